"""Commands of the data layer: ``synth``, ``info``, ``to-bag``, ``bench data``."""
from __future__ import annotations

import argparse
from pathlib import Path

from coop_perception.commands import Commands, add_json, output_folder, positive, write_json
from coop_perception.errors import UserError

from .bag import STORAGES
from .mimic import MIMICS
from .sensor_profiles import DEFAULT_PROFILE, MIXED, PROFILES, parse_profiles
from .synth import PRESETS
from .v2xsim import DEFAULT_VERSION, OWN_LAYOUT, VERSIONS


def add_dataset_args(p: argparse.ArgumentParser, role: str) -> None:
    """``--data`` (a V2X-Sim-format dataset root, e.g. ``role`` 'the test preset') and the options
    of `add_reading_args`."""
    p.add_argument('--data', required=True, help=f'dataset root ({role})')
    add_reading_args(p)


def add_reading_args(p: argparse.ArgumentParser) -> None:
    """How to read the dataset of ``args.data``: ``--version``, ``--frame-period``."""
    p.add_argument('--version', help=f'metadata folder name (default: whichever of {" and ".join(VERSIONS)} exists)')
    p.add_argument('--frame-period', type=positive(float), metavar='SECONDS',
                   help='seconds per frame, for datasets whose timestamps count frames (real V2X-Sim)')


def dataset_from_args(args, check_sweeps: bool = False):
    """The `V2XSimDataset` of ``args.data`` read as `add_reading_args` says; ``check_sweeps``: every
    LiDAR file checked against its table row first (`V2XSimDataset`)."""
    from .v2xsim import V2XSimDataset

    return V2XSimDataset(args.data, args.version, frame_period_s=args.frame_period, check_sweeps=check_sweeps)


def lidar_profiles(text: str) -> tuple[str, ...]:
    """argparse type of ``--lidar``: the profile names (`sensor_profiles.parse_profiles`); an unknown
    one is a one-line UserError, not argparse's usage message."""
    try:
        return parse_profiles(text)
    except ValueError as err:
        raise UserError('--lidar', str(err)) from None


def height_range(text: str) -> tuple[float, float]:
    """argparse type of ``--sensor-height``: ``H`` or ``LOW:HIGH`` metres (> 0) -> (low, high)."""
    try:
        low, high = (float(v) for v in (text.split(':') if ':' in text else (text, text)))
    except ValueError:
        raise UserError('--sensor-height', f'expected metres H or LOW:HIGH, got {text!r}') from None
    if not 0 < low <= high < float('inf'):
        raise UserError('--sensor-height', f'need 0 < LOW <= HIGH, got {text!r}')
    return low, high


def clutter_density(text: str) -> float | tuple[float, float]:
    """argparse type of ``--clutter``: a density ``D`` or a range ``LOW:HIGH`` drawn per scene,
    within [0, 4]."""
    try:
        low, high = (float(v) for v in (text.split(':') if ':' in text else (text, text)))
    except ValueError:
        raise UserError('--clutter', f'expected a number D or LOW:HIGH, got {text!r}') from None
    if not 0 <= low <= high <= 4:
        raise UserError('--clutter', f'need 0 <= LOW <= HIGH <= 4, got {text!r}')
    return low if low == high else (low, high)


def add_cli(commands: Commands) -> None:
    p = commands.add('synth', cmd_synth, 'generate synthetic multi-agent V2X scenes (V2X-Sim format)')
    p.add_argument('--out', required=True, type=output_folder, help='dataset root to write')
    p.add_argument('--preset', choices=sorted(PRESETS), help='named split with its own seed and size')
    p.add_argument('--scenes', type=positive(int), help='number of scenes')
    p.add_argument('--frames', type=positive(int), help='frames per scene')
    p.add_argument('--agents', type=positive(int), default=5,
                   help='agents incl. the road-side unit (agent 0); default 5')
    p.add_argument('--seed', type=int, help='random seed (default: the preset\'s, else 0)')
    p.add_argument('--rate', type=positive(float), default=10.0, help='LiDAR rate in Hz')
    p.add_argument('--synchronous', action='store_true',
                   help='every agent captures at the frame time (default: each at its own phase)')
    p.add_argument('--lidar', type=lidar_profiles, default=(DEFAULT_PROFILE,), metavar='PROFILE',
                   help=f'LiDAR model: {", ".join(PROFILES)} (default {DEFAULT_PROFILE}); {MIXED} (all of them) '
                        'or a comma-separated list: each agent draws one per scene')
    p.add_argument('--sensor-height', type=height_range, metavar='H|LOW:HIGH',
                   help='vehicle LiDAR height above the ground in metres, or a range drawn per agent and '
                        'scene (default: each profile\'s; always above the vehicle\'s roof; the road-side unit '
                        'keeps its own)')
    p.add_argument('--own-body', action='store_true',
                   help='rays can hit the scanning vehicle\'s own body: roof/hood returns and a blind zone around it')
    p.add_argument('--clutter', type=clutter_density, metavar='D|LOW:HIGH',
                   help='street furniture and porous vegetation along the sidewalks: 1 is clutter-heavy (an item '
                        'every 6-7 m of each sidewalk band), 0 none, LOW:HIGH drawn per scene (default: the '
                        'preset\'s, else 0)')
    p.add_argument('--mimic', choices=sorted(MIMICS),
                   help='write the scenes as that producer lays them out (v2xsim-real: the real V2X-Sim 2.0 '
                        'download; implies --synchronous and --version v2.0)')
    p.add_argument('--version', help=f'metadata folder name (default: {DEFAULT_VERSION}, with --mimic its own)')
    p.add_argument('--overwrite', action='store_true', help='replace an existing dataset')
    p.add_argument('--quiet', action='store_true', help='no progress bar')

    p = commands.add('info', cmd_info, 'summarise a V2X-Sim-format dataset and the conventions it follows')
    p.add_argument('data', help='dataset root')
    add_reading_args(p)
    add_json(p, 'the summary')

    p = commands.add('to-bag', cmd_to_bag, 'record a scene of a V2X-Sim-format dataset as a rosbag2 bag')
    p.add_argument('data', help='dataset root (real V2X-Sim or `coop-perception synth` output)')
    p.add_argument('--scene', default='0', help='scene name or index (default: 0)')
    p.add_argument('--out', required=True, type=output_folder, help='bag directory to create')
    p.add_argument('--storage', choices=sorted(STORAGES), default='mcap', help='default: mcap')
    add_reading_args(p)

    p = commands.add('data', cmd_bench_data, 'synthetic scan generation and scan reading', group='bench')
    p.add_argument('--frames', type=positive(int), default=20)
    p.add_argument('--seed', type=int, default=0)
    add_json(p, 'the numbers')


def cmd_synth(args) -> int:
    from .synth import ScenarioConfig, generate

    layout = MIMICS[args.mimic] if args.mimic else OWN_LAYOUT
    version = args.version or layout.version
    preset = PRESETS[args.preset] if args.preset else {}
    scenes = args.scenes or preset.get('scenes', 1)
    cfg = ScenarioConfig(seed=args.seed if args.seed is not None else preset.get('seed', 0),
                         vehicles=args.agents - 1,
                         frames=args.frames or preset.get('frames', 40),
                         rate_hz=args.rate, synchronous=args.synchronous or layout.frame_counters,
                         lidar_profiles=args.lidar, sensor_height=args.sensor_height, own_body=args.own_body,
                         clutter=args.clutter if args.clutter is not None else preset.get('clutter', 0.0))
    out = Path(args.out)
    if (out / version).exists() and not args.overwrite:
        raise UserError(out / version, 'already exists (use --overwrite to replace it)')
    n = generate(out, scenes, cfg, version, progress=not args.quiet, layout=layout)
    print(f'wrote {scenes} scene(s) x {cfg.frames} frames, {n} LiDAR scans to {out}'
          + (f' as {args.mimic} (read it with --frame-period {1 / cfg.rate_hz:g})' if layout.frame_counters else ''))
    return 0


def cmd_info(args) -> int:
    from .stats import format_summary, summarize

    ds = dataset_from_args(args, check_sweeps=True)
    summary = summarize(ds)
    print(format_summary(summary, ds.conventions.lines()))
    write_json(args, summary)
    return 0


def cmd_to_bag(args) -> int:
    from .bag import write_scene_bag

    summary = write_scene_bag(dataset_from_args(args), args.scene, args.out,
                              storage=args.storage, progress=True)
    total = sum(summary['messages'].values())
    print(f'{args.out}: scene {summary["scene"]}, {summary["frames"]} frames, agents '
          f'{summary["agents"]}, {total} messages ({args.storage})')
    return 0


def cmd_bench_data(args) -> int:
    from .bench import bench_synth

    result = bench_synth(frames=args.frames, seed=args.seed)
    print(f"{'stage':<28}{'median ms':>10}")
    print(f"{'ray cast + annotation/scan':<28}{result['median_ms']['agent_scan']:>10.1f}")
    print(f"{'read one scan':<28}{result['median_ms']['read_scan']:>10.2f}")
    print(f"({result['scans']} agent-scans, {result['points_per_scan']} points per scan, seed {args.seed})")
    write_json(args, result)
    return 0
