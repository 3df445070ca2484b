"""Commands of the evaluation: ``eval detector``, ``eval fusion``, ``bench fusion``,
``calibrate trust`` and ``plot``."""
from __future__ import annotations

from pathlib import Path

from coop_perception.commands import (MODELS, Commands, add_cache_arg, add_detector_args, add_fusion_model_args,
                                      add_json, non_negative, output_file, positive, print_stage_table, reading,
                                      require_checkpoint, write_json)
from coop_perception.data.channel import MEAN_LATENCY_MODELS
from coop_perception.data.commands import add_dataset_args, add_reading_args, dataset_from_args
from coop_perception.errors import UserError
from coop_perception.fusion.codec import FeatureMessage
from coop_perception.fusion.methods import METHODS
from coop_perception.fusion.sharing import DEFAULT_SHARING, SHARING_FORMATS

FEATURE_METHODS = tuple(name for name, m in METHODS.items() if m.payload is FeatureMessage)
DEFAULT_METHODS = 'ego,late,early,max,trust'
ATTACKS = ('phantom', 'shift', 'drop', 'replay')   # eval.attack_eval.ATTACKS, without importing torch here


def add_cli(commands: Commands) -> None:
    p = commands.add('detector', cmd_eval_detector, 'single-agent AP and uncertainty quality', group='eval')
    add_dataset_args(p, 'the test preset')
    p.add_argument('--range', type=positive(float), default=50.0, help='evaluate boxes within this of the sensor, m')
    p.add_argument('--agents', help='comma-separated agent ids (default: all, RSU included)')
    add_json(p)
    add_detector_args(p)

    _add_eval_fusion(commands)

    p = commands.add('delay-oracles', cmd_delay_oracles, 'where AP goes under delay: ground truth swapped in, one '
                     'part at a time (a diagnosis)', group='eval')
    add_dataset_args(p, 'the val preset: a diagnosis, not a result')
    add_cache_arg(p)
    p.add_argument('--delay', type=positive(float), default=300.0, help='mean latency, ms (default 300)')
    p.add_argument('--channel', default='uniform', choices=MEAN_LATENCY_MODELS, help='latency model')
    p.add_argument('--seed', type=int, default=0, help='channel seed')
    p.add_argument('--egos', help='comma-separated ego agents (default: every vehicle in turn)')
    p.add_argument('--range', type=positive(float), default=50.0, help='evaluate within this of the ego, m')
    add_fusion_model_args(p)
    add_json(p)
    add_detector_args(p)

    p = commands.add('fusion', cmd_bench_fusion, 'per-stage latency of fusing one ego frame with its collaborators',
                     group='bench')
    add_dataset_args(p, 'the test preset')
    add_cache_arg(p)
    p.add_argument('--method', default='trust', choices=FEATURE_METHODS, help='a method fusing feature messages')
    p.add_argument('--ego', type=int, default=1, help='ego agent')
    p.add_argument('--frames', type=positive(int), default=60, help='ego frames to time (median over them)')
    p.add_argument('--ego-map', action='store_true',
                   help="give the ego's frames as trust_fusion gets them (an int8 map without boxes)")
    add_fusion_model_args(p)
    add_json(p, 'the numbers')
    add_detector_args(p)

    p = commands.add('trust', cmd_calibrate_trust, 'thresholds of the trust gate from validation true positives',
                     group='calibrate')
    add_dataset_args(p, 'the val preset')
    add_cache_arg(p)
    p.add_argument('--quantile', type=float, default=0.95, help='quantile of true-positive uncertainty')
    p.add_argument('--out', type=output_file, default=str(MODELS / 'trust_gate.yaml'), help='gate YAML to write')
    add_detector_args(p)

    p = commands.add('box-trust', cmd_calibrate_box_trust, "the trust fusion's box trust from validation outcomes "
                     'under delay; written into the fusion checkpoint', group='calibrate')
    add_dataset_args(p, 'the val preset')
    add_cache_arg(p)
    p.add_argument('--fusion', default=str(MODELS / 'fusion.pt'), help='trust fusion checkpoint to calibrate')
    p.add_argument('--out', type=output_file, help='checkpoint to write (default: --fusion, in place)')
    add_json(p, 'the calibration summary')
    add_detector_args(p)

    p = commands.add('plot', cmd_plot, "bird's-eye view of one frame: points by agent, boxes, poses")
    p.add_argument('data', help='dataset root')
    p.add_argument('--scene', type=int, default=0, help='scene index')
    p.add_argument('--frame', type=int, default=0, help='frame index within the scene')
    p.add_argument('--out', required=True, type=output_file, help='PNG to write')
    p.add_argument('--extent', type=positive(float), default=80.0, help='half width of the view, m')
    add_reading_args(p)


def _add_eval_fusion(commands: Commands) -> None:
    p = commands.add('fusion', cmd_eval_fusion, 'AP of every fusion method under communication delay', group='eval')
    add_dataset_args(p, 'the test preset')
    add_cache_arg(p)
    p.add_argument('--delays', default='0,100,200,300,500', help='mean latencies to sweep, ms')
    p.add_argument('--methods', help=f'comma-separated fusion methods, of: {", ".join(METHODS)} (default: '
                                     f'{DEFAULT_METHODS}; with --attack: trust)')
    p.add_argument('--channel', default='uniform', choices=MEAN_LATENCY_MODELS, help='latency model')
    p.add_argument('--seed', type=int, default=0, help='channel seed (and, with --attack, attacker and attack seed)')
    p.add_argument('--egos', help='comma-separated ego agents (default: every vehicle in turn)')
    p.add_argument('--range', type=positive(float), default=50.0, help='evaluate within this of the ego, m')
    p.add_argument('--plot', metavar='FILE.png', type=output_file,
                   help='also draw AP@0.7 against the mean latency for every method')
    p.add_argument('--bootstrap', type=non_negative(int), default=1000, metavar='N',
                   help='resamples of the scenes for 90 %% intervals of trust - late and trust - '
                        'trust_flat (car AP@0.7, paired); 0: none')
    p.add_argument('--sharing', help=f'comma-separated wire layouts of the feature messages, of: '
                                     f'{", ".join(SHARING_FORMATS)} (default: {DEFAULT_SHARING}); '
                                     f'each a row of its own')
    p.add_argument('--budgets', help='comma-separated byte budgets per collaborator frame to sweep, each a row '
                                     "of its own (0: no limit; default: each layout's own)")
    p.add_argument('--plot-bytes', metavar='FILE.png', type=output_file,
                   help='also draw AP@0.7 against the bytes per collaborator frame (with --sharing/--budgets)')
    _add_attack_args(p)
    add_fusion_model_args(p)
    add_json(p)
    add_detector_args(p)


def _add_attack_args(p) -> None:
    p.add_argument('--attack', help=f'misbehaving collaborators instead: comma-separated attacks of '
                                    f'{", ".join(ATTACKS)} or all; one collaborator per scene and ego attacks, '
                                    'and the reputation check is scored (detection and false-alarm rates, AP '
                                    'with and without it and with the attacker excluded)')
    p.add_argument('--pose-noise', default='0.2,0.5',
                   help="with --attack: also rows with every collaborator's pose noisy, comma-separated sigmas "
                        "(m on x and y, the same number in degrees on yaw), or 'none'")


def _comma_list(option: str, text: str, kind, what: str) -> list:
    try:
        return [kind(v) for v in text.split(',')]
    except ValueError:
        raise UserError(option, f'expected comma-separated {what}, got {text!r}') from None


def _fusion_setup(args, methods: list[str]) -> tuple:
    """What a fusion command loads from its options: (detector, fusion model, gate settings,
    dataset, feature cache); the fusion model and gate only where ``methods`` need them."""
    from coop_perception.detection.commands import detector_from_args
    from coop_perception.fusion.commands import feature_cache_from_args, fusion_models_from_args

    if any(METHODS[m].needs_fusion_model for m in methods):
        require_checkpoint(args.fusion, 'fusion checkpoint', ' (train one with `train fusion`)')
    model = detector_from_args(args)
    with reading(args.fusion, 'fusion checkpoint'):
        fusion, gate = fusion_models_from_args(args, model, methods)
    ds = dataset_from_args(args)
    return model, fusion, gate, ds, feature_cache_from_args(args, model, ds)


def cmd_eval_detector(args) -> int:
    from coop_perception.detection.commands import detector_from_args
    from coop_perception.detection.dataset import AgentViewExamples

    from .ap import format_ap_table
    from .detector_eval import FALSE_POSITIVE_SCORE, evaluate_detector

    model = detector_from_args(args)
    agents = _comma_list('--agents', args.agents, int, 'agent ids') if args.agents else None
    examples = AgentViewExamples(dataset_from_args(args), agents=agents, sweeps=model.cfg.voxel.sweeps,
                                 max_age_s=model.cfg.voxel.sweep_max_age_s)
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
    fp = result['false_positives_per_scan']
    print(f'false positives per scan (score >= {FALSE_POSITIVE_SCORE}, no ground truth at IoU {q["iou"]}): '
          + ', '.join(f'{name} {value:.2f}' for name, value in fp.items()))
    for name, kinds in result['false_positive_kinds_per_scan'].items():
        print(f'  {name:<10} ' + ', '.join(f"{kind.replace('_', ' ')} {value:.2f}" for kind, value in kinds.items()))
    print(f"median latency {result['latency_ms']['median']:.1f} ms over {result['frames']} scans")
    write_json(args, result)
    return 0


def cmd_eval_fusion(args) -> int:
    from .fusion_eval import evaluate_fusion, evaluate_sharing, format_results

    methods = (args.methods or ('trust' if args.attack else DEFAULT_METHODS)).split(',')
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise UserError('--methods', f'unknown method(s) {", ".join(sorted(unknown))}; '
                                     f'choose from {", ".join(METHODS)}')
    delays = _comma_list('--delays', args.delays, float, 'milliseconds')
    egos = _comma_list('--egos', args.egos, int, 'agent ids') if args.egos else None
    if args.attack:
        return _eval_attacks(args, methods, delays, egos)
    policies = _sharing_policies(args)
    model, fusion, gate, ds, cache = _fusion_setup(args, methods)
    common = dict(channel_model=args.channel, seed=args.seed, max_range=args.range, egos=egos, gate=gate,
                  bootstrap=args.bootstrap)
    result = (evaluate_fusion(ds, model, cache, fusion, methods, delays, **common) if policies is None
              else evaluate_sharing(ds, model, cache, fusion, methods, delays, policies, **common))
    print(format_results(result))
    write_json(args, result)
    from .delay_plot import plot_bytes_sweep, plot_delay_sweep

    if args.plot:
        print(f'wrote {plot_delay_sweep(result, args.plot)}')
    if args.plot_bytes:
        print(f'wrote {plot_bytes_sweep(result, args.plot_bytes)}')
    return 0


def _sharing_policies(args) -> list[dict] | None:
    """The roi policies ``--sharing`` and ``--budgets`` sweep, None for neither."""
    if not (args.sharing or args.budgets):
        if args.plot_bytes:
            raise UserError('--plot-bytes', 'needs --sharing or --budgets to sweep')
        return None
    layouts = _comma_list('--sharing', args.sharing, str, 'layouts') if args.sharing else [DEFAULT_SHARING]
    unknown = set(layouts) - set(SHARING_FORMATS)
    if unknown:
        raise UserError('--sharing', f'unknown layout(s) {", ".join(sorted(unknown))}; '
                                     f'choose from {", ".join(SHARING_FORMATS)}')
    if not args.budgets:
        return [{'format': layout} for layout in layouts]
    budgets = _comma_list('--budgets', args.budgets, int, 'byte counts')
    if any(b < 0 for b in budgets):
        raise UserError('--budgets', f'byte budgets must be >= 0 (0: no limit), got {args.budgets}')
    return [{'format': layout, 'max_bytes': b or None} for layout in layouts for b in budgets]


def _eval_attacks(args, methods: list[str], delays: list[float], egos) -> int:
    from coop_perception.fusion.payloads import BoxList

    from .attack_eval import evaluate_attacks, format_attacks

    attacks = list(ATTACKS) if args.attack == 'all' else args.attack.split(',')
    if set(attacks) - set(ATTACKS):
        raise UserError('--attack', f'unknown attack(s) {", ".join(sorted(set(attacks) - set(ATTACKS)))}; '
                                    f'choose from {", ".join(ATTACKS)} or all')
    no_boxes = [m for m in methods if METHODS[m].payload not in (FeatureMessage, BoxList)]
    if no_boxes:
        raise UserError('--methods', f'{", ".join(no_boxes)}: collaborators send no boxes or features to attack '
                                     'or check; with --attack use methods that share features or boxes')
    noise = [] if args.pose_noise == 'none' else _comma_list('--pose-noise', args.pose_noise, float, 'sigmas')
    if any(not s > 0 for s in noise):
        raise UserError('--pose-noise', f'sigmas must be > 0, got {args.pose_noise}')
    model, fusion, gate, ds, cache = _fusion_setup(args, methods)
    runs = []
    for method in methods:
        for delay in delays:
            result = evaluate_attacks(ds, model, cache, fusion, method, delay, attacks, pose_noise=noise,
                                      channel_model=args.channel, seed=args.seed, max_range=args.range, egos=egos,
                                      gate=gate)
            print(format_attacks(result))
            runs.append(result)
    write_json(args, runs[0] if len(runs) == 1 else {'runs': runs})
    return 0


def cmd_delay_oracles(args) -> int:
    from .delay_diagnosis import ROWS, diagnose_delay, format_diagnosis, velocity_errors

    egos = _comma_list('--egos', args.egos, int, 'agent ids') if args.egos else None
    model, fusion, _, ds, cache = _fusion_setup(args, sorted({name for name, _, _ in ROWS}))
    result = diagnose_delay(ds, model, cache, fusion, args.delay, channel_model=args.channel, seed=args.seed,
                            max_range=args.range, egos=egos)
    result['velocity_error'] = velocity_errors(ds, cache)
    print(format_diagnosis(result))
    write_json(args, result)
    return 0


def cmd_bench_fusion(args) -> int:
    from .bench_fusion import STAGES, bench_fusion

    model, fusion, gate, ds, cache = _fusion_setup(args, [args.method])
    result = bench_fusion(ds, model, cache, fusion, method=args.method, ego=args.ego, frames=args.frames, gate=gate,
                          ego_map=args.ego_map)
    print_stage_table(result, STAGES)
    print(f"(method {args.method}, ego {args.ego} + {result['collaborators']:.1f} collaborators on average, "
          f"{result['frames']} frames of {args.data}, {model.cfg.runtime.threads or 'all'} thread(s); "
          'the detectors are not timed)')
    write_json(args, result)
    return 0


def cmd_calibrate_trust(args) -> int:
    import yaml

    from coop_perception.detection.commands import detector_from_args
    from coop_perception.fusion.commands import feature_cache_from_args

    from .gate_calibration import calibrate_gate

    model = detector_from_args(args)
    ds = dataset_from_args(args)
    gate, summary = calibrate_gate(ds, feature_cache_from_args(args, model, ds), model.cfg.classes,
                                   quantile=args.quantile)
    Path(args.out).write_text(
        f'# Trust gate calibrated on {args.data} (quantile {args.quantile} of true-positive uncertainty).\n'
        + yaml.safe_dump(gate.to_dict(), sort_keys=False))
    print(yaml.safe_dump({'gate': gate.to_dict(), 'calibration': summary}, sort_keys=False))
    print(f'wrote {args.out}')
    return 0


def cmd_calibrate_box_trust(args) -> int:
    import torch

    from coop_perception.detection.commands import detector_from_args
    from coop_perception.fusion.commands import feature_cache_from_args

    from .box_trust_calibration import calibrate_box_trust

    require_checkpoint(args.fusion, 'fusion checkpoint', ' (train one with `train fusion`)')
    with reading(args.fusion, 'fusion checkpoint'):
        ckpt = torch.load(args.fusion, map_location='cpu', weights_only=False)
    model = detector_from_args(args)
    ds = dataset_from_args(args)
    trust, summary = calibrate_box_trust(ds, model, feature_cache_from_args(args, model, ds))
    out = args.out or args.fusion
    torch.save({**ckpt, 'box_trust': {**trust.to_dict(), 'calibrated_on': str(args.data)}}, out)
    print(f"{summary['boxes']} ROI boxes ({summary['true_positives']} true positives at IoU {summary['iou']}), "
          f"messages up to {summary['delay_frames']} frames old; AUROC true vs false positives: box trust "
          f"{summary['auroc_trust']:.3f}, score alone {summary['auroc_score']:.3f}")
    print(f'wrote {out}')
    write_json(args, summary)
    return 0


def cmd_plot(args) -> int:
    from .bev_plot import plot_sample

    ds = dataset_from_args(args)
    plot_sample(ds.sample(args.scene, args.frame), args.out, extent=args.extent)
    print(f'wrote {args.out}')
    return 0
