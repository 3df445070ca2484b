"""Per-agent history of stamped sensor poses, looked up at arbitrary stamps.

Poses are 4x4 float64 ``T_map_sensor`` matrices (metres); stamps are integer nanoseconds, as in
ROS headers. Collaborator messages are stamped with their capture time, which falls between (or
slightly outside) the odometry samples, so a lookup interpolates on SE(3) between the bracketing
poses and extrapolates only a short, configurable distance past either end of the history.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Hashable

import numpy as np

from ..geometry import interpolate_pose

NS_PER_S = 1_000_000_000


def insert_stamped(stamps: list[int], values: list, stamp: int, value) -> None:
    """Insert ``value`` at ``stamp`` into the parallel lists, kept sorted by stamp; a value already
    at that stamp is replaced."""
    i = bisect.bisect_left(stamps, stamp)
    if i < len(stamps) and stamps[i] == stamp:
        values[i] = value
    else:
        stamps.insert(i, stamp)
        values.insert(i, value)

class PoseLookupError(LookupError):
    """No trustworthy pose exists at the requested stamp.

    ``reason`` is one of ``EMPTY``, ``TOO_OLD``, ``TOO_NEW`` so callers can count drops by cause.
    """

    EMPTY = 'empty'
    TOO_OLD = 'too_old'
    TOO_NEW = 'too_new'

    def __init__(self, reason: str, stamp_ns: int, detail: str):
        self.reason = reason
        self.stamp_ns = stamp_ns
        super().__init__(f'no pose at {stamp_ns} ns ({reason}): {detail}')


@dataclass(frozen=True)
class PoseBufferConfig:
    """History bounds and lookup limits. ``None`` disables a bound."""

    max_poses: int | None = 1000          # odometry at 50 Hz keeps 20 s
    max_age_s: float | None = 5.0         # kept history behind the newest stamp
    max_extrapolation_s: float = 0.1      # allowed lookup distance past the oldest/newest pose
    # A stamp this far behind the newest clears the history. Keep it below the shortest bag that
    # may loop; a pose arriving later than this is taken for a jump too.
    time_jump_back_s: float | None = 1.0

    def __post_init__(self):
        if self.max_poses is not None and self.max_poses < 1:
            raise ValueError(f'max_poses must be >= 1, got {self.max_poses}')
        for name in ('max_age_s', 'time_jump_back_s'):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f'{name} must be > 0 or None, got {value}')
        if not self.max_extrapolation_s >= 0:
            raise ValueError(f'max_extrapolation_s must be >= 0, got {self.max_extrapolation_s}')


def _check_stamp(stamp_ns) -> int:
    # A float here is almost always seconds passed where nanoseconds are expected.
    if isinstance(stamp_ns, (bool, np.bool_)) or not isinstance(stamp_ns, (int, np.integer)):
        raise TypeError(f'stamps are integer nanoseconds, got {type(stamp_ns).__name__} '
                        f'{stamp_ns!r}')
    return int(stamp_ns)


def _s_to_ns(seconds: float | None) -> int | None:
    return None if seconds is None else round(seconds * NS_PER_S)


class PoseBuffer:
    """Stamped poses of one agent, kept sorted by stamp.

    Inserts may arrive out of order; a second pose at an existing stamp replaces the first. A stamp
    far behind the newest one (the clock jumped back, e.g. a looping bag) clears the history first,
    so poses of the previous loop are never interpolated with poses of the new one.
    """

    def __init__(self, config: PoseBufferConfig | None = None):
        self.config = config or PoseBufferConfig()
        self._max_age_ns = _s_to_ns(self.config.max_age_s)
        self._max_extrap_ns = _s_to_ns(self.config.max_extrapolation_s)
        self._jump_ns = _s_to_ns(self.config.time_jump_back_s)
        self._stamps: list[int] = []
        self._poses: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self._stamps)

    @property
    def stamps_ns(self) -> np.ndarray:
        """(N,) int64 stamps in increasing order."""
        return np.asarray(self._stamps, dtype=np.int64)

    @property
    def oldest_ns(self) -> int | None:
        return self._stamps[0] if self._stamps else None

    @property
    def newest_ns(self) -> int | None:
        return self._stamps[-1] if self._stamps else None

    def reset(self) -> None:
        self._stamps.clear()
        self._poses.clear()

    def maybe_reset_on_time_jump(self, stamp_ns: int) -> bool:
        """Clear the history if ``stamp_ns`` lies more than ``time_jump_back_s`` behind the newest
        pose; return whether it was cleared."""
        stamp_ns = _check_stamp(stamp_ns)
        if (self._jump_ns is None or not self._stamps
                or stamp_ns >= self._stamps[-1] - self._jump_ns):
            return False
        self.reset()
        return True

    def insert(self, stamp_ns: int, pose: np.ndarray) -> bool:
        """Add ``pose`` (4, 4) at ``stamp_ns``; return whether a time jump cleared the history."""
        stamp_ns = _check_stamp(stamp_ns)
        pose = np.array(pose, dtype=np.float64)
        if pose.shape != (4, 4) or not np.all(np.isfinite(pose)):
            raise ValueError(f'pose must be a finite (4, 4) matrix, got shape {pose.shape}')
        was_reset = self.maybe_reset_on_time_jump(stamp_ns)
        insert_stamped(self._stamps, self._poses, stamp_ns, pose)
        self._prune()
        return was_reset

    def _prune(self) -> None:
        drop = 0
        if self.config.max_poses is not None:
            drop = max(drop, len(self._stamps) - self.config.max_poses)
        if self._max_age_ns is not None:
            drop = max(drop, bisect.bisect_left(self._stamps, self._stamps[-1] - self._max_age_ns))
        if drop:
            del self._stamps[:drop]
            del self._poses[:drop]

    def lookup(self, stamp_ns: int) -> np.ndarray:
        """(4, 4) pose at ``stamp_ns``.

        Between two poses: slerp of rotation, lerp of translation. Within ``max_extrapolation_s``
        past either end: continued along the two end poses (held constant if there is only one).
        Raises ``PoseLookupError`` otherwise.
        """
        stamp_ns = _check_stamp(stamp_ns)
        stamps = self._stamps
        if not stamps:
            raise PoseLookupError(PoseLookupError.EMPTY, stamp_ns, 'no pose history')
        limit = f'(limit {self.config.max_extrapolation_s} s)'
        if stamp_ns < stamps[0] - self._max_extrap_ns:
            raise PoseLookupError(PoseLookupError.TOO_OLD, stamp_ns,
                                  f'{(stamps[0] - stamp_ns) / NS_PER_S:.3f} s before the oldest '
                                  f'pose {limit}')
        if stamp_ns > stamps[-1] + self._max_extrap_ns:
            raise PoseLookupError(PoseLookupError.TOO_NEW, stamp_ns,
                                  f'{(stamp_ns - stamps[-1]) / NS_PER_S:.3f} s after the newest '
                                  f'pose {limit}')
        i = bisect.bisect_left(stamps, stamp_ns)
        if i < len(stamps) and stamps[i] == stamp_ns:
            return self._poses[i].copy()
        if len(stamps) == 1:
            return self._poses[0].copy()
        # The bracketing pair inside the history, or the end pair when extrapolating.
        i1 = min(max(i, 1), len(stamps) - 1)
        t0, t1 = stamps[i1 - 1], stamps[i1]
        return interpolate_pose(self._poses[i1 - 1], self._poses[i1], (stamp_ns - t0) / (t1 - t0))


class PoseBuffers:
    """One ``PoseBuffer`` per agent id, all with the same configuration, created on first insert."""

    def __init__(self, config: PoseBufferConfig | None = None):
        self.config = config or PoseBufferConfig()
        self._buffers: dict[Hashable, PoseBuffer] = {}

    def __contains__(self, agent_id: Hashable) -> bool:
        return agent_id in self._buffers

    def __getitem__(self, agent_id: Hashable) -> PoseBuffer:
        return self._buffers[agent_id]

    def agents(self) -> list[Hashable]:
        return list(self._buffers)

    def insert(self, agent_id: Hashable, stamp_ns: int, pose: np.ndarray) -> bool:
        """Add a pose of ``agent_id``; return whether a time jump cleared that agent's history."""
        buf = self._buffers.get(agent_id)
        if buf is None:
            buf = self._buffers[agent_id] = PoseBuffer(self.config)
        return buf.insert(stamp_ns, pose)

    def lookup(self, agent_id: Hashable, stamp_ns: int) -> np.ndarray:
        """(4, 4) pose of ``agent_id`` at ``stamp_ns``; ``PoseLookupError`` (``EMPTY`` for an agent
        never seen) when there is none."""
        buf = self._buffers.get(agent_id)
        if buf is None:
            raise PoseLookupError(PoseLookupError.EMPTY, _check_stamp(stamp_ns),
                                  f'no pose history for agent {agent_id!r}')
        return buf.lookup(stamp_ns)

    def reset(self) -> None:
        for buf in self._buffers.values():
            buf.reset()

    def maybe_reset_on_time_jump(self, stamp_ns: int) -> list[Hashable]:
        """Apply a clock reading (e.g. /clock) to every agent; return the agents whose history it
        cleared."""
        return [a for a, buf in self._buffers.items() if buf.maybe_reset_on_time_jump(stamp_ns)]
