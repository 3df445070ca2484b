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
    # A stamp this far behind the newest is a jump back of the clock (a looping bag) once
    # ``jump_confirm`` consecutive poses agree (BackJump); keep it below the shortest bag that may
    # loop. Until then such poses are held back, so one stale pose cannot empty the history.
    time_jump_back_s: float | None = 1.0
    jump_confirm: int = 1

    def __post_init__(self):
        if self.max_poses is not None and self.max_poses < 1:
            raise ValueError(f'max_poses must be >= 1, got {self.max_poses}')
        if self.jump_confirm < 1:
            raise ValueError(f'jump_confirm must be >= 1, got {self.jump_confirm}')
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


class BackJump:
    """Tells a real jump back of a stream's stamps (a bag that loops, a sender that restarts) from
    a stray old message (late, replayed or forged).

    ``observe(stamp, item)`` returns ``(OK, [])`` for a stamp at most ``jump_ns`` behind the newest
    one seen (which it moves on), ``(STALE, [])`` for one further behind, whose ``item`` it holds,
    and ``(JUMP, items)`` when ``confirm`` consecutive stamps were that far behind, each within
    ``jump_ns`` of the one before: the stream restarted there, ``items`` are the held ones in
    arrival order (this one last) and the newest stamp becomes the newest of theirs. A message in
    the current time in between drops the held ones, so isolated stale messages never add up.
    ``stale`` counts the STALE verdicts.
    """

    OK, STALE, JUMP = 'ok', 'stale', 'jump'

    def __init__(self, jump_ns: int | None, confirm: int = 1):
        if confirm < 1:
            raise ValueError(f'confirm must be >= 1, got {confirm}')
        self.jump_ns = jump_ns
        self.confirm = confirm
        self.newest_ns: int | None = None
        self.stale = 0
        self._held: list[tuple[int, object]] = []   # (stamp, item), consecutive stamps far behind

    def reset(self) -> None:
        self.newest_ns = None
        self._held.clear()

    def held(self) -> list:
        """The items held back as stale since the last stamp in the current time, oldest first."""
        return [item for _, item in self._held]

    def observe(self, stamp_ns: int, item=None) -> tuple[str, list]:
        if self.newest_ns is None or self.jump_ns is None or stamp_ns >= self.newest_ns - self.jump_ns:
            self.newest_ns = stamp_ns if self.newest_ns is None else max(self.newest_ns, stamp_ns)
            self._held.clear()
            return self.OK, []
        if self._held and abs(stamp_ns - self._held[-1][0]) > self.jump_ns:
            self._held.clear()
        self._held.append((stamp_ns, item))
        if len(self._held) < self.confirm:
            self.stale += 1
            return self.STALE, []
        held, self._held = self._held, []
        self.newest_ns = max(stamp for stamp, _ in held)
        return self.JUMP, [item for _, item in held]


class PoseBuffer:
    """Stamped poses of one agent, kept sorted by stamp.

    Inserts may arrive out of order; a second pose at an existing stamp replaces the first. A stamp
    far behind the newest one (the clock jumped back, e.g. a looping bag) clears the history first,
    so poses of the previous loop are never interpolated with poses of the new one; with
    ``jump_confirm`` > 1 such poses are held back until that many in a row confirm the jump
    (``BackJump``), and then the history restarts with them.
    """

    def __init__(self, config: PoseBufferConfig | None = None):
        self.config = config or PoseBufferConfig()
        self._max_age_ns = _s_to_ns(self.config.max_age_s)
        self._max_extrap_ns = _s_to_ns(self.config.max_extrapolation_s)
        self._jump_ns = _s_to_ns(self.config.time_jump_back_s)
        self._stamps: list[int] = []
        self._poses: list[np.ndarray] = []
        self._clock = BackJump(self._jump_ns, self.config.jump_confirm)

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
        self._clock.reset()

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
        verdict, held = self._clock.observe(stamp_ns, (stamp_ns, pose))
        if verdict == BackJump.STALE:
            return False
        if verdict == BackJump.JUMP:
            self._stamps.clear()
            self._poses.clear()
        for stamp, value in held or [(stamp_ns, pose)]:
            insert_stamped(self._stamps, self._poses, stamp, value)
        self._prune()
        return verdict == BackJump.JUMP

    @property
    def stale(self) -> int:
        """Poses held back as stale so far (``jump_confirm``)."""
        return self._clock.stale

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

    def __len__(self) -> int:
        return len(self._buffers)

    def agents(self) -> list[Hashable]:
        return list(self._buffers)

    def forget(self, agent_id: Hashable) -> None:
        """Drop ``agent_id``'s buffer altogether (an agent gone silent), if it has one."""
        self._buffers.pop(agent_id, None)

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
