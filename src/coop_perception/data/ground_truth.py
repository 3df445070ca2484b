"""The ground truth a cooperative detector is scored and trained against."""
from __future__ import annotations

import numpy as np

from coop_perception.geometry import invert_pose, rotate_vectors_2d, transform_boxes


def cooperative_targets(sample, ego: int):
    """Ground truth in the ego's sensor frame at its capture time: objects any agent sees, minus
    the ego's own vehicle. -> boxes (M, 7), labels (M,), velocities (M, 2)."""
    gt = sample.gt
    agent = sample.agents[ego]
    boxes = gt.boxes_at((agent.timestamp_us - sample.timestamp_us) * 1e-6)
    keep = np.ones(len(boxes), bool)
    if gt.agent_points:
        keep &= np.sum(list(gt.agent_points.values()), axis=0) >= 1
    own = sample.agent_box(ego)
    if own >= 0:
        keep[own] = False
    T = invert_pose(agent.T_world_sensor)
    return transform_boxes(T, boxes[keep]), np.asarray(gt.labels)[keep], rotate_vectors_2d(T, gt.velocities[keep])
