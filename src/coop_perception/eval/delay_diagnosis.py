"""Where cooperative AP goes under delay: oracle swaps, one at a time (a diagnosis, not a method).

Each row runs `eval fusion`'s loop (same channel, seed, egos and ground truth) with one part
replaced by ground truth:

- ``velocity``: every collaborator detection matched to a ground-truth object carries that
  object's true velocity at the sender's capture time instead of the sender's tracked one; the
  ego still predicts at constant velocity.
- ``motion``: every matched collaborator box moves by its object's true displacement and turn
  between the sender's capture and the ego stamp (a perfect motion model; the box keeps the
  detector's errors); unmatched boxes are predicted as usual.
- ``prediction``: every matched collaborator box is replaced by its object's true box at the ego
  stamp (a perfect temporal prediction, which also removes the detector's box errors).
- ``choice``: of the output boxes that overlap one ground-truth object, the best-overlapping one
  is kept with the highest of their scores (a perfect choice between the ego's fresh box and a
  collaborator's); the rest go through the usual NMS.

``motion`` and ``prediction`` need box-list payloads (method ``late``, whose boxes are what trust
fusion's ROI boxes are); ``velocity`` works for every method that sends detections. The gap from
the ``motion`` row to the 0 ms row is what delay costs besides motion: objects that appeared,
disappeared or changed visibility while the messages travelled.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

import numpy as np
from scipy.optimize import linear_sum_assignment
from tqdm import tqdm

from ..detection.decode import Detections, rotated_nms
from ..fusion.methods import METHODS
from ..fusion.payloads import BoxList
from ..fusion.pipeline import CooperativeConfig, FusedDetections, Sender
from ..geometry import bev_iou, invert_pose, rotate_vectors_2d, transform_boxes
from .ap import HEADLINE_CLASS, APAccumulator
from .fusion_eval import _run_ego, _scene_payloads, _Tally, scene_samples

MATCH_GATE_M = 2.0     # a detection within this of a true object's centre (same class) is that object
# m/s: the standard deviation given to a velocity the oracles set from ground truth: known, so that
# nothing borrows or overrides it (fusion.velocity_lending; 0 would mean "not measured")
KNOWN_VELOCITY_STD = 0.01


def _truth_in_sensor_frame(sample, agent: int, stamp_us: int) -> np.ndarray:
    """(M, 7) the sample's true boxes at ``stamp_us`` in ``agent``'s sensor frame."""
    a = sample.agents[agent]
    world = sample.gt.boxes_at((stamp_us - sample.timestamp_us) * 1e-6)
    return transform_boxes(invert_pose(a.T_world_sensor), world)


def match_truth(boxes: np.ndarray, labels: np.ndarray, truth: np.ndarray, truth_labels: np.ndarray) -> np.ndarray:
    """Detections (N, 7) with labels (N,) vs true boxes (M, 7) in the same frame -> (N,) index of
    the matched true box or -1: one-to-one by BEV centre distance, same class, within MATCH_GATE_M."""
    out = np.full(len(boxes), -1, np.int64)
    if not len(boxes) or not len(truth):
        return out
    d = np.linalg.norm(boxes[:, None, :2] - truth[None, :, :2], axis=-1)
    d[np.asarray(labels)[:, None] != np.asarray(truth_labels)[None, :]] = np.inf
    rows, cols = linear_sum_assignment(np.where(np.isfinite(d), d, 1e9))
    ok = d[rows, cols] <= MATCH_GATE_M
    out[rows[ok]] = cols[ok]
    return out


def true_velocities(det: Detections, sample, agent: int) -> Detections:
    """``det`` of ``agent``'s scan with every matched detection's velocity replaced by its true
    object's (sensor axes, m/s); the ``velocity`` oracle."""
    a = sample.agents[agent]
    idx = match_truth(det.boxes, det.labels, _truth_in_sensor_frame(sample, agent, a.timestamp_us), sample.gt.labels)
    vel = det.velocities.copy()
    hit = idx >= 0
    vel[hit] = rotate_vectors_2d(invert_pose(a.T_world_sensor), sample.gt.velocities[idx[hit]])
    std = np.array(np.broadcast_to(np.asarray(det.velocity_std, np.float32), hit.shape))
    std[hit] = KNOWN_VELOCITY_STD
    return replace(det, velocities=vel.astype(np.float32), velocity_std=std)


class Oracle:
    """The ``motion``, ``prediction`` and ``choice`` swaps, called by `fusion_eval._run_ego` per
    ego frame (``predict`` is 'motion', 'prediction' or None)."""

    def __init__(self, predict: str | None, choice: bool, nms_iou: float):
        self.mode, self.choice, self.nms_iou = predict, choice, nms_iou

    def predict(self, agent: int, item, T_world_sender: np.ndarray, sent, now, ego_view):
        """A collaborator's box list captured in sample ``sent`` -> the same list with each
        matched box moved (or replaced) as its object is at the ego stamp (sample ``now``), in the
        sender's frame and standing still, so that the pipeline's motion compensation keeps it."""
        if self.mode is None:
            return item
        if not isinstance(item, BoxList):
            raise ValueError(f'the {self.mode} oracle needs box-list payloads (method late)')
        stamp_us = sent.agents[agent].timestamp_us
        then = _truth_in_sensor_frame(sent, agent, stamp_us)
        idx = match_truth(item.boxes, item.labels, then, sent.gt.labels)
        at_ego = transform_boxes(invert_pose(T_world_sender),
                                 now.gt.boxes_at((ego_view.stamp_ns // 1000 - now.timestamp_us) * 1e-6))
        where_now = {tok: j for j, tok in enumerate(now.gt.instance_tokens)}
        now_idx = np.array([where_now.get(sent.gt.instance_tokens[i], -1) if i >= 0 else -1 for i in idx], np.int64)
        hit = now_idx >= 0
        boxes, vel = item.boxes.copy(), item.velocities.copy()
        if self.mode == 'prediction':
            boxes[hit] = at_ego[now_idx[hit]]
        else:
            moved = at_ego[now_idx[hit]] - then[idx[hit]]
            boxes[hit, :2] += moved[:, :2]
            boxes[hit, 6] += moved[:, 6]
        vel[hit] = 0.0
        std = None
        if item.velocity_std is not None:
            std = np.array(item.velocity_std, np.float32)
            std[hit] = KNOWN_VELOCITY_STD
        return replace(item, boxes=boxes, velocities=vel, velocity_std=std)

    def choose(self, out: FusedDetections, truth: np.ndarray, truth_labels: np.ndarray) -> FusedDetections:
        """Of the boxes overlapping one true object (same class), keep the best-overlapping with
        the highest of their scores; then the usual class-wise NMS."""
        if not self.choice or not len(out.boxes):
            return out
        keep = np.ones(len(out.boxes), bool)
        scores = out.scores.copy()
        if len(truth):
            iou = bev_iou(out.boxes, truth)
            iou[np.asarray(out.labels)[:, None] != np.asarray(truth_labels)[None, :]] = 0.0
            for j in np.argsort(-iou.max(0)):
                group = np.flatnonzero(keep & (iou[:, j] > 0))
                if len(group) > 1:
                    best = group[np.argmax(iou[group, j])]
                    scores[best] = scores[group].max()
                    keep[group] = False
                    keep[best] = True
                    iou[best] = 0.0      # one box serves one object
        idx = np.flatnonzero(keep)
        kept = [idx[k][rotated_nms(out.boxes[idx[k]], scores[idx[k]], self.nms_iou)]
                for k in (np.asarray(out.labels)[idx] == c for c in np.unique(out.labels[idx]))]
        sel = np.sort(np.concatenate(kept)) if kept else np.zeros(0, np.int64)
        return replace(out, boxes=out.boxes[sel], scores=scores[sel], labels=out.labels[sel],
                       velocities=out.velocities[sel], trust=np.asarray(out.trust)[sel],
                       sources=np.asarray(out.sources)[sel])


ROWS = (  # (method, delay: 'zero' or 'delayed', oracles)
    ('late', 'zero', ()), ('late', 'delayed', ()), ('late', 'delayed', ('velocity',)),
    ('late', 'delayed', ('motion',)), ('late', 'delayed', ('motion', 'choice')), ('late', 'zero', ('choice',)),
    ('late', 'delayed', ('prediction',)), ('late', 'zero', ('prediction',)),
    ('trust', 'zero', ()), ('trust', 'delayed', ()), ('trust', 'delayed', ('velocity',)),
)


def diagnose_delay(dataset, detector, cache, fusion_model, delay_ms: float, *, channel_model: str = 'uniform',
                   seed: int = 0, max_range: float = 50.0, egos=None, rows=ROWS, progress: bool = True) -> dict:
    """AP of each row of ``rows`` (method, 'zero' | 'delayed', oracles) over every scene and ego."""
    tallies = [_Tally(APAccumulator(detector.cfg.classes, max_range=max_range)) for _ in rows]
    bar = tqdm(total=len(rows) * len(dataset.scenes), desc='delay oracles', unit='scene', disable=not progress)
    for s in range(len(dataset.scenes)):
        samples, scene_egos = scene_samples(dataset, s, egos)
        payloads: dict = {}
        for tally, (name, when, oracles) in zip(tallies, rows):
            kind, truth = METHODS[name].payload, 'velocity' in oracles
            if (kind, truth) not in payloads:
                payloads[(kind, truth)] = _scene_payloads(cache, samples, kind, {},
                                                          true_velocities if truth else None)
            cfg = CooperativeConfig(method=name)
            # the choice oracle picks among every box; its own NMS follows
            mode = next((o for o in ('motion', 'prediction') if o in oracles), None)
            oracle = Oracle(mode, 'choice' in oracles, cfg.late_nms_iou)
            if oracle.choice:
                cfg = replace(cfg, late_nms_iou=1.0)
            for ego in scene_egos:
                _run_ego(tally, detector, cache, samples, ego, delay_ms if when == 'delayed' else 0.0,
                         payloads[(kind, truth)], fusion_model, cfg, channel_model, seed,
                         oracle=oracle if oracles else None)
            bar.update(1)
    bar.close()
    results = []
    for tally, (name, when, oracles) in zip(tallies, rows):
        head = tally.acc.summary()['ap'][HEADLINE_CLASS]
        results.append({'method': name, 'delay_ms': float(delay_ms if when == 'delayed' else 0.0),
                        'oracles': list(oracles), 'ap50': head['0.5'], 'ap70': head['0.7']})
    return {'results': results, 'headline_class': HEADLINE_CLASS, 'max_range_m': max_range,
            'channel': channel_model, 'seed': seed}


def format_diagnosis(result: dict) -> str:
    lines = [f"{'method':<8}{'delay ms':>9}  {'ground truth swapped in':<26}{'AP@0.5':>8}{'AP@0.7':>8}", '-' * 59]
    for r in result['results']:
        swapped = ' + '.join(r['oracles']) or '-'
        cells = ''.join(f"{100 * r[k]:>8.1f}" if r[k] is not None else f"{'n/a':>8}" for k in ('ap50', 'ap70'))
        lines.append(f"{r['method']:<8}{r['delay_ms']:>9.0f}  {swapped:<26}{cells}")
    lines.append(f"({result['headline_class']} AP in %, BEV rotated IoU, within {result['max_range_m']:g} m of the "
                 f"ego; {result['channel']} latency channel, seed {result['seed']})")
    v = result.get('velocity_error')
    if v and v['n']:
        lines.append(f"senders' tracked velocity on moving cars (>= 1 m/s, {v['n']} detections matched to them): "
                     f"error median {v['median_m_s']:.2f} m/s, p90 {v['p90_m_s']:.2f} m/s; "
                     f"{100 * v['untracked']:.1f} % reported as 0 (first scans, gated)")
        if v['measured']:
            lines.append(f"measured velocities (scan registration or a multi-sweep network) of the same detections: "
                         f"{100 * v['measured']:.1f} % measured, error median {v['measured_median_m_s']:.2f} m/s, "
                         f"p90 {v['measured_p90_m_s']:.2f} m/s")
    return '\n'.join(lines)


def velocity_errors(dataset, cache, min_speed: float = 1.0, label: int = 0) -> dict:
    """What feeds the prediction: each sender's tracked velocity (fusion.pipeline.Sender) of its
    detections matched to true objects of class ``label`` moving at >= ``min_speed`` m/s ->
    {'median_m_s', 'p90_m_s', 'n', 'untracked'}: error norms, and the fraction reported as 0
    (a track's first scan); 'measured': the fraction of them with a velocity measurement
    (``Detections.velocity_std`` > 0), 'measured_median_m_s' and 'measured_p90_m_s' its error."""
    errors, raw, untracked = [], [], 0
    for s in range(len(dataset.scenes)):
        samples = [dataset.sample(s, f) for f in range(dataset.num_frames(s))]
        senders: dict = defaultdict(Sender)
        for smp in samples:
            for k, agent in sorted(smp.agents.items()):
                view = cache.load(smp.scene_name, smp.frame_index, k)
                det = senders[k].prepare(view.detections, view.T_world_sensor, view.stamp_ns)
                truth = _truth_in_sensor_frame(smp, k, agent.timestamp_us)
                idx = match_truth(det.boxes, det.labels, truth, smp.gt.labels)
                hit = np.flatnonzero(idx >= 0)
                v_true = rotate_vectors_2d(invert_pose(agent.T_world_sensor), smp.gt.velocities[idx[hit]])
                moving = (np.linalg.norm(v_true, axis=1) >= min_speed) & (smp.gt.labels[idx[hit]] == label)
                est = det.velocities[hit[moving]]
                errors.append(np.linalg.norm(est - v_true[moving], axis=1))
                with_std = np.broadcast_to(np.asarray(view.detections.velocity_std), idx.shape)[hit[moving]] > 0
                raw.append(np.where(with_std, np.linalg.norm(view.detections.velocities[hit[moving]] - v_true[moving],
                                                             axis=1), np.nan))
                untracked += int((np.abs(est).sum(1) == 0).sum())
    e = np.concatenate(errors) if errors else np.zeros(0)
    r = np.concatenate(raw) if raw else np.zeros(0)
    r = r[np.isfinite(r)]
    return {'median_m_s': float(np.median(e)) if len(e) else None,
            'measured': len(r) / len(e) if len(e) else 0.0,
            'measured_median_m_s': float(np.median(r)) if len(r) else None,
            'measured_p90_m_s': float(np.percentile(r, 90)) if len(r) else None,
            'p90_m_s': float(np.percentile(e, 90)) if len(e) else None, 'n': int(len(e)),
            'untracked': untracked / len(e) if len(e) else None}
