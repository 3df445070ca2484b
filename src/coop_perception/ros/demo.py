"""``coop-perception demo`` (what ``make demo`` runs): the whole system on a synthetic scene.

1. generate the scene (reused when OUT/data holds one already);
2. record it as a rosbag2 bag (OUT/bag, reused likewise);
3. replay it through real ROS processes (a lidar_detector per agent, the ego's v2x_channel and
   trust_fusion, the bag player) and record their output (OUT/record, MCAP);
4. score the recording: car AP of the ego's own detector vs the fused output over every ego frame,
   frames with fused output, end-to-end latency as trust_fusion measured it;
5. evaluate the same scene, ego, method and channel offline (``eval fusion``'s code path);
6. draw the replay: OUT/bev.png (one frame) and OUT/replay.gif (every frame).

Everything also goes to OUT/demo.json. The live run also records what the ego's fusion receives
through the V2X channel, from which ``--per-vehicle`` (``ros.per_vehicle``) replays the ego's own
pipeline alone at real time.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from coop_perception.commands import Commands, non_negative, output_folder, positive
from coop_perception.data.bag import BagReader, write_scene_bag
from coop_perception.data.labels import CLASSES
from coop_perception.data.objects import object_boxes
from coop_perception.data.synth import PRESETS, RSU_AGENT, ScenarioConfig, generate
from coop_perception.data.v2xsim import DEFAULT_VERSION, V2XSimDataset
from coop_perception.errors import UserError
from coop_perception.eval import live_eval
from coop_perception.eval.ap import HEADLINE_CLASS
from coop_perception.paths import package_path
from coop_perception.ros import topics as T
from coop_perception.ros.live_run import LiveRunSettings, run_live

STEPS = 6
SCENE = 0


@dataclass(frozen=True)
class DemoSettings:
    out: Path = Path('out/demo')
    seed: int = PRESETS['demo']['seed']
    frames: int = PRESETS['demo']['frames']
    live: LiveRunSettings = field(default_factory=LiveRunSettings)
    method: str = 'trust'
    channel_model: str = 'uniform'
    latency_ms: float = 200.0           # mean; uniform: [0.5, 1.5] x mean
    channel_seed: int = 0
    max_range_m: float = 50.0           # as `eval fusion`
    display_score: float = 0.3          # lowest score drawn, as the nodes' markers
    gif_fps: float = 5.0
    detector_config: Path = field(default_factory=lambda: package_path('models', 'detector.yaml'))
    detector_weights: Path = field(default_factory=lambda: package_path('models', 'detector.pt'))
    fusion_model: Path = field(default_factory=lambda: package_path('models', 'fusion.pt'))
    # Extra parameters per section of the parameter file, e.g. {'/**/lidar_detector': {...}}.
    parameters: dict = field(default_factory=dict)


def step(i: int, text: str, steps: int = STEPS) -> None:
    print(f'[{i}/{steps}] {text}', flush=True)


def write_parameters(path: Path, s: DemoSettings) -> dict:
    """The package's parameter file with the demo's models, channel and method; returns it."""
    params = yaml.safe_load(package_path('config', 'coop_perception.yaml').read_text())
    params['/**']['ros__parameters'].update(detector_config=str(Path(s.detector_config).resolve()),
                                            detector_weights=str(Path(s.detector_weights).resolve()))
    params['/**/trust_fusion']['ros__parameters'].update(method=s.method,
                                                         fusion_model=str(Path(s.fusion_model).resolve()))
    params['/**/v2x_channel']['ros__parameters']['channel'].update(
        model=s.channel_model, mean_latency_ms=float(s.latency_ms), seed=s.channel_seed)
    for section, values in s.parameters.items():
        params[section]['ros__parameters'].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def prepare_scene(s: DemoSettings, progress: bool, steps: int = STEPS) -> V2XSimDataset:
    data = s.out / 'data'
    if (data / DEFAULT_VERSION / 'scene.json').exists():
        step(1, f'reusing the scene in {data}', steps)
    else:
        step(1, f'generating a {s.live.agents}-agent, {s.frames}-frame synthetic scene (seed {s.seed}) in {data}',
              steps)
        generate(data, 1, ScenarioConfig(seed=s.seed, vehicles=s.live.agents - 1, frames=s.frames), DEFAULT_VERSION,
                 progress=progress)
    ds = V2XSimDataset(data)
    agents = {k for f in range(ds.num_frames(SCENE)) for k in ds.sample(SCENE, f).agents}
    if agents != set(range(s.live.agents)):
        raise UserError(data, f'holds agents {sorted(agents)}, the demo runs {s.live.agents}; remove it to regenerate')
    return ds


def prepare_bag(s: DemoSettings, ds, progress: bool, steps: int = STEPS) -> Path:
    bag = s.out / 'bag'
    if (bag / 'metadata.yaml').exists():
        BagReader(bag).close()  # a damaged bag fails here, in one line, not in the player of the live run
        step(2, f'reusing the bag {bag}', steps)
    else:
        step(2, f'writing the rosbag2 bag {bag}', steps)
        write_scene_bag(ds, SCENE, bag, progress=progress)
    return bag


def _offline(s: DemoSettings, ds, progress: bool) -> dict:
    from coop_perception.detection.checkpoint import load_detector
    from coop_perception.detection.model import apply_threads
    from coop_perception.eval.fusion_eval import evaluate_fusion
    from coop_perception.fusion.cache import feature_cache
    from coop_perception.fusion.model import FusionModel

    detector = load_detector(s.detector_weights, s.detector_config)
    apply_threads(detector.cfg)
    cache, _ = feature_cache(ds, detector, s.detector_weights, s.out / 'data' / 'feature_cache', progress=progress)
    result = evaluate_fusion(ds, detector, cache, FusionModel.load(s.fusion_model), ['ego', s.method],
                             [s.latency_ms], channel_model=s.channel_model, seed=s.channel_seed,
                             max_range=s.max_range_m, egos=[s.live.ego], progress=progress)
    return {r['method']: {'ap50': r['ap50'], 'ap70': r['ap70'], 'frames': r['frames'], 'ap': r['ap']}
            for r in result['results']}


def _score_live(run: dict, ds, s: DemoSettings) -> tuple[list, dict]:
    """The recorded run (``run_live``'s summary) scored: (live_eval.ReplayFrame per ego frame, the
    'live' part of demo.json)."""
    record, ego = run['record'], s.live.ego
    frames, stray = live_eval.replay_frames(record, ds, SCENE, ego, T.FUSED_OBJECTS,
                                               T.agent_topic(ego, T.LOCAL_OBJECTS))
    scores = {w: live_eval.score(frames, w, CLASSES, s.max_range_m) for w in ('ego_only', 'fused')}
    status = live_eval.last_json(record, T.FUSION_STATUS) or {}
    detectors = {k: live_eval.last_json(record, T.agent_topic(k, T.DETECTOR_STATUS)) or {}
                 for k in range(s.live.agents)}
    latency = live_eval.latency_summary(frames, 'fused')
    return frames, {
        **scores, 'fused_fraction': scores['fused']['frames_with_output'] / max(len(frames), 1),
        'latency_ms': latency,
        'latency_wall_ms': ({k: round(latency[k] / s.live.rate, 1) for k in ('p50', 'p95', 'max')}
                            if latency else None),
        'ego_only_latency_ms': live_eval.latency_summary(frames, 'ego_only'),
        'fusion_node_latency_ms': status.get('latency_ms'),
        'fusion_processing_wall_ms': status.get('processing_ms'), 'stray_outputs': stray,
        'frames': [{'frame': fr.index, 'stamp_ns': fr.stamp_ns, 'gt': len(fr.gt_boxes),
                    'fused': None if fr.fused is None else len(fr.fused),
                    'ego_only': None if fr.ego_only is None else len(fr.ego_only),
                    'fused_latency_ms': fr.fused_latency_ms, 'ego_only_latency_ms': fr.ego_only_latency_ms}
                   for fr in frames],
        'detectors': {str(k): {'scans': d.get('scans'), 'detect_ms': (d.get('detect_ms') or {}).get('p50')}
                      for k, d in detectors.items()},
        'fusion_status': status, 'channel_status': live_eval.last_json(record, T.agent_topic(ego, T.V2X_STATUS)),
        'run': run}


def _views(ds, frames: list, ego: int, min_score: float) -> list:
    from coop_perception.eval.bev_plot import EgoView

    def shown(objects):
        return None if objects is None else object_boxes(objects[objects['score'] >= min_score])

    return [EgoView(ds.sample(SCENE, fr.index).agents[ego].load_points(), fr.gt_boxes, shown(fr.fused),
                    shown(fr.ego_only), f'{ds.scenes[SCENE].name} frame {fr.index}, ego agent {ego}')
            for fr in frames]


def _difference(a, b):
    return None if a is None or b is None else a - b


def check_ego(s: DemoSettings) -> None:
    ego = s.live.ego
    if ego == RSU_AGENT or not 0 <= ego < s.live.agents:
        raise UserError(f'--ego {ego}', f'must be a vehicle, one of 1..{s.live.agents - 1}')


def run_demo(s: DemoSettings, *, env: dict | None = None, progress: bool = True) -> dict:
    """Run every step (module doc) into ``s.out``; returns what OUT/demo.json holds."""
    from coop_perception.eval.bev_plot import animate_ego_views, plot_ego_view

    t0 = time.monotonic()
    ego = s.live.ego
    check_ego(s)
    s.out.mkdir(parents=True, exist_ok=True)
    ds = prepare_scene(s, progress)
    bag = prepare_bag(s, ds, progress)
    wall = {'data': time.monotonic() - t0}

    step(3, f'live replay at rate {s.live.rate:g} through {s.live.agents} lidar_detectors + v2x_channel '
             f'({s.channel_model}, {s.latency_ms:g} ms mean) + trust_fusion ({s.method}); models load first')
    params = write_parameters(s.out / 'params.yaml', s)
    run = run_live(bag, s.out / 'params.yaml', s.out, s.live, env=env, progress=progress)
    wall['live'] = run['wall_s']['total']

    step(4, f'scoring the recording {run["record"]}')
    frames, live = _score_live(run, ds, s)

    step(5, f'offline `eval fusion` on the same scene: ego {ego}, methods ego + {s.method}, '
             f'{s.channel_model} {s.latency_ms:g} ms, channel seed {s.channel_seed}')
    t5 = time.monotonic()
    offline = _offline(s, ds, progress)
    wall['offline'] = time.monotonic() - t5

    step(6, 'drawing bev.png and replay.gif')
    t6 = time.monotonic()
    views = _views(ds, frames, ego, s.display_score)
    fused_at = [i for i, fr in enumerate(frames) if fr.fused is not None] or list(range(len(frames)))
    png, gif = s.out / 'bev.png', s.out / 'replay.gif'
    plot_ego_view(views[fused_at[len(fused_at) // 2]], png, s.max_range_m)
    animate_ego_views(views, gif, s.max_range_m, s.gif_fps)
    wall['pictures'] = time.monotonic() - t6

    result = {
        'scene': ds.scenes[SCENE].name, 'agents': s.live.agents, 'ego': ego, 'ego_frames': len(frames),
        'settings': {'rate': s.live.rate, 'collaborator_nice': s.live.collaborator_nice,
                     'mc_passes': mc_passes(s.detector_config), 'method': s.method, 'channel': s.channel_model,
                     'mean_latency_ms': s.latency_ms, 'channel_seed': s.channel_seed, 'max_range_m': s.max_range_m,
                     'headline_class': HEADLINE_CLASS, 'parameters': params},
        'live': live,
        'offline': offline,
        'live_minus_offline': {k: _difference(live['fused'][k], offline[s.method][k]) for k in ('ap50', 'ap70')},
        'outputs': {'json': str(s.out / 'demo.json'), 'png': str(png), 'gif': str(gif), 'record': run['record'],
                    'bag': str(bag), 'data': str(s.out / 'data'), 'logs': str(s.out / 'logs')},
    }
    wall['total'] = time.monotonic() - t0
    result['wall_s'] = {k: round(v, 1) for k, v in wall.items()}
    (s.out / 'demo.json').write_text(json.dumps(result, indent=2, default=json_default))
    return result


def mc_passes(config: Path) -> int:
    return int(yaml.safe_load(Path(config).read_text())['decode']['mc_passes'])


def json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f'{type(value).__name__} is not JSON serialisable')


def pct(v) -> str:
    return f'{100 * v:6.1f}' if v is not None else f'{"n/a":>6}'


def _points(v) -> str:
    return f'{100 * v:+6.1f}' if v is not None else f'{"n/a":>6}'


def format_report(r: dict) -> str:
    """The demo's printed summary of ``run_demo``'s result."""
    st, live, off = r['settings'], r['live'], r['offline']
    method = st['method']
    lines = [
        f"{r['scene']}: {r['agents']} agents (agent 0 = RSU), ego = agent {r['ego']}, {r['ego_frames']} ego frames",
        f"live run: replay rate {st['rate']:g} (bag time runs at {st['rate']:g}x wall time"
        + (', so that every detector keeps up on 2 shared cores),' if st['rate'] < 1 else '),'),
        f"  collaborators' detectors at nice +{st['collaborator_nice']} (the ego's pipeline comes first), "
        f"MC-dropout passes {st['mc_passes']} (the detector config's),",
        f"  V2X channel {st['channel']} {st['mean_latency_ms']:g} ms mean (seed {st['channel_seed']}), fusion "
        f"method {method}",
        '',
        f"{st['headline_class']} AP in %, BEV rotated IoU, within {st['max_range_m']:g} m of the ego "
        f"(same ground truth and AP as `eval fusion`)",
        f"{'':<40}{'AP@0.5':>8}{'AP@0.7':>8}",
        f"{'live    ego only (/agent' + str(r['ego']) + '/coop/objects)':<40}"
        f"{pct(live['ego_only']['ap50']):>8}{pct(live['ego_only']['ap70']):>8}",
        f"{'live    fused (/coop/objects)':<40}{pct(live['fused']['ap50']):>8}{pct(live['fused']['ap70']):>8}",
        f"{'offline ego':<40}{pct(off['ego']['ap50']):>8}{pct(off['ego']['ap70']):>8}",
        f"{'offline ' + method:<40}{pct(off[method]['ap50']):>8}{pct(off[method]['ap70']):>8}",
        f"{'live - offline (' + method + '), AP points':<40}{_points(r['live_minus_offline']['ap50']):>8}"
        f"{_points(r['live_minus_offline']['ap70']):>8}",
        '',
        f"ego frames with fused output: {live['fused']['frames_with_output']}/{r['ego_frames']} "
        f"({100 * live['fused_fraction']:.0f} %)",
    ]
    lat, wall, local = live['latency_ms'], live['latency_wall_ms'], live['ego_only_latency_ms']
    if lat:
        lines.append(f"end-to-end latency, ego scan stamp -> /coop/objects received by the recorder (ROS time): "
                     f"median {lat['p50']:.1f} ms, p95 {lat['p95']:.1f} ms over {lat['n']} frames")
        lines.append(f"  ROS time runs at {st['rate']:g}x wall time: median {wall['p50']:.0f} ms, p95 "
                     f"{wall['p95']:.0f} ms of wall time on this shared machine"
                     + (f"; the ego detector's own output alone: median {local['p50']:.1f} ms ROS time"
                        if local else ''))
        node = live['fusion_node_latency_ms']
        if node:
            lines.append(f"  (trust_fusion's /coop/status says median {node['p50']:.1f} ms: under sim time its clock "
                         f"is read before the frame's own processing, see README)")
    else:
        lines.append('end-to-end latency: no fused frame, none measured')
    scans = ', '.join(f'agent {k} {d["scans"] if d["scans"] is not None else "?"}'
                      + (f' ({d["detect_ms"]:.0f} ms)' if d['detect_ms'] is not None else '')
                      for k, d in live['detectors'].items())
    lines.append(f"scans detected of {live['run']['ego_scans_in_bag']} (median wall time a scan): {scans}")
    codes = {k: v for k, v in live['run']['exit_codes'].items() if v != 0}
    lines.append('every node stopped cleanly' if not codes else f'nodes that did not stop cleanly: {codes}')
    ws = r['wall_s']
    run = live['run']['wall_s']
    lines.append(f"wall time {ws['total']:.0f} s: data {ws['data']:.0f}, live {ws['live']:.0f} (node start-up "
                 f"{run['startup']:.0f}, replay and drain {run['replay_and_drain']:.0f}), offline {ws['offline']:.0f}, "
                 f"pictures {ws['pictures']:.0f}")
    o = r['outputs']
    lines.append(f"wrote {o['json']}, {o['png']}, {o['gif']}, recorded bag {o['record']} (MCAP), logs {o['logs']}")
    return '\n'.join(lines)


# --------------------------------------------------------------------------- CLI
def add_cli(commands: Commands) -> None:
    p = commands.add('demo', cmd_demo, 'the whole system live on a synthetic scene, vs offline evaluation (make demo)',
                     description='Generate (or reuse) a 5-agent synthetic scene, record it as a bag, replay it '
                                 'through real ROS processes, record and score the fused output against the '
                                 'ground truth and against offline `eval fusion`, draw it.')
    p.add_argument('--out', type=output_folder, default='out/demo', help='output folder (default out/demo)')
    p.add_argument('--rate', type=positive(float), default=0.1,
                   help='replay speed factor (default 0.1: on 2 shared cores every detector keeps up, so the '
                        'live run sees the scans offline evaluation sees)')
    p.add_argument('--latency-ms', type=non_negative(float), default=200.0,
                   help='mean V2X latency of the uniform channel, ms (default 200)')
    p.add_argument('--nice', type=non_negative(int), default=10,
                   help="niceness added to the collaborators' detectors so that the ego's keeps its frames "
                        '(default 10; 0: none)')
    p.add_argument('--per-vehicle', action='store_true',
                   help="instead: replay at real time only what the ego vehicle's own computer runs (its "
                        "detector and fusion), with the collaborators' features as the V2X channel delivered "
                        "them in the demo's live run (recorded there, or run first; --rate, --latency-ms and "
                        "--nice are that run's); writes OUT/per_vehicle.json")


def cmd_demo(args) -> int:
    settings = DemoSettings(out=Path(args.out), latency_ms=args.latency_ms,
                            live=LiveRunSettings(rate=args.rate, collaborator_nice=args.nice))
    if args.per_vehicle:
        from coop_perception.ros import per_vehicle

        print(per_vehicle.format_report(per_vehicle.run_per_vehicle(settings)))
        return 0
    print(format_report(run_demo(settings)))
    return 0
