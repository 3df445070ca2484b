"""Several LiDAR sweeps of one sensor as one ego-motion-compensated cloud with a per-point age.

A single sweep shows where an object is, not where it goes: the detector's velocity head learns ~0
from it. Earlier sweeps, moved into the newest sweep's sensor frame with the sensor's poses, make a
moving object a streak whose older end is tagged with its age (seconds before the newest sweep),
as CenterPoint does on nuScenes. Static things land on themselves, so what moves in the stacked
cloud moves in the world.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from coop_perception.geometry import invert_pose

NS_PER_S = 1_000_000_000


@dataclass(frozen=True)
class Sweep:
    points: np.ndarray  # (N, C) float32 in this sweep's sensor frame, columns x, y, z (m), ...
    T_world_sensor: np.ndarray  # (4, 4) sensor pose at the capture time
    stamp_ns: int  # capture time


def stack_sweeps(current: Sweep, previous: list[Sweep], max_age_s: float) -> tuple[np.ndarray, np.ndarray]:
    """-> points (M, C) float32 in ``current``'s sensor frame (current sweep first) and ages (M,)
    float32, seconds before ``current.stamp_ns`` (0 for the current sweep). Previous sweeps older
    than ``max_age_s``, newer than the current one, or with another column count are left out."""
    pts = np.asarray(current.points, np.float32)
    parts, ages = [pts], [np.zeros(len(pts), np.float32)]
    T_sensor_world = invert_pose(current.T_world_sensor)
    for sweep in previous:
        age = (current.stamp_ns - sweep.stamp_ns) / NS_PER_S
        prev = np.asarray(sweep.points, np.float32)
        if not 0.0 < age <= max_age_s or prev.ndim != 2 or prev.shape[1] != pts.shape[1]:
            continue
        T = (T_sensor_world @ sweep.T_world_sensor).astype(np.float32)
        moved = prev.copy()
        moved[:, :3] = prev[:, :3] @ T[:3, :3].T + T[:3, 3]
        parts.append(moved)
        ages.append(np.full(len(prev), age, np.float32))
    return np.concatenate(parts), np.concatenate(ages)


def sweep_slices(ages: np.ndarray) -> list[tuple[float, slice]]:
    """Ages (M,) of stacked sweeps (``stack_sweeps``: each sweep's points contiguous, newest first)
    -> [(age s, slice of its points)], newest first."""
    ages = np.asarray(ages)
    if not len(ages):
        return []
    starts = np.concatenate([[0], np.flatnonzero(np.diff(ages)) + 1])
    ends = np.concatenate([starts[1:], [len(ages)]])
    return [(float(ages[a]), slice(int(a), int(b))) for a, b in zip(starts, ends)]


def newest_sweeps(points: np.ndarray, ages: np.ndarray, sweeps: int,
                  max_age_s: float) -> tuple[np.ndarray, np.ndarray]:
    """The newest ``sweeps`` sweeps (no older than ``max_age_s``) of a stack -> (points, ages)."""
    kept = [sl for age, sl in sweep_slices(ages)[:sweeps] if age <= max_age_s]
    end = kept[-1].stop if kept else 0
    if end == len(ages):
        return points, ages
    return points[:end], ages[:end]


class SweepHistory:
    """The last ``sweeps - 1`` sweeps of one sensor, stacked under each new one (``stack``).

    A sweep without a pose is used alone and empties the history (it cannot be placed); so does
    time going back (a looped bag), so that a sweep is never stacked with its future.
    """

    def __init__(self, sweeps: int, max_age_s: float):
        if sweeps < 1:
            raise ValueError(f'sweeps must be >= 1, got {sweeps}')
        self.max_age_s = float(max_age_s)
        self._kept: deque[Sweep] = deque(maxlen=sweeps - 1) if sweeps > 1 else deque(maxlen=0)

    def reset(self) -> None:
        self._kept.clear()

    def stack(self, points: np.ndarray, T_world_sensor: np.ndarray | None,
              stamp_ns: int) -> tuple[np.ndarray, np.ndarray]:
        """-> (points (M, C), ages (M,) s) for the sweep captured at ``stamp_ns``; see stack_sweeps."""
        pts = np.asarray(points, np.float32)
        unplaced = T_world_sensor is None or pts.ndim != 2 or pts.shape[1] < 3
        if unplaced or (self._kept and stamp_ns <= self._kept[-1].stamp_ns):
            self.reset()
        if unplaced:
            return pts, np.zeros(len(pts), np.float32)
        current = Sweep(pts, np.asarray(T_world_sensor, np.float64), int(stamp_ns))
        out = stack_sweeps(current, list(reversed(self._kept)), self.max_age_s)
        if self._kept.maxlen:
            self._kept.append(current)
        return out
