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
])

# What a field holds when a producer has nothing to say about it.
DEFAULTS = {'score': 1.0, 'label': -1, 'trust': 1.0, 'source': -1, 'id': -1}


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
