"""Compact BEV features on the wire: which cells to share, int8 quantisation, PointCloud2 layout.

A feature message is a sparse set of BEV cells of one agent's detector grid, one PointCloud2
point per cell (DESIGN.md, "Compact features"). Producer side::

    det = detector.detect(scan)                                    # Detections, sensor frame
    msg = make_message(det, select_roi_cells(det), agent_id, stamp_ns)
    fields, data, point_step = encode(msg)                         # -> PointCloud2, width = M

Consumer side: ``decode(fields, data, point_step, width=..., grid=..., channels=..., ...)``
validates the cloud and raises :class:`FeatureMessageError` (with a countable ``reason``) for
anything a fusion must not trust.

Wire layout (little endian, packed, ``point_step = 46 + C`` bytes; 110 for C = 64):

    x, y                  float32  cell centre in the sender's sensor frame (m)
    scale                 float32  dequantisation step: feature = int8 * scale
    confidence            float32  detector confidence at this cell (max class probability)
    cls_aleatoric, cls_epistemic, reg_aleatoric, reg_epistemic
                          float32  the ROI's uncertainties (see message_uncertainty)
    vx, vy                float32  the ROI's ground velocity along the sender's sensor axes (m/s)
    score                 float32  the ROI's detection score
    roi                   int16    index of the ROI in the sender's Detections, -1 = background
    features              int8 x C the quantised feature vector

Per-ROI values are repeated on every cell of the ROI because a PointCloud2 has one record type.
They stay float32 rather than being squeezed into bespoke integer codes: they cost 28 of 110
bytes a cell, every consumer (RViz included) reads float32 fields as they are, and the variances
span many decades, which a linear 8- or 16-bit code would not hold. ``vx``/``vy`` are optional on
decode (DESIGN lists velocity as optional); a message without them decodes with zero velocity.

The grid (cell size, extent) is not on the wire: every agent runs the same detector config, so a
receiver decodes against its own copy and rejects cells that are not centres of that grid.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Hashable, NamedTuple, Sequence

import numpy as np

from coop_perception.data.pointcloud import (
    FLOAT32, INT8, INT16, Field, PointCloudError, array_to_buffer, buffer_to_array, check_layout)

if TYPE_CHECKING:  # only for annotations: decoding needs no torch
    from coop_perception.detection.decode import BevGrid, Detections

# Columns of FeatureMessage.uncertainty, from the detector's six by message_uncertainty().
MESSAGE_UNCERTAINTY_FIELDS = ('cls_aleatoric', 'cls_epistemic', 'reg_aleatoric', 'reg_epistemic')

# ROI policy defaults, sized for the 20 kB mean message budget (issue 5) with C = 64; the fusion
# config overrides them. See select_roi_cells for what each does.
ROI_SCORE_THRESHOLD = 0.3
ROI_MAX = 32
ROI_MARGIN_M = 0.4            # half a 0.8 m cell: the cells the box edge cuts through come along
ROI_MIN_CONFIDENCE = 0.1
# Data bytes: 20 000 minus ~500 for the PointCloud2 header and the 13 field descriptors.
ROI_MAX_BYTES = 19_500

_INT8_MAX = 127
# A received centre may sit this far (in cells) from the grid's centre: float32 rounding of
# centres at +-51 m is ~1e-6 cell, while a sender with another cell size or origin is off by far
# more than this.
_LATTICE_TOLERANCE_CELLS = 1e-2


class FeatureMessageError(ValueError):
    """A feature cloud the fusion must drop; ``reason`` is one of the class constants, so drops
    can be counted by cause, and the message says what exactly was wrong."""

    LAYOUT = 'layout'                   # point_step/row_step/data length/types inconsistent
    MISSING_FIELD = 'missing_field'
    CHANNELS = 'channel_count'          # features count differs from the receiver's C
    BAD_SCALE = 'bad_scale'             # NaN, infinite or negative dequantisation scale
    NON_FINITE = 'non_finite'           # NaN/inf position, confidence, score or velocity
    BAD_VALUE = 'bad_value'             # probabilities outside [0, 1], negative variances, roi < -1
    OUT_OF_GRID = 'out_of_grid'         # a cell centre outside the grid's extent
    OFF_LATTICE = 'off_lattice'         # a position that is not a cell centre of the grid
    DUPLICATE_CELL = 'duplicate_cell'

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        super().__init__(f'feature message dropped ({reason}): {detail}')


@dataclass
class FeatureMessage:
    """Decoded form of one agent's shared cells; M cells, C channels.

    Features stay quantised (int8 + per-cell scale): decode is then a view-and-copy, re-encoding
    (e.g. relaying or recording) reproduces the bytes exactly, and it holds a quarter of the
    memory; :meth:`dequantised` gives float32 where a consumer needs it.
    """
    agent_id: Hashable
    stamp_ns: int                 # capture time of the scan the features came from (int ns)
    grid: BevGrid                 # the sender's detector grid; cells are centres of its cells
    cells: np.ndarray             # (M, 2) float32 x, y cell centres, sender sensor frame (m)
    features: np.ndarray          # (M, C) int8 quantised features
    scale: np.ndarray             # (M,) float32 >= 0, feature = features * scale
    confidence: np.ndarray        # (M,) float32 in [0, 1]
    # Attributes of the cell's ROI; 0 (roi -1) on background cells:
    uncertainty: np.ndarray       # (M, 4) float32, columns MESSAGE_UNCERTAINTY_FIELDS
    velocity: np.ndarray          # (M, 2) float32 ground velocity along the sender's axes (m/s)
    roi: np.ndarray               # (M,) int16 index of the ROI in the sender's Detections
    score: np.ndarray             # (M,) float32 detection score

    @property
    def num_cells(self) -> int:
        return len(self.cells)

    @property
    def channels(self) -> int:
        return self.features.shape[1]

    def dequantised(self) -> np.ndarray:
        """(M, C) float32 features."""
        return dequantise(self.features, self.scale)


class CellSelection(NamedTuple):
    """Cells chosen by a sharing policy, sorted by flat index row * W + col."""
    rows: np.ndarray  # (M,) int64
    cols: np.ndarray  # (M,) int64
    roi: np.ndarray   # (M,) int64 index into the Detections' arrays, -1 background


# --------------------------------------------------------------------------- uncertainty
def message_uncertainty(uncertainty: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Detector uncertainty (N, 6) (columns detection.decode.UNCERTAINTY_FIELDS) and boxes (N, 7)
    -> (N, 4) float32 with columns MESSAGE_UNCERTAINTY_FIELDS:

    * cls_aleatoric = ale_cls (variance of the class logit)
    * cls_epistemic = epi_cls (MC-dropout entropy of the class probability, nats)
    * reg_aleatoric = detection.decode.corner_variance: the expected squared displacement of a
      box corner from ale_x, ale_y and ale_yaw (m^2)
    * reg_epistemic = epi_reg (MC-dropout variance of the centre, m^2)

    epi_reg covers the centre only because that is all the detector's MC passes measure. NaN (no
    MC passes) stays NaN.
    """
    # imported here: the detection package pulls in torch, which decoding a message must not need
    from coop_perception.detection.decode import corner_variance

    u = np.asarray(uncertainty, dtype=np.float64).reshape(-1, 6)
    reg_ale = corner_variance(u, boxes)
    return np.stack([u[:, 3], u[:, 4], reg_ale, u[:, 5]], axis=1).astype(np.float32)


# --------------------------------------------------------------------------- quantisation
def quantise(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(M, C) float -> (int8 (M, C), float32 scale (M,)): symmetric, scale = max|f| / 127.

    An all-zero cell gets scale 0 and zero codes. The worst-case error per value is scale / 2.
    """
    f = np.asarray(features, dtype=np.float32)
    scale = (np.abs(f).max(axis=1, initial=0.0) / _INT8_MAX).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1.0))
    q = np.clip(np.rint(f / safe[:, None]), -_INT8_MAX, _INT8_MAX).astype(np.int8)
    return q, scale


def dequantise(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """int8 (M, C), scale (M,) -> (M, C) float32."""
    return q.astype(np.float32) * np.asarray(scale, dtype=np.float32)[:, None]


# --------------------------------------------------------------------------- sharing policies
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
    cell = grid.cell_size
    half_l = boxes[:, 3] / 2 + margin_m
    half_w = boxes[:, 4] / 2 + margin_m
    k = int(np.ceil(np.hypot(half_l, half_w).max() / cell)) + 1
    k = min(k, max(H, W))
    offsets = np.arange(-k, k + 1)
    c0 = np.floor((boxes[:, 0] - grid.origin[0]) / cell).astype(np.int64)
    r0 = np.floor((boxes[:, 1] - grid.origin[1]) / cell).astype(np.int64)
    rows = r0[:, None, None] + offsets[None, :, None]            # (n, 2k+1, 1)
    cols = c0[:, None, None] + offsets[None, None, :]            # (n, 1, 2k+1)
    dx = grid.origin[0] + (cols + 0.5) * cell - boxes[:, 0, None, None]
    dy = grid.origin[1] + (rows + 0.5) * cell - boxes[:, 1, None, None]
    c = np.cos(boxes[:, 6])[:, None, None]
    s = np.sin(boxes[:, 6])[:, None, None]
    inside = ((np.abs(c * dx + s * dy) <= half_l[:, None, None])
              & (np.abs(-s * dx + c * dy) <= half_w[:, None, None])
              & (rows >= 0) & (rows < H) & (cols >= 0) & (cols < W))
    b, i, j = np.nonzero(inside)
    flat = (r0[b] + offsets[i]) * W + (c0[b] + offsets[j])
    return b, flat


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


def cell_bytes(channels: int) -> int:
    """Bytes per shared cell on the wire (the PointCloud2 point_step)."""
    return message_dtype(channels).itemsize


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
    the message's data stays within ``max_bytes`` (None: no limit); the first ROI that does not
    fit ends the message, so a lower-score ROI is never sent in place of a higher one.
    """
    scores = np.asarray(det.scores, dtype=np.float64)
    cand = np.flatnonzero(scores >= score_threshold)
    cand = cand[np.argsort(-scores[cand], kind='stable')][:max_rois]
    b, flat = _box_cells(np.asarray(det.boxes, np.float64)[cand], det.grid, margin_m)
    confidence = det.confidence.reshape(-1)
    core_b, core_flat = _peak_neighbourhoods(b, flat, confidence, det.grid.shape)
    keep = confidence[flat] >= min_confidence
    b, flat = np.concatenate([b[keep], core_b]), np.concatenate([flat[keep], core_flat])
    occupied = _occupied(det).reshape(-1)[flat]
    b, flat = _assign_by_score(b[occupied], flat[occupied], scores[cand])
    if max_bytes is not None:
        max_cells = max_bytes // cell_bytes(det.features.shape[0])
        fits = np.cumsum(np.bincount(b, minlength=len(cand))) <= max_cells
        b, flat = b[fits[b]], flat[fits[b]]
    rows, cols = np.divmod(flat, det.grid.shape[1])
    return CellSelection(rows, cols, cand[b])


def _peak_neighbourhoods(box_idx: np.ndarray, flat: np.ndarray, confidence: np.ndarray,
                         shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (box, cell) of every box's footprint -> pairs (box, cell) of the 3 x 3 cells around
    each box's highest-confidence footprint cell, within the grid."""
    if len(flat) == 0:
        return box_idx, flat
    H, W = shape
    order = np.lexsort((-confidence[flat], box_idx))
    first = np.ones(len(order), bool)
    first[1:] = box_idx[order][1:] != box_idx[order][:-1]
    peak_b, peak = box_idx[order][first], flat[order][first]
    rows, cols = np.divmod(peak, W)
    offsets = np.arange(-1, 2)
    nr = (rows[:, None, None] + offsets[None, :, None]).repeat(3, 2)
    nc = (cols[:, None, None] + offsets[None, None, :]).repeat(3, 1)
    inside = (nr >= 0) & (nr < H) & (nc >= 0) & (nc < W)
    nb = np.broadcast_to(peak_b[:, None, None], nr.shape)
    return nb[inside], (nr * W + nc)[inside]


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
    rows, cols = np.divmod(flat, W)
    return CellSelection(rows, cols, roi_map[flat])


def make_message(det: Detections, selection: CellSelection, agent_id: Hashable,
                 stamp_ns: int) -> FeatureMessage:
    """Gather the selected cells of ``det`` into a message stamped with the scan's capture time."""
    rows, cols, roi = selection
    grid = det.grid
    q, scale = quantise(det.features[:, rows, cols].T)
    cells = np.stack([grid.origin[0] + (cols + 0.5) * grid.cell_size,
                      grid.origin[1] + (rows + 0.5) * grid.cell_size], axis=1).astype(np.float32)
    fg = roi >= 0
    r = roi[fg]
    uncertainty = np.zeros((len(roi), len(MESSAGE_UNCERTAINTY_FIELDS)), np.float32)
    uncertainty[fg] = message_uncertainty(det.uncertainty, det.boxes)[r]
    velocity = np.zeros((len(roi), 2), np.float32)
    velocity[fg] = det.velocities[r]
    score = np.zeros(len(roi), np.float32)
    score[fg] = det.scores[r]
    return FeatureMessage(
        agent_id=agent_id, stamp_ns=int(stamp_ns), grid=grid, cells=cells, features=q, scale=scale,
        confidence=det.confidence[rows, cols].astype(np.float32), uncertainty=uncertainty,
        velocity=velocity, roi=roi.astype(np.int16), score=score)


# --------------------------------------------------------------------------- wire format
_FLOAT_FIELDS = ('x', 'y', 'scale', 'confidence', *MESSAGE_UNCERTAINTY_FIELDS, 'vx', 'vy', 'score')
_OPTIONAL_FIELDS = ('vx', 'vy')
_EXPECTED_TYPES = {**{name: FLOAT32 for name in _FLOAT_FIELDS}, 'roi': INT16, 'features': INT8}
_REQUIRED_FIELDS = tuple(n for n in _EXPECTED_TYPES if n not in _OPTIONAL_FIELDS)


def message_dtype(channels: int, extra_floats: Sequence[str] = ()) -> np.dtype:
    """Packed little-endian record of one cell (the layout in the module docstring), plus
    ``extra_floats`` float32 fields at the end (which codec consumers ignore)."""
    return np.dtype([(name, '<f4') for name in _FLOAT_FIELDS]
                    + [('roi', '<i2'), ('features', 'i1', (channels,))]
                    + [(name, '<f4') for name in extra_floats])


def encode(msg: FeatureMessage, extra_floats: dict[str, float] | None = None) -> tuple[list[Field], bytes, int]:
    """-> (fields, data, point_step) of a PointCloud2 with height 1, width M, little endian,
    row_step = len(data). Header stamp = ``msg.stamp_ns``, frame = the sender's sensor frame.
    ``extra_floats``: name -> value of float32 fields appended to every cell."""
    extra_floats = extra_floats or {}
    rec = np.zeros(msg.num_cells, dtype=message_dtype(msg.channels, tuple(extra_floats)))
    for name, value in extra_floats.items():
        rec[name] = value
    rec['x'], rec['y'] = msg.cells[:, 0], msg.cells[:, 1]
    rec['scale'] = msg.scale
    rec['confidence'] = msg.confidence
    for i, name in enumerate(MESSAGE_UNCERTAINTY_FIELDS):
        rec[name] = msg.uncertainty[:, i]
    rec['vx'], rec['vy'] = msg.velocity[:, 0], msg.velocity[:, 1]
    rec['score'] = msg.score
    rec['roi'] = msg.roi
    rec['features'] = msg.features
    fields, _, step, data = array_to_buffer(rec)
    return fields, data, step


def _check_fields(fields: Sequence, channels: int) -> None:
    by_name = {str(f.name): f for f in fields}
    missing = [n for n in _REQUIRED_FIELDS if n not in by_name]
    if ('vx' in by_name) != ('vy' in by_name):
        missing.append('vy' if 'vx' in by_name else 'vx')
    if missing:
        raise FeatureMessageError(FeatureMessageError.MISSING_FIELD, f'missing field(s) '
                                  f'{", ".join(missing)} (has: {", ".join(by_name) or "none"})')
    for name, datatype in _EXPECTED_TYPES.items():
        f = by_name.get(name)
        if f is None:
            continue
        if int(f.datatype) != datatype:
            raise FeatureMessageError(FeatureMessageError.LAYOUT, f'field {name!r} has datatype '
                                                                  f'{int(f.datatype)}, expected {datatype}')
        count = max(int(f.count), 1)  # some producers write 0 for scalars
        if name == 'features' and count != channels:
            raise FeatureMessageError(FeatureMessageError.CHANNELS, f'features has count {count}, '
                                                                    f'this detector has {channels} channels')
        if name != 'features' and count != 1:
            raise FeatureMessageError(FeatureMessageError.LAYOUT,
                                      f'field {name!r} has count {count}, expected 1')


def _check_values(msg: FeatureMessage) -> None:
    err = FeatureMessageError
    bad = ~(np.isfinite(msg.scale) & (msg.scale >= 0))
    if bad.any():
        raise err(err.BAD_SCALE, f'{int(bad.sum())} of {msg.num_cells} cells have a NaN, infinite '
                                 f'or negative scale (first: {msg.scale[bad][0]})')
    for name, values in (('x/y', msg.cells), ('confidence', msg.confidence), ('score', msg.score),
                         ('vx/vy', msg.velocity)):
        if not np.isfinite(values).all():
            raise err(err.NON_FINITE, f'{name} holds NaN or infinite values')
    for name, values in (('confidence', msg.confidence), ('score', msg.score)):
        if ((values < 0) | (values > 1)).any():
            raise err(err.BAD_VALUE, f'{name} outside [0, 1]')
    # NaN uncertainty is legitimate (a sender without MC dropout); negative or infinite is not.
    known = msg.uncertainty[~np.isnan(msg.uncertainty)]
    if ((known < 0) | ~np.isfinite(known)).any():
        raise err(err.BAD_VALUE, 'an uncertainty is negative or infinite')
    if (msg.roi < -1).any():
        raise err(err.BAD_VALUE, f'roi ids below -1 (min {int(msg.roi.min())})')

    grid = msg.grid
    H, W = grid.shape
    u = (msg.cells.astype(np.float64) - grid.origin) / grid.cell_size  # position in cell units
    outside = (u[:, 0] < 0) | (u[:, 0] >= W) | (u[:, 1] < 0) | (u[:, 1] >= H)
    if outside.any():
        x, y = msg.cells[outside][0]
        raise err(err.OUT_OF_GRID, f'{int(outside.sum())} of {msg.num_cells} cells lie outside the '
                                   f'{H}x{W} grid of {grid.cell_size} m cells '
                                   f'(first: x={x:.2f}, y={y:.2f} m)')
    off = np.abs(u - 0.5 - np.rint(u - 0.5)).max(axis=1, initial=0.0) > _LATTICE_TOLERANCE_CELLS
    if off.any():
        x, y = msg.cells[off][0]
        raise err(err.OFF_LATTICE, f'{int(off.sum())} cells are not centres of {grid.cell_size} m '
                                   f'cells (first: x={x:.3f}, y={y:.3f} m); sender grid differs?')
    flat = np.floor(u[:, 1]).astype(np.int64) * W + np.floor(u[:, 0]).astype(np.int64)
    repeats = len(flat) - len(np.unique(flat))
    if repeats:
        raise err(err.DUPLICATE_CELL, f'{repeats} cells appear more than once')


def decode(fields: Sequence, data, point_step: int, *, width: int, grid: BevGrid, channels: int,
           agent_id: Hashable, stamp_ns: int, height: int = 1, row_step: int | None = None,
           is_bigendian: bool = False) -> FeatureMessage:
    """A received feature cloud -> FeatureMessage, or FeatureMessageError.

    ``fields`` are any objects with name/offset/datatype/count (sensor_msgs/PointField or
    :class:`Field`); field order and offsets are free, extra fields are ignored. ``grid`` and
    ``channels`` are the receiver's detector grid and feature width, which the sender must share;
    ``agent_id`` and ``stamp_ns`` come from the topic and header. ``row_step`` defaults to
    ``width * point_step``.
    """
    _check_fields(fields, channels)
    if row_step is None:
        row_step = width * point_step
    try:
        dtype = check_layout(fields, height=height, width=width, point_step=point_step,
                             row_step=row_step, data_len=len(data), is_bigendian=is_bigendian,
                             require=())
    except PointCloudError as e:
        raise FeatureMessageError(FeatureMessageError.LAYOUT, str(e)) from None
    rec = buffer_to_array(data, dtype, height=height, width=width, row_step=row_step).reshape(-1)

    def column(name):
        return rec[name].astype(np.float32)

    m = len(rec)
    velocity = (np.stack([column('vx'), column('vy')], axis=1) if 'vx' in dtype.names
                else np.zeros((m, 2), np.float32))
    msg = FeatureMessage(
        agent_id=agent_id, stamp_ns=int(stamp_ns), grid=grid,
        cells=np.stack([column('x'), column('y')], axis=1).reshape(m, 2),
        features=rec['features'].astype(np.int8).reshape(m, channels),
        scale=column('scale'), confidence=column('confidence'),
        uncertainty=np.stack([column(n) for n in MESSAGE_UNCERTAINTY_FIELDS], axis=1).reshape(m, 4),
        velocity=velocity.reshape(m, 2), roi=rec['roi'].astype(np.int16), score=column('score'))
    _check_values(msg)
    return msg
