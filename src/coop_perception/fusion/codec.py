"""Compact BEV features on the wire: int8 quantisation, PointCloud2 layout, validation.

A feature message is a sparse set of BEV cells of one agent's detector grid, one PointCloud2
point per cell (docs/architecture.md, "Wire formats"); which cells is the sharing policy's choice
(fusion.sharing). Producer side::

    det = detector.detect(scan)                                    # Detections, sensor frame
    msg = make_message(det, sharing.select_roi_cells(det), agent_id, stamp_ns)
    fields, data, point_step = encode(msg)                         # -> PointCloud2, width = M

Consumer side: ``decode(fields, data, point_step, width=..., grid=..., channels=..., ...)``
validates the cloud and raises :class:`FeatureMessageError` (with a countable ``reason``) for
anything a fusion must not trust.

Wire layout (little endian, packed, ``point_step = 47 + C`` bytes; 111 for C = 64):

    x, y                  float32  cell centre in the sender's sensor frame (m)
    scale                 float32  dequantisation step: feature = int8 * scale
    confidence            float32  detector confidence at this cell (max class probability)
    cls_aleatoric, cls_epistemic, reg_aleatoric, reg_epistemic
                          float32  the ROI's uncertainties (see message_uncertainty)
    vx, vy                float32  the ROI's ground velocity along the sender's sensor axes (m/s)
    score                 float32  the ROI's detection score
    roi                   int16    index of the ROI in the sender's Detections, -1 = background
    v_std_q               uint8    the standard deviation of vx, vy per axis (the sender tracker's),
                                   a log code (``velocity_std_to_wire``): 0.01 * 2^((q-1)/24) m/s,
                                   0 = none (background; a detector's unmeasured velocity),
                                   255 = unknown
    features              int8 x C the quantised feature vector
    free_range_q          uint8 x k  optional: the sender's free-range profile (detection.free_range),
                          one byte a bin (``free_range.to_wire``); cell i carries bins i*k .. i*k+k-1,
                          k = ceil(B / M), the bytes past bin B are 0: B + (k*M - B) bytes a message

Per-ROI values are repeated on every cell of the ROI because a PointCloud2 has one record type.
They stay float32 rather than being squeezed into bespoke integer codes: they cost 28 of 111
bytes a cell, every consumer (RViz included) reads float32 fields as they are, and the variances
span many decades, which a linear 8- or 16-bit code would not hold. The velocity's standard
deviation came later, when every byte of the budget counted: one byte of log code holds it to 3 %.
``vx``/``vy`` and ``v_std_q`` are optional on decode (the contract makes velocity optional); a
message without them decodes with zero velocity of unknown error.
A message without ``free_range_q`` (or without cells) carries no profile; the receiver's fusion
then takes no free-space testimony from that sender (fusion.reputation).

The grid (cell size, extent) is not on the wire: every agent runs the same detector config, so a
receiver decodes against its own copy and rejects cells that are not centres of that grid.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Hashable, Sequence

import numpy as np

from coop_perception.data.objects import MAX_SPEED_MPS   # |vx|, |vy| bound (m/s)
from coop_perception.data.pointcloud import (FLOAT32, INT8, INT16, UINT8, Field, array_to_buffer,
                                             buffer_to_array, check_layout)
from coop_perception.detection.free_range import FREE_RANGE_BINS, from_wire, to_wire

if TYPE_CHECKING:  # only for annotations: decoding needs no torch
    from coop_perception.bev_grid import BevGrid
    from coop_perception.detection.decode import Detections

    from .sharing import CellSelection

# Columns of FeatureMessage.uncertainty, from the detector's six by message_uncertainty().
MESSAGE_UNCERTAINTY_FIELDS = ('cls_aleatoric', 'cls_epistemic', 'reg_aleatoric', 'reg_epistemic')

_INT8_MAX = 127
# Physical bounds of decoded values: a message beyond them is corrupt or hostile, and its values
# would reach the fused map and the published boxes (NaN from overflowing products, boxes
# hundreds of km away). The shipped detector's features stay below ~15 in magnitude and real
# traffic below 70 m/s; the bounds leave a wide margin.
MAX_FEATURE_ABS = 1000.0                 # largest |dequantised feature| a sender may send
MAX_SCALE = MAX_FEATURE_ABS / _INT8_MAX  # so scale <= ~7.87
MAX_UNCERTAINTY = 1e4                    # any uncertainty column (logit variance, nats, m^2)
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
    BAD_SCALE = 'bad_scale'             # NaN, infinite, negative or above MAX_SCALE
    NON_FINITE = 'non_finite'           # NaN/inf position, confidence, score or velocity
    BAD_VALUE = 'bad_value'             # probabilities outside [0, 1], negative variances, roi < -1
    BAD_VELOCITY = 'bad_velocity'       # |vx| or |vy| above MAX_SPEED_MPS
    BAD_UNCERTAINTY = 'bad_uncertainty'  # an uncertainty above MAX_UNCERTAINTY
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
    # the sender's free-range profile (B,) float32 m as it reads after the wire's quantisation
    # (detection.free_range.from_wire); None: the sender sent none
    free_range: np.ndarray | None = None
    # (M,) float32 standard deviation of ``velocity`` per axis (m/s) as it reads after the wire's
    # code (velocity_std_from_wire), 0 on background cells, NaN unknown; None: the sender sent none
    velocity_std: np.ndarray | None = None
    # A compact message's ROI boxes (one cell per ROI, fusion.compact_codec): (M, 7) [x, y, z, l,
    # w, h, yaw] in the sender's sensor frame, z above the ground below the sender, and (M,) int64
    # labels, as the sender decoded them; None: a cell message, whose boxes the receiver decodes
    boxes: np.ndarray | None = None
    labels: np.ndarray | None = None

    @property
    def num_cells(self) -> int:
        return len(self.cells)

    def take(self, index) -> FeatureMessage:
        """The message with the cells ``index`` (an index array or a bool mask) only."""
        return replace(self, **{name: getattr(self, name)[index] for name in _PER_CELL
                                if getattr(self, name) is not None})

    def extended(self, *parts: FeatureMessage) -> FeatureMessage:
        """The message with the cells of ``parts`` (messages of the same layout) appended."""
        return replace(self, **{name: np.concatenate([getattr(m, name) for m in (self, *parts)])
                                for name in _PER_CELL if getattr(self, name) is not None})

    @property
    def channels(self) -> int:
        return self.features.shape[1]

    def dequantised(self) -> np.ndarray:
        """(M, C) float32 features."""
        return dequantise(self.features, self.scale)


# FeatureMessage fields with one row per cell
_PER_CELL = ('cells', 'features', 'scale', 'confidence', 'uncertainty', 'velocity', 'roi', 'score', 'velocity_std',
             'boxes', 'labels')


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


# --------------------------------------------------------------------------- producer side
def make_message(det: Detections, selection: CellSelection, agent_id: Hashable,
                 stamp_ns: int) -> FeatureMessage:
    """Gather the selected cells of ``det`` into a message stamped with the scan's capture time."""
    rows, cols, roi = selection
    grid = det.grid
    q, scale = quantise(det.features[:, rows, cols].T)
    cells = np.stack(grid.centre_of(rows, cols), axis=1).astype(np.float32)
    fg = roi >= 0
    r = roi[fg]
    uncertainty = np.zeros((len(roi), len(MESSAGE_UNCERTAINTY_FIELDS)), np.float32)
    uncertainty[fg] = message_uncertainty(det.uncertainty, det.boxes)[r]
    velocity = np.zeros((len(roi), 2), np.float32)
    velocity[fg] = det.velocities[r]
    velocity_std = np.zeros(len(roi), np.float32)
    velocity_std[fg] = np.broadcast_to(np.asarray(det.velocity_std, np.float32), (len(det.boxes),))[r]
    score = np.zeros(len(roi), np.float32)
    score[fg] = det.scores[r]
    free = None if det.free_range is None else from_wire(to_wire(det.free_range, det.sensor_height))
    return FeatureMessage(
        agent_id=agent_id, stamp_ns=int(stamp_ns), grid=grid, cells=cells, features=q, scale=scale,
        confidence=det.confidence[rows, cols].astype(np.float32), uncertainty=uncertainty,
        velocity=velocity, roi=roi.astype(np.int16), score=score, free_range=free,
        velocity_std=velocity_std_from_wire(velocity_std_to_wire(velocity_std)))


# --------------------------------------------------------------------------- velocity std code
_V_STD_MIN = 0.01          # m/s at code 1 (code 0: none)
_V_STD_PER_OCTAVE = 24     # codes per doubling: 2.9 % steps
_V_STD_UNKNOWN = 255


def velocity_std_to_wire(std: np.ndarray) -> np.ndarray:
    """(M,) m/s -> (M,) uint8 codes: 0 for 0 (or less), 255 for NaN, else the nearest of
    0.01 * 2^((q - 1) / 24) m/s, q in 1..254 (0.01 to 15 m/s; beyond, 254: no better than a guess)."""
    s = np.asarray(std, np.float64).reshape(-1)
    q = 1 + np.rint(_V_STD_PER_OCTAVE * np.log2(np.maximum(np.nan_to_num(s, nan=1.0), _V_STD_MIN) / _V_STD_MIN))
    q = np.where(s > 0, np.clip(q, 1, _V_STD_UNKNOWN - 1), 0)
    return np.where(np.isnan(s), _V_STD_UNKNOWN, q).astype(np.uint8)


def velocity_std_from_wire(q: np.ndarray) -> np.ndarray:
    """(M,) uint8 codes -> (M,) float32 m/s (NaN for unknown)."""
    q = np.asarray(q, np.float64).reshape(-1)
    std = np.where(q > 0, _V_STD_MIN * np.exp2((q - 1) / _V_STD_PER_OCTAVE), 0.0)
    return np.where(q == _V_STD_UNKNOWN, np.nan, std).astype(np.float32)


# --------------------------------------------------------------------------- wire format
_FLOAT_FIELDS = ('x', 'y', 'scale', 'confidence', *MESSAGE_UNCERTAINTY_FIELDS, 'vx', 'vy', 'score')
FREE_RANGE_Q_FIELD = 'free_range_q'
V_STD_Q_FIELD = 'v_std_q'
_OPTIONAL_FIELDS = ('vx', 'vy', V_STD_Q_FIELD, FREE_RANGE_Q_FIELD)
_EXPECTED_TYPES = {**{name: FLOAT32 for name in _FLOAT_FIELDS}, 'roi': INT16, V_STD_Q_FIELD: UINT8,
                   'features': INT8, FREE_RANGE_Q_FIELD: UINT8}
_REQUIRED_FIELDS = tuple(n for n in _EXPECTED_TYPES if n not in _OPTIONAL_FIELDS)


def message_dtype(channels: int, extra_floats: Sequence[str] = (), free_range_count: int = 0) -> np.dtype:
    """Packed little-endian record of one cell (the layout in the module docstring), with
    ``free_range_count`` profile bytes (none when 0), plus ``extra_floats`` float32 fields at the
    end (which codec consumers ignore)."""
    return np.dtype([(name, '<f4') for name in _FLOAT_FIELDS]
                    + [('roi', '<i2'), (V_STD_Q_FIELD, 'u1'), ('features', 'i1', (channels,))]
                    + ([(FREE_RANGE_Q_FIELD, 'u1', (free_range_count,))] if free_range_count else [])
                    + [(name, '<f4') for name in extra_floats])


def cell_bytes(channels: int) -> int:
    """Bytes per shared cell on the wire without the free-range profile (whose bytes are per
    message, ``free_range_count`` each of M cells)."""
    return message_dtype(channels).itemsize


def free_range_count(bins: int, cells: int) -> int:
    """Profile bytes each of ``cells`` cells carries for a profile of ``bins`` bins (0: none)."""
    return -(-bins // cells) if cells else 0


def encode(msg: FeatureMessage, extra_floats: dict[str, float] | None = None) -> tuple[list[Field], bytes, int]:
    """-> (fields, data, point_step) of a PointCloud2 with height 1, width M, little endian,
    row_step = len(data). Header stamp = ``msg.stamp_ns``, frame = the sender's sensor frame.
    ``extra_floats``: name -> value of float32 fields appended to every cell. A compact message
    (``msg.boxes`` set) is written in its own layout (fusion.compact_codec), without extras."""
    if msg.boxes is not None:
        from .compact_codec import encode_compact   # it builds on this module

        return encode_compact(msg)
    extra_floats = extra_floats or {}
    k = 0 if msg.free_range is None else free_range_count(len(msg.free_range), msg.num_cells)
    rec = np.zeros(msg.num_cells, dtype=message_dtype(msg.channels, tuple(extra_floats), k))
    for name, value in extra_floats.items():
        rec[name] = value
    if k:
        codes = np.zeros(k * msg.num_cells, np.uint8)
        codes[:len(msg.free_range)] = to_wire(msg.free_range, 0.0)   # already on the wire's steps
        rec[FREE_RANGE_Q_FIELD] = codes.reshape(msg.num_cells, k)
    rec['x'], rec['y'] = msg.cells[:, 0], msg.cells[:, 1]
    rec['scale'] = msg.scale
    rec['confidence'] = msg.confidence
    for i, name in enumerate(MESSAGE_UNCERTAINTY_FIELDS):
        rec[name] = msg.uncertainty[:, i]
    rec['vx'], rec['vy'] = msg.velocity[:, 0], msg.velocity[:, 1]
    rec['score'] = msg.score
    rec['roi'] = msg.roi
    rec[V_STD_Q_FIELD] = velocity_std_to_wire(np.full(msg.num_cells, np.nan) if msg.velocity_std is None
                                              else msg.velocity_std)
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
    count = max(int(by_name['features'].count), 1)
    if by_name['features'].datatype == INT8 and count != channels:
        raise FeatureMessageError(FeatureMessageError.CHANNELS, f'features has count {count}, '
                                                                f'this detector has {channels} channels')
    check_field_types(by_name, _EXPECTED_TYPES, {'features': channels, FREE_RANGE_Q_FIELD: None})


def check_field_types(by_name: dict, expected: dict[str, int], counts: dict[str, int | None]) -> None:
    """FeatureMessageError (``layout``) for a field of ``by_name`` (name -> PointField) among
    ``expected`` (name -> datatype) with another datatype, or another count than ``counts`` says
    (1 when it does not name the field; None: any count)."""
    for name, datatype in expected.items():
        f = by_name.get(name)
        if f is None:
            continue
        if int(f.datatype) != datatype:
            raise FeatureMessageError(FeatureMessageError.LAYOUT, f'field {name!r} has datatype '
                                                                  f'{int(f.datatype)}, expected {datatype}')
        count, want = max(int(f.count), 1), counts.get(name, 1)   # some producers write 0 for scalars
        if want is not None and count != want:
            raise FeatureMessageError(FeatureMessageError.LAYOUT,
                                      f'field {name!r} has count {count}, expected {want}')


def read_records(fields: Sequence, data, point_step: int, *, width: int, height: int, row_step: int | None,
                 is_bigendian: bool) -> np.ndarray:
    """A cloud's data -> its records (height * width,) as a structured view, or
    FeatureMessageError (``layout``) when the layout and the data disagree."""
    if row_step is None:
        row_step = width * point_step
    try:
        dtype = check_layout(fields, height=height, width=width, point_step=point_step,
                             row_step=row_step, data_len=len(data), is_bigendian=is_bigendian,
                             require=())
    except ValueError as e:  # PointCloudError, or numpy refusing sizes beyond a C int (~2^32 steps)
        raise FeatureMessageError(FeatureMessageError.LAYOUT, str(e)) from None
    return buffer_to_array(data, dtype, height=height, width=width, row_step=row_step).reshape(-1)


def check_message_values(msg: FeatureMessage) -> None:
    """FeatureMessageError for decoded values no sender may send (module docstring's bounds)."""
    err = FeatureMessageError
    bad = ~((msg.scale >= 0) & (msg.scale <= MAX_SCALE))   # NaN fails both comparisons
    if bad.any():
        raise err(err.BAD_SCALE, f'{int(bad.sum())} of {msg.num_cells} cells have a NaN, negative or '
                                 f'above {MAX_SCALE:.3g} scale (first: {msg.scale[bad][0]})')
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
    if (known > MAX_UNCERTAINTY).any():
        raise err(err.BAD_UNCERTAINTY, f'an uncertainty exceeds {MAX_UNCERTAINTY:g} (max {known.max():.3g})')
    if (np.abs(msg.velocity) > MAX_SPEED_MPS).any():
        raise err(err.BAD_VELOCITY, f'a velocity exceeds {MAX_SPEED_MPS:g} m/s '
                                    f'(max {np.abs(msg.velocity).max():.3g})')
    if (msg.roi < -1).any():
        raise err(err.BAD_VALUE, f'roi ids below -1 (min {int(msg.roi.min())})')

    grid = msg.grid
    H, W = grid.shape
    xs, ys = msg.cells.astype(np.float64).T
    # unrounded: a far-off position must not reach the float -> int cast
    outside = ~grid.inside(*grid.cell_coords(xs, ys))
    if outside.any():
        x, y = msg.cells[outside][0]
        raise err(err.OUT_OF_GRID, f'{int(outside.sum())} of {msg.num_cells} cells lie outside the '
                                   f'{H}x{W} grid of {grid.cell_size} m cells '
                                   f'(first: x={x:.2f}, y={y:.2f} m)')
    off = grid.centre_offset(xs, ys) > _LATTICE_TOLERANCE_CELLS
    if off.any():
        x, y = msg.cells[off][0]
        raise err(err.OFF_LATTICE, f'{int(off.sum())} cells are not centres of {grid.cell_size} m '
                                   f'cells (first: x={x:.3f}, y={y:.3f} m); sender grid differs?')
    flat = grid.flat_index(*grid.cells_of(xs, ys))
    repeats = len(flat) - len(np.unique(flat))
    if repeats:
        raise err(err.DUPLICATE_CELL, f'{repeats} cells appear more than once')


def decode(fields: Sequence, data, point_step: int, *, width: int, grid: BevGrid, channels: int,
           agent_id: Hashable, stamp_ns: int, height: int = 1, row_step: int | None = None,
           is_bigendian: bool = False, num_classes: int | None = None) -> FeatureMessage:
    """A received feature cloud -> FeatureMessage, or FeatureMessageError.

    ``fields`` are any objects with name/offset/datatype/count (sensor_msgs/PointField or
    :class:`Field`); field order and offsets are free, extra fields are ignored. ``grid`` and
    ``channels`` are the receiver's detector grid and feature width, which the sender must share;
    ``agent_id`` and ``stamp_ns`` come from the topic and header. ``row_step`` defaults to
    ``width * point_step``. A cloud in the compact layout (a ``cell`` field) is decoded by
    ``fusion.compact_codec``, whose labels must be below ``num_classes`` when given.
    """
    from .compact_codec import decode_compact, is_compact   # it builds on this module

    if is_compact(fields):
        return decode_compact(fields, data, point_step, width=width, grid=grid, channels=channels,
                              agent_id=agent_id, stamp_ns=stamp_ns, height=height, row_step=row_step,
                              is_bigendian=is_bigendian, num_classes=num_classes)
    _check_fields(fields, channels)
    rec = read_records(fields, data, point_step, width=width, height=height, row_step=row_step,
                       is_bigendian=is_bigendian)
    names = rec.dtype.names

    def column(name):
        return rec[name].astype(np.float32)

    m = len(rec)
    velocity = (np.stack([column('vx'), column('vy')], axis=1) if 'vx' in names
                else np.zeros((m, 2), np.float32))
    msg = FeatureMessage(
        agent_id=agent_id, stamp_ns=int(stamp_ns), grid=grid,
        cells=np.stack([column('x'), column('y')], axis=1).reshape(m, 2),
        features=rec['features'].astype(np.int8).reshape(m, channels),
        scale=column('scale'), confidence=column('confidence'),
        uncertainty=np.stack([column(n) for n in MESSAGE_UNCERTAINTY_FIELDS], axis=1).reshape(m, 4),
        velocity=velocity.reshape(m, 2), roi=rec['roi'].astype(np.int16), score=column('score'),
        free_range=free_range_from_records(rec, m),
        velocity_std=velocity_std_from_wire(rec[V_STD_Q_FIELD]) if V_STD_Q_FIELD in names else None)
    check_message_values(msg)
    return msg


def free_range_from_records(rec: np.ndarray, cells: int) -> np.ndarray | None:
    """The profile (FREE_RANGE_BINS,) m of a decoded record array, None when it carries none
    (no field, no cells, all 0); FeatureMessageError when its bytes cannot hold every bin."""
    if FREE_RANGE_Q_FIELD not in rec.dtype.names or cells == 0:
        return None
    codes = rec[FREE_RANGE_Q_FIELD].reshape(-1)
    if len(codes) < FREE_RANGE_BINS:
        raise FeatureMessageError(FeatureMessageError.LAYOUT, f'{FREE_RANGE_Q_FIELD} holds {len(codes)} bytes '
                                                              f'for {FREE_RANGE_BINS} bins')
    codes = codes[:FREE_RANGE_BINS]
    return from_wire(codes) if codes.any() else None
