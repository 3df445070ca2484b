"""Multi-scale attention fusion of per-agent BEV feature maps already warped into the ego grid.

At each scale the agents are reduced to their element-wise max and mean; a spatial attention map
(from the channel-wise max and mean of both) blends the two, and a squeeze-excitation channel
attention reweights the result. The coarse scale is upsampled and merged with the fine one, and
the merged map is added to the ego's own features through a zero-initialised projection, so an
untrained fusion is exactly ego-only detection and the ego's features are never masked.

Training fuses dense (B, A, C, H, W) stacks. At run time a collaborator brings a few hundred ROI
cells of the 16k in the grid, and the dense stack is mostly zeros that cost most of the time, so
`MultiScaleFusion.forward_sparse` computes the same agent-wise max and mean from the ego's map and
the collaborators' cells alone. That relies on the features being non-negative (the detector's
BEV ends in a ReLU): a collaborator's empty (zero) cells then never raise the max.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class SparseAgent(NamedTuple):
    """One collaborator's non-zero cells in the ego grid, for `MultiScaleFusion.forward_sparse`."""
    index: torch.Tensor    # (n,) int64 flat cell index row * W + col, unique
    values: torch.Tensor   # (C, n) float32 features (trust applied), >= 0


def reduce_agents(x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A, C, H, W) agents + (B, A) validity -> agent-wise max and mean, each (B, C, H, W)."""
    v = valid[:, :, None, None, None].to(x.dtype)
    mx = (x + (v - 1.0) * 1e4).amax(1)  # invalid agents sink below any real feature
    mean = (x * v).sum(1) / v.sum(1).clamp_min(1.0)
    return mx, mean


def reduce_sparse(ego: torch.Tensor, agents: list[SparseAgent]) -> tuple[torch.Tensor, torch.Tensor]:
    """`reduce_agents` for one ego map (C, H, W) and collaborators' non-negative cells -> max and
    mean, each (C, H, W). Collaborators without cells (compact records) count in the mean only;
    the max is then the ego map itself, not a copy."""
    C, H, W = ego.shape
    share = 1.0 / (1 + len(agents))
    flat = ego.reshape(C, -1)
    mx, mean = flat, flat * share
    for a in agents:
        if not len(a.index):
            continue
        if mx is flat:
            mx = flat.clone()
        mx[:, a.index] = torch.maximum(mx[:, a.index], a.values)
        mean.index_add_(1, a.index, a.values, alpha=share)
    return mx.reshape(C, H, W), mean.reshape(C, H, W)


class AgentAttention(nn.Module):
    """Agent-wise max and mean (B, C, H, W) each -> one fused map (B, C, H, W)."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.spatial = nn.Conv2d(4, 1, 7, padding=3)
        self.channel = nn.Sequential(nn.Linear(channels, channels // reduction), nn.ReLU(inplace=True),
                                     nn.Linear(channels // reduction, channels))

    def forward(self, mx: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        fused, c = self.blend(mx, mean)
        return fused * c[:, :, None, None]

    def blend(self, mx: torch.Tensor, mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` before its channel reweighting -> blended map (B, C, H, W) and channel
        weights (B, C), which a following linear layer can take into its weights instead."""
        stats = torch.cat([mx.amax(1, keepdim=True), mx.mean(1, keepdim=True),
                           mean.amax(1, keepdim=True), mean.mean(1, keepdim=True)], 1)
        s = torch.sigmoid(self.spatial(stats))
        fused = torch.lerp(mean, mx, s)   # s * mx + (1 - s) * mean in one pass
        return fused, torch.sigmoid(self.channel(fused.mean((2, 3))))


class MultiScaleFusion(nn.Module):
    """Fuse agents at `scales` resolutions (1 = the BEV grid, each next one half of it)."""

    def __init__(self, channels: int, scales: int = 2):
        super().__init__()
        if scales < 1:
            raise ValueError('scales must be >= 1')
        self.scales = scales
        self.attend = nn.ModuleList([AgentAttention(channels) for _ in range(scales)])
        self.up = nn.ModuleList([nn.Sequential(nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
                                               nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
                                               nn.Upsample(scale_factor=2 ** s, mode='nearest'))
                                 for s in range(1, scales)])
        self.project = nn.Conv2d(channels * scales, channels, 1)
        nn.init.zeros_(self.project.weight)
        nn.init.zeros_(self.project.bias)

    def forward(self, agents: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """agents: (B, A, C, H, W) with the ego at index 0; valid: (B, A) bool -> (B, C, H, W).
        H and W must be divisible by 2^(scales-1)."""
        B, A, C, H, W = agents.shape
        x = agents.reshape(B * A, C, H, W)
        fused = [self.attend[0](*reduce_agents(agents, valid))]
        for s in range(1, self.scales):
            # Parameter-free 2x2 max pooling per agent: a strided conv on every agent cost ~4x the rest
            # of the fusion on these CPUs; the learned layers act on the one fused map per scale.
            x = F.max_pool2d(x, 2)
            fused.append(self.attend[s](*reduce_agents(x.reshape(B, A, C, *x.shape[-2:]), valid)))
        return self._merge(agents[:, 0], fused)

    def forward_sparse(self, ego: torch.Tensor, agents: list[SparseAgent]) -> torch.Tensor:
        """The same fusion for one ego map (C, H, W) and its valid collaborators' cells (features
        >= 0, see the module docstring) -> (1, C, H, W); equals ``forward`` on the dense stack.
        Memory traffic, not arithmetic, is most of its time on a CPU: collaborators without cells
        cost nothing but their share of the mean, and the fine scale's channel weights go into
        the projection's weights instead of over the map."""
        C, H, W = ego.shape
        share = 1.0 / (1 + len(agents))
        with_cells = [a for a in agents if len(a.index)]
        fine, c = self.attend[0].blend(*(m[None] for m in reduce_sparse(ego, agents)))
        weight, bias = self.project.weight, self.project.bias
        delta = F.conv2d(fine, weight[:, :C] * c[0][None, :, None, None], bias)
        for s in range(1, self.scales):
            f = 2 ** s
            # a coarse grid is small enough to reduce densely
            mx = max_pool(ego, f)
            total = mx.clone() if with_cells else mx
            for a in with_cells:
                pooled = pool_dense(a, H, W, f)
                mx = torch.maximum(mx, pooled)
                total += pooled
            coarse = self.attend[s](mx[None], total[None] * share)
            up = self.up[s - 1]
            delta += up[-1](F.conv2d(up[:-1](coarse), weight[:, s * C:(s + 1) * C]))
        return delta.add_(ego)

    def _merge(self, ego: torch.Tensor, fused: list[torch.Tensor]) -> torch.Tensor:
        """ego + project(cat(fine, upsampled coarse scales)). The 1x1 projection is split by scale
        and applied before the nearest-neighbour upsampling, with which it commutes: the same
        result without the full-resolution concatenation."""
        C = ego.shape[1]
        weight, bias = self.project.weight, self.project.bias
        delta = F.conv2d(fused[0], weight[:, :C], bias)
        for s in range(1, self.scales):
            up = self.up[s - 1]
            coarse = F.conv2d(up[:-1](fused[s]), weight[:, s * C:(s + 1) * C])
            delta = delta + up[-1](coarse)
        return ego + delta


def max_pool(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(C, H, W) -> (C, H/f, W/f) max pooling; channels-last, where the CPU kernel is several times
    faster than on the planar layout."""
    cl = x[None].contiguous(memory_format=torch.channels_last)
    return F.max_pool2d(cl, factor)[0].contiguous()


def pool_dense(agent: SparseAgent, H: int, W: int, factor: int) -> torch.Tensor:
    """A collaborator's cells after ``factor`` x ``factor`` max pooling -> (C, H/f, W/f); empty
    cells count as zeros, which non-negative features never fall below."""
    rows, cols = agent.index // W, agent.index % W
    pooled = (rows // factor) * (W // factor) + cols // factor
    out = agent.values.new_zeros(agent.values.shape[0], (H // factor) * (W // factor))
    out.scatter_reduce_(1, pooled.expand_as(agent.values), agent.values, 'amax')
    return out.reshape(-1, H // factor, W // factor)


def max_fusion(agents: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The no-learning baseline: element-wise max over valid agents, (B, A, C, H, W) -> (B, C, H, W)."""
    v = valid[:, :, None, None, None]
    return torch.where(v, agents, torch.full_like(agents, -torch.inf)).amax(1).nan_to_num(0.0, neginf=0.0)

