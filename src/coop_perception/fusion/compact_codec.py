"""One-packet feature messages: one fixed-point record per ROI (docs/architecture.md §4.1.1).

The cell layout (``codec``) sends every cell of an ROI with its attributes repeated in float32,
111 bytes a cell, ~19 kB a frame. One ITS-G5 GeoNetworking packet holds 1,398 bytes. Here an ROI
is one record of 28 bytes: its peak cell, the box the sender's head decoded there, its score,
uncertainties and velocity in fixed-point or log codes; the free-range profile rides along as in
the cell layout. The receiver takes the box as sent instead of running its head on the peak's
neighbourhood (``roi_boxes.decode_roi_boxes``), and the peak cell carries no features, so the
fused map gets no collaborator cells from these messages: at this size the boxes and their
uncertainties are what the trust and the merge work on.

Wire layout (PointCloud2, little endian, packed, ``point_step`` 28 plus the profile's bytes):

    cell        uint16  flat index row * W + col of the ROI's peak cell in the sender's grid
    x, y        int16   box centre in the sender's sensor frame, cm
    z           int16   box centre above the ground below the sender, cm
    l, w, h     uint16  box size, cm (0 is invalid)
    yaw         int16   box yaw, pi / 32767 rad
    label       uint8   class index of the sender's detector
    score       uint8   detection score x 255
    confidence  uint8   the peak cell's detector confidence x 255
    unc_q       uint8 x 4  MESSAGE_UNCERTAINTY_FIELDS as log codes (``uncertainty_to_wire``):
                        1e-6 * 2^((q - 1) / 8), 0 = 0, 255 = unknown (no MC passes)
    vx, vy      int16   ground velocity along the sender's sensor axes, cm/s
    v_std_q     uint8   the velocity's standard deviation per axis (``codec.velocity_std_to_wire``)
    free_range_q uint8 x k  optional: the sender's free-range profile, as in the cell layout

The ``cell`` field names the layout: a consumer that finds it decodes this one
(``codec.decode`` dispatches here).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Hashable, Sequence

import numpy as np

from coop_perception.data.objects import MAX_SPEED_MPS
from coop_perception.data.pointcloud import INT16, UINT8, UINT16, array_to_buffer
from coop_perception.detection.free_range import FREE_RANGE_BINS, to_wire

from .codec import (FREE_RANGE_Q_FIELD, MESSAGE_UNCERTAINTY_FIELDS, V_STD_Q_FIELD, FeatureMessage,
                    FeatureMessageError, check_field_types, check_message_values, free_range_count,
                    free_range_from_records, message_uncertainty, read_records, velocity_std_from_wire,
                    velocity_std_to_wire)

if TYPE_CHECKING:
    from coop_perception.bev_grid import BevGrid
    from coop_perception.detection.decode import Detections

    from .sharing import CellSelection

CELL_FIELD = 'cell'
UNC_Q_FIELD = 'unc_q'
_CM = 100.0
_YAW_STEP = np.pi / 32767
_UNC_MIN = 1e-6            # code 1
_UNC_PER_OCTAVE = 8        # 9 % steps: the box trust reads uncertainties as logarithms
_UNC_UNKNOWN = 255
_BYTE = 255.0


def record_dtype(free_range_count: int = 0) -> np.dtype:
    """Packed little-endian record of one ROI (module docstring), with ``free_range_count``
    profile bytes (none when 0)."""
    return np.dtype([(CELL_FIELD, '<u2'), ('x', '<i2'), ('y', '<i2'), ('z', '<i2'),
                     ('l', '<u2'), ('w', '<u2'), ('h', '<u2'), ('yaw', '<i2'),
                     ('label', 'u1'), ('score', 'u1'), ('confidence', 'u1'), (UNC_Q_FIELD, 'u1', (4,)),
                     ('vx', '<i2'), ('vy', '<i2'), (V_STD_Q_FIELD, 'u1')]
                    + ([(FREE_RANGE_Q_FIELD, 'u1', (free_range_count,))] if free_range_count else []))


RECORD_BYTES = record_dtype().itemsize
_EXPECTED_TYPES = {CELL_FIELD: UINT16, **{n: INT16 for n in ('x', 'y', 'z', 'yaw', 'vx', 'vy')},
                   **{n: UINT16 for n in ('l', 'w', 'h')},
                   **{n: UINT8 for n in ('label', 'score', 'confidence', UNC_Q_FIELD, V_STD_Q_FIELD,
                                         FREE_RANGE_Q_FIELD)}}
_COUNTS = {UNC_Q_FIELD: len(MESSAGE_UNCERTAINTY_FIELDS), FREE_RANGE_Q_FIELD: None}


def is_compact(fields: Sequence) -> bool:
    """Whether a cloud's fields are this layout's."""
    return any(str(f.name) == CELL_FIELD for f in fields)


# --------------------------------------------------------------------------- codes
def uncertainty_to_wire(u: np.ndarray) -> np.ndarray:
    """(..., ) non-negative values -> uint8 log codes: 0 for 0, 255 for NaN, else the nearest of
    1e-6 * 2^((q - 1) / 8), q in 1..254 (1e-6 to ~3,000; beyond saturates at 254)."""
    u = np.asarray(u, np.float64)
    q = 1 + np.rint(_UNC_PER_OCTAVE * np.log2(np.maximum(np.nan_to_num(u, nan=1.0), _UNC_MIN) / _UNC_MIN))
    q = np.where(u > 0, np.clip(q, 1, _UNC_UNKNOWN - 1), 0)
    return np.where(np.isnan(u), _UNC_UNKNOWN, q).astype(np.uint8)


def uncertainty_from_wire(q: np.ndarray) -> np.ndarray:
    """uint8 log codes -> float32 values (NaN for unknown)."""
    q = np.asarray(q, np.float64)
    u = np.where(q > 0, _UNC_MIN * np.exp2((q - 1) / _UNC_PER_OCTAVE), 0.0)
    return np.where(q == _UNC_UNKNOWN, np.nan, u).astype(np.float32)


def _fixed(values, step: float, dtype) -> np.ndarray:
    info = np.iinfo(dtype)
    return np.clip(np.rint(np.nan_to_num(np.asarray(values, np.float64)) / step), info.min, info.max).astype(dtype)


def _wrap(yaw: np.ndarray) -> np.ndarray:
    return (np.asarray(yaw, np.float64) + np.pi) % (2 * np.pi) - np.pi


# --------------------------------------------------------------------------- producer side
def records_from_detections(det: Detections, selection: CellSelection) -> np.ndarray:
    """The selected ROIs of ``det`` (one cell each, their peaks; ``sharing.select_roi_peaks``) ->
    records (R,) of ``record_dtype`` with the profile, when the scan has one."""
    rows, cols, roi = selection
    boxes = np.asarray(det.boxes, np.float64)[roi].reshape(-1, 7)
    profile = det.free_range is not None and len(roi) > 0
    k = free_range_count(FREE_RANGE_BINS, len(roi)) if profile else 0
    rec = np.zeros(len(roi), record_dtype(k))
    rec[CELL_FIELD] = det.grid.flat_index(rows, cols)
    rec['x'], rec['y'] = _fixed(boxes[:, 0], 1 / _CM, np.int16), _fixed(boxes[:, 1], 1 / _CM, np.int16)
    rec['z'] = _fixed(boxes[:, 2] + det.sensor_height, 1 / _CM, np.int16)
    for i, name in enumerate(('l', 'w', 'h')):
        rec[name] = np.maximum(_fixed(boxes[:, 3 + i], 1 / _CM, np.uint16), 1)
    rec['yaw'] = _fixed(_wrap(boxes[:, 6]), _YAW_STEP, np.int16)
    rec['label'] = np.asarray(det.labels)[roi]
    rec['score'] = _fixed(np.asarray(det.scores)[roi], 1 / _BYTE, np.uint8)
    rec['confidence'] = _fixed(det.confidence[rows, cols], 1 / _BYTE, np.uint8)
    rec[UNC_Q_FIELD] = uncertainty_to_wire(message_uncertainty(det.uncertainty, det.boxes)[roi])
    velocity = np.clip(np.asarray(det.velocities, np.float64)[roi], -MAX_SPEED_MPS, MAX_SPEED_MPS)
    rec['vx'], rec['vy'] = _fixed(velocity[:, 0], 1 / _CM, np.int16), _fixed(velocity[:, 1], 1 / _CM, np.int16)
    std = np.broadcast_to(np.asarray(det.velocity_std, np.float32), (len(det.boxes),))
    rec[V_STD_Q_FIELD] = velocity_std_to_wire(std[roi])
    if k:
        codes = np.zeros(k * len(roi), np.uint8)
        codes[:FREE_RANGE_BINS] = to_wire(det.free_range, det.sensor_height)
        rec[FREE_RANGE_Q_FIELD] = codes.reshape(len(roi), k)
    return rec


def compact_message(det: Detections, selection: CellSelection, agent_id: Hashable, stamp_ns: int,
                    channels: int) -> FeatureMessage:
    """What the receiver decodes from the records of ``det``'s selected ROIs: offline evaluation
    fuses exactly what goes on the air."""
    return messages_from_records(records_from_detections(det, selection), det.grid, channels,
                                 agent_id, stamp_ns)


def encode_compact(msg: FeatureMessage) -> tuple[list, bytes, int]:
    """A compact message (``FeatureMessage.boxes`` set) -> (fields, data, point_step), the bytes
    it was decoded from."""
    m = msg.num_cells
    k = 0 if msg.free_range is None or m == 0 else free_range_count(FREE_RANGE_BINS, m)
    rec = np.zeros(m, record_dtype(k))
    rec[CELL_FIELD] = msg.grid.flat_index(*msg.grid.cells_of(msg.cells[:, 0], msg.cells[:, 1]))
    for i, name in enumerate(('x', 'y', 'z')):
        rec[name] = _fixed(msg.boxes[:, i], 1 / _CM, np.int16)
    for i, name in enumerate(('l', 'w', 'h')):
        rec[name] = _fixed(msg.boxes[:, 3 + i], 1 / _CM, np.uint16)
    rec['yaw'] = _fixed(msg.boxes[:, 6], _YAW_STEP, np.int16)
    rec['label'] = msg.labels
    rec['score'] = _fixed(msg.score, 1 / _BYTE, np.uint8)
    rec['confidence'] = _fixed(msg.confidence, 1 / _BYTE, np.uint8)
    rec[UNC_Q_FIELD] = uncertainty_to_wire(msg.uncertainty)
    rec['vx'], rec['vy'] = _fixed(msg.velocity[:, 0], 1 / _CM, np.int16), _fixed(msg.velocity[:, 1], 1 / _CM, np.int16)
    rec[V_STD_Q_FIELD] = velocity_std_to_wire(np.full(m, np.nan) if msg.velocity_std is None else msg.velocity_std)
    if k:
        codes = np.zeros(k * m, np.uint8)
        codes[:FREE_RANGE_BINS] = to_wire(msg.free_range, 0.0)   # already on the wire's steps
        rec[FREE_RANGE_Q_FIELD] = codes.reshape(m, k)
    fields, _, step, data = array_to_buffer(rec)
    return fields, data, step


# --------------------------------------------------------------------------- consumer side
def messages_from_records(rec: np.ndarray, grid: BevGrid, channels: int, agent_id: Hashable,
                          stamp_ns: int, num_classes: int | None = None) -> FeatureMessage:
    """Records (R,) -> FeatureMessage with one cell per ROI (its peak, no features) and the
    ROIs' boxes; FeatureMessageError for values no sender may send."""
    err = FeatureMessageError
    m = len(rec)
    flat = rec[CELL_FIELD].astype(np.int64)
    H, W = grid.shape
    if (flat >= H * W).any():
        raise err(err.OUT_OF_GRID, f'a cell index is {int(flat.max())}, the {H}x{W} grid has {H * W} cells')
    size = np.stack([rec[n].astype(np.float32) for n in ('l', 'w', 'h')], axis=1) / np.float32(_CM)
    if (size <= 0).any():
        raise err(err.BAD_VALUE, f'{int((size <= 0).any(axis=1).sum())} of {m} boxes have a zero size')
    labels = rec['label'].astype(np.int64)
    if num_classes is not None and (labels >= num_classes).any():
        raise err(err.BAD_VALUE, f'a label is {int(labels.max())}, this detector has {num_classes} classes')
    centre = np.stack([rec[n].astype(np.float32) for n in ('x', 'y', 'z')], axis=1) / np.float32(_CM)
    yaw = rec['yaw'].astype(np.float32) * np.float32(_YAW_STEP)
    rows, cols = grid.unflatten(flat)
    msg = FeatureMessage(
        agent_id=agent_id, stamp_ns=int(stamp_ns), grid=grid,
        cells=np.stack(grid.centre_of(rows, cols), axis=1).astype(np.float32).reshape(m, 2),
        features=np.zeros((m, channels), np.int8), scale=np.zeros(m, np.float32),
        confidence=(rec['confidence'].astype(np.float32) / np.float32(_BYTE)),
        uncertainty=uncertainty_from_wire(rec[UNC_Q_FIELD]).reshape(m, 4),
        velocity=np.stack([rec['vx'], rec['vy']], axis=1).astype(np.float32).reshape(m, 2) / np.float32(_CM),
        roi=np.arange(m, dtype=np.int16), score=rec['score'].astype(np.float32) / np.float32(_BYTE),
        free_range=free_range_from_records(rec, m),
        velocity_std=velocity_std_from_wire(rec[V_STD_Q_FIELD]),
        boxes=np.concatenate([centre, size, yaw[:, None]], axis=1).reshape(m, 7), labels=labels)
    check_message_values(msg)
    return msg


def _check_fields(fields: Sequence) -> None:
    by_name = {str(f.name): f for f in fields}
    missing = [n for n in _EXPECTED_TYPES if n not in by_name and n != FREE_RANGE_Q_FIELD]
    if missing:
        raise FeatureMessageError(FeatureMessageError.MISSING_FIELD, f'missing field(s) {", ".join(missing)} '
                                                                     f'of the compact layout')
    check_field_types(by_name, _EXPECTED_TYPES, _COUNTS)


def decode_compact(fields: Sequence, data, point_step: int, *, width: int, grid: BevGrid, channels: int,
                   agent_id: Hashable, stamp_ns: int, height: int = 1, row_step: int | None = None,
                   is_bigendian: bool = False, num_classes: int | None = None) -> FeatureMessage:
    """A received compact cloud -> FeatureMessage (arguments as ``codec.decode``), or
    FeatureMessageError."""
    _check_fields(fields)
    rec = read_records(fields, data, point_step, width=width, height=height, row_step=row_step,
                       is_bigendian=is_bigendian)
    return messages_from_records(rec, grid, channels, agent_id, stamp_ns, num_classes)

