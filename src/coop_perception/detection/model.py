"""Sparse 3D encoder -> BEV backbone -> CenterPoint-style head with aleatoric and MC-dropout heads.

Sized for 2 CPU cores (see models/detector.yaml): on CPU, spconv's cost is dominated by building
neighbour indices, so the encoder has one resolution with a shared-index SubM pair, one stride-2
layer and a z-collapsing layer; the spatial context comes from the dense 2D backbone, which runs in
channels_last where oneDNN is several times faster. Dropout lives only in the pointwise part of the
head, so MC dropout can be evaluated exactly at the detected cells instead of over the whole map.
"""
from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager

import numpy as np
import spconv.pytorch as spconv
import torch
import torch.nn.functional as F
from torch import nn

from coop_perception.bev_grid import BevGrid

from .config import DetectorConfig
from .decode import REG_FIELDS, REG_LOGVAR_FIELDS, Detections, decode, empty_detections
from .free_range import free_range_profile
from .scan_velocity import with_measured_velocities
from .spconv_cpu import patch_spconv_for_cpu
from .sweeps import newest_sweeps
from .voxelize import resolve_sensor_height, voxelize

patch_spconv_for_cpu()
log = logging.getLogger(__name__)

_HEATMAP_PRIOR = 0.1  # initial heatmap probability, so the focal loss starts balanced (CenterNet)
_CLS_LOGVAR_INIT = -4.0  # start with a near-deterministic logit


def _sparse_block(cout: int, conv: spconv.SparseModule) -> spconv.SparseSequential:
    return spconv.SparseSequential(conv, nn.BatchNorm1d(cout, eps=1e-3, momentum=0.01), nn.ReLU(inplace=True))


def _conv_block(cin: int, cout: int, stride: int = 1, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=False),
                         nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01), nn.ReLU(inplace=True))


class SparseEncoder(nn.Module):
    """Voxels (V, F) -> dense BEV (B, C, H/2, W/2) in channels_last."""

    def __init__(self, cfg: DetectorConfig):
        super().__init__()
        c0, c1, c2 = cfg.model.encoder_channels
        D, _, _ = cfg.voxel.grid_shape
        self.spatial_shape = list(cfg.voxel.grid_shape)
        dz = D // 2
        self.net = spconv.SparseSequential(
            _sparse_block(c0, spconv.SubMConv3d(cfg.voxel.num_features, c0, 3, bias=False, indice_key='subm0')),
            _sparse_block(c0, spconv.SubMConv3d(c0, c0, 3, bias=False, indice_key='subm0')),
            _sparse_block(c1, spconv.SparseConv3d(c0, c1, 3, 2, padding=1, bias=False)),
            # collapses the remaining z levels into channels: one BEV cell per (y, x) column
            _sparse_block(c2, spconv.SparseConv3d(c1, c2, (dz, 1, 1), (dz, 1, 1), bias=False)),
        )

    def forward(self, coords: torch.Tensor, features: torch.Tensor, batch_size: int) -> torch.Tensor:
        with _one_thread_on_cpu(features):
            out = self.net(spconv.SparseConvTensor(features, coords, self.spatial_shape, batch_size))
        # z is collapsed to one level, so a plain scatter makes the dense map (and avoids the
        # indexing that SparseConvTensor.dense() does, deprecated in torch)
        _, H, W = out.spatial_shape
        idx = out.indices.long()
        dense = out.features.new_zeros(batch_size, H, W, out.features.shape[1])
        dense = dense.index_put((idx[:, 0], idx[:, 2], idx[:, 3]), out.features)
        return dense.permute(0, 3, 1, 2)  # NCHW view with channels_last strides


@contextmanager
def _one_thread_on_cpu(tensor: torch.Tensor):
    """Run the block with one torch thread when ``tensor`` is on the CPU, then restore the count.

    spconv's CPU convolutions scatter-add their outputs in an order that depends on thread
    scheduling: with several threads the same scan gave features differing by ~1 and 73 to 77
    boxes from call to call. The encoder is a small part of a detection (its cost is building
    neighbour indices), so determinism costs little; the dense backbone keeps every thread."""
    threads = torch.get_num_threads()
    if tensor.device.type != 'cpu' or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class BevBackbone(nn.Module):
    """Two-scale 2D backbone; the output is the shared BEV feature map."""

    def __init__(self, cfg: DetectorConfig):
        super().__init__()
        cin = cfg.model.encoder_channels[2]
        b0, b1 = cfg.model.backbone_channels
        self.stage0 = nn.Sequential(_conv_block(cin, b0), _conv_block(b0, b0))
        self.stage1 = nn.Sequential(_conv_block(b0, b1, 2), _conv_block(b1, b1), _conv_block(b1, b1))
        self.up1 = nn.Sequential(nn.ConvTranspose2d(b1, b0, 2, 2, bias=False),
                                 nn.BatchNorm2d(b0, eps=1e-3, momentum=0.01), nn.ReLU(inplace=True))
        self.fuse = _conv_block(2 * b0, cfg.model.feature_channels, k=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.stage0(x)
        x1 = self.up1(self.stage1(x0))
        return self.fuse(torch.cat([x0, x1], 1))


class PointwiseMLP(nn.Module):
    """Two-layer per-cell MLP with dropout before each layer (the MC-dropout part).

    Training draws one keep mask per sample and channel, shared by all cells of a map (like
    Dropout2d). A cell's output depends only on its own mask, so this trains the same per-cell
    dropout distribution that MC sampling at inference draws from, at a fraction of the cost of
    an independent mask per cell (which dominated the training step on CPU).
    """

    def __init__(self, cin: int, hidden: int, cout: int, p: float):
        super().__init__()
        self.fc1, self.fc2, self.p = nn.Linear(cin, hidden), nn.Linear(hidden, cout), p

    def forward(self, x: torch.Tensor, masks: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x (..., cin) -> (..., cout). ``masks``: scaled keep masks (broadcastable to the inputs
        of fc1 and fc2) that replace the module's own dropout, for reproducible MC passes."""
        if masks is None and self.training and self.p > 0:
            shape = (x.shape[0],) + (1,) * (x.dim() - 2)
            masks = (self.keep_mask(shape + (self.fc1.in_features,), device=x.device),
                     self.keep_mask(shape + (self.fc1.out_features,), device=x.device))
        if masks is None:
            return self.fc2(F.relu(self.fc1(x)))
        return self.fc2(F.relu(self.fc1(x * masks[0])) * masks[1])

    def keep_mask(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
                  device: torch.device | str = 'cpu') -> torch.Tensor:
        """Scaled keep mask; with a ``generator`` drawn on its device (the CPU for MC passes, so
        that they are the same masks on any device)."""
        keep = 1.0 - self.p
        where = generator.device if generator is not None else device
        return (torch.rand(shape, generator=generator, device=where) < keep).float().to(device) / keep


class CenterHead(nn.Module):
    """Shared 3x3 conv, then two pointwise MLPs: class logits + their log-variance, and box
    regression + log-variance of x, y and yaw (classification and regression kept apart)."""

    def __init__(self, cfg: DetectorConfig):
        super().__init__()
        C, Ch, K, p = cfg.model.feature_channels, cfg.model.head_channels, len(cfg.classes), cfg.model.dropout
        self.num_classes = K
        self.shared = _conv_block(C, Ch)
        self.cls = PointwiseMLP(Ch, Ch, 2 * K, p)
        self.box = PointwiseMLP(Ch, Ch, len(REG_FIELDS) + len(REG_LOGVAR_FIELDS), p)
        nn.init.constant_(self.cls.fc2.bias[:K], -math.log((1 - _HEATMAP_PRIOR) / _HEATMAP_PRIOR))
        nn.init.constant_(self.cls.fc2.bias[K:], _CLS_LOGVAR_INIT)

    def pointwise(self, cells: torch.Tensor, masks: dict | None = None) -> dict[str, torch.Tensor]:
        """(..., Ch) head inputs -> heatmap (..., K) logits, cls_logvar (..., K),
        reg (..., len(REG_FIELDS)), reg_logvar (..., len(REG_LOGVAR_FIELDS))."""
        m = masks or {}
        return {**self.classify(cells, m.get('cls')), **self.regress(cells, m.get('box'))}

    def classify(self, cells: torch.Tensor, masks=None) -> dict[str, torch.Tensor]:
        """(..., Ch) head inputs -> heatmap (..., K) logits, cls_logvar (..., K)."""
        cls = self.cls(cells, masks)
        return {'heatmap': cls[..., :self.num_classes], 'cls_logvar': cls[..., self.num_classes:]}

    def regress(self, cells: torch.Tensor, masks=None) -> dict[str, torch.Tensor]:
        """(..., Ch) head inputs -> reg (..., len(REG_FIELDS)), reg_logvar (..., len(REG_LOGVAR_FIELDS))."""
        box = self.box(cells, masks)
        return {'reg': box[..., :len(REG_FIELDS)], 'reg_logvar': box[..., len(REG_FIELDS):]}

    def mc_masks(self, shape: tuple[int, ...], generator: torch.Generator,
                 device: torch.device | str = 'cpu') -> dict:
        """Independent keep masks of leading ``shape`` for every dropout in the pointwise MLPs."""
        return {name: (mlp.keep_mask(shape + (mlp.fc1.in_features,), generator, device),
                       mlp.keep_mask(shape + (mlp.fc1.out_features,), generator, device))
                for name, mlp in (('cls', self.cls), ('box', self.box))}

    def forward(self, bev: torch.Tensor, boxes: bool = True) -> dict[str, torch.Tensor]:
        """(B, C, H, W) -> pointwise outputs as (B, n, H, W) maps plus 'cells' (B, H, W, Ch).
        Without ``boxes`` only the class maps: decoding regresses the few cells it keeps
        (``regress``), a quarter of the head's time on every cell."""
        cells = self.shared(bev).permute(0, 2, 3, 1)
        out = {k: v.permute(0, 3, 1, 2) for k, v in (self.pointwise(cells) if boxes else self.classify(cells)).items()}
        out['cells'] = cells
        return out


def apply_threads(cfg: DetectorConfig) -> None:
    """Set the process-wide torch thread count from ``runtime.threads`` (0 leaves it alone)."""
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)


def native_bf16() -> bool:
    """Whether this CPU has AMX tiles (a private torch probe; False if it vanishes), where the
    bfloat16 convolutions run ~3x faster than float32 ones (models/detector.md). AVX512-BF16
    alone is not enough: there the same 3x3 convolution took 15.6 ms in bf16 against 8.9 ms in
    channels-last float32."""
    probe = getattr(torch.cpu, '_is_amx_tile_supported', None)
    return probe is not None and bool(probe())


class Detector(nn.Module):
    """The whole detector: :meth:`forward` for training on batches of voxels, :meth:`detect` for
    one scan, :meth:`detect_from_features` for a BEV feature map in this detector's grid (e.g. one
    fused from several agents)."""

    def __init__(self, cfg: DetectorConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = SparseEncoder(cfg)
        self.backbone = BevBackbone(cfg)
        self.head = CenterHead(cfg)
        for dense in (self.backbone, self.head):
            dense.to(memory_format=torch.channels_last)
        self.bf16 = native_bf16() if cfg.runtime.bf16 == 'auto' else bool(cfg.runtime.bf16)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _autocast(self):
        device = self.device
        if device.type == 'cuda':
            enabled = self.cfg.runtime.bf16 is not False and torch.cuda.is_bf16_supported()
            return torch.autocast('cuda', dtype=torch.bfloat16, enabled=enabled)
        return torch.autocast('cpu', dtype=torch.bfloat16, enabled=self.bf16)

    def forward(self, coords: torch.Tensor, features: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
        """coords (V, 4) int32 [batch, z, y, x], features (V, F) -> float32 maps (B, n, H, W):
        heatmap (class logits), cls_logvar, reg (REG_FIELDS), reg_logvar (REG_LOGVAR_FIELDS)."""
        bev = self.encoder(coords, features, batch_size)
        with self._autocast():
            out = self.head(self.backbone(bev))
        return {k: v.float() for k, v in out.items() if k != 'cells'}

    def grid(self) -> BevGrid:
        return BevGrid.for_detector(self.cfg)

    @torch.inference_mode()
    def detect(self, points: np.ndarray, sensor_height: float | None = None,
               mc_passes: int | None = None, ages: np.ndarray | None = None,
               measure_velocities: bool = True) -> Detections:
        """One sensor-frame scan (N, 3+) -> :class:`Detections`. Never raises on bad point values:
        an empty or clipped scan gives empty or partial output with the reason logged and stored
        in ``Detections.note``. ``sensor_height`` (m above ground) overrides the config. ``ages``
        (N,) s: the points are several stacked sweeps (detection.sweeps), the newest at age 0;
        the ground and the free range come from the newest alone, the network sees the newest
        ``voxel.sweeps``, and with ``measure_velocities`` the vehicles' velocities are measured
        from the stack (``scan_velocity``; ``cfg.sweeps_needed`` sweeps are what it uses)."""
        self._check_eval()
        cfg = self.cfg
        t0 = time.perf_counter()
        stacked = ages is not None and np.ndim(points) == 2 and np.shape(ages) == (len(points),) and np.any(ages)
        newest = np.asarray(points)[np.asarray(ages) == 0] if stacked else points
        h = resolve_sensor_height(newest, cfg.voxel, sensor_height)
        net_points, net_ages = (newest_sweeps(points, ages, cfg.voxel.sweeps, cfg.voxel.sweep_max_age_s)
                                if stacked else (points, ages))
        vox = voxelize(net_points, cfg.voxel, h, net_ages)
        timings = {'voxelize': time.perf_counter() - t0}
        note = vox.stats.reason()
        if note:
            (log.warning if vox.stats.clipped or not vox.stats.voxels else log.debug)('detector input: %s', note)
        if vox.stats.voxels == 0:
            timings['total'] = time.perf_counter() - t0
            det = empty_detections(cfg, self.grid(), h, vox.stats, _to_ms(timings), note)
            det.free_range = free_range_profile(newest, h)
            return det

        t = time.perf_counter()
        coords = torch.from_numpy(np.pad(vox.coords, ((0, 0), (1, 0)))).to(self.device)
        bev = self.encoder(coords, torch.from_numpy(vox.features).to(self.device), 1)
        timings['encoder'] = time.perf_counter() - t
        t = time.perf_counter()
        with self._autocast():
            feats = self.backbone(bev)
        timings['backbone_head'] = time.perf_counter() - t
        det = self._head_and_decode(feats, h, mc_passes, timings)
        det.stats, det.note = vox.stats, note
        t = time.perf_counter()
        det.free_range = free_range_profile(newest, h)
        timings['free_range'] = time.perf_counter() - t
        if stacked and measure_velocities and cfg.scan_velocity.on:
            t = time.perf_counter()
            det = with_measured_velocities(det, points, ages, cfg.scan_velocity)
            timings['scan_velocity'] = time.perf_counter() - t
        timings['total'] = time.perf_counter() - t0
        det.timings_ms = _to_ms(timings)
        return det

    @torch.inference_mode()
    def detect_from_features(self, features: np.ndarray | torch.Tensor, sensor_height: float,
                             mc_passes: int | None = None) -> Detections:
        """(C, H, W) BEV features in this detector's grid -> Detections (head, decode, MC)."""
        self._check_eval()
        t0 = time.perf_counter()
        feats = torch.as_tensor(features, dtype=torch.float32, device=self.device)[None].contiguous(
            memory_format=torch.channels_last)
        timings = {'backbone_head': 0.0}
        det = self._head_and_decode(feats, float(sensor_height), mc_passes, timings)
        timings['total'] = time.perf_counter() - t0
        det.timings_ms = _to_ms(timings)
        return det

    def _head_and_decode(self, feats: torch.Tensor, sensor_height: float, mc_passes: int | None,
                         timings: dict[str, float]) -> Detections:
        t = time.perf_counter()
        with self._autocast():
            maps = self.head(feats, boxes=False)
        # The per-cell head inputs stay as computed: decode converts only the cells it keeps.
        maps = {k: v if k == 'cells' else v.float() for k, v in maps.items()}
        maps['features'] = feats.float()
        timings['backbone_head'] += time.perf_counter() - t
        return decode(self.head, maps, self.cfg, self.grid(), sensor_height,
                      self.cfg.decode.mc_passes if mc_passes is None else mc_passes, timings)

    def _check_eval(self) -> None:
        if self.training:
            raise RuntimeError('detection needs eval mode (BatchNorm statistics, no dropout)')


def _to_ms(t: dict[str, float]) -> dict[str, float]:
    return {k: v * 1000.0 for k, v in t.items()}
