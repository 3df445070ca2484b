"""Collaborator ROIs decoded in the collaborator's own grid, then moved into the ego frame.

The shared cells are the detector's BEV features, and its head reads box offsets and yaw from
them in the orientation of the grid they were computed in. Resampled into a rotated ego grid
(``align.warp_to_ego``) they still encode the sender's orientation, which the ego's head cannot
know, so a box decoded from fused cells that only a collaborator saw comes out turned by the
relative yaw. Here the receiver runs the same head where the cells were computed, in the sender's
grid: at each ROI's peak (its cell of highest confidence) the head's 3 x 3 convolution needs only
the peak and its eight neighbours, which the sharing policy always sends
(``sharing.select_roi_cells``), so the box is what the sender's own head reads there. Boxes, not
features, then move into the ego frame with the ROI's velocity, carrying the ROI's attributes so
that the trust modulus weights them like the ROI's cells.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..detection.decode import boxes_from_regression, class_probability
from .align import cell_index, warp_boxes
from .codec import FeatureMessage
from .pose_buffer import NS_PER_S
from .trust import roi_attributes

# 3 x 3 neighbourhood (drow, dcol) in row-major order, centre at index 4
_NEIGHBOURS = np.stack(np.meshgrid(np.arange(-1, 2), np.arange(-1, 2), indexing='ij'), -1).reshape(-1, 2)


@dataclass
class RoiBoxes:
    """One box per ROI of a message, in the ego sensor frame at the ego stamp."""
    boxes: np.ndarray        # (N, 7) [x, y, z, l, w, h, yaw], z from the ground below the ego
    scores: np.ndarray       # (N,) the head's class probability at the ROI's peak
    labels: np.ndarray       # (N,) int64
    velocities: np.ndarray   # (N, 2) m/s, ego axes (the ROI's tracked velocity)
    attributes: np.ndarray   # (N, 8) float32, columns trust.ROI_ATTRIBUTES of the box's ROI
    velocity_std: np.ndarray  # (N,) m/s per axis, the sender's; NaN where it sent none


def roi_peaks(msg: FeatureMessage) -> np.ndarray:
    """(R,) message cell index of each ROI's highest-confidence cell, by ascending ROI id."""
    fg = np.flatnonzero(msg.roi >= 0)
    order = fg[np.lexsort((-msg.confidence[fg], msg.roi[fg]))]
    first = np.ones(len(order), bool)
    first[1:] = msg.roi[order][1:] != msg.roi[order][:-1]
    return order[first]


def peak_patches(msg: FeatureMessage, peaks: np.ndarray) -> np.ndarray:
    """(R,) peak cells -> (R, C, 3, 3) float32 features of each peak's neighbourhood in the
    sender's grid; neighbours not in the message (all-zero cells, the grid's edge) are zero."""
    grid = msg.grid
    H, W = grid.shape
    flat = cell_index(msg)
    rows, cols = grid.unflatten(flat[peaks])
    nr = rows[:, None] + _NEIGHBOURS[:, 0]
    nc = cols[:, None] + _NEIGHBOURS[:, 1]
    lookup = np.full(H * W + 1, -1, np.int64)   # the extra slot answers for outside cells
    lookup[flat] = np.arange(msg.num_cells)
    src = lookup[np.where(grid.inside(nr, nc), grid.flat_index(nr, nc), H * W)]  # (R, 9)
    values = np.concatenate([msg.dequantised(), np.zeros((1, msg.channels), np.float32)])
    return np.ascontiguousarray(values[src].transpose(0, 2, 1)).reshape(len(peaks), msg.channels, 3, 3)


@torch.inference_mode()
def decode_roi_boxes(head, msg: FeatureMessage, T_world_sender: np.ndarray, T_world_ego: np.ndarray,
                     ego_stamp_ns: int, ego_sensor_height: float) -> RoiBoxes:
    """The detector ``head`` (detection.model.CenterHead) at each ROI peak of ``msg`` -> one box
    per ROI in the ego frame at ``ego_stamp_ns``. Poses are ``T_world_sensor`` (4x4): the sender's
    at its capture stamp, the ego's at the ego stamp."""
    peaks = roi_peaks(msg)
    if msg.boxes is not None:   # a compact message: the sender's boxes, as it decoded them
        boxes = msg.boxes[peaks].astype(np.float64)
        scores, labels = msg.score[peaks], msg.labels[peaks]
    else:
        scores, labels, boxes = _head_boxes(head, msg, peaks)
    ground_z = boxes[:, 2].copy()
    range_m = np.hypot(boxes[:, 0], boxes[:, 1])
    boxes, vel = warp_boxes(boxes, msg.velocity[peaks], T_world_sender, T_world_ego, msg.stamp_ns, ego_stamp_ns)
    boxes[:, 2] = ground_z - ego_sensor_height
    age_s = (int(ego_stamp_ns) - int(msg.stamp_ns)) / NS_PER_S
    attributes = roi_attributes(msg.score[peaks], msg.uncertainty[peaks], age_s,
                                np.hypot(msg.velocity[peaks, 0], msg.velocity[peaks, 1]), range_m)
    v_std = (np.full(len(peaks), np.nan, np.float32) if msg.velocity_std is None
             else msg.velocity_std[peaks].astype(np.float32))
    return RoiBoxes(boxes, np.asarray(scores, np.float32), np.asarray(labels, np.int64), vel, attributes, v_std)


def _head_boxes(head, msg: FeatureMessage, peaks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The head at ``peaks`` of a cell message -> scores (R,), labels (R,), boxes (R, 7) in the
    sender's frame with z above the ground below it."""
    patches = torch.from_numpy(peak_patches(msg, peaks)).to(next(head.parameters()).device)
    out = {k: v.cpu() for k, v in head.pointwise(head.shared(patches)[:, :, 1, 1]).items()}
    prob = class_probability(out['heatmap'], out['cls_logvar'])
    scores, labels = prob.max(1)
    rows, cols = msg.grid.unflatten(cell_index(msg)[peaks])
    # Against the ground (sensor height 0): z must not depend on the sender's height, which the
    # message does not carry (a road-side unit sits metres above a car's LiDAR).
    boxes, _ = boxes_from_regression(out['reg'].numpy(), rows, cols, msg.grid, 0.0)
    return scores.numpy(), labels.numpy(), boxes
