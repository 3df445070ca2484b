"""ROI velocities for motion compensation, estimated by the sender from its own scan sequence.

A single LiDAR sweep does not show how fast an object moves, and the detector's velocity head
learns little beyond "zero" from one sweep. Each sender therefore associates its detections with
those of its previous scan (world frame, same class, nearest first within a speed gate) and
differentiates the centres, smoothing with the matched track's previous velocity (in the spirit of
CoBEVFlow's ROI motion from the collaborator's own history).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..geometry import invert_pose, rotate_vectors_2d, transform_boxes
from .pose_buffer import NS_PER_S


@dataclass
class VelocityTrackerConfig:
    max_speed: float = 30.0       # m/s: association gate is max_speed x dt (at least min_gate)
    min_gate: float = 1.0         # m
    smoothing: float = 0.5        # weight of the previous velocity of a matched track
    max_gap_s: float = 0.5        # older previous scans are not used (a restart, a lost scan burst)


class VelocityTracker:
    """Feed one agent's scans in capture order; get each detection's ground velocity."""

    def __init__(self, cfg: VelocityTrackerConfig | None = None):
        self.cfg = cfg or VelocityTrackerConfig()
        self.reset()

    def reset(self) -> None:
        self._prev = None  # (stamp_ns, boxes_world (N, 7), labels (N,), velocities_world (N, 2))

    def update(self, boxes: np.ndarray, labels: np.ndarray, T_world_sensor: np.ndarray,
               stamp_ns: int) -> np.ndarray:
        """boxes (N, 7) and labels (N,) in the sensor frame at stamp_ns -> velocities (N, 2) m/s
        along the sensor axes (0 for objects not seen in the previous scan)."""
        world = transform_boxes(T_world_sensor, boxes)
        vel_world = np.zeros((len(world), 2))
        prev = self._prev
        if prev is not None and prev[0] < stamp_ns:
            dt = (stamp_ns - prev[0]) / NS_PER_S
            if dt <= self.cfg.max_gap_s and len(world) and len(prev[1]):
                vel_world = self._associate(world, labels, prev, dt)
        if prev is None or prev[0] < stamp_ns:
            self._prev = (int(stamp_ns), world, np.asarray(labels), vel_world)
        elif prev[0] > stamp_ns:  # time went back (bag loop): start over from this scan
            self._prev = (int(stamp_ns), world, np.asarray(labels), np.zeros_like(vel_world))
        return rotate_vectors_2d(invert_pose(T_world_sensor), vel_world)

    def _associate(self, world, labels, prev, dt) -> np.ndarray:
        _, pw, pl, pv = prev
        gate = max(self.cfg.max_speed * dt, self.cfg.min_gate)
        d = np.linalg.norm(world[:, None, :2] - pw[None, :, :2], axis=-1)
        d[np.asarray(labels)[:, None] != pl[None, :]] = np.inf
        vel = np.zeros((len(world), 2))
        # greedy nearest pairs first: one previous box serves at most one current box
        order = np.argsort(d, axis=None)
        used_now, used_prev = np.zeros(len(world), bool), np.zeros(len(pw), bool)
        for flat in order[:np.count_nonzero(d <= gate)]:
            i, j = divmod(int(flat), len(pw))
            if used_now[i] or used_prev[j]:
                continue
            used_now[i] = used_prev[j] = True
            raw = (world[i, :2] - pw[j, :2]) / dt
            vel[i] = (1 - self.cfg.smoothing) * raw + self.cfg.smoothing * pv[j] if np.any(pv[j]) else raw
        return vel
