"""Multi-scale attention fusion of per-agent BEV feature maps already warped into the ego grid.

At each scale the agents are reduced to their element-wise max and mean; a spatial attention map
(from the channel-wise max and mean of both) blends the two, and a squeeze-excitation channel
attention reweights the result. The coarse scale is upsampled and merged with the fine one, and
the merged map is added to the ego's own features through a zero-initialised projection, so an
untrained fusion is exactly ego-only detection and the ego's features are never masked.
"""
from __future__ import annotations

import torch
from torch import nn


class AgentAttention(nn.Module):
    """(B, A, C, H, W) agents + (B, A) validity -> (B, C, H, W)."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.spatial = nn.Conv2d(4, 1, 7, padding=3)
        self.channel = nn.Sequential(nn.Linear(channels, channels // reduction), nn.ReLU(inplace=True),
                                     nn.Linear(channels // reduction, channels))

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        v = valid[:, :, None, None, None].to(x.dtype)
        mx = (x + (v - 1.0) * 1e4).amax(1)  # invalid agents sink below any real feature
        mean = (x * v).sum(1) / v.sum(1).clamp_min(1.0)
        stats = torch.cat([mx.amax(1, keepdim=True), mx.mean(1, keepdim=True),
                           mean.amax(1, keepdim=True), mean.mean(1, keepdim=True)], 1)
        s = torch.sigmoid(self.spatial(stats))
        fused = s * mx + (1 - s) * mean
        c = torch.sigmoid(self.channel(fused.mean((2, 3))))[:, :, None, None]
        return fused * c


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
        fused = [self.attend[0](agents, valid)]
        for s in range(1, self.scales):
            n, c, h, w = x.shape
            # Parameter-free 2x2 max pooling per agent: a strided conv on every agent cost ~4x the rest
            # of the fusion on these CPUs; the learned layers act on the one fused map per scale.
            x = x.reshape(n, c, h // 2, 2, w // 2, 2).amax((3, 5))
            fused.append(self.up[s - 1](self.attend[s](x.reshape(B, A, C, *x.shape[-2:]), valid)))
        delta = self.project(torch.cat(fused, 1))
        return agents[:, 0] + delta


def max_fusion(agents: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The no-learning baseline: element-wise max over valid agents, (B, A, C, H, W) -> (B, C, H, W)."""
    v = valid[:, :, None, None, None]
    return torch.where(v, agents, torch.full_like(agents, -torch.inf)).amax(1).nan_to_num(0.0, neginf=0.0)

