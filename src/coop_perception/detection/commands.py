"""Commands of the detector: ``train detector``, ``bench detector``; and the detector that any
command loads from its ``--config`` / ``--weights`` options."""
from __future__ import annotations

from coop_perception.commands import (Commands, add_detector_args, add_json, add_run_folder_args, positive,
                                      print_stage_table, reading, require_checkpoint, write_json)
from coop_perception.data.commands import add_dataset_args, dataset_from_args
from coop_perception.torch_device import resolve_device


def add_cli(commands: Commands) -> None:
    p = commands.add('detector', cmd_train_detector, 'train the LiDAR detector on every agent view (resumable)',
                     group='train')
    add_dataset_args(p, 'the train preset')
    add_run_folder_args(p, 'override train.iterations')
    add_detector_args(p, weights=False)
    p.add_argument('--init', metavar='WEIGHTS',
                   help='start from these detector weights (fine-tuning; the config\'s train section sets the '
                        'schedule); a checkpoint already in --out is resumed instead')
    p.add_argument('--lr', type=positive(float), help='override train.lr (peak learning rate)')
    p.add_argument('--warmup', type=positive(int), help='override train.warmup_iterations')

    p = commands.add('detector', cmd_bench_detector, 'per-stage detector latency on synthetic scans', group='bench')
    add_detector_args(p)
    p.add_argument('--scans', type=positive(int), default=60, help='scans to time (median over them)')
    p.add_argument('--seed', type=int, default=0)
    add_json(p, 'the numbers')


def detector_from_args(args):
    """The detector of ``--weights`` and ``--config``, its torch threads applied."""
    from .checkpoint import load_detector
    from .model import apply_threads

    require_checkpoint(args.weights, 'detector checkpoint', ' (train one with `train detector`)')
    device = resolve_device(args.device)
    with reading(args.weights, 'detector checkpoint'):
        model = load_detector(args.weights, args.config)
    apply_threads(model.cfg)
    return model.to(device)


def cmd_train_detector(args) -> int:
    from .config import load_config, with_overrides
    from .dataset import AgentViewExamples
    from .model import apply_threads
    from .train import train

    cfg = load_config(args.config)
    schedule = {key: value for key, value in (('iterations', args.iterations), ('lr', args.lr),
                                              ('warmup_iterations', args.warmup)) if value}
    if schedule:
        cfg = with_overrides(cfg, train=schedule)
    apply_threads(cfg)
    examples = AgentViewExamples(dataset_from_args(args), sweeps=cfg.voxel.sweeps,
                                 max_age_s=cfg.voxel.sweep_max_age_s)
    if args.init:
        require_checkpoint(args.init, 'detector checkpoint', '')
    print(f'training on {len(examples)} agent views from {args.data} -> {args.out}'
          + (f', starting from {args.init}' if args.init else ''))
    summary = train(cfg, examples, args.out, resume=not args.restart, device=resolve_device(args.device),
                    init=args.init)
    print(f'wrote {summary.weights} after {summary.iterations} iterations; losses {summary.final_losses}')
    return 0


def cmd_bench_detector(args) -> int:
    from coop_perception.data.synth import Scenario, ScenarioConfig

    from .bench import STAGES, bench_detector
    from .sweeps import SweepHistory

    model = detector_from_args(args)
    # every agent's scans stacked on its previous ones, as its lidar_detector node does
    history: dict = {}
    sweeps = max(model.cfg.sweeps_needed, 1)
    scenario = Scenario(ScenarioConfig(seed=args.seed, frames=args.scans // 5 + sweeps))
    scans = []
    for f in scenario.frames():
        for s in f.scans:
            hist = history.setdefault(s.agent_id, SweepHistory(sweeps, model.cfg.sweep_max_age_s))
            stacked = hist.stack(s.points[:, :4], s.T_world_ego @ s.T_ego_sensor, s.timestamp_us * 1000)
            if f.index >= sweeps - 1:   # every timed scan has its full history
                scans.append(stacked)
    result = bench_detector(model, scans[:args.scans])
    print_stage_table(result, STAGES)
    print(f"({result['scans']} synthetic 32-beam scans, each with the {sweeps - 1} before it, seed {args.seed}, "
          f"{model.cfg.runtime.threads or 'all'} thread(s))")
    write_json(args, result)
    return 0
