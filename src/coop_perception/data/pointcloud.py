"""PointCloud2 field layouts as numpy structured dtypes (no ROS import).

A PointCloud2 is a byte buffer plus a list of fields ``(name, offset, datatype, count)``. Here a
layout is a numpy structured dtype whose ``itemsize`` is the point step: fields may be of mixed
types, leave padding between them, and carry ``count > 1`` (a sub-array). Both directions are
vectorised: decoding is a (strided) view on the buffer, encoding one ``tobytes``.

Validation follows what a robust consumer must not assume: producers get ``point_step``,
``row_step``, ``width`` or the data length wrong, or send clouds without coordinates.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

# sensor_msgs/PointField datatype constants.
INT8, UINT8, INT16, UINT16, INT32, UINT32, FLOAT32, FLOAT64 = range(1, 9)

_DATATYPE_TO_NUMPY = {
    INT8: 'i1', UINT8: 'u1', INT16: 'i2', UINT16: 'u2',
    INT32: 'i4', UINT32: 'u4', FLOAT32: 'f4', FLOAT64: 'f8',
}
_NUMPY_TO_DATATYPE = {np.dtype(v).newbyteorder('<'): k for k, v in _DATATYPE_TO_NUMPY.items()}
_NATIVE_LITTLE = np.little_endian


class PointCloudError(ValueError):
    """A PointCloud2 whose layout or buffer is inconsistent; the message says why."""


class Field(NamedTuple):
    """One sensor_msgs/PointField, independent of any message library."""
    name: str
    offset: int
    datatype: int
    count: int = 1


def fields_to_dtype(fields: Sequence, point_step: int, is_bigendian: bool = False) -> np.dtype:
    """Structured dtype of one point; ``fields`` are any objects with name/offset/datatype/count.

    Raises PointCloudError for unknown datatypes, duplicate names, fields that overlap or end past
    ``point_step``.
    """
    order = '>' if is_bigendian else '<'
    names, formats, offsets = [], [], []
    for f in fields:
        name, offset, datatype, count = str(f.name), int(f.offset), int(f.datatype), int(f.count)
        if datatype not in _DATATYPE_TO_NUMPY:
            raise PointCloudError(f'field {name!r} has unknown datatype {datatype}')
        if name in names:
            raise PointCloudError(f'field {name!r} appears twice')
        # count == 0 is what some drivers write for scalars.
        base = np.dtype(order + _DATATYPE_TO_NUMPY[datatype])
        fmt = base if count <= 1 else np.dtype((base, (count,)))
        if offset < 0 or offset + fmt.itemsize > point_step:
            raise PointCloudError(f'field {name!r} (offset {offset}, {fmt.itemsize} bytes) does '
                                  f'not fit in point_step {point_step}')
        names.append(name)
        formats.append(fmt)
        offsets.append(offset)
    spans = sorted(zip(offsets, (f.itemsize for f in formats), names))
    for (o0, s0, n0), (o1, _, n1) in zip(spans, spans[1:]):
        if o0 + s0 > o1:
            raise PointCloudError(f'fields {n0!r} and {n1!r} overlap')
    return np.dtype({'names': names, 'formats': formats, 'offsets': offsets,
                     'itemsize': point_step})


def dtype_to_fields(dtype: np.dtype) -> tuple[list[Field], bool]:
    """Fields and ``is_bigendian`` of a structured dtype (itemsize = point step).

    Every field must be one of the eight PointField types, scalar or 1-D sub-array, and all in one
    byte order (PointCloud2 has a single endianness flag).
    """
    dtype = np.dtype(dtype)
    if dtype.names is None:
        raise PointCloudError(f'expected a structured dtype, got {dtype}')
    fields, orders = [], set()
    for name in dtype.names:
        fmt, offset = dtype.fields[name][:2]
        base, shape = (fmt.subdtype if fmt.subdtype else (fmt, ()))
        if len(shape) > 1:
            raise PointCloudError(f'field {name!r} has a {len(shape)}-D shape; only 1-D counts exist')
        key = base.newbyteorder('<') if base.byteorder in '<>=' else base
        if key not in _NUMPY_TO_DATATYPE:
            raise PointCloudError(f'field {name!r} has dtype {base}, not a PointField type')
        if base.itemsize > 1:
            orders.add(base.byteorder == '>' or (base.byteorder == '=' and not _NATIVE_LITTLE))
        fields.append(Field(name, int(offset), _NUMPY_TO_DATATYPE[key],
                            int(shape[0]) if shape else 1))
    if len(orders) > 1:
        raise PointCloudError('fields mix byte orders')
    return fields, bool(orders and orders.pop())


def check_layout(fields: Sequence, *, height: int, width: int, point_step: int, row_step: int,
                 data_len: int, is_bigendian: bool = False,
                 require: Sequence[str] = ('x', 'y', 'z')) -> np.dtype:
    """Validate a cloud's header against its buffer; return the point dtype.

    ``require`` names the fields a consumer needs (coordinates by default).
    """
    names = [str(f.name) for f in fields]
    missing = [n for n in require if n not in names]
    if missing:
        raise PointCloudError(f'missing field(s) {", ".join(missing)} (has: {", ".join(names) or "none"})')
    if point_step <= 0 and height * width > 0:
        raise PointCloudError(f'point_step is {point_step}')
    dtype = fields_to_dtype(fields, max(point_step, 0), is_bigendian)
    if row_step < width * point_step:
        raise PointCloudError(f'row_step {row_step} < width {width} x point_step {point_step}')
    if data_len != height * row_step:
        raise PointCloudError(f'data has {data_len} bytes, expected height {height} x row_step '
                              f'{row_step} = {height * row_step}')
    return dtype


def buffer_to_array(data, dtype: np.dtype, *, height: int, width: int, row_step: int) -> np.ndarray:
    """(height, width) structured view on a validated buffer; rows may carry trailing padding."""
    buf = np.frombuffer(data, dtype=np.uint8)
    if height * width == 0:
        return np.zeros((height, width), dtype=dtype)
    return np.ndarray(shape=(height, width), dtype=dtype, buffer=buf,
                      strides=(row_step, dtype.itemsize))


def array_to_buffer(points: np.ndarray) -> tuple[list[Field], bool, int, bytes]:
    """Structured array (any shape, flattened row-major) -> (fields, is_bigendian, point_step, bytes)."""
    fields, big = dtype_to_fields(points.dtype)
    return fields, big, points.dtype.itemsize, np.ascontiguousarray(points).tobytes()


def structured(columns: dict[str, np.ndarray], dtype: np.dtype) -> np.ndarray:
    """Fill a structured array of ``dtype`` from named columns (missing fields stay zero)."""
    n = len(next(iter(columns.values()))) if columns else 0
    out = np.zeros(n, dtype=dtype)
    for name, values in columns.items():
        out[name] = values
    return out


def field_matrix(points: np.ndarray, names: Sequence[str], dtype=np.float32) -> np.ndarray:
    """(N, len(names)) plain matrix of scalar fields of a structured array (copies); a
    PointCloudError when one of them holds several values a point (a PointField count > 1)."""
    points = points.reshape(-1)
    out = np.empty((len(points), len(names)), dtype=dtype)
    for i, name in enumerate(names):
        shape = points.dtype[name].shape
        if shape:
            raise PointCloudError(f'field {name!r} holds {int(np.prod(shape))} values a point (count); expected 1')
        out[:, i] = points[name]
    return out
