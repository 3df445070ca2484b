"""Sharing policies: which BEV cells of a scan's Detections go into a feature message.

A policy returns a :class:`CellSelection`; ``codec.make_message`` gathers those cells into the wire
message. ``select_roi_cells`` is what a collaborator sends (its confident detections, within a byte
budget), ``select_roi_peaks`` the same in one packet (one record per ROI, fusion.compact_codec),
``select_occupied_cells`` what the ego's detector sends its own fusion node (everything).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from ..detection.free_range import FREE_RANGE_BINS
from .codec import cell_bytes
from .compact_codec import RECORD_BYTES

if TYPE_CHECKING:  # only for annotations: selecting cells needs no torch
    from coop_perception.bev_grid import BevGrid
    from coop_perception.detection.decode import Detections

# ROI policy defaults, sized for the 20 kB mean message budget (issue 5) with C = 64; the fusion
# config overrides them. See select_roi_cells for what each does.
ROI_SCORE_THRESHOLD = 0.3
ROI_MAX = 32
ROI_MARGIN_M = 0.4            # half a 0.8 m cell: the cells the box edge cuts through come along
ROI_MIN_CONFIDENCE = 0.1
# Data bytes: 20 000 minus ~500 for the PointCloud2 header and its field descriptors.
ROI_MAX_BYTES = 19_500
# The compact layout's budget: one ITS-G5 GeoNetworking packet (1,398 bytes of payload).
COMPACT_MAX_BYTES = 1_398
# Wire layouts a collaborator may share in (roi policy key ``format``): ``cells`` (fusion.codec,
# select_roi_cells) or ``compact`` (fusion.compact_codec, select_roi_peaks).
SHARING_FORMATS = ('cells', 'compact')
DEFAULT_SHARING = 'compact'


class CellSelection(NamedTuple):
    """Cells chosen by a sharing policy, sorted by flat index row * W + col (``select_roi_peaks``:
    by descending score of their ROI)."""
    rows: np.ndarray  # (M,) int64
    cols: np.ndarray  # (M,) int64
    roi: np.ndarray   # (M,) int64 index into the Detections' arrays, -1 background


def _box_cells(boxes: np.ndarray, grid: BevGrid, margin_m: float) -> tuple[np.ndarray, np.ndarray]:
    """Grid cells whose centre lies inside each box's BEV footprint grown by ``margin_m`` on every
    side -> (box index (P,), flat cell index (P,)), pairs of all boxes (a cell may repeat).

    Each box tests only a square window of cells around its centre, sized for the largest box,
    instead of the whole grid.
    """
    n = len(boxes)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    H, W = grid.shape
    half_l = boxes[:, 3] / 2 + margin_m
    half_w = boxes[:, 4] / 2 + margin_m
    k = int(np.ceil(np.hypot(half_l, half_w).max() / grid.cell_size)) + 1
    k = min(k, max(H, W))
    offsets = np.arange(-k, k + 1)
    r0, c0 = grid.cells_of(boxes[:, 0], boxes[:, 1])
    rows = r0[:, None, None] + offsets[None, :, None]            # (n, 2k+1, 1)
    cols = c0[:, None, None] + offsets[None, None, :]            # (n, 1, 2k+1)
    cx, cy = grid.centre_of(rows, cols)
    dx = cx - boxes[:, 0, None, None]
    dy = cy - boxes[:, 1, None, None]
    c = np.cos(boxes[:, 6])[:, None, None]
    s = np.sin(boxes[:, 6])[:, None, None]
    inside = ((np.abs(c * dx + s * dy) <= half_l[:, None, None])
              & (np.abs(-s * dx + c * dy) <= half_w[:, None, None])
              & grid.inside(rows, cols))
    b, i, j = np.nonzero(inside)
    return b, grid.flat_index(r0[b] + offsets[i], c0[b] + offsets[j])


def _assign_by_score(box_idx: np.ndarray, flat: np.ndarray, scores: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (box, cell) -> one box per cell, the one with the higher score (lower index on ties);
    returns (box index, flat cell) sorted by cell."""
    order = np.lexsort((box_idx, -scores[box_idx], flat))
    box_idx, flat = box_idx[order], flat[order]
    first = np.ones(len(flat), bool)
    first[1:] = flat[1:] != flat[:-1]
    return box_idx[first], flat[first]


def _occupied(det: Detections) -> np.ndarray:
    """(H, W) bool: cells whose feature vector is not all zero."""
    return np.any(det.features != 0, axis=0)


def select_roi_cells(det: Detections, score_threshold: float = ROI_SCORE_THRESHOLD,
                     max_rois: int = ROI_MAX, margin_m: float = ROI_MARGIN_M, *,
                     min_confidence: float = ROI_MIN_CONFIDENCE,
                     max_bytes: int | None = ROI_MAX_BYTES) -> CellSelection:
    """What a collaborator shares: the cells of its confident detections (Where2comm/CoDynTrust).

    ROIs are the detections with score >= ``score_threshold``, at most ``max_rois`` of them by
    descending score. An ROI's cells are its peak's 3 x 3 neighbourhood (the peak is the ROI's cell
    of highest confidence: the receiver runs the detector's head there, whose 3 x 3 convolution
    reads exactly these cells, fusion.roi_boxes) and the grid cells whose centre lies inside its
    rotated BEV footprint grown by ``margin_m`` on every side with confidence >= ``min_confidence``
    (the detector's confidence is high around object centres, where the receiving head reads its
    evidence, and the threshold drops the low-evidence fringe of large boxes). All-zero cells are
    left out: the receiver fills missing cells with zeros, so that costs nothing. A cell inside
    several ROIs belongs to the one with the higher score. ROIs are then kept in score order while
    the message's data (with the free-range profile, when the scan has one) stays within
    ``max_bytes`` (None: no limit); the first ROI that does not fit ends the message, so a
    lower-score ROI is never sent in place of a higher one.
    """
    scores = np.asarray(det.scores, dtype=np.float64)
    cand = np.flatnonzero(scores >= score_threshold)
    cand = cand[np.argsort(-scores[cand], kind='stable')][:max_rois]
    b, flat = _box_cells(np.asarray(det.boxes, np.float64)[cand], det.grid, margin_m)
    confidence = det.confidence.reshape(-1)
    core_b, core_flat = _peak_neighbourhoods(b, flat, confidence, det.grid)
    keep = confidence[flat] >= min_confidence
    b, flat = np.concatenate([b[keep], core_b]), np.concatenate([flat[keep], core_flat])
    occupied = _occupied(det).reshape(-1)[flat]
    b, flat = _assign_by_score(b[occupied], flat[occupied], scores[cand])
    if max_bytes is not None:
        # The free-range profile rides along (codec): FREE_RANGE_BINS bytes, padded by < 1 byte a cell.
        profile = det.free_range is not None
        room = max(max_bytes - (FREE_RANGE_BINS if profile else 0), 0)
        max_cells = room // (cell_bytes(det.features.shape[0]) + int(profile))
        fits = np.cumsum(np.bincount(b, minlength=len(cand))) <= max_cells
        b, flat = b[fits[b]], flat[fits[b]]
    rows, cols = det.grid.unflatten(flat)
    return CellSelection(rows, cols, cand[b])


def _peaks(box_idx: np.ndarray, flat: np.ndarray, confidence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (box, cell) of boxes' footprints -> (box (R,), flat cell (R,)): each box's
    highest-confidence footprint cell, by ascending box."""
    order = np.lexsort((-confidence[flat], box_idx))
    first = np.ones(len(order), bool)
    first[1:] = box_idx[order][1:] != box_idx[order][:-1]
    return box_idx[order][first], flat[order][first]


def _peak_neighbourhoods(box_idx: np.ndarray, flat: np.ndarray, confidence: np.ndarray,
                         grid: BevGrid) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (box, cell) of every box's footprint -> pairs (box, cell) of the 3 x 3 cells around
    each box's highest-confidence footprint cell, within the grid."""
    if len(flat) == 0:
        return box_idx, flat
    peak_b, peak = _peaks(box_idx, flat, confidence)
    rows, cols = grid.unflatten(peak)
    offsets = np.arange(-1, 2)
    nr = (rows[:, None, None] + offsets[None, :, None]).repeat(3, 2)
    nc = (cols[:, None, None] + offsets[None, None, :]).repeat(3, 1)
    inside = grid.inside(nr, nc)
    nb = np.broadcast_to(peak_b[:, None, None], nr.shape)
    return nb[inside], grid.flat_index(nr, nc)[inside]


def select_roi_peaks(det: Detections, score_threshold: float = ROI_SCORE_THRESHOLD,
                     max_rois: int = ROI_MAX, margin_m: float = ROI_MARGIN_M, *,
                     min_confidence: float = ROI_MIN_CONFIDENCE,
                     max_bytes: int | None = COMPACT_MAX_BYTES) -> CellSelection:
    """What a collaborator shares in the compact layout (fusion.compact_codec): one record per
    ROI, at its peak. ROIs as in ``select_roi_cells``; each one's peak is its footprint's cell of
    highest confidence (``min_confidence`` is unused: it shapes footprints, not peaks). Two ROIs
    whose peaks coincide keep the higher-scoring one. ROIs are kept in score order while the
    records and the free-range profile fit ``max_bytes`` (None: no limit)."""
    del min_confidence
    scores = np.asarray(det.scores, dtype=np.float64)
    cand = np.flatnonzero(scores >= score_threshold)
    cand = cand[np.argsort(-scores[cand], kind='stable')][:max_rois]
    b, flat = _box_cells(np.asarray(det.boxes, np.float64)[cand], det.grid, margin_m)
    b, flat = _peaks(b, flat, det.confidence.reshape(-1))
    _, first = np.unique(flat, return_index=True)      # b ascends: the first is the higher score
    b, flat = b[np.sort(first)], flat[np.sort(first)]
    if max_bytes is not None:
        profile = det.free_range is not None
        room = max(max_bytes - (FREE_RANGE_BINS if profile else 0), 0)
        n = room // (RECORD_BYTES + int(profile))
        b, flat = b[:n], flat[:n]
    rows, cols = det.grid.unflatten(flat)
    return CellSelection(rows, cols, cand[b])


def select_occupied_cells(det: Detections, margin_m: float = ROI_MARGIN_M) -> CellSelection:
    """Every cell whose feature vector is not all zero (the ego's own full map). Cells inside a
    detection's footprint grown by ``margin_m`` carry that detection's attributes (higher score
    wins), the rest are background."""
    H, W = det.grid.shape
    flat = np.flatnonzero(_occupied(det))
    scores = np.asarray(det.scores, dtype=np.float64)
    b, roi_flat = _box_cells(np.asarray(det.boxes, np.float64), det.grid, margin_m)
    b, roi_flat = _assign_by_score(b, roi_flat, scores)
    roi_map = np.full(H * W, -1, np.int64)
    roi_map[roi_flat] = b
    rows, cols = det.grid.unflatten(flat)
    return CellSelection(rows, cols, roi_map[flat])
