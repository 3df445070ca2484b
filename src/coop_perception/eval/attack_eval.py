"""Misbehaving collaborators (``eval fusion --attack``): how often the reputation
(fusion.reputation) flags an attacker and an honest agent, and fused AP under attack with the
defence, without it and with an oracle that excludes the attacker.

For every scene and ego (every vehicle in turn, as ``eval fusion``) one collaborator is the
attacker, drawn with a generator seeded by (seed, scene, ego). Attacks, applied to what the
attacker puts on the air (its message and the pose it reports), after its sender's tracker:

* ``phantom``: ``PHANTOMS`` fake objects a frame, each a copy of its highest-scoring ROI (its
  cells, features and attributes; a box list: the box) moved by whole cells to a place it sees
  as free itself (its own free range) within ``PHANTOM_RANGE_M`` of it and 45 m of the ego,
  standing still; the free-range profile it sends lies consistently (cut at each phantom's near
  side), so its own message never contradicts itself;
* ``shift``: its reported pose is off by ``SHIFT_M`` in a seeded direction and ``SHIFT_DEG``;
* ``drop``: its ROIs (boxes) removed, background cells kept;
* ``replay``: the message of ``REPLAY_FRAMES`` frames earlier, restamped with the current stamp
  (honest until it has one).

Pose-noise rows add Gaussian noise (sigma in m on x and y, the same number in degrees on yaw)
to every collaborator's reported pose, independently per message; they have no attacker.

Detection rate: the fraction of attacker-frames (ego frames at least ``WARMUP_S`` after the
scene's first, with the attacker judged) where the attacker is excluded; false-alarm rate: the
same over honest agent-frames. AP is the headline class's, as in ``eval fusion``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from tqdm import tqdm

from ..detection.free_range import azimuth_bins
from ..fusion.codec import FeatureMessage
from ..fusion.methods import METHODS
from ..fusion.payloads import BoxList
from ..fusion.pipeline import CooperativeConfig
from ..fusion.pose_buffer import NS_PER_S
from ..fusion.reputation import ReputationConfig
from ..geometry import invert_pose
from .ap import HEADLINE_CLASS, APAccumulator
from .fusion_eval import _run_ego, _scene_payloads, _Tally, method_policy, scene_samples

ATTACKS = ('phantom', 'shift', 'drop', 'replay')
WARMUP_S = 1.0
PHANTOMS = 3
PHANTOM_RANGE_M = (5.0, 35.0)
SHIFT_M, SHIFT_DEG = 3.0, 10.0
REPLAY_FRAMES = 10
_VARIANTS = ('defended', 'undefended')


@dataclass
class _Row:
    accs: dict
    attacker_frames: int = 0
    attacker_flagged: int = 0
    honest_frames: int = 0
    honest_flagged: int = 0
    drops: dict = field(default_factory=dict)


def choose_attacker(collaborators, scene: int, ego: int, seed: int):
    """The attacker among ``collaborators`` of one (scene, ego), seeded."""
    rng = np.random.default_rng([seed, scene, ego])
    return sorted(collaborators)[int(rng.integers(len(collaborators)))]


def _yaw(deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def lied_pose(T_world_sensor: np.ndarray, dx: float, dy: float, dyaw_deg: float) -> np.ndarray:
    """The pose an agent reports when it lies: turned by ``dyaw_deg`` about its own position and
    moved by (dx, dy) m in the map frame."""
    T = np.array(T_world_sensor, np.float64)
    T[:3, :3] = _yaw(dyaw_deg) @ T[:3, :3]
    T[:2, 3] += (dx, dy)
    return T


def without_rois(item):
    """An attacker's message with its objects removed (``drop``)."""
    if isinstance(item, BoxList):
        return BoxList(item.boxes[:0], item.scores[:0], item.labels[:0], item.velocities[:0],
                       None if item.velocity_std is None else item.velocity_std[:0])
    return item.take(item.roi < 0)


def phantom_places(det, ego_xy: np.ndarray, rng, count: int = PHANTOMS) -> np.ndarray:
    """(k, 2) m, k <= count: places in the attacker's sensor frame for phantoms: where its own
    free range says it sees nothing within 4 m beyond, away from its detections (4 m) and the ego,
    within 45 m of the ego (``ego_xy``, attacker frame), 6 m apart."""
    if det.free_range is None:
        return np.zeros((0, 2))
    r = rng.uniform(*PHANTOM_RANGE_M, 400)
    a = rng.uniform(-np.pi, np.pi, 400)
    xy = np.stack([r * np.cos(a), r * np.sin(a)], 1)
    ok = det.free_range[azimuth_bins(xy[:, 0], xy[:, 1], len(det.free_range))] > r + 4.0
    near_ego = np.linalg.norm(xy - ego_xy, axis=1)
    ok &= (near_ego < 45.0) & (near_ego > 6.0)
    if len(det.boxes):
        ok &= np.linalg.norm(xy[:, None] - det.boxes[None, :, :2], axis=2).min(1) > 4.0
    out = []
    for p in xy[ok]:
        if all(np.linalg.norm(p - q) > 6.0 for q in out):
            out.append(p)
        if len(out) == count:
            break
    return np.asarray(out).reshape(-1, 2)


def with_phantoms(item, places: np.ndarray):
    """The attacker's message with its highest-scoring object copied to each of ``places``
    (attacker frame, m), standing still."""
    if len(places) == 0:
        return item
    if isinstance(item, BoxList):
        if len(item.boxes) == 0:
            return item
        t = int(np.argmax(item.scores))
        boxes = np.repeat(item.boxes[t:t + 1], len(places), 0)
        boxes[:, :2] = places
        return BoxList(np.concatenate([item.boxes, boxes]),
                       np.concatenate([item.scores, np.repeat(item.scores[t], len(places))]),
                       np.concatenate([item.labels, np.repeat(item.labels[t], len(places))]),
                       np.concatenate([item.velocities, np.zeros((len(places), 2), item.velocities.dtype)]),
                       None if item.velocity_std is None
                       else np.concatenate([item.velocity_std, np.repeat(item.velocity_std[t], len(places))]))
    fg = np.flatnonzero(item.roi >= 0)
    if len(fg) == 0:
        return item
    template = item.roi[fg[np.argmax(item.score[fg])]]
    cells = np.flatnonzero(item.roi == template)
    peak = cells[np.argmax(item.confidence[cells])]
    grid, size = item.grid, item.grid.cell_size
    taken = set(map(tuple, np.round(item.cells / size).astype(np.int64).tolist()))
    parts, next_roi = [], int(item.roi.max()) + 1
    for place in places:
        shift = (np.round((place - item.cells[peak]) / size) * size).astype(np.float32)
        moved = item.cells[cells] + shift
        keys = set(map(tuple, np.round(moved / size).astype(np.int64).tolist()))
        if keys & taken or not grid.inside(*grid.cells_of(moved[:, 0], moved[:, 1])).all():
            continue
        taken |= keys
        copy = item.take(cells)
        boxes = None if copy.boxes is None else copy.boxes + np.concatenate([shift, np.zeros(5, np.float32)])
        parts.append(replace(copy, cells=moved, roi=np.full(len(cells), next_roi, np.int16),
                             velocity=np.zeros_like(copy.velocity), boxes=boxes))
        next_roi += 1
    if not parts:
        return item
    free = None if item.free_range is None else hidden_behind(item.free_range, [p.cells for p in parts], size)
    return replace(item.extended(*parts), free_range=free)


def hidden_behind(free_range: np.ndarray, objects: list, cell_size: float) -> np.ndarray:
    """A profile (B,) m cut so that each object (its cells, (n, 2) m, sender frame) stands in
    front of the first return: what a phantom sender reports to be consistent with its lie."""
    out = np.array(free_range, np.float32)
    B = len(out)
    for cells in objects:
        corners = (cells[:, None, :] + np.array([[-1, -1], [-1, 1], [1, -1], [1, 1]]) * cell_size / 2).reshape(-1, 2)
        r = np.hypot(corners[:, 0], corners[:, 1])
        # every bin the object spans, not only those its corners fall in: near the sensor one
        # cell covers several bins
        mid = np.arctan2(cells[:, 1].mean(), cells[:, 0].mean())
        rel = (np.arctan2(corners[:, 1], corners[:, 0]) - mid + np.pi) % (2 * np.pi) - np.pi
        edges = mid + np.array([rel.min(), rel.max()])
        first, last = azimuth_bins(np.cos(edges), np.sin(edges), B)
        bins = np.arange(B) if np.ptp(edges) >= np.pi else (first + np.arange((last - first) % B + 1)) % B
        out[bins] = np.minimum(out[bins], np.float32(max(r.min() - cell_size, 0.0)))
    return out


def restamped(item, stamp_ns: int):
    return replace(item, stamp_ns=int(stamp_ns)) if isinstance(item, FeatureMessage) else item


def attacked_payloads(payloads: dict, cache, samples, attack: str, attacker, ego, rng) -> dict:
    """``payloads`` ((frame, agent) -> (stamp, pose, item, bytes)) with the attacker's (or, for
    ``pose_noise_<sigma>``, every collaborator's) entries changed by ``attack``."""
    out = dict(payloads)
    scene = samples[0].scene_name
    if attack.startswith('pose_noise_'):
        sigma = float(attack.removeprefix('pose_noise_'))
        for (f, k), (stamp, pose, item, nbytes) in payloads.items():
            if k != ego:
                dx, dy, dyaw = rng.normal(0.0, sigma, 3)
                out[(f, k)] = (stamp, lied_pose(pose, dx, dy, dyaw), item, nbytes)
        return out
    heading = rng.uniform(-np.pi, np.pi)
    frames = sorted(f for f, k in payloads if k == attacker)
    for f in frames:
        stamp, pose, item, nbytes = payloads[(f, attacker)]
        if attack == 'shift':
            out[(f, attacker)] = (stamp, lied_pose(pose, SHIFT_M * np.cos(heading), SHIFT_M * np.sin(heading),
                                                   SHIFT_DEG), item, nbytes)
        elif attack == 'drop':
            out[(f, attacker)] = (stamp, pose, without_rois(item), nbytes)
        elif attack == 'replay':
            if (f - REPLAY_FRAMES, attacker) in payloads:
                old = payloads[(f - REPLAY_FRAMES, attacker)][2]
                out[(f, attacker)] = (stamp, pose, restamped(old, stamp), nbytes)
        elif attack == 'phantom':
            view = cache.load(scene, f, attacker)
            if ego not in samples[f].agents:
                continue
            ego_T = cache.load(scene, f, ego).T_world_sensor
            ego_xy = (invert_pose(pose) @ ego_T)[:2, 3]
            places = phantom_places(view.detections, ego_xy, rng)
            out[(f, attacker)] = (stamp, pose, with_phantoms(item, places), nbytes)
        else:
            raise ValueError(f'unknown attack {attack!r}')
    return out


def evaluate_attacks(dataset, detector, cache, fusion_model, method: str, delay_ms: float, attacks, *,
                     pose_noise=(), channel_model: str = 'uniform', seed: int = 0, max_range: float = 50.0,
                     egos=None, roi_policy: dict | None = None, gate: dict | None = None,
                     reputation: ReputationConfig | None = None, progress: bool = True) -> dict:
    """Rows 'none' (no attack), each of ``attacks`` and ``pose_noise_<sigma>`` for each sigma;
    per row AP with and without the defence and detection / false-alarm rates; one oracle
    (attacker excluded, no defence)."""
    classes = detector.cfg.classes
    rep = reputation or ReputationConfig()
    scenarios = ['none', *attacks, *(f'pose_noise_{s:g}' for s in pose_noise)]
    rows = {s: _Row({v: _Tally(APAccumulator(classes, max_range=max_range)) for v in _VARIANTS}) for s in scenarios}
    oracle = _Tally(APAccumulator(classes, max_range=max_range))
    kind, roi_policy = METHODS[method].payload, method_policy(method, roi_policy)

    def config(on: bool) -> CooperativeConfig:
        return CooperativeConfig(method=method, roi_policy=roi_policy, gate=gate,
                                 reputation=replace(rep, enabled=on))

    bar = tqdm(total=len(dataset.scenes), desc='eval attacks', unit='scene', disable=not progress)
    for s in range(len(dataset.scenes)):
        samples, scene_egos = scene_samples(dataset, s, egos)
        payloads = _scene_payloads(cache, samples, kind, roi_policy)
        for ego in scene_egos:
            collaborators = sorted({k for smp in samples if ego in smp.agents for k in smp.agents} - {ego})
            if not collaborators:
                continue
            attacker = choose_attacker(collaborators, s, ego, seed)
            run = dict(detector=detector, cache=cache, samples=samples, ego=ego, mean_ms=delay_ms,
                       fusion_model=fusion_model, channel_model=channel_model, seed=seed)
            _run_ego(oracle, payloads=payloads, cfg=config(False), absent=(attacker,), **run)
            for scenario in scenarios:
                rng = np.random.default_rng([seed, s, ego, scenarios.index(scenario)])
                sent = payloads if scenario == 'none' else attacked_payloads(payloads, cache, samples, scenario,
                                                                            attacker, ego, rng)
                row = rows[scenario]
                has_attacker = scenario in ATTACKS
                start = samples[0].agents[ego].timestamp_us * 1000 if ego in samples[0].agents else None

                def observe(coop, f, t_e, row=row, has_attacker=has_attacker, attacker=attacker, start=start):
                    if start is None or (t_e - start) / NS_PER_S < WARMUP_S - 1e-6:
                        return
                    for agent in coop.reputation.agents():
                        flagged = coop.reputation.excluded(agent)
                        if has_attacker and agent == attacker:
                            row.attacker_frames += 1
                            row.attacker_flagged += flagged
                        else:
                            row.honest_frames += 1
                            row.honest_flagged += flagged

                _run_ego(row.accs['defended'], payloads=sent, cfg=config(True), observe=observe, **run)
                _run_ego(row.accs['undefended'], payloads=sent, cfg=config(False), **run)
        bar.update(1)
    bar.close()
    oracle_ap = oracle.acc.summary()['ap'][HEADLINE_CLASS]
    results = []
    for scenario in scenarios:
        row = rows[scenario]
        ap = {v: row.accs[v].acc.summary()['ap'][HEADLINE_CLASS] for v in _VARIANTS}
        defended70 = ap['defended']['0.7']
        results.append({
            'attack': scenario,
            'detection_rate': row.attacker_flagged / row.attacker_frames if row.attacker_frames else None,
            'false_alarm_rate': row.honest_flagged / row.honest_frames if row.honest_frames else None,
            'attacker_frames': row.attacker_frames, 'honest_frames': row.honest_frames,
            'ap50': {v: ap[v]['0.5'] for v in _VARIANTS}, 'ap70': {v: ap[v]['0.7'] for v in _VARIANTS},
            'ap70_gap_to_oracle': (oracle_ap['0.7'] - defended70
                                   if scenario in ATTACKS and defended70 is not None else None),
            'drops': dict(row.accs['defended'].drops)})
    return {'method': method, 'delay_ms': float(delay_ms),
            'oracle': {'ap50': oracle_ap['0.5'], 'ap70': oracle_ap['0.7']}, 'results': results,
            'attack': {r['attack']: {k: r[k] for k in ('detection_rate', 'false_alarm_rate', 'ap70_gap_to_oracle')}
                       for r in results if r['attack'] in ATTACKS},
            'headline_class': HEADLINE_CLASS, 'max_range_m': max_range, 'channel': channel_model, 'seed': seed,
            'warmup_s': WARMUP_S}


def format_attacks(result: dict) -> str:
    """The attack table of ``evaluate_attacks``: rates and AP in %."""
    def pct(v):
        return f'{100 * v:.1f}' if v is not None else 'n/a'

    rows = result['results']
    w = max(len('attack'), *(len(r['attack']) for r in rows)) + 1
    lines = [f"{'attack':<{w}}{'detected':>9}{'false al.':>10}{'AP@0.7 def.':>12}{'undef.':>8}{'oracle':>8}"
             f"{'gap':>7}{'AP@0.5 def.':>12}{'undef.':>8}", '-' * (w + 74)]
    oracle = result['oracle']
    for r in rows:
        gap = r['ap70_gap_to_oracle']
        lines.append(f"{r['attack']:<{w}}{pct(r['detection_rate']):>9}{pct(r['false_alarm_rate']):>10}"
                     f"{pct(r['ap70']['defended']):>12}{pct(r['ap70']['undefended']):>8}"
                     f"{pct(oracle['ap70']) if r['attack'] in ATTACKS else '':>8}"
                     f"{pct(gap) if gap is not None else '':>7}"
                     f"{pct(r['ap50']['defended']):>12}{pct(r['ap50']['undefended']):>8}")
    lines.append(f"(method {result['method']}, {result['delay_ms']:g} ms mean {result['channel']} latency, seed "
                 f"{result['seed']}; detected: attacker-frames excluded after {result['warmup_s']:g} s, false al.: "
                 f"honest agent-frames excluded; {result['headline_class']} AP in % within {result['max_range_m']:g} m;"
                 ' oracle: the attacker excluded, no defence; gap: oracle - defended AP@0.7)')
    return '\n'.join(lines)
