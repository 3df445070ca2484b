"""Speed of the cooperative fusion itself: one ego frame fused with its collaborators' messages.

The detectors' own work is not timed (each agent runs its detector on its own computer, and
`bench detector` measures it): the ego's detector output and the collaborators' messages come
from the feature cache, and only `CooperativeDetector.detect` runs under the clock.
"""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

from ..data.synth import RSU_AGENT
from ..fusion.codec import make_message
from ..fusion.ego_map import ego_features
from ..fusion.pipeline import CooperativeConfig, CooperativeDetector, Sender, collaborator_message
from ..fusion.sharing import select_occupied_cells
from .fusion_eval import method_policy

STAGES = ('lending', 'reputation', 'warp', 'fusion', 'head_decode', 'roi_boxes', 'merge', 'total')


def bench_fusion(dataset, detector, cache, fusion_model, *, method: str = 'trust', ego: int = 1,
                 frames: int = 60, gate: dict | None = None, ego_map: bool = False, progress: bool = True) -> dict:
    """Fuse up to ``frames`` ego frames of ``dataset`` (scene by scene) with every other agent's
    newest message (no latency) -> {'median_ms': {stage: ..}, 'p90_ms': {..}, 'frames': n,
    'collaborators': mean number fused}. With ``ego_map`` the ego's frames come as trust_fusion
    gets them, as an int8 map without boxes (fusion.ego_map), not as detections."""
    times: dict[str, list[float]] = {s: [] for s in STAGES}
    fused_with = []
    policy = method_policy(method, None)
    bar = tqdm(total=frames, desc=f'bench fusion ({method})', unit='frame', disable=not progress)
    for s in range(len(dataset.scenes)):
        if len(times['total']) >= frames:
            break
        coop = CooperativeDetector(detector, ego, CooperativeConfig(method=method, gate=gate), fusion_model)
        senders: dict[int, Sender] = {}
        for f in range(dataset.num_frames(s)):
            sample = dataset.sample(s, f)
            if ego not in sample.agents or len(times['total']) >= frames:
                continue
            for k in sorted(sample.agents):
                view = cache.load(sample.scene_name, f, k)
                coop.add_pose(k, view.stamp_ns, view.T_world_sensor)
                # every agent tracks its own detections, the ego too (as its detector node does)
                det = senders.setdefault(k, Sender()).prepare(view.detections, view.T_world_sensor, view.stamp_ns)
                if k == ego:
                    _add_ego(coop, det, view.stamp_ns, ego_map)
                    ego_stamp = view.stamp_ns
                else:
                    coop.add_input(k, view.stamp_ns, collaborator_message(det, k, view.stamp_ns, policy))
            out = coop.detect(ego_stamp)
            if out is None or not out.ages_s:
                continue
            for stage in STAGES:
                times[stage].append(out.timings_ms.get(stage, 0.0))
            fused_with.append(len(out.ages_s))
            bar.update(1)
    bar.close()
    return {'median_ms': {k: float(np.median(v)) if v else None for k, v in times.items()},
            'p90_ms': {k: float(np.percentile(v, 90)) if v else None for k, v in times.items()},
            'frames': len(times['total']), 'collaborators': float(np.mean(fused_with)) if fused_with else 0.0,
            'method': method, 'excluded_agents': [ego], 'rsu': RSU_AGENT}


def _add_ego(coop: CooperativeDetector, det, stamp_ns: int, as_map: bool) -> None:
    if not as_map:
        coop.add_ego_detections(stamp_ns, det)
        return
    msg = make_message(det, select_occupied_cells(det), coop.ego_id, stamp_ns)
    coop.add_ego_map(stamp_ns, ego_features(msg, det.grid, msg.channels), det.sensor_height, det.free_range, msg)
