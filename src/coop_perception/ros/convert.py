"""rclpy messages for the nodes, and the conversions only nodes need: ``/clock``, feature
payloads (``fusion.codec``) as PointCloud2, trust colours and vision_msgs detections.

The layouts nodes share with bag files (stamps, clouds, poses, object lists, markers) are in
``data.ros_msgs``, which takes ``RclpyMessages`` as its factory as well. ``RclpyMessages`` imports
message classes on first use, so importing this module does not import rclpy.
"""
from __future__ import annotations

import array
import importlib
from collections import Counter
from typing import Sequence

import numpy as np

from coop_perception import geometry as geo
from coop_perception.data.labels import CLASSES
from coop_perception.data.objects import implausible_objects, make_objects, object_boxes
from coop_perception.data.ros_msgs import MessageFactory, default_texts, matrix_to_pose_msg, to_stamp

# --------------------------------------------------------------------------- factories
_ARRAY_TYPECODES = {'u1': 'B', 'i1': 'b', 'u2': 'H', 'i2': 'h', 'u4': 'I', 'i4': 'i',
                    'u8': 'Q', 'i8': 'q', 'f4': 'f', 'f8': 'd'}


def _split_type(type_name: str) -> tuple[str, str]:
    parts = type_name.split('/')
    if len(parts) == 2:  # 'pkg/Name' as older tools write it
        parts = [parts[0], 'msg', parts[1]]
    if len(parts) != 3 or not all(parts):
        raise ValueError(f'not a ROS message type name: {type_name!r}')
    return f'{parts[0]}.{parts[1]}', parts[2]


class RclpyMessages:
    """Builds rclpy message objects; classes are imported on first use."""

    def __init__(self):
        self._classes: dict[str, type] = {}
        self._sequences: dict[type, set[str]] = {}

    def get_class(self, type_name: str) -> type:
        """The message class, or ImportError/AttributeError if this ROS install lacks it."""
        cls = self._classes.get(type_name)
        if cls is None:
            module, name = _split_type(type_name)
            cls = getattr(importlib.import_module(module), name)
            self._classes[type_name] = cls
            self._sequences[cls] = {f for f, t in cls.get_fields_and_field_types().items()
                                    if t.startswith('sequence<') and '/' not in t}
        return cls

    def has(self, type_name: str) -> bool:
        try:
            self.get_class(type_name)
        except (ImportError, AttributeError, ValueError):
            return False
        return True

    def __call__(self, type_name: str, **fields):
        cls = self.get_class(type_name)
        for name in self._sequences[cls] & fields.keys():
            value = fields[name]
            # rclpy stores sequences as array.array and checks other inputs element by element.
            if isinstance(value, np.ndarray):
                code = _ARRAY_TYPECODES[value.dtype.str[1:]]
                fields[name] = array.array(code, np.ascontiguousarray(value).tobytes())
        return cls(**fields)


# --------------------------------------------------------------------------- time
def make_clock(msgs: MessageFactory, t_ns: int):
    return msgs('rosgraph_msgs/msg/Clock', clock=to_stamp(msgs, t_ns))


# --------------------------------------------------------------------------- feature payloads
def buffer_to_cloud(fields: Sequence, data: bytes, point_step: int, header, msgs: MessageFactory):
    """A little-endian, unorganised buffer (e.g. ``fusion.codec.encode`` output) -> PointCloud2."""
    width = len(data) // point_step if point_step else 0
    return msgs('sensor_msgs/msg/PointCloud2', header=header, height=1, width=width,
                fields=[msgs('sensor_msgs/msg/PointField', name=f.name, offset=f.offset,
                             datatype=f.datatype, count=f.count) for f in fields],
                is_bigendian=False, point_step=point_step, row_step=len(data),
                data=np.frombuffer(data, dtype=np.uint8), is_dense=True)


def cloud_layout(msg) -> dict:
    """The layout keywords of ``fusion.codec.decode`` (and ``fusion.ego_map.decode_ego_map``)
    from a PointCloud2, which they validate against its buffer."""
    return {'fields': msg.fields, 'data': msg.data, 'point_step': int(msg.point_step),
            'width': int(msg.width), 'height': int(msg.height), 'row_step': int(msg.row_step),
            'is_bigendian': bool(msg.is_bigendian)}


# --------------------------------------------------------------------------- last check before publishing
def publishable(objects: np.ndarray, extent_xy: tuple[float, float, float, float], dropped: Counter) -> np.ndarray:
    """(N,) object records about to be published -> (N,) bool of those that may be: finite,
    centred within ``extent_xy`` (the sensor range, m), of physical size, speed and score
    (``data.objects.implausible_objects``). The others are counted in ``dropped`` by reason: no
    input, however crafted, may put a NaN or a box far outside the sensor range on the air."""
    reasons = implausible_objects(objects, extent_xy)
    dropped.update(r for r in reasons.tolist() if r)
    return reasons == ''


# --------------------------------------------------------------------------- trust colours
# RGBA of fused boxes at trust 0 (the ego's evidence alone) and trust 1 (full collaborator
# trust); trust in between blends them.
EGO_ONLY_COLOR = np.array([0.20, 0.60, 1.00, 1.0])
TRUSTED_COLOR = np.array([0.20, 1.00, 0.30, 1.0])


def trust_colors(trust: np.ndarray) -> np.ndarray:
    """(N,) trust in [0, 1] -> (N, 4) RGBA."""
    t = np.clip(np.nan_to_num(np.asarray(trust, np.float64)), 0.0, 1.0)[:, None]
    return (1.0 - t) * EGO_ONLY_COLOR + t * TRUSTED_COLOR


# --------------------------------------------------------------------------- vision_msgs
DETECTION3D_ARRAY = 'vision_msgs/msg/Detection3DArray'


def objects_to_detection3d(objects: np.ndarray, header, msgs: MessageFactory):
    """Object records -> vision_msgs/Detection3DArray; check ``msgs.has(DETECTION3D_ARRAY)``
    first, vision_msgs is optional. ``class_id`` is the class name, ``id`` the object id."""
    objects = np.asarray(objects).reshape(-1)
    boxes = object_boxes(objects)
    names = default_texts(objects, with_score=False)
    detections = []
    for i in range(len(boxes)):
        T = geo.make_pose(boxes[i, :3], yaw=boxes[i, 6])
        hyp = msgs('vision_msgs/msg/ObjectHypothesisWithPose',
                   hypothesis=msgs('vision_msgs/msg/ObjectHypothesis', class_id=names[i],
                                   score=float(objects['score'][i])),
                   pose=msgs('geometry_msgs/msg/PoseWithCovariance', pose=matrix_to_pose_msg(T, msgs)))
        bbox = msgs('vision_msgs/msg/BoundingBox3D', center=matrix_to_pose_msg(T, msgs),
                    size=msgs('geometry_msgs/msg/Vector3', x=boxes[i, 3], y=boxes[i, 4], z=boxes[i, 5]))
        ident = int(objects['id'][i])
        detections.append(msgs('vision_msgs/msg/Detection3D', header=header, results=[hyp],
                               bbox=bbox, id='' if ident < 0 else str(ident)))
    return msgs(DETECTION3D_ARRAY, header=header, detections=detections)


def detection3d_to_objects(msg) -> np.ndarray:
    """vision_msgs/Detection3DArray -> object records (best hypothesis per detection)."""
    boxes, labels, scores, ids = [], [], [], []
    for d in msg.detections:
        c, s = d.bbox.center, d.bbox.size
        o = c.orientation
        yaw = geo.quat_wxyz_to_yaw(geo.xyzw_to_wxyz([o.x, o.y, o.z, o.w]))
        boxes.append([c.position.x, c.position.y, c.position.z, s.x, s.y, s.z, yaw])
        best = max(d.results, key=lambda r: r.hypothesis.score, default=None)
        name = best.hypothesis.class_id if best is not None else ''
        labels.append(CLASSES.index(name) if name in CLASSES else -1)
        scores.append(best.hypothesis.score if best is not None else 0.0)
        ids.append(int(d.id) if str(d.id).lstrip('-').isdigit() else -1)
    return make_objects(np.array(boxes).reshape(-1, geo.BOX_DIM), label=labels, score=scores, id=ids)
