"""Scan -> sparse voxels, vectorised in numpy.

Heights are normalised by the sensor's height above the ground so that vehicle LiDARs (~1.8 m) and
road-side units (~6 m) fill the same voxel grid: inside the detector ``z`` means metres above the
ground below the sensor. Each voxel carries the mean of its points (no per-voxel point buffer, so
no points-per-voxel cap is needed); the number of points and voxels is capped so that a
multi-million-point scan costs bounded time and memory.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .config import VoxelConfig

log = logging.getLogger(__name__)

# Ground estimation: only returns in this ring (m) are used; nearer ones hit the ego vehicle, farther
# ones see slopes. Bins of this size (m) over sensor-frame z in this window.
_GROUND_RING = (3.0, 25.0)
_GROUND_BIN = 0.1
_GROUND_Z_WINDOW = (-12.0, 1.0)
_GROUND_MIN_POINTS = 50


@dataclass
class VoxelStats:
    """What voxelisation kept and dropped (point counts unless named otherwise)."""
    points_in: int = 0
    dropped_nonfinite: int = 0
    dropped_out_of_range: int = 0
    dropped_point_cap: int = 0
    dropped_voxel_cap: int = 0
    voxels: int = 0
    voxels_dropped: int = 0

    @property
    def clipped(self) -> bool:
        """True when something other than ordinary out-of-range points was lost."""
        return bool(self.dropped_nonfinite or self.dropped_point_cap or self.dropped_voxel_cap)

    def reason(self) -> str:
        """One line on what was dropped and why; empty when the scan was used as given."""
        parts = []
        if self.points_in == 0:
            parts.append('empty scan')
        if self.dropped_nonfinite:
            parts.append(f'{self.dropped_nonfinite} non-finite points dropped')
        if self.dropped_out_of_range:
            parts.append(f'{self.dropped_out_of_range} points outside the range dropped')
        if self.dropped_point_cap:
            parts.append(f'{self.dropped_point_cap} points subsampled away (max_points cap)')
        if self.dropped_voxel_cap:
            parts.append(f'{self.voxels_dropped} farthest voxels ({self.dropped_voxel_cap} points) '
                         'dropped (max_voxels cap)')
        if self.points_in and not self.voxels:
            parts.append('no voxels left')
        return '; '.join(parts)


@dataclass
class Voxels:
    coords: np.ndarray  # (V, 3) int32 [z, y, x] voxel indices (spconv order)
    features: np.ndarray  # (V, F) float32, see VoxelConfig.num_features
    stats: VoxelStats


# No LiDAR return lies this far away (m): a larger finite coordinate is a corrupt value (a float
# read with the wrong byte order, say), whose squares would overflow in every range computation.
MAX_POINT_ABS_M = 1e4


def usable_points(points: np.ndarray) -> tuple[np.ndarray, int]:
    """(N, 3+) points -> (the rows whose values are all finite and whose x, y, z lie within
    MAX_POINT_ABS_M, how many rows were not)."""
    pts = np.asarray(points)
    if pts.ndim != 2 or len(pts) == 0:
        return pts, 0
    with np.errstate(invalid='ignore'):
        ok = np.isfinite(pts).all(axis=1) & (np.abs(pts[:, :3]) <= MAX_POINT_ABS_M).all(axis=1)
    return (pts, 0) if ok.all() else (pts[ok], int((~ok).sum()))


def estimate_sensor_height(points: np.ndarray, default: float) -> float:
    """Height of the sensor above the ground (m) from the densest horizontal layer of returns.

    Ground returns dominate a LiDAR scan and lie in one thin z layer, while walls and objects spread
    over many heights, so the mode of the z histogram of nearby returns is the ground. Falls back to
    ``default`` when fewer than a handful of returns are near enough.
    """
    pts = np.asarray(points)
    if pts.ndim != 2 or pts.shape[0] == 0:
        return float(default)
    xyz = pts[:, :3]
    r = np.hypot(xyz[:, 0], xyz[:, 1])
    z = xyz[:, 2]
    sel = (r >= _GROUND_RING[0]) & (r <= _GROUND_RING[1]) & np.isfinite(z) & np.isfinite(r)
    z = z[sel]
    z = z[(z >= _GROUND_Z_WINDOW[0]) & (z < _GROUND_Z_WINDOW[1])]
    if len(z) < _GROUND_MIN_POINTS:
        return float(default)
    nbins = int(round((_GROUND_Z_WINDOW[1] - _GROUND_Z_WINDOW[0]) / _GROUND_BIN))
    hist, edges = np.histogram(z, bins=nbins, range=_GROUND_Z_WINDOW)
    k = int(np.argmax(hist))
    near = z[(z >= edges[k] - _GROUND_BIN) & (z < edges[k + 1] + _GROUND_BIN)]
    return float(-np.median(near))


def resolve_sensor_height(points: np.ndarray, cfg: VoxelConfig, sensor_height: float | None) -> float:
    """The given height, else the config's fixed one, else the per-scan estimate."""
    if sensor_height is not None:
        return float(sensor_height)
    if cfg.sensor_height != 'auto':
        return float(cfg.sensor_height)
    return estimate_sensor_height(points, cfg.default_sensor_height)


def voxelize(points: np.ndarray, cfg: VoxelConfig, sensor_height: float,
             ages: np.ndarray | None = None) -> Voxels:
    """(N, 3+) sensor-frame points [x, y, z, (intensity, ...)] -> sparse voxels. ``ages`` (N,):
    seconds before the newest sweep of each point (detection.sweeps), used when ``cfg.sweeps`` > 1;
    None means one sweep (all 0).

    Non-finite and out-of-range points are dropped and counted in ``stats``; never raises on bad
    values, only on a wrong array shape.
    """
    pts = np.asarray(points)
    if pts.size == 0:
        pts = np.zeros((0, 4), np.float32)
    if pts.ndim != 2 or pts.shape[1] < 3 or (cfg.use_intensity and pts.shape[1] < 4):
        raise ValueError(f'points must be (N, {4 if cfg.use_intensity else 3}+), got {pts.shape}')
    if ages is not None and np.shape(ages) != (len(pts),):
        raise ValueError(f'ages must be ({len(pts)},), got {np.shape(ages)}')
    stats = VoxelStats(points_in=len(pts))
    ncols = 4 if cfg.use_intensity else 3
    pts = pts[:, :ncols].astype(np.float32, copy=False)
    if cfg.sweeps > 1:
        age = np.zeros(len(pts), np.float32) if ages is None else np.asarray(ages, np.float32)
        pts = np.concatenate([pts, (age / np.float32(cfg.sweep_max_age_s))[:, None]], 1)
        ncols += 1

    D, H, W = cfg.grid_shape
    lo = np.array([cfg.range_xy[0], cfg.range_xy[1], cfg.z_range[0] - sensor_height], np.float64)
    size = np.asarray(cfg.voxel_size, np.float64)
    # float32 and NaN-propagating: non-finite rows fail the range test, and are told apart from
    # out-of-range rows only among the (few) rejected ones.
    ijk = np.floor((pts[:, :3] - lo.astype(np.float32)) * (1.0 / size).astype(np.float32))
    inside = (ijk >= 0).all(axis=1) & (ijk < np.array([W, H, D], np.float32)).all(axis=1)
    inside &= np.isfinite(pts[:, 3:]).all(axis=1)
    rejected = pts[~inside]
    stats.dropped_nonfinite = int((~np.isfinite(rejected).all(axis=1)).sum())
    stats.dropped_out_of_range = len(rejected) - stats.dropped_nonfinite
    pts, ijk = pts[inside], ijk[inside].astype(np.int64)

    if len(pts) > cfg.max_points:
        # A fixed seed keeps detections on the same huge scan reproducible.
        keep = np.sort(np.random.default_rng(0).choice(len(pts), cfg.max_points, replace=False))
        stats.dropped_point_cap = len(pts) - cfg.max_points
        pts, ijk = pts[keep], ijk[keep]

    if len(pts) == 0:
        return Voxels(np.zeros((0, 3), np.int32), np.zeros((0, cfg.num_features), np.float32), stats)

    lin = (ijk[:, 2] * H + ijk[:, 1]) * W + ijk[:, 0]
    uniq, inverse, counts = np.unique(lin, return_inverse=True, return_counts=True)
    coords = np.stack([uniq // (H * W), (uniq // W) % H, uniq % W], axis=1)

    if len(uniq) > cfg.max_voxels:
        # Near voxels hold the best-resolved objects; far ones are the cheapest to lose.
        centre_xy = (coords[:, [2, 1]] + 0.5) * size[:2] + lo[:2]
        order = np.argsort(np.hypot(centre_xy[:, 0], centre_xy[:, 1]), kind='stable')
        kept = np.zeros(len(uniq), bool)
        kept[order[:cfg.max_voxels]] = True
        stats.voxels_dropped = int(len(uniq) - cfg.max_voxels)
        point_kept = kept[inverse]
        stats.dropped_voxel_cap = int(len(pts) - point_kept.sum())
        remap = np.cumsum(kept) - 1
        pts, inverse = pts[point_kept], remap[inverse[point_kept]]
        coords, counts = coords[kept], counts[kept]

    V = len(coords)
    sums = np.stack([np.bincount(inverse, weights=pts[:, c], minlength=V) for c in range(ncols)], 1)
    mean = sums / counts[:, None]
    centre = (coords[:, ::-1] + 0.5) * size + lo  # (V, 3) x, y, z of voxel centres
    z_extent = cfg.z_range[1] - cfg.z_range[0]
    feats = [(mean[:, :3] - centre) / size,
             ((mean[:, 2] - lo[2]) / z_extent)[:, None],
             np.minimum(counts / cfg.count_norm, 1.0)[:, None]]
    feats.append(mean[:, 3:])  # intensity and age, where configured
    stats.voxels = V
    return Voxels(coords.astype(np.int32), np.concatenate(feats, 1).astype(np.float32), stats)
