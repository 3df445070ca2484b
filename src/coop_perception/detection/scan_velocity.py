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

An estimate is kept only with enough points in the sweeps compared and when the older sweeps
agree with the first estimate (their best shift lies inside the window it allows); its noise
(``velocity_std``) shrinks with the points it rests on and the time it spans.
"""
from __future__ import annotations

import numpy as np
from scipy.fft import next_fast_len

from coop_perception.data.labels import CLASSES
from coop_perception.detection.config import ScanVelocityConfig
from coop_perception.detection.decode import Detections
from coop_perception.detection.sweeps import sweep_slices

# Raised whenever the measurement changes, so that velocities cached with another (fusion.cache)
# are measured again.
METHOD_VERSION = 3
# m: shifts at least this far from the best are the alternatives ScanVelocityConfig.max_ambiguity
# compares it with (closer ones are the same peak's flanks)
AMBIGUOUS_M = 0.5


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
    den = values[k - 1] - 2 * values[k] + values[k + 1]
    return float(0.5 * (values[k - 1] - values[k + 1]) / den) if den < 0 else 0.0


def register_shift(current: np.ndarray, previous: np.ndarray, half: tuple[float, float],
                   reach: tuple[float, float], cell: float, blur: float,
                   guess: tuple[float, float] = (0.0, 0.0), max_ambiguity: float = 1.0) -> np.ndarray | None:
    """Box-axes points of now (K, 2), within ``half`` (m) of the box centre, and of before (L, 2)
    -> (2,) displacement (m, box axes) from before to now that overlaps them best, searched within
    ``guess`` +- ``reach`` (m); None when the best lies on the edge of that window (the motion is
    outside it, or clutter wins) or when a shift more than ``AMBIGUOUS_M`` away overlaps them
    almost as well (> ``max_ambiguity`` x the best: a flat side or repeated structure, where the
    best is a guess). Both rasters are blurred by ``blur`` cells."""
    rx, ry = int(np.ceil(reach[0] / cell)), int(np.ceil(reach[1] / cell))
    hx, hy = half[0] + reach[0], half[1] + reach[1]
    nx, ny = int(np.ceil(2 * hx / cell)), int(np.ceil(2 * hy / cell))
    # padded so that no searched shift wraps one raster's cells onto the other's
    size = (next_fast_len(nx + rx + 1), next_fast_len(ny + ry + 1))

    def raster(q: np.ndarray) -> np.ndarray:
        ij = np.floor((q + (hx, hy)) / cell).astype(np.int64)
        ok = (ij >= 0).all(1) & (ij < (nx, ny)).all(1)
        g = np.bincount(ij[ok, 0] * ny + ij[ok, 1], minlength=nx * ny).reshape(nx, ny)
        return np.fft.rfft2(g.astype(np.float64), size)

    fx, fy = np.fft.fftfreq(size[0]), np.fft.rfftfreq(size[1])
    # blurring both rasters by blur cells = blurring their correlation by blur * sqrt(2)
    smooth = np.exp(-4 * np.pi ** 2 * blur ** 2 * (fx[:, None] ** 2 + fy[None, :] ** 2))
    # corr[k] = sum over cells c of now(c) * before(c - k), k taken modulo the padded size
    corr = np.fft.irfft2(raster(current) * np.conj(raster(previous + guess)) * smooth, size)
    win = corr[np.arange(-rx, rx + 1)[:, None] % size[0], np.arange(-ry, ry + 1)[None, :] % size[1]]
    i, j = np.unravel_index(int(np.argmax(win)), win.shape)
    if i in (0, 2 * rx) or (ry and j in (0, 2 * ry)):
        return None
    if max_ambiguity < 1.0:
        di, dj = np.ogrid[-i:win.shape[0] - i, -j:win.shape[1] - j]
        elsewhere = win[np.hypot(di, dj) * cell > AMBIGUOUS_M]
        if len(elsewhere) and elsewhere.max() > max_ambiguity * win[i, j]:
            return None
    return np.array([guess[0] + (i - rx + _peak_offset(win[:, j], i)) * cell,
                     guess[1] + (j - ry + (_peak_offset(win[i, :], j) if ry else 0.0)) * cell])


class _Neighbourhoods:
    """The points of one sweep near any of a scan's boxes, bucketed in BEV cells so that each box
    reads only the cells around it: one pass over the sweep instead of one per box."""

    def __init__(self, points: np.ndarray, centres: np.ndarray, radius: float, z_range: tuple[float, float],
                 cell: float = 2.0):
        self.cell, self.r = cell, int(np.ceil(radius / cell))
        self.lo = centres.min(0) - (self.r + 1) * cell
        self.shape = np.floor((centres.max(0) - self.lo) / cell).astype(np.int64) + self.r + 2
        z = points[:, 2]
        pts = points[(z > z_range[0]) & (z < z_range[1])]
        ij = np.floor((pts[:, :2] - self.lo) / cell).astype(np.int64)
        ok = (ij >= 0).all(1) & (ij < self.shape).all(1)
        keys = ij[ok, 0] * self.shape[1] + ij[ok, 1]
        order = np.argsort(keys, kind='stable')
        self.points, self.keys = pts[ok][order], keys[order]

    def around(self, centre: np.ndarray) -> np.ndarray:
        """The points in the cells within ``radius`` of ``centre`` (a square of cells)."""
        ci, cj = np.floor((centre - self.lo) / self.cell).astype(np.int64)
        j0, j1 = max(cj - self.r, 0), min(cj + self.r, self.shape[1] - 1)
        rows = np.arange(max(ci - self.r, 0), min(ci + self.r, self.shape[0] - 1) + 1) * self.shape[1]
        starts = np.searchsorted(self.keys, rows + j0)
        ends = np.searchsorted(self.keys, rows + j1, side='right')
        return np.concatenate([self.points[a:b] for a, b in zip(starts, ends)] or [self.points[:0]])


def measure_velocities(boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray, points: np.ndarray,
                       ages: np.ndarray, cfg: ScanVelocityConfig) -> tuple[np.ndarray, np.ndarray]:
    """Detections (N, 7) boxes [x, y, z, l, w, h, yaw], labels (N,), scores (N,) in the newest
    sweep's sensor frame; the stacked sweeps' points (M, >=3) and ages (M,) s (detection.sweeps)
    -> velocities (N, 2) m/s along the sensor axes and their noise (N,) m/s, 0 where not measured
    (class or score left out, too few points, sweeps disagreeing, no earlier sweep).

    The newest earlier sweep with enough points is searched over every displacement up to
    max_speed; older sweeps only near where that velocity puts the object (+- agree_m_s), so a
    later sweep can refine the velocity but not contradict it."""
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
    earlier = [(age, sl) for age, sl in sweeps[1:cfg.sweeps] if 0.0 < age <= cfg.max_age_s]
    margin = cfg.cell_m * 3
    size = np.hypot(boxes[todo, 3], boxes[todo, 4]).max() / 2 + margin + cfg.lateral_m
    centres = boxes[todo, :2]
    bottoms = boxes[todo, 2] - boxes[todo, 5] / 2
    z_range = (bottoms.min() + cfg.ground_clearance_m, (bottoms + boxes[todo, 5]).max() + cfg.ground_clearance_m)
    now = _Neighbourhoods(pts[sweeps[0][1]], centres, size, z_range)
    before = [(age, _Neighbourhoods(pts[sl], centres, size + cfg.max_speed * age, z_range)) for age, sl in earlier]
    for n in todo:
        box = boxes[n]
        half = (box[3] / 2 + margin, box[4] / 2 + margin)
        q_now = _crop(now.around(box[:2]), box, margin, margin, cfg.ground_clearance_m)
        if len(q_now) < cfg.min_points:
            continue
        velocity, weights, refuted = None, [], False
        for age, prev in before:
            guess = (0.0, 0.0) if velocity is None else tuple(velocity * age)
            reach = ((cfg.max_speed * age, cfg.lateral_m) if velocity is None
                     else (cfg.agree_m_s * age, min(cfg.lateral_m, cfg.agree_m_s * age)))
            grow = np.abs(guess) + reach
            q_prev = _crop(prev.around(box[:2]), box, margin + grow[0], margin + grow[1], cfg.ground_clearance_m)
            if len(q_prev) < cfg.min_points:
                continue
            shift = register_shift(q_now, q_prev, half, reach, cfg.cell_m, cfg.blur_cells, guess,
                                   cfg.max_ambiguity)
            if shift is None:
                refuted = True
                break
            # the shift's error does not grow with age, so the velocity's shrinks: weights age^2
            velocity = shift / age if velocity is None else \
                (velocity * sum(weights) + shift * age) / (sum(weights) + age ** 2)
            weights.append(age ** 2)
        if velocity is None or refuted:
            continue
        c, s = np.cos(box[6]), np.sin(box[6])
        velocities[n] = (c * velocity[0] - s * velocity[1], s * velocity[0] + c * velocity[1])
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
