"""ROI velocities for motion compensation, estimated by the sender from its own scan sequence.

A single LiDAR sweep does not show how fast an object moves, and the detector's velocity head
learns little beyond "zero" from one sweep. Each sender therefore tracks its detections over its
own scans in the world frame with one constant-velocity Kalman filter per object: detections are
associated with the tracks' predicted positions (same class, Mahalanobis gate, one-to-one), and
the filtered velocity is what the receiver's motion compensation uses. Differentiating centres
from one scan to the next (what this did before) turns 10-20 cm of detector centre noise into
1-2 m/s of velocity noise at 10 Hz; the filter averages it out over the track.

Velocities measured from the sensor's previous sweeps (detection.scan_velocity, or a multi-sweep
network's head; ``Detections.velocity_std`` > 0, per box or for all) are a second measurement of
each track, with their own noise, and a new track starts from them, so that an object is moved
correctly from its early scans on. A measurement far from a track's predicted velocity is an
outlier and changes nothing (``velocity_gate``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from ..geometry import invert_pose, rotate_vectors_2d, transform_boxes
from .pose_buffer import NS_PER_S

# m/s: the noise given to a velocity that was not measured, so that it changes no track
_UNMEASURED_STD = 1e6


@dataclass
class VelocityTrackerConfig:
    accel_std: float = 2.0        # m/s^2: white-noise acceleration of the constant-velocity model
    position_std: float = 0.15    # m: noise of a detected box centre
    init_speed_std: float = 10.0  # m/s: velocity spread of a new track (sets its first gate)
    gate: float = 3.5             # Mahalanobis distance of a detection from a track's prediction
    max_gap_s: float = 0.5        # a track not seen for longer is dropped (occlusion, a lost burst)
    # A track reports its velocity only once it is this many standard deviations (Mahalanobis, of
    # the filtered velocity) away from standing still, else 0: most objects are parked, and a
    # young track's velocity is mostly the detector's centre jitter divided by 0.1 s.
    moving_gate: float = 1.0
    # A velocity measurement further than this (Mahalanobis) from a track's predicted velocity is
    # an outlier (a registration that locked onto the wrong structure) and is ignored; 0: none is.
    velocity_gate: float = 3.0


class VelocityTracker:
    """Feed one agent's scans in capture order; get each detection's ground velocity."""

    def __init__(self, cfg: VelocityTrackerConfig | None = None):
        self.cfg = cfg or VelocityTrackerConfig()
        self.reset()

    def reset(self) -> None:
        self._x = np.zeros((0, 4))          # (T, 4) world x, y (m), vx, vy (m/s) at each track's last scan
        self._P = np.zeros((0, 4, 4))       # (T, 4, 4) their covariances
        self._labels = np.zeros(0, np.int64)
        self._seen_ns = np.zeros(0, np.int64)
        self._newest_ns = None

    def update(self, boxes: np.ndarray, labels: np.ndarray, T_world_sensor: np.ndarray,
               stamp_ns: int, velocities: np.ndarray | None = None,
               velocity_std: float | np.ndarray = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """boxes (N, 7) and labels (N,) in the sensor frame at stamp_ns -> velocities (N, 2) m/s
        along the sensor axes (0 for an object seen for the first time, unless measured) and their
        standard deviations (N,) m/s per axis: the track's, including the error of reporting a
        slow track as standing still; ``init_speed_std`` for an unmeasured first sighting.
        ``velocities`` (N, 2) m/s along the sensor axes: measured velocities (a multi-sweep
        detector's, or detection.scan_velocity's), used as measurements with noise
        ``velocity_std`` (m/s; a scalar or one per box); a box whose noise is 0 or not finite has
        no velocity measurement."""
        stamp_ns = int(stamp_ns)
        if self._newest_ns is not None and stamp_ns < self._newest_ns:   # time went back (bag loop)
            self.reset()
        self._newest_ns = stamp_ns
        alive = (stamp_ns - self._seen_ns) / NS_PER_S <= self.cfg.max_gap_s
        self._keep(alive)
        labels = np.asarray(labels, np.int64)
        z = transform_boxes(T_world_sensor, np.asarray(boxes, np.float64).reshape(-1, 7))[:, :2]
        v_std = np.zeros(len(z))
        if velocities is not None:
            v_std = np.broadcast_to(np.asarray(velocity_std, np.float64), (len(z),)).copy()
            v_std[~np.isfinite(v_std) | (v_std < 0)] = 0.0
        measured = v_std > 0
        if measured.any():
            v = np.asarray(velocities, np.float64).reshape(-1, 2)
            z = np.column_stack([z, rotate_vectors_2d(T_world_sensor, np.where(measured[:, None], v, 0.0))])
        x, P = self._predict(stamp_ns)
        track_of = self._associate(z[:, :2], labels, x, P)
        hit = track_of >= 0
        t = track_of[hit]
        if hit.any():
            self._x[t], self._P[t] = self._correct(x[t], P[t], z[hit], v_std[hit])
            self._seen_ns[t] = stamp_ns
        first = len(self._x)
        self._start(z[~hit], labels[~hit], stamp_ns, v_std[~hit])
        rows = np.empty(len(z), np.int64)
        rows[hit], rows[~hit] = t, np.arange(first, len(self._x))
        filtered = self._x[rows, 2:]
        vel_world = filtered * self._moving(rows)[:, None]
        vel_world[~hit & ~measured] = 0.0  # an unmeasured new track's velocity is only its prior, 0
        bias = filtered - vel_world
        std = np.sqrt((np.trace(self._P[rows, 2:, 2:], axis1=1, axis2=2) + (bias ** 2).sum(1)) / 2)
        return rotate_vectors_2d(invert_pose(T_world_sensor), vel_world), std

    def _moving(self, tracks: np.ndarray) -> np.ndarray:
        """(k,) bool: the tracks' filtered velocities are moving_gate sigmas away from 0."""
        if self.cfg.moving_gate <= 0:
            return np.ones(len(tracks), bool)
        v = self._x[tracks, 2:]
        m2 = np.einsum('ki,kij,kj->k', v, np.linalg.inv(self._P[tracks, 2:, 2:]), v)
        return m2 >= self.cfg.moving_gate ** 2

    def _keep(self, mask: np.ndarray) -> None:
        self._x, self._P, self._labels = self._x[mask], self._P[mask], self._labels[mask]
        self._seen_ns = self._seen_ns[mask]

    def _predict(self, stamp_ns: int) -> tuple[np.ndarray, np.ndarray]:
        """Every track moved to stamp_ns: states (T, 4) and covariances (T, 4, 4)."""
        dt = (stamp_ns - self._seen_ns) / NS_PER_S
        F = np.tile(np.eye(4), (len(dt), 1, 1))
        F[:, 0, 2] = F[:, 1, 3] = dt
        q = self.cfg.accel_std ** 2
        Q = np.zeros((len(dt), 4, 4))
        for i in range(2):   # per axis: position and velocity driven by the same acceleration
            Q[:, i, i] = q * dt ** 3 / 3
            Q[:, i, i + 2] = Q[:, i + 2, i] = q * dt ** 2 / 2
            Q[:, i + 2, i + 2] = q * dt
        x = np.einsum('tij,tj->ti', F, self._x)
        P = F @ self._P @ F.transpose(0, 2, 1) + Q
        return x, P

    def _innovation_cov(self, P: np.ndarray) -> np.ndarray:
        return P[:, :2, :2] + self.cfg.position_std ** 2 * np.eye(2)

    def _associate(self, z: np.ndarray, labels: np.ndarray, x: np.ndarray, P: np.ndarray) -> np.ndarray:
        """(N,) index of the track each detection continues, -1 for none."""
        out = np.full(len(z), -1, np.int64)
        if not len(z) or not len(x):
            return out
        S_inv = np.linalg.inv(self._innovation_cov(P))
        d = z[:, None, :] - x[None, :, :2]                              # (N, T, 2)
        m2 = np.einsum('ntj,tjk,ntk->nt', d, S_inv, d)
        m2[labels[:, None] != self._labels[None, :]] = np.inf
        allowed = m2 <= self.cfg.gate ** 2
        rows, cols = linear_sum_assignment(np.where(allowed, m2, 1e12))
        ok = allowed[rows, cols]
        out[rows[ok]] = cols[ok]
        return out

    def _correct(self, x: np.ndarray, P: np.ndarray, z: np.ndarray,
                 velocity_std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Kalman update of tracks (k, 4), (k, 4, 4) with their detected centres (k, 2), or
        centres and velocities (k, 4) whose velocities were measured with noise velocity_std
        (k,) m/s (0: not measured)."""
        m = z.shape[1]
        R = np.zeros((len(z), m, m))
        R[:, 0, 0] = R[:, 1, 1] = self.cfg.position_std ** 2
        if m == 4:   # an unmeasured velocity: a measurement so noisy that it changes nothing
            used = velocity_std > 0
            if self.cfg.velocity_gate > 0 and used.any():
                S = P[:, 2:, 2:] + (velocity_std ** 2)[:, None, None] * np.eye(2)
                d = z[:, 2:] - x[:, 2:]
                used &= np.einsum('ki,kij,kj->k', d, np.linalg.inv(S), d) <= self.cfg.velocity_gate ** 2
            R[:, 2, 2] = R[:, 3, 3] = np.where(used, velocity_std, _UNMEASURED_STD) ** 2
        K = P[:, :, :m] @ np.linalg.inv(P[:, :m, :m] + R)              # (k, 4, m)
        x = x + np.einsum('kij,kj->ki', K, z - x[:, :m])
        P = P - K @ P[:, :m, :]
        return x, P

    def _start(self, z: np.ndarray, labels: np.ndarray, stamp_ns: int, velocity_std: np.ndarray) -> None:
        n = len(z)
        measured = velocity_std > 0
        speed_std = np.where(measured, velocity_std, self.cfg.init_speed_std)
        P0 = np.zeros((n, 4, 4))
        P0[:, 0, 0] = P0[:, 1, 1] = self.cfg.position_std ** 2
        P0[:, 2, 2] = P0[:, 3, 3] = speed_std ** 2
        v0 = np.where(measured[:, None], z[:, 2:4], 0.0) if z.shape[1] == 4 else np.zeros((n, 2))
        self._x = np.concatenate([self._x, np.column_stack([z[:, :2], v0])])
        self._P = np.concatenate([self._P, P0])
        self._labels = np.concatenate([self._labels, labels])
        self._seen_ns = np.concatenate([self._seen_ns, np.full(n, stamp_ns, np.int64)])
