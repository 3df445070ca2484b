"""Object velocities measured from the scan itself: each vehicle's points registered against the
same place in the sensor's previous sweeps.

One sweep shows where an object is, not where it goes, and a tracker needs several scans before
its velocity means anything: a young track's velocity is the detector's centre jitter (10-20 cm)
divided by 0.1 s. The sensor's earlier sweeps, moved into the current sweep's frame with its own
poses (detection.sweeps), already contain the motion: a moving car's points of 0.1 and 0.2 s ago
lie behind the current ones, displaced by velocity x age, while everything static lands on
itself. So for each detected vehicle its current points and the previous sweeps' points around it
are rasterised into a fine BEV grid in the box's own axes, and the displacement that best
overlaps them (cross-correlation, sub-cell peak) divided by the age is its velocity. Many points
constrain a displacement far better than one detected centre does, and it is there from an
object's first detection on; fusion.motion uses it as a Kalman measurement.

An estimate is kept only with enough points in both sweeps and when the sweeps of different ages
agree; its noise (``velocity_std``) shrinks with the points it rests on and the age it spans.
"""
from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.signal import fftconvolve
from scipy.spatial import cKDTree

from coop_perception.data.labels import CLASSES
from coop_perception.detection.config import ScanVelocityConfig
from coop_perception.detection.decode import Detections
from coop_perception.detection.sweeps import sweep_slices


def _to_box_axes(xy: np.ndarray, box: np.ndarray) -> np.ndarray:
    """(K, 2) sensor-frame points -> the box's axes (x along its length), centred on it."""
    c, s = np.cos(box[6]), np.sin(box[6])
    d = xy - box[:2]
    return np.column_stack([c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1]])


def _crop(points: np.ndarray, box: np.ndarray, margin_x: float, margin_y: float,
          clearance: float) -> np.ndarray:
    """(K, 2) box-axes xy of the above-ground points within the box grown by the margins."""
    bottom = box[2] - box[5] / 2
    z = points[:, 2]
    keep = (z > bottom + clearance) & (z < bottom + box[5] + clearance)
    q = _to_box_axes(points[keep, :2], box)
    inside = (np.abs(q[:, 0]) <= box[3] / 2 + margin_x) & (np.abs(q[:, 1]) <= box[4] / 2 + margin_y)
    return q[inside]


def _peak_offset(values: np.ndarray, k: int) -> float:
    """Sub-cell position of the maximum at index k of a 1-D profile (parabola through 3 points)."""
    if 0 < k < len(values) - 1:
        den = values[k - 1] - 2 * values[k] + values[k + 1]
        if den < 0:
            return float(0.5 * (values[k - 1] - values[k + 1]) / den)
    return 0.0


def register_shift(current: np.ndarray, previous: np.ndarray, half: tuple[float, float],
                   reach: tuple[float, float], cell: float, blur: float) -> np.ndarray:
    """Box-axes points of now (K, 2) and of before (L, 2), both within ``half`` + ``reach`` (m)
    of the box centre -> (2,) displacement (m, box axes) from before to now that overlaps them
    best, searched within +-``reach``."""
    hx, hy = half[0] + reach[0], half[1] + reach[1]
    nx, ny = int(np.ceil(2 * hx / cell)), int(np.ceil(2 * hy / cell))

    def raster(q: np.ndarray) -> np.ndarray:
        ix = np.clip(((q[:, 0] + hx) / cell).astype(np.int64), 0, nx - 1)
        iy = np.clip(((q[:, 1] + hy) / cell).astype(np.int64), 0, ny - 1)
        g = np.bincount(ix * ny + iy, minlength=nx * ny).reshape(nx, ny).astype(np.float64)
        return gaussian_filter(g, blur)

    # corr[i, j] = sum over cells of now(c) * before(c - (i - nx + 1, j - ny + 1))
    corr = fftconvolve(raster(current), raster(previous)[::-1, ::-1], mode='full')
    rx, ry = int(np.ceil(reach[0] / cell)), int(np.ceil(reach[1] / cell))
    win = corr[nx - 1 - rx: nx + rx, ny - 1 - ry: ny + ry]
    i, j = np.unravel_index(int(np.argmax(win)), win.shape)
    return np.array([(i - rx + _peak_offset(win[:, j], i)) * cell,
                     (j - ry + _peak_offset(win[i, :], j)) * cell])


def measure_velocities(boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray, points: np.ndarray,
                       ages: np.ndarray, cfg: ScanVelocityConfig) -> tuple[np.ndarray, np.ndarray]:
    """Detections (N, 7) boxes [x, y, z, l, w, h, yaw], labels (N,), scores (N,) in the newest
    sweep's sensor frame; the stacked sweeps' points (M, >=3) and ages (M,) s (detection.sweeps)
    -> velocities (N, 2) m/s along the sensor axes and their noise (N,) m/s, 0 where not measured
    (class or score left out, too few points, sweeps disagreeing, no earlier sweep)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 7)
    velocities, noise = np.zeros((len(boxes), 2), np.float32), np.zeros(len(boxes), np.float32)
    sweeps = sweep_slices(np.asarray(ages))
    if not cfg.on or len(sweeps) < 2 or sweeps[0][0] != 0.0:
        return velocities, noise
    measured = [CLASSES.index(c) for c in cfg.classes]
    todo = np.flatnonzero(np.isin(labels, measured) & (np.asarray(scores) >= cfg.min_score))
    if not len(todo):
        return velocities, noise
    pts = np.asarray(points)
    now = pts[sweeps[0][1]]
    before = [(age, pts[sl]) for age, sl in sweeps[1:cfg.sweeps] if 0.0 < age <= cfg.max_age_s]
    now_tree = cKDTree(now[:, :2])
    trees = [cKDTree(p[:, :2]) for _, p in before]
    margin = cfg.cell_m * 3
    for n in todo:
        box = boxes[n]
        radius = np.hypot(box[3], box[4]) / 2 + margin + cfg.lateral_m
        q_now = _crop(now[now_tree.query_ball_point(box[:2], radius)], box, margin, margin,
                      cfg.ground_clearance_m)
        if len(q_now) < cfg.min_points:
            continue
        estimates, weights = [], []
        for (age, prev), tree in zip(before, trees):
            reach = (cfg.max_speed * age, cfg.lateral_m)
            near = prev[tree.query_ball_point(box[:2], radius + reach[0])]
            q_prev = _crop(near, box, margin + reach[0], margin + reach[1], cfg.ground_clearance_m)
            if len(q_prev) < cfg.min_points:
                continue
            shift = register_shift(q_now, q_prev, (box[3] / 2 + margin, box[4] / 2 + margin), reach,
                                   cfg.cell_m, cfg.blur_cells)
            estimates.append(shift / age)
            weights.append(age ** 2)   # the shift's error does not grow with age, the velocity's shrinks
        if not estimates:
            continue
        est = np.asarray(estimates)
        if len(est) > 1 and np.ptp(est, axis=0).max() > cfg.agree_m_s:
            continue
        v_box = np.average(est, axis=0, weights=weights)
        c, s = np.cos(box[6]), np.sin(box[6])
        velocities[n] = (c * v_box[0] - s * v_box[1], s * v_box[0] + c * v_box[1])
        noise[n] = cfg.shift_noise_m / np.sqrt(np.sum(weights)) * np.sqrt(cfg.min_points / len(q_now))
    return velocities, noise


def with_measured_velocities(det: Detections, points: np.ndarray, ages: np.ndarray,
                             cfg: ScanVelocityConfig) -> Detections:
    """``det`` (of the newest sweep in ``points``) with each measured box's velocity and its noise
    replacing the detector's (``velocity_std`` becomes per box); unmeasured boxes keep the
    detector's velocity and noise."""
    measured, noise = measure_velocities(det.boxes, det.labels, det.scores, points, ages, cfg)
    hit = noise > 0
    std = np.broadcast_to(np.asarray(det.velocity_std, np.float32), hit.shape)
    det.velocities = np.where(hit[:, None], measured, det.velocities).astype(np.float32)
    det.velocity_std = np.where(hit, noise, std).astype(np.float32)
    return det
