"""`coop-perception` command line. User mistakes print one line and exit with code 2."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import UserError, exit_code


def _positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f'must be > 0, got {text}')
        return value
    return parse


def _non_negative(kind):
    def parse(text):
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f'must be >= 0, got {text}')
        return value
    return parse


# ----------------------------------------------------------------------------- data commands
def cmd_synth(args) -> int:
    from .data.synth import PRESETS, ScenarioConfig, generate

    preset = PRESETS[args.preset] if args.preset else {}
    scenes = args.scenes or preset.get('scenes', 1)
    cfg = ScenarioConfig(seed=args.seed if args.seed is not None else preset.get('seed', 0),
                         vehicles=args.agents - 1,
                         frames=args.frames or preset.get('frames', 40),
                         rate_hz=args.rate)
    out = Path(args.out)
    if (out / args.version).exists() and not args.overwrite:
        raise UserError(out / args.version, 'already exists (use --overwrite to replace it)')
    n = generate(out, scenes, cfg, args.version, progress=not args.quiet)
    print(f'wrote {scenes} scene(s) x {cfg.frames} frames, {n} LiDAR scans to {out}')
    return 0


def cmd_info(args) -> int:
    from .data.stats import format_summary, summarize
    from .data.v2xsim import V2XSimDataset

    summary = summarize(V2XSimDataset(args.data, args.version))
    print(format_summary(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


def cmd_plot(args) -> int:
    from .data.v2xsim import V2XSimDataset
    from .eval.bev_plot import plot_sample

    ds = V2XSimDataset(args.data, args.version)
    plot_sample(ds.sample(args.scene, args.frame), args.out, extent=args.extent)
    print(f'wrote {args.out}')
    return 0


def cmd_demo(args) -> int:
    # imported here: the demo's recorder imports rclpy, which no other command needs
    from .ros.demo import DemoSettings, LiveRunSettings, format_report, run_demo

    settings = DemoSettings(out=Path(args.out), latency_ms=args.latency_ms,
                            live=LiveRunSettings(rate=args.rate, collaborator_nice=args.nice))
    print(format_report(run_demo(settings)))
    return 0


def cmd_bench_data(args) -> int:
    from .eval.bench_data import bench_synth

    result = bench_synth(frames=args.frames, seed=args.seed)
    print(f"{'stage':<28}{'median ms':>10}")
    print(f"{'ray cast + annotation/scan':<28}{result['median_ms']['agent_scan']:>10.1f}")
    print(f"{'read one scan':<28}{result['median_ms']['read_scan']:>10.2f}")
    print(f"({result['scans']} agent-scans, {result['points_per_scan']} points per scan, seed {args.seed})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


# ----------------------------------------------------------------------------- detector commands
MODELS = Path(__file__).resolve().parents[2] / 'models'


def _detector_config(args):
    from .detection import load_config
    from .detection.config import with_overrides

    cfg = load_config(args.config)
    if getattr(args, 'iterations', None):
        cfg = with_overrides(cfg, train={'iterations': args.iterations})
    return cfg


def _load_detector(args):
    from .detection import apply_threads, load_detector

    if not Path(args.weights).exists():
        raise UserError(args.weights, 'detector checkpoint not found (train one with `train detector`)')
    model = load_detector(args.weights, args.config)
    apply_threads(model.cfg)
    return model


def cmd_train_detector(args) -> int:
    from .data.v2xsim import V2XSimDataset
    from .detection import apply_threads
    from .detection.dataset import AgentViewExamples
    from .detection.train import train

    cfg = _detector_config(args)
    apply_threads(cfg)
    examples = AgentViewExamples(V2XSimDataset(args.data, args.version))
    print(f'training on {len(examples)} agent views from {args.data} -> {args.out}')
    summary = train(cfg, examples, args.out, resume=not args.restart)
    print(f'wrote {summary.weights} after {summary.iterations} iterations; losses {summary.final_losses}')
    return 0


def cmd_eval_detector(args) -> int:
    from .data.v2xsim import V2XSimDataset
    from .detection.dataset import AgentViewExamples
    from .detection.evaluate import evaluate_detector
    from .eval.ap import format_ap_table

    model = _load_detector(args)
    agents = [int(a) for a in args.agents.split(',')] if args.agents else None
    examples = AgentViewExamples(V2XSimDataset(args.data, args.version), agents=agents)
    result = evaluate_detector(model, examples, max_range=args.range)
    print(format_ap_table(result))
    q = result['uncertainty']
    print(f"uncertainty AUROC (false vs true positives at IoU {q['iou']}, "
          f"{q['true_positives']} TP / {q['false_positives']} FP):")
    for name, value in q['auroc'].items():
        print(f'  {name:<8} {value:.3f}' if value is not None else f'  {name:<8} n/a')
    print(f"  score    {q['score_auroc']:.3f}  (reference: the detection score itself)"
          if q['score_auroc'] is not None else '')
    for name, rho in q['error_spearman'].items():
        print(f'  Spearman({name}, squared centre error on TPs) = {rho:.3f}' if rho is not None else '')
    print(f"median latency {result['latency_ms']['median']:.1f} ms over {result['frames']} scans")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def cmd_bench_detector(args) -> int:
    from .data.synth import Scenario, ScenarioConfig
    from .detection.bench import STAGES, bench_detector

    model = _load_detector(args)
    scenario = Scenario(ScenarioConfig(seed=args.seed, frames=args.scans // 5 + 1))
    scans = [s.points[:, :4] for f in scenario.frames() for s in f.scans][:args.scans]
    result = bench_detector(model, scans)
    print(f"{'stage':<16}{'median ms':>10}{'p90 ms':>10}")
    for stage in STAGES:
        print(f"{stage:<16}{result['median_ms'][stage]:>10.1f}{result['p90_ms'][stage]:>10.1f}")
    print(f"({result['scans']} synthetic 32-beam scans, seed {args.seed}, "
          f"{model.cfg.runtime.threads or 'all'} thread(s))")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


# ----------------------------------------------------------------------------- fusion commands
def _feature_cache(args, model, ds):
    from .eval.fusion_eval import feature_cache

    cache, written = feature_cache(ds, model, args.weights, args.cache or Path(args.data) / 'feature_cache')
    if written:
        print(f'cached {written} new agent views in {cache.root}')
    return cache


def cmd_train_fusion(args) -> int:
    from .data.v2xsim import V2XSimDataset
    from .fusion.train import FusionExamples, FusionTrainConfig, train_fusion

    model = _load_detector(args)
    ds = V2XSimDataset(args.data, args.version)
    examples = FusionExamples(ds, _feature_cache(args, model, ds))
    cfg = FusionTrainConfig(**({'iterations': args.iterations} if args.iterations else {}))
    print(f'training fusion on {len(examples)} ego frames -> {args.out}')
    path = train_fusion(model, examples, args.out, cfg, resume=not args.restart)
    print(f'wrote {path}')
    return 0


def _fusion_models(args, methods) -> tuple:
    """The trust fusion checkpoint and the calibrated gate that ``methods`` need (else None)."""
    import yaml

    from .fusion.model import FusionModel

    fusion = gate = None
    if {'trust', 'gate'} & set(methods):
        if not Path(args.fusion).exists():
            raise UserError(args.fusion, 'fusion checkpoint not found (train one with `train fusion`)')
        fusion = FusionModel.load(args.fusion)
    if 'gate' in methods:
        if not Path(args.gate).exists():
            raise UserError(args.gate, 'trust gate not found (make one with `calibrate trust`)')
        gate = yaml.safe_load(Path(args.gate).read_text())
    return fusion, gate


def cmd_bench_fusion(args) -> int:
    from .data.v2xsim import V2XSimDataset
    from .eval.bench_fusion import STAGES, bench_fusion

    model = _load_detector(args)
    fusion, gate = _fusion_models(args, [args.method])
    ds = V2XSimDataset(args.data, args.version)
    cache = _feature_cache(args, model, ds)
    result = bench_fusion(ds, model, cache, fusion, method=args.method, ego=args.ego, frames=args.frames, gate=gate)
    print(f"{'stage':<16}{'median ms':>10}{'p90 ms':>10}")
    for stage in STAGES:
        if result['median_ms'][stage] is not None:
            print(f"{stage:<16}{result['median_ms'][stage]:>10.1f}{result['p90_ms'][stage]:>10.1f}")
    print(f"(method {args.method}, ego {args.ego} + {result['collaborators']:.1f} collaborators on average, "
          f"{result['frames']} frames of {args.data}, {model.cfg.runtime.threads or 'all'} thread(s); "
          'the detectors are not timed)')
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def cmd_eval_fusion(args) -> int:
    from .data.v2xsim import V2XSimDataset
    from .eval.fusion_eval import evaluate_fusion, format_results
    from .fusion.pipeline import METHODS

    methods = args.methods.split(',')
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise UserError('--methods', f'unknown method(s) {", ".join(sorted(unknown))}; choose from {", ".join(METHODS)}')
    try:
        delays = [float(d) for d in args.delays.split(',')]
    except ValueError:
        raise UserError('--delays', f'expected comma-separated milliseconds, got {args.delays!r}') from None
    model = _load_detector(args)
    fusion, gate = _fusion_models(args, methods)
    ds = V2XSimDataset(args.data, args.version)
    cache = _feature_cache(args, model, ds)
    egos = [int(e) for e in args.egos.split(',')] if args.egos else None
    result = evaluate_fusion(ds, model, cache, fusion, methods, delays, channel_model=args.channel,
                             seed=args.seed, max_range=args.range, egos=egos, gate=gate)
    print(format_results(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def cmd_calibrate_trust(args) -> int:
    import yaml

    from .data.v2xsim import V2XSimDataset
    from .fusion.calibrate import calibrate_gate

    model = _load_detector(args)
    ds = V2XSimDataset(args.data, args.version)
    gate, summary = calibrate_gate(ds, _feature_cache(args, model, ds), model.cfg.classes, quantile=args.quantile)
    Path(args.out).write_text(
        f'# Trust gate calibrated on {args.data} (quantile {args.quantile} of true-positive uncertainty).\n'
        + yaml.safe_dump(gate.to_dict(), sort_keys=False))
    print(yaml.safe_dump({'gate': gate.to_dict(), 'calibration': summary}, sort_keys=False))
    print(f'wrote {args.out}')
    return 0


def _run_folder_args(p, iterations_help: str):
    """A resumable training run's options."""
    p.add_argument('--out', required=True, help='run folder: checkpoints, log, final weights')
    p.add_argument('--iterations', type=_positive(int), help=iterations_help)
    p.add_argument('--restart', action='store_true', help='ignore an existing checkpoint in --out')


def _fusion_model_args(p):
    p.add_argument('--fusion', default=str(MODELS / 'fusion.pt'), help='trust fusion checkpoint')
    p.add_argument('--gate', default=str(MODELS / 'trust_gate.yaml'), help="calibrated gate for method 'gate'")


def _cache_arg(p):
    p.add_argument('--cache', help='feature cache folder (default: DATA/feature_cache), one subfolder per '
                                   'detector; built if missing')


def _detector_args(p, weights: bool = True):
    p.add_argument('--config', default=str(MODELS / 'detector.yaml'), help='detector config YAML')
    if weights:
        p.add_argument('--weights', default=str(MODELS / 'detector.pt'), help='detector checkpoint')


def build_parser() -> argparse.ArgumentParser:
    from .data.synth import PRESETS
    from .data.v2xsim import DEFAULT_VERSION

    parser = argparse.ArgumentParser(prog='coop-perception', description=__doc__)
    sub = parser.add_subparsers(dest='command', required=True)

    p = sub.add_parser('synth', help='generate synthetic multi-agent V2X scenes (V2X-Sim format)')
    p.add_argument('--out', required=True, help='dataset root to write')
    p.add_argument('--preset', choices=sorted(PRESETS), help='named split with its own seed and size')
    p.add_argument('--scenes', type=_positive(int), help='number of scenes')
    p.add_argument('--frames', type=_positive(int), help='frames per scene')
    p.add_argument('--agents', type=_positive(int), default=5,
                   help='agents incl. the road-side unit (agent 0); default 5')
    p.add_argument('--seed', type=int, help='random seed (default: the preset\'s, else 0)')
    p.add_argument('--rate', type=_positive(float), default=10.0, help='LiDAR rate in Hz')
    p.add_argument('--version', default=DEFAULT_VERSION, help='metadata folder name')
    p.add_argument('--overwrite', action='store_true', help='replace an existing dataset')
    p.add_argument('--quiet', action='store_true', help='no progress bar')
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser('info', help='summarise a V2X-Sim-format dataset')
    p.add_argument('data', help='dataset root')
    p.add_argument('--version', default=DEFAULT_VERSION)
    p.add_argument('--json', help='also write the summary as JSON here')
    p.set_defaults(func=cmd_info)

    p = sub.add_parser('plot', help="bird's-eye view of one frame: points by agent, boxes, poses")
    p.add_argument('data', help='dataset root')
    p.add_argument('--scene', type=int, default=0, help='scene index')
    p.add_argument('--frame', type=int, default=0, help='frame index within the scene')
    p.add_argument('--out', required=True, help='PNG to write')
    p.add_argument('--extent', type=_positive(float), default=80.0, help='half width of the view, m')
    p.add_argument('--version', default=DEFAULT_VERSION)
    p.set_defaults(func=cmd_plot)

    bench = sub.add_parser('bench', help='speed benchmarks (print tables)').add_subparsers(
        dest='target', required=True)
    p = bench.add_parser('data', help='synthetic scan generation and scan reading')
    p.add_argument('--frames', type=_positive(int), default=20)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--json', help='also write the numbers as JSON here')
    p.set_defaults(func=cmd_bench_data)
    from .ros import replay_bench
    p = bench.add_parser('replay', help='replay a bag at 1x into a subscriber: lateness, drops, codec cost')
    replay_bench.add_arguments(p)
    p.set_defaults(func=replay_bench.run)

    from .data.bag import add_cli as add_bag_cli
    from .ros.bag_player import add_cli as add_play_cli

    from .ros.launcher import add_cli as add_launch_cli

    add_bag_cli(sub)
    add_play_cli(sub)
    add_launch_cli(sub)

    p = bench.add_parser('detector', help='per-stage detector latency on synthetic scans')
    _detector_args(p)
    p.add_argument('--scans', type=_positive(int), default=60, help='scans to time (median over them)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--json', help='also write the numbers as JSON here')
    p.set_defaults(func=cmd_bench_detector)

    p = bench.add_parser('fusion', help='per-stage latency of fusing one ego frame with its collaborators')
    p.add_argument('--data', required=True, help='dataset root (the test preset)')
    _cache_arg(p)
    p.add_argument('--method', default='trust', choices=('max', 'trust', 'gate'))
    p.add_argument('--ego', type=int, default=1, help='ego agent')
    p.add_argument('--frames', type=_positive(int), default=60, help='ego frames to time (median over them)')
    _fusion_model_args(p)
    p.add_argument('--json', help='also write the numbers as JSON here')
    p.add_argument('--version', default=DEFAULT_VERSION)
    _detector_args(p)
    p.set_defaults(func=cmd_bench_fusion)

    train = sub.add_parser('train', help='train a model').add_subparsers(dest='target', required=True)
    p = train.add_parser('detector', help='train the LiDAR detector on every agent view (resumable)')
    p.add_argument('--data', required=True, help='training dataset root (the train preset)')
    _run_folder_args(p, 'override train.iterations')
    p.add_argument('--version', default=DEFAULT_VERSION)
    _detector_args(p, weights=False)
    p.set_defaults(func=cmd_train_detector)

    evaluate = sub.add_parser('eval', help='evaluate (prints tables)').add_subparsers(dest='target', required=True)
    p = evaluate.add_parser('detector', help='single-agent AP and uncertainty quality')
    p.add_argument('--data', required=True, help='dataset root (the test preset)')
    p.add_argument('--range', type=_positive(float), default=50.0, help='evaluate boxes within this of the sensor, m')
    p.add_argument('--agents', help='comma-separated agent ids (default: all, RSU included)')
    p.add_argument('--json', help='also write the results as JSON here')
    p.add_argument('--version', default=DEFAULT_VERSION)
    _detector_args(p)
    p.set_defaults(func=cmd_eval_detector)

    p = train.add_parser('fusion', help='train the trust fusion on cached detector features (resumable)')
    p.add_argument('--data', required=True, help='training dataset root (the train preset)')
    _cache_arg(p)
    _run_folder_args(p, 'training iterations')
    p.add_argument('--version', default=DEFAULT_VERSION)
    _detector_args(p)
    p.set_defaults(func=cmd_train_fusion)

    p = evaluate.add_parser('fusion', help='AP of every fusion method under communication delay')
    p.add_argument('--data', required=True, help='dataset root (the test preset)')
    _cache_arg(p)
    p.add_argument('--delays', default='0,100,200,300,500', help='mean latencies to sweep, ms')
    p.add_argument('--methods', default='ego,late,early,max,trust', help='comma-separated fusion methods')
    p.add_argument('--channel', default='uniform', help='latency model (uniform, fixed, bernoulli_frames)')
    p.add_argument('--seed', type=int, default=0, help='channel seed')
    p.add_argument('--egos', help='comma-separated ego agents (default: every vehicle in turn)')
    p.add_argument('--range', type=_positive(float), default=50.0, help='evaluate within this of the ego, m')
    _fusion_model_args(p)
    p.add_argument('--json', help='also write the results as JSON here')
    p.add_argument('--version', default=DEFAULT_VERSION)
    _detector_args(p)
    p.set_defaults(func=cmd_eval_fusion)

    calibrate = sub.add_parser('calibrate', help='calibrate on validation data').add_subparsers(
        dest='target', required=True)
    p = calibrate.add_parser('trust', help='thresholds of the trust gate from validation true positives')
    p.add_argument('--data', required=True, help='validation dataset root (the val preset)')
    _cache_arg(p)
    p.add_argument('--quantile', type=float, default=0.95, help='quantile of true-positive uncertainty')
    p.add_argument('--out', default=str(MODELS / 'trust_gate.yaml'), help='gate YAML to write')
    p.add_argument('--version', default=DEFAULT_VERSION)
    _detector_args(p)
    p.set_defaults(func=cmd_calibrate_trust)

    p = sub.add_parser('demo', help='the whole system live on a synthetic scene, vs offline evaluation (make demo)',
                       description='Generate (or reuse) a 5-agent synthetic scene, record it as a bag, replay it '
                                   'through real ROS processes, record and score the fused output against the '
                                   'ground truth and against offline `eval fusion`, draw it.')
    p.add_argument('--out', default='out/demo', help='output folder (default out/demo)')
    p.add_argument('--rate', type=_positive(float), default=0.1,
                   help='replay speed factor (default 0.1: on 2 shared cores every detector keeps up, so the '
                        'live run sees the scans offline evaluation sees)')
    p.add_argument('--latency-ms', type=_non_negative(float), default=200.0,
                   help='mean V2X latency of the uniform channel, ms (default 200)')
    p.add_argument('--nice', type=_non_negative(int), default=10,
                   help="niceness added to the collaborators' detectors so that the ego's keeps its frames "
                        '(default 10; 0: none)')
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return exit_code(lambda: args.func(args))


if __name__ == '__main__':
    sys.exit(main())
