"""Training targets (CenterPoint-style gaussian heatmaps + per-object regression) and the losses."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from coop_perception.bev_grid import BevGrid

from .config import DetectorConfig
from .decode import LOGVAR_CLAMP, REG_FIELDS, class_probability

_PROB_CLAMP = (1e-4, 1.0 - 1e-4)


@dataclass
class Targets:
    heatmap: torch.Tensor  # (B, K, H, W) float32, 1 at object centres, gaussian around them
    index: torch.Tensor  # (B, M) int64 flat cell index row * W + col
    mask: torch.Tensor  # (B, M) bool, which of the M slots hold an object
    reg: torch.Tensor  # (B, M, len(REG_FIELDS)) float32

    def to(self, device) -> 'Targets':
        return Targets(*(t.to(device) for t in (self.heatmap, self.index, self.mask, self.reg)))


def gaussian_radius(l_cells: np.ndarray, w_cells: np.ndarray, min_overlap: float) -> np.ndarray:
    """CenterNet/CenterPoint radius (cells) within which a shifted box keeps IoU >= min_overlap."""
    h, w, o = l_cells, w_cells, min_overlap
    b1, c1 = h + w, w * h * (1 - o) / (1 + o)
    r1 = (b1 + np.sqrt(b1 ** 2 - 4 * c1)) / 2
    b2, c2 = 2 * (h + w), (1 - o) * w * h
    r2 = (b2 + np.sqrt(b2 ** 2 - 16 * c2)) / 2
    a3, b3, c3 = 4 * o, -2 * o * (h + w), (o - 1) * w * h
    r3 = (b3 + np.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
    return np.minimum(np.minimum(r1, r2), r3)


def example_targets(boxes: np.ndarray, labels: np.ndarray, velocities: np.ndarray,
                    sensor_height: float, cfg: DetectorConfig):
    """One scan's sensor-frame boxes -> (heatmap (K, H, W), index (M,), reg (M, 10)) numpy.

    Boxes of unknown classes, with non-finite values or whose centre lies outside the BEV range are
    left out; beyond ``target.max_objects`` the farthest are.
    """
    grid = BevGrid.for_detector(cfg)
    K, (H, W), cell = len(cfg.classes), grid.shape, grid.cell_size
    boxes = np.asarray(boxes, np.float64).reshape(-1, 7)
    labels = np.asarray(labels, np.int64).reshape(-1)
    velocities = np.asarray(velocities, np.float64).reshape(-1, 2)
    # tested unrounded: flooring would cast the non-finite boxes this drops to int
    ok = ((labels >= 0) & (labels < K) & np.isfinite(boxes).all(1) & np.isfinite(velocities).all(1)
          & (boxes[:, 3:6] > 0).all(1) & grid.inside(*grid.cell_coords(boxes[:, 0], boxes[:, 1])))
    order = np.argsort(np.hypot(boxes[:, 0], boxes[:, 1])[ok], kind='stable')[:cfg.target.max_objects]
    sel = np.flatnonzero(ok)[order]
    boxes, labels, velocities = boxes[sel], labels[sel], velocities[sel]
    rows, cols = grid.cells_of(boxes[:, 0], boxes[:, 1])

    heatmap = np.zeros((K, H, W), np.float32)
    radius = np.maximum(cfg.target.min_radius, gaussian_radius(
        boxes[:, 3] / cell, boxes[:, 4] / cell, cfg.target.gaussian_overlap).astype(np.int64))
    for k, r, c, rad in zip(labels, rows, cols, radius):
        _draw_gaussian(heatmap[k], r, c, int(rad))

    reg = np.zeros((len(boxes), len(REG_FIELDS)), np.float32)
    cx, cy = grid.centre_of(rows, cols)
    reg[:, 0], reg[:, 1] = boxes[:, 0] - cx, boxes[:, 1] - cy
    reg[:, 2] = boxes[:, 2] + sensor_height
    reg[:, 3:6] = np.log(boxes[:, 3:6])
    reg[:, 6], reg[:, 7] = np.sin(boxes[:, 6]), np.cos(boxes[:, 6])
    reg[:, 8:10] = velocities
    return heatmap, grid.flat_index(rows, cols), reg


def _draw_gaussian(hm: np.ndarray, row: int, col: int, radius: int) -> None:
    sigma = (2 * radius + 1) / 6.0
    d = np.arange(-radius, radius + 1)
    g = np.exp(-(d[:, None] ** 2 + d[None, :] ** 2) / (2 * sigma * sigma))
    H, W = hm.shape
    r0, r1 = max(0, row - radius), min(H, row + radius + 1)
    c0, c1 = max(0, col - radius), min(W, col + radius + 1)
    np.maximum(hm[r0:r1, c0:c1], g[r0 - row + radius:r1 - row + radius, c0 - col + radius:c1 - col + radius],
               out=hm[r0:r1, c0:c1])


def batch_targets(per_example: list, cfg: DetectorConfig) -> Targets:
    """Stack example_targets outputs, padding the object slots to the batch maximum."""
    M = max(1, max(len(idx) for _, idx, _ in per_example))
    B = len(per_example)
    index = np.zeros((B, M), np.int64)
    mask = np.zeros((B, M), bool)
    reg = np.zeros((B, M, len(REG_FIELDS)), np.float32)
    for b, (_, idx, r) in enumerate(per_example):
        index[b, :len(idx)], mask[b, :len(idx)], reg[b, :len(idx)] = idx, True, r
    heatmap = np.stack([hm for hm, _, _ in per_example])
    return Targets(torch.from_numpy(heatmap), torch.from_numpy(index), torch.from_numpy(mask),
                   torch.from_numpy(reg))


def focal_heatmap_loss(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CornerNet/CenterPoint focal loss with gaussian-reduced negatives, per positive."""
    prob = prob.clamp(*_PROB_CLAMP)
    pos = target.eq(1.0)
    pos_loss = (torch.log(prob) * (1 - prob) ** 2)[pos].sum()
    neg_loss = (torch.log(1 - prob) * prob ** 2 * (1 - target) ** 4)[~pos].sum()
    return -(pos_loss + neg_loss) / pos.sum().clamp(min=1)


def laplace_nll(residual: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood (up to a constant) of a Laplace with variance exp(logvar):
    scale b = sqrt(var / 2), so -log p = |r| / b + log b = sqrt(2) |r| exp(-logvar / 2) + logvar / 2."""
    logvar = logvar.clamp(*LOGVAR_CLAMP)
    return math.sqrt(2.0) * residual.abs() * torch.exp(-0.5 * logvar) + 0.5 * logvar


def detection_loss(maps: dict[str, torch.Tensor], t: Targets, cfg: DetectorConfig):
    """-> (total loss, dict of detached components). Regression terms are per object."""
    w = cfg.train.loss_weights
    hm = focal_heatmap_loss(class_probability(maps['heatmap'], maps['cls_logvar']), t.heatmap)

    B, R, H, W = maps['reg'].shape
    def gather(x):  # (B, n, H, W) -> (B, M, n)
        return x.reshape(B, x.shape[1], H * W).gather(2, t.index[:, None, :].expand(-1, x.shape[1], -1)
                                                      ).transpose(1, 2)
    pred, logvar = gather(maps['reg']), gather(maps['reg_logvar'])
    mask = t.mask[..., None].float()
    n = t.mask.sum().clamp(min=1)
    code_w = torch.tensor(cfg.train.code_weights, dtype=pred.dtype, device=pred.device)
    l1 = ((pred - t.reg).abs() * code_w * mask).sum() / n

    s_p, c_p, s_t, c_t = pred[..., 6], pred[..., 7], t.reg[..., 6], t.reg[..., 7]
    yaw_err = torch.atan2(s_p * c_t - c_p * s_t, c_p * c_t + s_p * s_t)
    residual = torch.stack([pred[..., 0] - t.reg[..., 0], pred[..., 1] - t.reg[..., 1], yaw_err], -1)
    nll = (laplace_nll(residual, logvar) * mask).sum() / n

    total = w.heatmap * hm + w.regression * l1 + w.nll * nll
    return total, {'loss': total.detach(), 'heatmap': hm.detach(), 'l1': l1.detach(), 'nll': nll.detach()}
