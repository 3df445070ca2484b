"""Global scan augmentation about the sensor: flips, yaw rotation, scaling (points, boxes, velocities)."""
from __future__ import annotations

import numpy as np

from coop_perception.geometry import wrap_angle

from .config import AugmentConfig


def augment_scene(points: np.ndarray, boxes: np.ndarray, velocities: np.ndarray, sensor_height: float,
                  cfg: AugmentConfig, rng: np.random.Generator):
    """-> (points, boxes, velocities, sensor_height), all new arrays. Scaling is about the sensor,
    so the ground below it moves with the points and the sensor height scales too."""
    pts = np.array(points, np.float32)
    boxes = np.array(boxes, np.float64).reshape(-1, 7)
    vel = np.array(velocities, np.float64).reshape(-1, 2)
    if cfg.flip and rng.random() < 0.5:  # mirror across the x axis
        pts[:, 1] *= -1
        boxes[:, 1] *= -1
        boxes[:, 6] = -boxes[:, 6]
        vel[:, 1] *= -1
    if cfg.flip and rng.random() < 0.5:  # mirror across the y axis
        pts[:, 0] *= -1
        boxes[:, 0] *= -1
        boxes[:, 6] = np.pi - boxes[:, 6]
        vel[:, 0] *= -1
    theta = rng.uniform(-cfg.rotation, cfg.rotation)
    c, s = np.cos(theta), np.sin(theta)
    rot = np.array([[c, -s], [s, c]])
    pts[:, :2] = pts[:, :2] @ rot.T.astype(np.float32)
    boxes[:, :2] = boxes[:, :2] @ rot.T
    boxes[:, 6] = wrap_angle(boxes[:, 6] + theta)
    vel = vel @ rot.T
    scale = rng.uniform(*cfg.scale)
    pts[:, :3] *= np.float32(scale)
    boxes[:, :6] *= scale
    return pts, boxes, vel * scale, sensor_height * scale
