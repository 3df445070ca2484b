"""Head maps -> boxes: peak extraction, rotated-IoU NMS, aleatoric and MC-dropout uncertainty."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from coop_perception.bev_grid import BevGrid
from coop_perception.geometry import bev_iou

from .config import DetectorConfig
from .voxelize import VoxelStats

# Regression channels of the head, in order: centre offset from the cell centre (m), centre height
# above the ground (m), log size (m), heading as sin/cos, velocity in the sensor frame (m/s).
REG_FIELDS = ('dx', 'dy', 'z', 'log_l', 'log_w', 'log_h', 'sin', 'cos', 'vx', 'vy')
# Log-variance channels: x, y (m^2) and yaw (rad^2), of a Laplace distribution.
REG_LOGVAR_FIELDS = ('x', 'y', 'yaw')
LOGVAR_CLAMP = (-10.0, 10.0)
_LOG_SIZE_CLAMP = (-5.0, 4.0)

# Columns of Detections.uncertainty (the one place they are named):
#   ale_x, ale_y   aleatoric variance of the box centre (m^2), from the log-variance head
#   ale_yaw        aleatoric variance of the heading (rad^2)
#   ale_cls        aleatoric variance of the class logit
#   epi_cls        MC-dropout predictive entropy of the class probability (nats, <= ln 2)
#   epi_reg        MC-dropout variance of the box centre, var(x) + var(y) over passes (m^2)
UNCERTAINTY_FIELDS = ('ale_x', 'ale_y', 'ale_yaw', 'ale_cls', 'epi_cls', 'epi_reg')


def corner_variance(uncertainty: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(N, 6) uncertainty, (N, 7) boxes -> (N,) aleatoric variance of a BEV box corner (m^2):
    ale_x + ale_y + (l^2 + w^2) / 4 * ale_yaw. To first order a heading error d moves every corner
    by r * d, r = sqrt(l^2 + w^2) / 2; rotated IoU at 0.7 depends on the corners, and a heading
    error on a 12 m bus moves them as much as a 1 m centre error."""
    u = np.asarray(uncertainty, dtype=np.float64).reshape(-1, len(UNCERTAINTY_FIELDS))
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 7)
    return u[:, 0] + u[:, 1] + (boxes[:, 3] ** 2 + boxes[:, 4] ** 2) / 4.0 * u[:, 2]


@dataclass
class Detections:
    """One scan's output, all in the sensor frame of that scan."""
    boxes: np.ndarray  # (N, 7) float64 [x, y, z, l, w, h, yaw], sorted by descending score
    scores: np.ndarray  # (N,) float32
    labels: np.ndarray  # (N,) int64 indices into coop_perception.data.labels.CLASSES
    velocities: np.ndarray  # (N, 2) float32 vx, vy (m/s)
    uncertainty: np.ndarray  # (N, 6) float32, columns UNCERTAINTY_FIELDS
    features: np.ndarray  # (C, H, W) float32 shared BEV feature map (a strided view, channels last in memory)
    confidence: np.ndarray  # (H, W) float32 max class probability per cell
    grid: BevGrid
    sensor_height: float  # m above ground used to normalise heights
    stats: VoxelStats = field(default_factory=VoxelStats)
    timings_ms: dict[str, float] = field(default_factory=dict)
    note: str = ''  # why the output is empty or partial, '' when the scan was used as given
    # (B,) float32 m: per azimuth bin the range of the nearest obstacle return of the scan
    # (detection.free_range); None where the scan was not at hand (a decoded map, an old cache)
    free_range: np.ndarray | None = None
    # m/s per axis, the standard deviation of ``velocities``, one for all or (N,) per box: from
    # the detector, their noise as measurements (DecodeConfig.velocity_std, detection.scan_velocity;
    # 0: not measured); after a sender's tracker (fusion.pipeline.Sender), the tracks'
    velocity_std: float | np.ndarray = 0.0


def class_probability(logit: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Probability of a logit ~ N(logit, exp(logvar)) under a sigmoid (probit approximation,
    MacKay 1992): sigmoid(logit / sqrt(1 + pi/8 var)). Used in the loss and in decoding alike."""
    var = torch.exp(logvar.clamp(*LOGVAR_CLAMP))
    return torch.sigmoid(logit / torch.sqrt(1.0 + (math.pi / 8.0) * var))


def boxes_from_regression(reg: np.ndarray, rows: np.ndarray, cols: np.ndarray, grid: BevGrid,
                          sensor_height: float) -> tuple[np.ndarray, np.ndarray]:
    """(n, len(REG_FIELDS)) regression at cells (rows, cols) -> boxes (n, 7), velocities (n, 2)."""
    reg = reg.astype(np.float64)
    cx, cy = grid.centre_of(rows, cols)
    x, y = cx + reg[:, 0], cy + reg[:, 1]
    z = reg[:, 2] - sensor_height
    lwh = np.exp(np.clip(reg[:, 3:6], *_LOG_SIZE_CLAMP))
    yaw = np.arctan2(reg[:, 6], reg[:, 7])
    boxes = np.column_stack([x, y, z, lwh, yaw])
    return boxes, reg[:, 8:10].astype(np.float32)


def rotated_nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS with rotated BEV IoU: indices of kept boxes, by descending score."""
    order = np.argsort(-scores, kind='stable')
    iou = bev_iou(boxes[order])
    suppressed = np.zeros(len(order), bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(order[i])
        suppressed |= iou[i] > iou_threshold
    return np.asarray(keep, dtype=np.int64)


def empty_detections(cfg: DetectorConfig, grid: BevGrid, sensor_height: float, stats: VoxelStats,
                     timings_ms: dict[str, float], note: str) -> Detections:
    H, W = grid.shape
    return Detections(
        boxes=np.zeros((0, 7)), scores=np.zeros(0, np.float32), labels=np.zeros(0, np.int64),
        velocities=np.zeros((0, 2), np.float32),
        uncertainty=np.zeros((0, len(UNCERTAINTY_FIELDS)), np.float32),
        features=np.zeros((cfg.model.feature_channels, H, W), np.float32),
        confidence=np.zeros((H, W), np.float32), grid=grid, sensor_height=sensor_height,
        stats=stats, timings_ms=timings_ms, note=note, velocity_std=cfg.decode.velocity_std)


@torch.inference_mode()
def decode(head, maps: dict[str, torch.Tensor], cfg: DetectorConfig,
           grid: BevGrid, sensor_height: float, mc_passes: int, timings: dict[str, float],
           batch_index: int = 0) -> Detections:
    """Maps of one batch element -> Detections; adds 'decode' and 'mc' seconds to ``timings``.

    ``head`` is the model's CenterHead: MC dropout re-runs its pointwise MLPs at the kept cells
    only, which gives exactly what full-map MC passes would give at those cells.
    """
    t = time.perf_counter()
    dc = cfg.decode
    b = batch_index
    prob = class_probability(maps['heatmap'][b], maps['cls_logvar'][b])  # (K, H, W)
    K, H, W = prob.shape
    confidence = prob.amax(0)
    is_peak = F.max_pool2d(prob[None], 3, 1, 1)[0] == prob
    scores, flat = torch.where(is_peak, prob, torch.zeros_like(prob)).flatten().topk(
        min(dc.pre_nms_top_k, K * H * W))
    sel = scores >= dc.score_threshold
    scores, flat = scores[sel], flat[sel]
    labels, rows, cols = flat // (H * W), (flat % (H * W)) // W, flat % W

    reg_all, logvar_all = _regression_at(head, maps, b, rows, cols)
    reg = reg_all.cpu().numpy()
    boxes, vel = boxes_from_regression(reg, rows.cpu().numpy(), cols.cpu().numpy(), grid, sensor_height)
    scores_np, labels_np = scores.cpu().numpy(), labels.cpu().numpy()
    keep = []
    for k in range(K):
        members = np.flatnonzero(labels_np == k)
        keep.append(members[rotated_nms(boxes[members], scores_np[members], dc.nms_iou[k])])
    keep = np.concatenate(keep)
    keep = keep[np.argsort(-scores_np[keep], kind='stable')][:dc.max_boxes]
    keep_t = torch.from_numpy(keep).to(rows.device)
    rows, cols, labels = rows[keep_t], cols[keep_t], labels[keep_t]

    ale = torch.cat([logvar_all[keep_t], maps['cls_logvar'][b][labels, rows, cols][:, None]], 1)
    ale = torch.exp(ale.clamp(*LOGVAR_CLAMP)).cpu().numpy()
    timings['decode'] = time.perf_counter() - t

    t = time.perf_counter()
    epi = _mc_uncertainty(head, maps['cells'][b][rows, cols].float(), labels, mc_passes, dc.mc_seed)
    timings['mc'] = time.perf_counter() - t

    return Detections(
        boxes=boxes[keep], scores=scores_np[keep].astype(np.float32), labels=labels_np[keep].astype(np.int64),
        velocities=vel[keep], uncertainty=np.concatenate([ale, epi], 1).astype(np.float32),
        features=maps['features'][b].cpu().numpy(), confidence=confidence.cpu().numpy(),
        grid=grid, sensor_height=sensor_height, velocity_std=dc.velocity_std)


def _regression_at(head, maps: dict[str, torch.Tensor], b: int, rows: torch.Tensor,
                   cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """reg (n, len(REG_FIELDS)) and reg_logvar (n, ..) of batch element ``b`` at the cells
    (rows, cols): read from the maps, or regressed from the head inputs where the head left the
    box maps out (``CenterHead.forward(boxes=False)``)."""
    if 'reg' in maps:
        return maps['reg'][b][:, rows, cols].T, maps['reg_logvar'][b][:, rows, cols].T
    out = head.regress(maps['cells'][b][rows, cols].float())
    return out['reg'].float(), out['reg_logvar'].float()


def _mc_uncertainty(head, cells: torch.Tensor, labels: torch.Tensor, passes: int, seed: int) -> np.ndarray:
    """(n, Ch) head inputs of the kept boxes -> (n, 2) [entropy, centre variance] over MC passes.

    Masks come from a generator seeded the same way on every call: the K passes are a fixed set of
    thinned networks, so detections are reproducible while still sampling the dropout posterior.
    """
    n = len(cells)
    if passes < 1:
        return np.full((n, 2), np.nan, np.float32)
    if n == 0:
        return np.zeros((0, 2), np.float32)
    gen = torch.Generator().manual_seed(seed)
    out = head.pointwise(cells.expand(passes, n, cells.shape[-1]), head.mc_masks((passes, n), gen, cells.device))
    idx = torch.arange(n, device=cells.device)
    p = class_probability(out['heatmap'][:, idx, labels], out['cls_logvar'][:, idx, labels]).mean(0)
    p = p.clamp(1e-6, 1 - 1e-6)
    entropy = -(p * p.log() + (1 - p) * (1 - p).log())
    centre_var = out['reg'][..., :2].var(0, unbiased=False).sum(-1)
    return torch.stack([entropy, centre_var], 1).cpu().numpy()
