"""Trust-modulated multi-scale fusion: the learned part of the cooperative detector.

Per ego frame the inputs are the ego's own BEV features and up to K collaborators' features already
warped into the ego grid (`align.warp_to_ego`), with per-cell ROI attributes. The learned trust
modulus scales each collaborator ROI cell, background cells of collaborators are suppressed, the
ego is never masked; `MultiScaleFusion` then fuses the agents. The detector's own (frozen) head
turns the fused map into boxes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import yaml
from torch import nn

from coop_perception.errors import UserError

from .align import WarpedFeatures
from .methods import GATE, METHODS, FusionMethod
from .network import MultiScaleFusion, SparseAgent, max_fusion, reduce_sparse
from .trust import ROI_ATTRIBUTES, BoxTrust, LearnedTrust, ThresholdTrust, roi_attributes


@dataclass
class FusionInputs:
    """Numpy inputs of one ego frame; K collaborator slots (unused ones have valid False)."""
    ego: np.ndarray          # (C, H, W) float32
    collab: np.ndarray       # (K, C, H, W) float32, warped into the ego grid
    attributes: np.ndarray   # (K, H, W, 8) float32, columns trust.ROI_ATTRIBUTES
    roi: np.ndarray          # (K, H, W) bool, the cell carries a collaborator ROI
    valid: np.ndarray        # (K,) bool


def stack_inputs(ego_features: np.ndarray, warped: list[WarpedFeatures], slots: int) -> FusionInputs:
    """Ego features (C, H, W) + up to `slots` warped messages -> FusionInputs (extra ones dropped)."""
    C, H, W = ego_features.shape
    collab = np.zeros((slots, C, H, W), np.float32)
    attributes = np.zeros((slots, H, W, len(ROI_ATTRIBUTES)), np.float32)
    roi = np.zeros((slots, H, W), bool)
    valid = np.zeros(slots, bool)
    for i, w in enumerate(warped[:slots]):
        collab[i] = w.features
        attributes[i] = roi_attributes(w.score, w.uncertainty, w.age_s, w.speed, w.range_m).reshape(H, W, -1)
        roi[i] = w.roi >= 0
        valid[i] = True
    return FusionInputs(ego_features.astype(np.float32, copy=False), collab, attributes, roi, valid)


def collate(batch: list[FusionInputs], device: torch.device | str = 'cpu') -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(np.stack([getattr(b, name) for b in batch])).to(device)
            for name in ('ego', 'collab', 'attributes', 'roi', 'valid')}


def fuse(ego, collab, attributes, roi, valid, method: FusionMethod, model: 'FusionModel | None' = None,
         gate: 'ThresholdTrust | None' = None):
    """A feature method (fusion.methods) on a batch: each collaborator ROI cell weighted by the
    method's trust (learned: ``model.cell_trust``; gate: ``gate``; none: full weight), then fused by
    ``model``'s multi-scale fusion or, without a fusion network, an element-wise max.
    Background cells of collaborators are suppressed either way; the ego is never masked.
    -> fused (B, C, H, W), trust (B, K, H, W)."""
    keep = roi.to(collab.dtype) * valid[:, :, None, None]
    if method.trust is None:
        trust = keep
    elif method.trust == GATE:
        flat = attributes.reshape(-1, attributes.shape[-1]).cpu().numpy()
        trust = torch.from_numpy(gate.trust(flat).astype(np.float32)).to(keep.device).reshape(keep.shape) * keep
    else:
        trust = model.cell_trust(attributes) * keep
    agents = torch.cat([ego[:, None], collab * trust[:, :, None]], 1)
    valid_all = torch.cat([torch.ones_like(valid[:, :1]), valid], 1)
    if not method.fusion_network:
        return max_fusion(agents, valid_all), trust
    return model.fusion(agents, valid_all), trust


def _cell_attributes(w: WarpedFeatures, cells: np.ndarray) -> np.ndarray:
    """(n, 8) trust attributes of the flat ego cells ``cells`` of one warped message."""
    return roi_attributes(w.score.reshape(-1)[cells], w.uncertainty.reshape(-1, 4)[cells], w.age_s,
                          w.speed.reshape(-1)[cells], w.range_m.reshape(-1)[cells])


def fuse_sparse(ego_features: np.ndarray, warped: list[WarpedFeatures], method: FusionMethod, slots: int,
                model: 'FusionModel | None' = None, gate: 'ThresholdTrust | None' = None):
    """`fuse` for one ego frame at run time, from each message's ROI cells alone (the first
    ``slots`` messages) -> fused (1, C, H, W) tensor, trust (K, H, W) float32 (K = messages used).
    Equal to `fuse` on ``collate([stack_inputs(...)])``, at a fraction of the cost."""
    C, H, W = ego_features.shape
    device = next(model.parameters()).device if model is not None else torch.device('cpu')
    ego = torch.as_tensor(np.ascontiguousarray(ego_features, np.float32), device=device)
    agents, trust = [], np.zeros((min(len(warped), slots), H * W), np.float32)
    for i, w in enumerate(warped[:slots]):
        cells = np.flatnonzero(w.roi.reshape(-1) >= 0)
        if method.trust is None:
            t = np.ones(len(cells), np.float32)
        elif method.trust == GATE:
            t = gate.trust(_cell_attributes(w, cells)).astype(np.float32)
        else:
            t = model.cell_trust(torch.from_numpy(_cell_attributes(w, cells)).to(device)).cpu().numpy()
        trust[i, cells] = t
        values = w.features.reshape(C, -1)[:, cells] * t
        agents.append(SparseAgent(torch.from_numpy(cells).to(device),
                                  torch.from_numpy(np.ascontiguousarray(values)).to(device)))
    if not method.fusion_network:
        fused = reduce_sparse(ego, agents)[0][None] if agents else ego[None]
    else:
        fused = model.fusion.forward_sparse(ego, agents)
    return fused, trust.reshape(-1, H, W)


class FusionModel(nn.Module):
    """The learned part of the feature methods: trust network + multi-scale fusion."""

    def __init__(self, channels: int, scales: int = 2, trust_hidden: int = 16):
        super().__init__()
        self.trust = LearnedTrust(trust_hidden)
        self.fusion = MultiScaleFusion(channels, scales)
        self.config = {'channels': channels, 'scales': scales, 'trust_hidden': trust_hidden}
        # calibrated on validation outcomes (eval.box_trust_calibration) and fixed before training:
        # rescores the collaborators' ROI boxes and weights their cells (`cell_trust`)
        self.box_trust: BoxTrust | None = None

    def cell_trust(self, attributes: torch.Tensor) -> torch.Tensor:
        """(..., 8) ROI attributes of collaborator cells -> (...,) trust in (0, 1): the learned
        trust times, where the model has one, the box trust of the cell's ROI (the probability that
        its box is a true positive at the ego stamp), which ranks what the learned trust alone,
        trained through the detection loss, leaves near 1."""
        learned = self.trust(attributes)
        if self.box_trust is None:
            return learned
        flat = attributes.detach().reshape(-1, attributes.shape[-1]).cpu().numpy()
        box = torch.from_numpy(self.box_trust.trust(flat).astype(np.float32)).to(learned.device).reshape(learned.shape)
        return learned * box

    def forward(self, ego, collab, attributes, roi, valid):
        """Tensors as in `collate` (batched) -> fused (B, C, H, W) and trust (B, K, H, W), with the
        learned trust (method 'trust', what training optimises)."""
        return fuse(ego, collab, attributes, roi, valid, METHODS['trust'], self)

    def save(self, path, **extra) -> None:
        box_trust = {'box_trust': self.box_trust.to_dict()} if self.box_trust is not None else {}
        state = {k: v.cpu() for k, v in self.state_dict().items()}  # loads anywhere
        torch.save({'config': self.config, 'state': state, **box_trust, **extra}, path)

    @classmethod
    def load(cls, path) -> 'FusionModel':
        ckpt = torch.load(Path(path), map_location='cpu', weights_only=False)
        inputs = ckpt['state']['trust.net.0.weight'].shape[1]
        if inputs != len(ROI_ATTRIBUTES):
            raise UserError(path, f'its trust takes {inputs} ROI attributes, this version '
                                  f'{len(ROI_ATTRIBUTES)} ({", ".join(ROI_ATTRIBUTES)}); train it again '
                                  'with `train fusion`')
        model = cls(**ckpt['config'])
        model.load_state_dict(ckpt['state'])
        try:
            model.box_trust = BoxTrust.from_dict(ckpt['box_trust']) if 'box_trust' in ckpt else None
        except (KeyError, ValueError) as err:
            raise UserError(path, f'box trust unreadable ({err}); calibrate it again with '
                                  '`calibrate box-trust`') from None
        return model.eval()


def load_method_models(methods: Iterable[FusionMethod], fusion_path, gate_path,
                       channels: int | None = None) -> tuple['FusionModel | None', dict | None]:
    """The fusion checkpoint and the calibrated gate settings that ``methods`` need (else None);
    ``channels``: the detector's feature channels, which the fusion model must match."""
    methods = list(methods)
    fusion = gate = None
    if any(m.needs_fusion_model for m in methods):
        if not Path(fusion_path).exists():
            raise UserError(fusion_path, 'fusion checkpoint not found (train one with `train fusion`)')
        fusion = FusionModel.load(fusion_path)
        if channels is not None and fusion.config['channels'] != channels:
            raise UserError(fusion_path, f'fusion model has {fusion.config["channels"]} channels, '
                                         f'the detector {channels}')
    if any(m.needs_gate for m in methods):
        if not Path(gate_path).exists():
            raise UserError(gate_path, 'trust gate not found (make one with `calibrate trust`)')
        gate = yaml.safe_load(Path(gate_path).read_text())
    return fusion, gate
