"""Cooperative detection under communication delay: AP per method x mean latency, and bytes sent
per collaborator-frame, all through `CooperativeDetector` (the object the ROS node runs).

Every vehicle agent takes the ego role in turn; every other agent (RSU included) is a
collaborator whose LiDAR is out of phase with the ego's and whose messages arrive after a latency
drawn from a seeded channel model with the given mean. Ground truth: objects any agent has LiDAR
returns on, at the ego's capture time, in the ego frame, within `max_range` of the ego.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..data.channel import channel_for_mean_latency
from ..data.objects import OBJECT_DTYPE
from ..data.synth import RSU_AGENT
from ..fusion.cache import FeatureCache, build_cache
from ..fusion.codec import ROI_SCORE_THRESHOLD, encode
from ..fusion.pipeline import CooperativeConfig, CooperativeDetector, Sender, collaborator_message
from ..fusion.train import cooperative_targets
from .ap import APAccumulator

HEADLINE_CLASS = 'car'
RAW_POINT_BYTES = 16  # x, y, z, intensity as float32: what a raw scan costs on the wire


def _payload(method: str, view, agent, points_fn, roi_policy):
    """(input for the pipeline, bytes on the wire) of one collaborator scan."""
    det = view.detections
    if method in ('max', 'trust', 'gate'):
        msg = collaborator_message(det, agent, view.stamp_ns, roi_policy)
        return msg, len(encode(msg)[1])
    if method == 'late':
        # late fusion shares the boxes it is as confident about as intermediate fusion's ROIs
        keep = det.scores >= (roi_policy or {}).get('score_threshold', ROI_SCORE_THRESHOLD)
        boxes = {'boxes': det.boxes[keep], 'scores': det.scores[keep], 'labels': det.labels[keep],
                 'velocities': det.velocities[keep]}
        return boxes, int(keep.sum()) * OBJECT_DTYPE.itemsize
    pts = points_fn()
    return pts, len(pts) * RAW_POINT_BYTES


def feature_cache(dataset, detector, weights, root, progress: bool = True) -> tuple[FeatureCache, int]:
    """The cached detector output of every agent view of ``dataset``, in ``root/<weights id>``:
    keyed by the checkpoint file ``weights``, so a retrained detector never reads stale features.
    Views not cached yet are computed now. -> (cache, views written now)."""
    weights_id = hashlib.sha256(Path(weights).read_bytes()).hexdigest()[:16]
    folder = Path(root) / weights_id
    written = build_cache(dataset, detector, folder, progress=progress)
    return FeatureCache(folder, detector.grid()), written


def evaluate_fusion(dataset, detector, cache: FeatureCache, fusion_model, methods, delays_ms, *,
                    channel_model: str = 'uniform', seed: int = 0, max_range: float = 50.0,
                    egos=None, roi_policy: dict | None = None, gate: dict | None = None,
                    progress: bool = True) -> dict:
    classes = detector.cfg.classes
    results = []
    bar = tqdm(total=len(methods) * len(delays_ms) * len(dataset.scenes), desc='eval fusion', unit='scene',
               disable=not progress)
    for method in methods:
        for delay in delays_ms:
            if method == 'early' and results and results[-1]['method'] == 'early':
                # the no-delay upper bound: its collaborators' points arrive at once, whatever the delay
                results.append(dict(results[-1], delay_ms=float(delay)))
                bar.update(len(dataset.scenes))
                continue
            mean_ms = 0.0 if method == 'early' else float(delay)
            acc = APAccumulator(classes, max_range=max_range)
            sent_bytes, sent = 0, 0
            drops: Counter = Counter()
            for s in range(len(dataset.scenes)):
                n = dataset.num_frames(s)
                samples = [dataset.sample(s, f) for f in range(n)]
                agents = sorted({k for smp in samples for k in smp.agents})
                scene = samples[0].scene_name
                for ego in [a for a in agents if a != RSU_AGENT and (egos is None or a in egos)]:
                    channel = channel_for_mean_latency(mean_ms, channel_model, seed=seed)
                    coop = CooperativeDetector(
                        detector, ego, CooperativeConfig(method=method, roi_policy=roi_policy or {}, gate=gate),
                        fusion_model if method in ('trust', 'gate') else None)
                    senders = {k: Sender() for k in agents}
                    pending = []  # (arrival_ns, agent, stamp_ns, pose, item)
                    for f, smp in enumerate(samples):
                        if ego not in smp.agents:
                            continue
                        for k, agent in smp.agents.items():
                            if k == ego or method == 'ego':
                                continue
                            view = cache.load(scene, f, k)
                            view = replace(view, detections=senders[k].prepare(view.detections, view.T_world_sensor,
                                                                                view.stamp_ns))
                            item, nbytes = _payload(method, view, k, lambda a=agent: a.load_points()[:, :4], roi_policy)
                            sent_bytes += nbytes
                            sent += 1
                            delivery = channel.send(k, nbytes)
                            if delivery.delivered:
                                pending.append((delivery.arrival_ns(view.stamp_ns), k, view.stamp_ns,
                                                view.T_world_sensor, item))
                        ego_view = cache.load(scene, f, ego)
                        t_e = ego_view.stamp_ns
                        coop.add_pose(ego, t_e, ego_view.T_world_sensor)
                        ego_points = smp.agents[ego].load_points()[:, :4] if method == 'early' else None
                        coop.add_ego_detections(t_e, ego_view.detections, ego_points)
                        arrived = [p for p in pending if p[0] <= t_e]
                        pending = [p for p in pending if p[0] > t_e]
                        for _, k, stamp, pose, item in arrived:
                            coop.add_pose(k, stamp, pose)
                            coop.add_input(k, stamp, item)
                        out = coop.detect(t_e)
                        boxes, labels, _ = cooperative_targets(smp, ego)
                        if out is not None:
                            acc.add_frame(out.boxes, out.scores, out.labels, boxes, labels)
                    drops.update(coop.drops)
                bar.update(1)
            summary = acc.summary()
            head = summary['ap'][HEADLINE_CLASS]
            results.append({'method': method, 'delay_ms': float(delay), 'ap50': head['0.5'], 'ap70': head['0.7'],
                            'ap30': head['0.3'], 'mean_ap': summary['mean'], 'ap': summary['ap'],
                            'bytes_per_agent_frame': sent_bytes / sent if sent else 0.0,
                            'frames': summary['frames'], 'drops': dict(drops)})
    bar.close()
    return {'results': results, 'headline_class': HEADLINE_CLASS, 'max_range_m': max_range,
            'channel': channel_model, 'seed': seed}


def format_results(result: dict) -> str:
    rows = result['results']
    lines = [f"{'method':<8}{'delay ms':>9}{'AP@0.5':>8}{'AP@0.7':>8}{'bytes/agent-frame':>19}",
             '-' * 52]
    for r in rows:
        ap50 = f"{100 * r['ap50']:.1f}" if r['ap50'] is not None else 'n/a'
        ap70 = f"{100 * r['ap70']:.1f}" if r['ap70'] is not None else 'n/a'
        lines.append(f"{r['method']:<8}{r['delay_ms']:>9.0f}{ap50:>8}{ap70:>8}{r['bytes_per_agent_frame']:>19.0f}")
    lines.append(f"({result['headline_class']} AP in %, BEV rotated IoU, within {result['max_range_m']:g} m of the ego; "
                 f"{result['channel']} latency channel, seed {result['seed']})")
    return '\n'.join(lines)
