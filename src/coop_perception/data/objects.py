"""The object list: one record per 3D box, the layout of ``/coop/objects`` and ground truth.

Defined here once, as a numpy structured dtype, so detection, fusion, evaluation and the ROS
conversion share it without ROS. On the wire it is a PointCloud2 with one point per object and
these named fields (``coop_perception.data.ros_msgs.objects_to_cloud``).

Geometry and velocity are float64 so that boxes survive a bag round trip bit for bit (map-frame
coordinates of hundreds of metres lose millimetres in float32).
"""
from __future__ import annotations

import numpy as np

from coop_perception.geometry import BOX_DIM

BOX_FIELDS = ('x', 'y', 'z', 'l', 'w', 'h', 'yaw')
VELOCITY_FIELDS = ('vx', 'vy')

OBJECT_DTYPE = np.dtype([
    ('x', '<f8'), ('y', '<f8'), ('z', '<f8'),        # box centre (m)
    ('l', '<f8'), ('w', '<f8'), ('h', '<f8'),        # size (m)
    ('yaw', '<f8'),                                  # heading about +z (rad)
    ('vx', '<f8'), ('vy', '<f8'),                    # ground-plane velocity (m/s), same frame
    ('score', '<f4'),                                # detection confidence in [0, 1]
    ('label', '<i4'),                                # index in data.labels.CLASSES, -1 other
    ('trust', '<f4'),                                # fusion trust modulus in [0, 1]
    ('source', '<i4'),                               # agent id that produced it, -1 fused/GT
    ('id', '<i4'),                                   # track / instance id, -1 unknown
    ('v_std', '<f4'),                                # standard deviation of vx, vy per axis (m/s), -1 unknown
])

# What a field holds when a producer has nothing to say about it.
DEFAULTS = {'score': 1.0, 'label': -1, 'trust': 1.0, 'source': -1, 'id': -1, 'v_std': -1.0}


def make_objects(boxes: np.ndarray, velocities: np.ndarray | None = None, **columns) -> np.ndarray:
    """(N, 7) boxes [+ (N, 2) velocities, named (N,) columns] -> (N,) OBJECT_DTYPE records."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, BOX_DIM)
    unknown = set(columns) - set(OBJECT_DTYPE.names)
    if unknown:
        raise ValueError(f'unknown object field(s): {", ".join(sorted(unknown))}')
    out = np.zeros(len(boxes), dtype=OBJECT_DTYPE)
    for i, name in enumerate(BOX_FIELDS):
        out[name] = boxes[:, i]
    if velocities is not None:
        velocities = np.asarray(velocities, dtype=np.float64).reshape(-1, 2)
        out['vx'], out['vy'] = velocities[:, 0], velocities[:, 1]
    for name, value in {**DEFAULTS, **columns}.items():
        out[name] = value
    return out


def object_boxes(objects: np.ndarray) -> np.ndarray:
    """(N,) records -> (N, 7) float64 boxes."""
    return np.stack([objects[n].astype(np.float64) for n in BOX_FIELDS], axis=-1).reshape(-1, BOX_DIM)


def object_velocities(objects: np.ndarray) -> np.ndarray:
    """(N,) records -> (N, 2) float64 velocities."""
    return np.stack([objects[n].astype(np.float64) for n in VELOCITY_FIELDS], axis=-1).reshape(-1, 2)


def as_objects(records: np.ndarray) -> np.ndarray:
    """Any structured array with the box fields (e.g. decoded from a foreign producer's cloud,
    with fewer fields or other dtypes) -> OBJECT_DTYPE records, absent fields at their defaults."""
    records = np.asarray(records).reshape(-1)
    missing = [n for n in BOX_FIELDS if n not in (records.dtype.names or ())]
    if missing:
        raise ValueError(f'object records lack field(s) {", ".join(missing)}')
    out = make_objects(np.zeros((len(records), BOX_DIM)))
    for name in OBJECT_DTYPE.names:
        if name in records.dtype.names:
            out[name] = records[name]
    return out


# --------------------------------------------------------------------------- plausibility
# Agent ids every node accepts: ``source`` is an INT32 on the wire, so larger ids could not be
# named in an object list.
MAX_AGENT_ID = 2**31 - 1
# Bounds of a box that may be published, beyond the sensor range the caller gives: the largest
# road vehicles are ~25 m long and 5 m high, nothing on a road moves faster than MAX_SPEED_MPS,
# and box centres sit within a few metres of the sensor's height.
MAX_BOX_SIZE_M = 30.0
MAX_BOX_ABS_Z_M = 20.0
MAX_SPEED_MPS = 100.0
# Why an object is implausible, in the order they are tested: each box counts under the first.
IMPLAUSIBLE_REASONS = ('non_finite', 'out_of_range', 'bad_size', 'bad_velocity', 'bad_score')


def implausible_objects(objects: np.ndarray, extent_xy: tuple[float, float, float, float]) -> np.ndarray:
    """(N,) records -> (N,) object array: '' for a box that may be published, else the first of
    IMPLAUSIBLE_REASONS it fails. ``extent_xy`` = (x_min, y_min, x_max, y_max) (m) is the sensor
    range in the records' frame; centres outside it are 'out_of_range'."""
    objects = np.asarray(objects).reshape(-1)
    values = np.stack([objects[n].astype(np.float64) for n in (*BOX_FIELDS, *VELOCITY_FIELDS, 'score', 'trust')],
                      axis=-1).reshape(-1, BOX_DIM + 4)
    boxes, vel, score = values[:, :BOX_DIM], values[:, BOX_DIM:BOX_DIM + 2], values[:, BOX_DIM + 2:]
    x_min, y_min, x_max, y_max = extent_xy
    with np.errstate(invalid='ignore'):
        checks = (
            ~np.isfinite(values).all(axis=1),
            ~((boxes[:, 0] >= x_min) & (boxes[:, 0] <= x_max) & (boxes[:, 1] >= y_min) & (boxes[:, 1] <= y_max)
              & (np.abs(boxes[:, 2]) <= MAX_BOX_ABS_Z_M)),
            ~((boxes[:, 3:6] > 0) & (boxes[:, 3:6] <= MAX_BOX_SIZE_M)).all(axis=1),
            (np.abs(vel) > MAX_SPEED_MPS).any(axis=1),
            ~((score >= 0) & (score <= 1)).all(axis=1),
        )
    reasons = np.full(len(objects), '', dtype=object)
    for reason, bad in zip(reversed(IMPLAUSIBLE_REASONS), reversed(checks)):
        reasons[bad] = reason
    return reasons


def grid_extent(grid, margin_m: float = 0.0) -> tuple[float, float, float, float]:
    """(x_min, y_min, x_max, y_max) (m) of a BevGrid's area, grown by ``margin_m`` on every side."""
    x0, y0 = (float(v) for v in grid.origin)
    H, W = grid.shape
    return (x0 - margin_m, y0 - margin_m, x0 + W * grid.cell_size + margin_m, y0 + H * grid.cell_size + margin_m)
