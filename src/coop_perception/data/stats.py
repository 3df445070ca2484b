"""Dataset summary: sizes, classes, points per scan and how much collaboration could help."""
from __future__ import annotations

from collections import Counter

import numpy as np

from .synth import RSU_AGENT
from .v2xsim import V2XSimDataset

OCCLUSION_RADIUS = 50.0      # m around the ego vehicle
COLLABORATOR_MIN_POINTS = 5  # points a collaborator needs on an object to count as seeing it


def summarize(ds: V2XSimDataset) -> dict:
    """Counts over the whole dataset.

    occluded_visible_to_collaborator: over every (vehicle ego, sample), the fraction of ground-truth
    objects within OCCLUSION_RADIUS of the ego that carry no ego point but at least
    COLLABORATOR_MIN_POINTS points from some other agent (the ego's own vehicle excluded).
    """
    classes: Counter = Counter()
    profiles: Counter = Counter()   # agent-scans per LiDAR profile (None: the dataset does not say)
    points = []
    agents_seen = set()
    near = occluded = 0
    frames = 0
    for sample in ds.samples():
        frames += 1
        classes.update(sample.gt.categories)
        agents_seen.update(sample.agents)
        for a in sample.agents.values():
            points.append(a.num_points())
            profiles[a.lidar_profile or 'unrecorded'] += 1
        counts = sample.gt.agent_points
        if not counts:
            continue
        for ego in sample.agents:
            if ego == RSU_AGENT or ego not in counts:
                continue
            centre = sample.agents[ego].T_world_ego[:2, 3]
            within = np.linalg.norm(sample.gt.boxes[:, :2] - centre, axis=1) <= OCCLUSION_RADIUS
            own = sample.agent_box(ego)
            if own >= 0:
                within[own] = False
            others = [counts[k] for k in counts if k != ego]
            best_other = np.max(others, axis=0) if others else np.zeros_like(counts[ego])
            near += int(within.sum())
            occluded += int((within & (counts[ego] == 0) & (best_other >= COLLABORATOR_MIN_POINTS)).sum())
    pts = np.array(points) if points else np.zeros(1)
    return {
        'scenes': len(ds.scenes),
        'frames': frames,
        'agents': sorted(agents_seen),
        'classes': dict(sorted(classes.items())),
        'points_per_scan': {'mean': float(pts.mean()), 'min': int(pts.min()), 'max': int(pts.max())},
        'lidar_profiles': dict(sorted(profiles.items())),
        'objects_near_ego': near,
        'occluded_visible_to_collaborator': occluded / near if near else 0.0,
        'conventions': ds.conventions.to_dict(),
    }


def format_summary(s: dict, conventions: list[str]) -> str:
    """The summary as text; `conventions`: `Conventions.lines()` of the dataset."""
    lines = [f"scenes: {s['scenes']}   frames: {s['frames']}   agents: {s['agents']}",
             'classes: ' + ', '.join(f'{k}={v}' for k, v in s['classes'].items()),
             'points per scan: mean {mean:.0f}, min {min}, max {max}'.format(**s['points_per_scan']),
             'LiDAR profiles (agent-scans): ' + ', '.join(f'{k}={v}' for k, v in s['lidar_profiles'].items()),
             f"objects within {OCCLUSION_RADIUS:g} m of an ego vehicle: {s['objects_near_ego']}",
             f"  of which occluded for the ego but seen (>= {COLLABORATOR_MIN_POINTS} points) by a "
             f"collaborator: {100 * s['occluded_visible_to_collaborator']:.1f}%",
             'conventions (detected when opened):'] + ['  ' + line for line in conventions]
    return '\n'.join(lines)
