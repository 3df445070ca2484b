"""The free space a scan saw, as a compact polar profile: per azimuth bin, how far the sensor
looked before it hit something standing above the ground.

A box another agent reports where this profile says the sensor saw through is a box the scene
contradicts (fusion.reputation). The profile is what the detector can measure cheaply from its
own scan, in its own sensor frame, without ray casting: a return at height 0.3-2.5 m above the
ground (the band a car, a person or a wall occupies) is an obstacle, and within one bin nothing
nearer than the nearest such return can stand in the LiDAR's line of sight at those heights.
A bin without any obstacle return is free up to ``max_range_m``, the LiDAR's range.

On a collaborator's feature message the profile travels as one byte a bin (``to_wire``): the
range rounded down to ``WIRE_STEP_M`` (a receiver never sees more free space than the sender did).
A sensor mounted above the obstacle band (a road-side unit) sends 0 (nothing known) for the bins
without an obstacle return: its beams can pass above a low object and reach the ground behind
it, so the absence of a return in the band is no view through it (measured in models/fusion.md).
"""
from __future__ import annotations

import numpy as np

FREE_RANGE_BINS = 360               # 1 deg bins; bin b covers azimuth [-pi + b * 2 pi / B, ...)
FREE_RANGE_MAX_M = 70.0             # the LiDAR's range: nothing returned means free this far
OBSTACLE_BAND_M = (0.3, 2.5)        # heights above the ground that count as an obstacle
# Returns this close are the sensor's own mount or vehicle, not the scene.
_MIN_RANGE_M = 1.0
WIRE_STEP_M = 0.25                  # one byte a bin on the wire: 0-63.75 m (the reputation checks to 40 m)
_WIRE_MAX_CODE = 255


def azimuth_bins(x, y, bins: int = FREE_RANGE_BINS) -> np.ndarray:
    """Positions x, y (m, sensor frame, any shape) -> int64 bin index in [0, bins)."""
    az = np.arctan2(np.asarray(y, np.float64), np.asarray(x, np.float64))
    return np.floor((az + np.pi) * (bins / (2 * np.pi))).astype(np.int64) % bins


def free_range_profile(points: np.ndarray, sensor_height: float, bins: int = FREE_RANGE_BINS,
                       max_range_m: float = FREE_RANGE_MAX_M) -> np.ndarray:
    """Sensor-frame points (N, 3+) m and the sensor's height above the ground (m) -> (bins,)
    float32: per azimuth bin the horizontal range (m) of the nearest obstacle return, at most
    ``max_range_m``. Non-finite points are ignored."""
    pts = np.asarray(points)
    out = np.full(bins, max_range_m, np.float32)
    if pts.ndim != 2 or len(pts) == 0:
        return out
    x, y, z = (pts[:, i].astype(np.float64) for i in range(3))
    r = np.hypot(x, y)
    height = z + sensor_height
    keep = (height >= OBSTACLE_BAND_M[0]) & (height <= OBSTACLE_BAND_M[1]) & (r >= _MIN_RANGE_M) & (r < max_range_m)
    keep &= np.isfinite(r) & np.isfinite(height)
    if keep.any():
        np.minimum.at(out, azimuth_bins(x[keep], y[keep], bins), r[keep].astype(np.float32))
    return out


def to_wire(free_range: np.ndarray, sensor_height: float, max_range_m: float = FREE_RANGE_MAX_M) -> np.ndarray:
    """A profile (B,) m of a sensor ``sensor_height`` m above the ground -> (B,) uint8 codes of
    ``WIRE_STEP_M``, rounded down and saturating at 255; 0 for the bins a sensor above the obstacle
    band saw no obstacle in (module docstring)."""
    free = np.nan_to_num(np.asarray(free_range, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    codes = np.clip(np.floor(free / WIRE_STEP_M), 0, _WIRE_MAX_CODE).astype(np.uint8)
    if sensor_height > OBSTACLE_BAND_M[1]:
        codes[free >= max_range_m] = 0
    return codes


def from_wire(codes: np.ndarray) -> np.ndarray:
    """(B,) uint8 codes -> (B,) float32 ranges (m); 0: nothing known free in that bin."""
    return np.asarray(codes, np.uint8).astype(np.float32) * np.float32(WIRE_STEP_M)
