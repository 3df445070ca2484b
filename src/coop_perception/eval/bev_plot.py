"""Bird's-eye-view pictures of a sample: every agent's points, ground-truth and predicted boxes."""
from __future__ import annotations

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..geometry import bev_corners, transform_points  # noqa: E402

AGENT_COLOURS = plt.get_cmap('tab10')


def draw_boxes(ax, boxes: np.ndarray, colour, label: str | None = None, lw: float = 1.0):
    """Outline (N, 7) world-frame boxes with a heading tick."""
    for i, c in enumerate(bev_corners(boxes)):
        ring = np.vstack([c, c[:1]])
        ax.plot(ring[:, 0], ring[:, 1], color=colour, lw=lw, label=label if i == 0 else None)
        front = c[[0, 3]].mean(0)
        ax.plot([boxes[i, 0], front[0]], [boxes[i, 1], front[1]], color=colour, lw=lw)


def plot_sample(sample, out_path, extent: float = 80.0, max_points: int = 40000,
                predictions: np.ndarray | None = None, title: str | None = None):
    """Write a BEV PNG of a `v2xsim.Sample` centred on the intersection / agents."""
    fig, ax = plt.subplots(figsize=(10, 10), dpi=110)
    rng = np.random.default_rng(0)
    centres = []
    for k, agent in sample.agents.items():
        pts = agent.load_points()
        if len(pts) > max_points:
            pts = pts[rng.choice(len(pts), max_points, replace=False)]
        world = transform_points(agent.T_world_sensor, pts[:, :3])
        above_ground = world[:, 2] > 0.2
        colour = AGENT_COLOURS(k % 10)
        ax.scatter(world[above_ground, 0], world[above_ground, 1], s=0.15, color=colour, alpha=0.6)
        ax.scatter(world[~above_ground, 0], world[~above_ground, 1], s=0.05, color=colour, alpha=0.12)
        T = agent.T_world_ego
        centres.append(T[:2, 3])
        heading = T[:2, 0] * 4.0
        ax.arrow(T[0, 3], T[1, 3], heading[0], heading[1], width=0.5, color=colour, zorder=5)
        ax.text(T[0, 3] + 1.5, T[1, 3] + 1.5, 'RSU 0' if k == 0 else f'agent {k}', color=colour,
                fontsize=9, weight='bold', zorder=6)
    draw_boxes(ax, sample.gt.boxes, 'black', 'ground truth', lw=0.8)
    if predictions is not None and len(predictions):
        draw_boxes(ax, predictions, 'red', 'detections', lw=1.0)
    c = np.mean(centres, axis=0) if centres else np.zeros(2)
    ax.set_xlim(c[0] - extent, c[0] + extent)
    ax.set_ylim(c[1] - extent, c[1] + extent)
    ax.set_aspect('equal')
    ax.set_xlabel('x [m]')
    ax.set_ylabel('y [m]')
    ax.set_title(title or f'{sample.scene_name} frame {sample.frame_index}: points coloured by agent')
    ax.legend(loc='upper right', fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
