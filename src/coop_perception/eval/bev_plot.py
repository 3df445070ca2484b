"""Bird's-eye-view pictures of a sample: every agent's points, ground-truth and predicted boxes."""
from __future__ import annotations

from dataclasses import dataclass

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.animation import FuncAnimation, PillowWriter  # noqa: E402

from ..geometry import bev_corners, transform_points  # noqa: E402

AGENT_COLOURS = plt.get_cmap('tab10')


def draw_boxes(ax, boxes: np.ndarray, colour, label: str | None = None, lw: float = 1.0, ls: str = '-'):
    """Outline (N, 7) boxes (in the axes' frame) with a heading tick."""
    for i, c in enumerate(bev_corners(boxes)):
        ring = np.vstack([c, c[:1]])
        ax.plot(ring[:, 0], ring[:, 1], color=colour, lw=lw, ls=ls, label=label if i == 0 else None)
        front = c[[0, 3]].mean(0)
        ax.plot([boxes[i, 0], front[0]], [boxes[i, 1], front[1]], color=colour, lw=lw, ls=ls)


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


@dataclass
class EgoView:
    """What one ego frame shows, in the ego sensor frame (metres)."""
    points: np.ndarray                  # (N, >=3) the ego's scan
    gt: np.ndarray                      # (M, 7) ground-truth boxes
    fused: np.ndarray | None            # (F, 7) fused boxes; None: no fused output this frame
    ego_only: np.ndarray | None         # (E, 7) the ego detector's own boxes
    title: str


def draw_ego_view(ax, view: EgoView, extent: float, max_points: int = 20000) -> None:
    """One ego frame on ``ax``: its points, ground truth (black), ego-only (blue, dashed) and
    fused (red) boxes, the evaluation range ``extent`` (m) as a circle."""
    ax.clear()
    pts = view.points
    if len(pts) > max_points:
        pts = pts[np.random.default_rng(0).choice(len(pts), max_points, replace=False)]
    pts = pts[np.hypot(pts[:, 0], pts[:, 1]) <= 1.5 * extent]
    # Returns from objects stand out against the ground rings: ground lies near the lowest returns.
    raised = pts[:, 2] > (np.percentile(pts[:, 2], 5) + 0.3 if len(pts) else 0.0)
    ax.scatter(pts[~raised, 0], pts[~raised, 1], s=0.1, color='0.75', rasterized=True)
    ax.scatter(pts[raised, 0], pts[raised, 1], s=0.3, color='0.35', rasterized=True)
    ax.add_patch(plt.Circle((0, 0), extent, fill=False, ls=':', color='0.4', lw=0.8))
    draw_boxes(ax, view.gt, 'black', 'ground truth', lw=0.9)
    if view.ego_only is not None and len(view.ego_only):
        draw_boxes(ax, view.ego_only, 'tab:blue', 'ego only', lw=1.0, ls='--')
    if view.fused is not None and len(view.fused):
        draw_boxes(ax, view.fused, 'tab:red', 'fused', lw=1.2)
    ax.arrow(0, 0, 4, 0, width=0.5, color='tab:green', zorder=5)
    ax.set_xlim(-extent, extent)
    ax.set_ylim(-extent, extent)
    ax.set_aspect('equal')
    ax.set_xlabel('x [m] (ego sensor frame)')
    ax.set_ylabel('y [m]')
    ax.set_title(view.title + ('' if view.fused is not None else ' (no fused output)'), fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(loc='upper right', fontsize=8)


def plot_ego_view(view: EgoView, out_path, extent: float = 50.0) -> None:
    """Write one ego frame as a PNG."""
    fig, ax = plt.subplots(figsize=(9, 9), dpi=110)
    draw_ego_view(ax, view, extent)
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)


def animate_ego_views(views: list[EgoView], out_path, extent: float = 50.0, fps: float = 5.0) -> None:
    """Write the ego frames as an animated GIF (``fps`` frames per second)."""
    fig, ax = plt.subplots(figsize=(6, 6), dpi=80)
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.08, top=0.94)
    anim = FuncAnimation(fig, lambda i: draw_ego_view(ax, views[i], extent), frames=len(views))
    anim.save(out_path, writer=PillowWriter(fps=fps))
    plt.close(fig)
