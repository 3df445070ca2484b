"""Velocities lent at the receiver: a collaborator's object whose sender does not know its
velocity takes the velocity of the same object as another source (the ego, another collaborator)
tracks it.

A sender's tracker reports 0, with the standard deviation of a guess, for an object it sees for
the first time and could not measure from its sweeps (detection.scan_velocity). Under delay such
an object is left where the sender saw it, the largest velocity error there is (models/fusion.md,
delay diagnosis). The receiver often knows better: the ego, or another collaborator, has been
tracking the same object. Only a settled track lends (a small standard deviation): a parked
object's young track, or one started from a bad registration, would move a correct 0.

Whether it is the same object is decided in time, not only in space: the donor's position, run
back along its own velocity to the borrower's capture stamp, must lie where the borrower was seen.
A parked object next to a moving one is not matched, because the moving one was elsewhere when
the parked one was seen.

Every object is given at the ego stamp in the ego frame: where the fusion puts it (its capture
position moved along its velocity by its age).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class LendingConfig:
    enabled: bool = True
    gate_m: float = 1.5          # m: the donor, run back to the borrower's stamp, this close
    min_score: float = 0.3       # borrowers and donors scoring lower take part in nothing
    min_shift_m: float = 0.3     # m: lend only where the borrowed motion moves the borrower this far
    # m/s (standard deviation per axis): a sender this unsure of a velocity does not know it (an
    # unmeasured first sighting has the tracker's init_speed_std, 10); a donor's must be below lend_std
    borrow_std: float = 3.0
    lend_std: float = 1.0
    min_speed: float = 1.0       # m/s: slower donors lend nothing (a parked object's track jitters)

    def __post_init__(self):
        if not (self.gate_m > 0 and self.min_shift_m >= 0 and self.min_speed > 0 and 0 <= self.min_score <= 1
                and 0 < self.lend_std <= self.borrow_std):
            raise ValueError('velocity lending: gate_m and min_speed must be > 0, min_shift_m >= 0, min_score in '
                             f'[0, 1] and 0 < lend_std <= borrow_std, got {self}')


def lend_velocities(positions: np.ndarray, velocities: np.ndarray, velocity_std: np.ndarray, labels: np.ndarray,
                    scores: np.ndarray, ages: np.ndarray, sources: np.ndarray, may_borrow: np.ndarray,
                    cfg: LendingConfig) -> np.ndarray:
    """Objects of every source at the ego stamp -> (n,) index of the object each one borrows its
    velocity from, -1 for none.

    positions (n, 2) m and velocities (n, 2) m/s in the ego frame; velocity_std (n,) m/s per axis
    (NaN: unknown, which neither borrows nor lends); labels (n,) int; scores (n,); ages (n,) s (ego
    stamp - capture stamp); sources (n,) an id per source; may_borrow (n,) bool (a collaborator's
    object, not the ego's). A borrower's sender is at least ``borrow_std`` unsure of its velocity;
    a donor is an object of another source and the same label, at most ``lend_std`` unsure,
    moving at least ``min_speed``; the nearest within ``gate_m`` after running it back by the
    borrower's age wins.
    """
    n = len(positions)
    out = np.full(n, -1, np.int64)
    speed = np.hypot(velocities[:, 0], velocities[:, 1]) if n else np.zeros(0)
    std = np.asarray(velocity_std, np.float64)
    borrower = np.flatnonzero(may_borrow & (std >= cfg.borrow_std) & (scores >= cfg.min_score))
    donor = np.flatnonzero((std <= cfg.lend_std) & (speed >= cfg.min_speed) & (scores >= cfg.min_score))
    if not len(borrower) or not len(donor):
        return out
    age = np.maximum(ages[borrower], 0.0)[:, None]                                     # (b, 1)
    back = positions[donor][None] - velocities[donor][None] * age[..., None]           # (b, d, 2)
    dist = np.linalg.norm(positions[borrower][:, None] - back, axis=2)
    allowed = ((labels[borrower][:, None] == labels[donor][None])
               & (sources[borrower][:, None] != sources[donor][None])
               & (speed[donor][None] * age >= cfg.min_shift_m)
               & (dist <= cfg.gate_m))
    dist = np.where(allowed, dist, np.inf)
    best = dist.argmin(1)
    found = np.isfinite(dist[np.arange(len(borrower)), best])
    out[borrower[found]] = donor[best[found]]
    return out
