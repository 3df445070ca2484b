"""numpy <-> ROS message layouts (time, PointCloud2, poses, object lists, markers), without rclpy.

Reading is duck-typed on attribute names (rclpy and `rosbags` messages use the same ROS field
names). Building goes through a message factory, ``msgs(type_name, **fields)``: ``RosbagsMessages``
for bag files, ``ros.convert.RclpyMessages`` for live nodes. The factory is passed in, so this
module imports neither rclpy nor a message package and bags are written and read without ROS.

Arrays that a message carries as a primitive array/sequence are handed to the factory as numpy
arrays; each factory turns them into what its library stores.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np
from rosbags.interfaces import Nodetype

from coop_perception import geometry as geo
from coop_perception.data import pointcloud as pc
from coop_perception.data.labels import CLASSES
from coop_perception.data.objects import BOX_FIELDS, as_objects, make_objects, object_boxes

PointCloudError = pc.PointCloudError

# Bounds of a pose read from a message. Map frames in use (V2X-Sim towns, UTM eastings and
# northings) stay well within 10,000 km of their origin; beyond that a pose is corrupt, and its
# products with boxes would put them anywhere. Quaternions must be unit within float32 rounding
# of a few decimals: a producer sending anything else does not know what its rotation is.
MAX_POSE_TRANSLATION_M = 1e7
QUATERNION_NORM_TOLERANCE = 1e-2


class PoseError(ValueError):
    """A pose message that must not be used; ``reason`` is one of the class constants."""

    NON_FINITE = 'non_finite'
    FAR_AWAY = 'translation_out_of_range'    # |x|, |y| or |z| above MAX_POSE_TRANSLATION_M
    NOT_UNIT = 'quaternion_not_unit'

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        super().__init__(f'{reason}: {detail}')

# visualization_msgs/Marker constants (identical in every ROS 2 distro).
MARKER_LINE_LIST = 5
MARKER_TEXT_VIEW_FACING = 9
MARKER_ADD = 0
MARKER_DELETEALL = 3

# RGBA per label index (CLASSES order), last entry for label -1 / unknown.
LABEL_COLORS = np.array([
    [0.20, 0.60, 1.00, 1.0],   # car: blue
    [1.00, 0.60, 0.10, 1.0],   # truck: orange
    [1.00, 0.25, 0.25, 1.0],   # pedestrian: red
    [0.30, 0.90, 0.30, 1.0],   # cyclist: green
    [0.75, 0.75, 0.75, 1.0],   # other: grey
])
# The 12 edges of a box as pairs of geometry.box_corners indices.
BOX_EDGES = np.array([[0, 1], [1, 2], [2, 3], [3, 0],
                      [4, 5], [5, 6], [6, 7], [7, 4],
                      [0, 4], [1, 5], [2, 6], [3, 7]])


class MessageFactory(Protocol):
    def __call__(self, type_name: str, **fields): ...

    def has(self, type_name: str) -> bool: ...


# --------------------------------------------------------------------------- factories
class RosbagsMessages:
    """Builds `rosbags` message objects for a type store; unspecified fields get ROS defaults."""

    _NUMERIC = {'bool': np.bool_, 'byte': np.uint8, 'char': np.uint8, 'octet': np.uint8,
                'int8': np.int8, 'uint8': np.uint8, 'int16': np.int16, 'uint16': np.uint16,
                'int32': np.int32, 'uint32': np.uint32, 'int64': np.int64, 'uint64': np.uint64,
                'float32': np.float32, 'float64': np.float64}

    def __init__(self, typestore):
        self.typestore = typestore

    def has(self, type_name: str) -> bool:
        return type_name in self.typestore.types

    def __call__(self, type_name: str, **fields):
        _, defs = self.typestore.fielddefs[type_name]
        values = {name: fields[name] if name in fields else self._default(desc)
                  for name, desc in defs}
        unknown = fields.keys() - values.keys()
        if unknown:
            raise TypeError(f'{type_name} has no field(s) {", ".join(sorted(unknown))}')
        return self.typestore.types[type_name](**values)

    def _default(self, desc):
        kind, detail = desc
        if kind == Nodetype.NAME:
            return self(detail)
        if kind == Nodetype.BASE:
            base = detail[0]
            if base in ('string', 'wstring'):
                return ''
            if base == 'bool':
                return False
            return 0.0 if base.startswith('float') else 0
        sub, length = detail
        numeric = sub[0] == Nodetype.BASE and sub[1][0] in self._NUMERIC
        if kind == Nodetype.ARRAY:
            if numeric:
                return np.zeros(length, dtype=self._NUMERIC[sub[1][0]])
            return [self._default(sub) for _ in range(length)]
        return np.zeros(0, dtype=self._NUMERIC[sub[1][0]]) if numeric else []


# --------------------------------------------------------------------------- time and headers
def to_stamp(msgs: MessageFactory, t_ns: int):
    t_ns = int(t_ns)
    return msgs('builtin_interfaces/msg/Time', sec=t_ns // 1_000_000_000,
                nanosec=t_ns % 1_000_000_000)


def stamp_ns(stamp) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def make_header(msgs: MessageFactory, t_ns: int, frame_id: str):
    return msgs('std_msgs/msg/Header', stamp=to_stamp(msgs, t_ns), frame_id=frame_id)


# --------------------------------------------------------------------------- PointCloud2
def array_to_cloud(points: np.ndarray, header, msgs: MessageFactory, is_dense: bool = True):
    """Structured array -> PointCloud2. 1-D arrays give an unorganised cloud (height 1), 2-D an
    organised (height, width) one. The dtype's itemsize is the point step, so padding survives."""
    points = np.asarray(points)
    height, width = (points.shape if points.ndim == 2 else (1, points.size))
    fields, big, step, data = pc.array_to_buffer(points)
    return msgs('sensor_msgs/msg/PointCloud2', header=header, height=height, width=width,
                fields=[msgs('sensor_msgs/msg/PointField', name=f.name, offset=f.offset,
                             datatype=f.datatype, count=f.count) for f in fields],
                is_bigendian=big, point_step=step, row_step=step * width,
                data=np.frombuffer(data, dtype=np.uint8), is_dense=is_dense)


def cloud_to_array(msg, require: Sequence[str] = ('x', 'y', 'z'), organized: bool = False) -> np.ndarray:
    """PointCloud2 -> structured array, (N,) or (height, width) with ``organized``.

    The result is a read-only view on the message buffer when rows are unpadded. Raises
    PointCloudError when fields named in ``require`` are missing or the layout does not match the
    buffer.
    """
    data = msg.data
    n_bytes = len(data) * (data.itemsize if hasattr(data, 'itemsize') else 1)
    height, width, step, row_step = int(msg.height), int(msg.width), int(msg.point_step), int(msg.row_step)
    try:
        dtype = pc.check_layout(msg.fields, height=height, width=width, point_step=step,
                                row_step=row_step, data_len=n_bytes,
                                is_bigendian=bool(msg.is_bigendian), require=require)
    except ValueError as e:  # PointCloudError, or numpy refusing sizes beyond a C int (~2^32 steps)
        raise PointCloudError(str(e)) from None
    out = pc.buffer_to_array(data, dtype, height=height, width=width, row_step=row_step)
    return out if organized else out.reshape(-1)


def points_to_cloud(points: np.ndarray, dtype: np.dtype, header, msgs: MessageFactory):
    """(N, C) numeric matrix whose columns are the fields of ``dtype`` in order -> PointCloud2."""
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] != len(dtype.names):
        raise ValueError(f'expected (N, {len(dtype.names)}) points for fields {dtype.names}, '
                         f'got {points.shape}')
    return array_to_cloud(pc.structured(dict(zip(dtype.names, points.T)), dtype), header, msgs)


def cloud_to_points(msg, names: Sequence[str] = ('x', 'y', 'z'), dtype=np.float32) -> np.ndarray:
    """PointCloud2 -> (N, len(names)) matrix of the named scalar fields."""
    return pc.field_matrix(cloud_to_array(msg, require=names), names, dtype)


# --------------------------------------------------------------------------- poses
def _pose_parts(T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    T = np.asarray(T, dtype=np.float64)
    return T[:3, 3], geo.wxyz_to_xyzw(geo.matrix_to_quat_wxyz(T[:3, :3]))


def _pose_matrix(position, orientation) -> np.ndarray:
    """4x4 pose from a message's point/vector and quaternion; PoseError when out of bounds."""
    t = np.array([position.x, position.y, position.z], np.float64)
    q = geo.xyzw_to_wxyz([orientation.x, orientation.y, orientation.z, orientation.w])
    if not (np.isfinite(t).all() and np.isfinite(q).all()):
        raise PoseError(PoseError.NON_FINITE, f'translation {t} or quaternion {q} holds NaN or inf')
    if np.abs(t).max() > MAX_POSE_TRANSLATION_M:
        raise PoseError(PoseError.FAR_AWAY, f'translation {t} lies beyond {MAX_POSE_TRANSLATION_M:g} m')
    # a unit quaternion has no component above 1; checked first, as squaring absurd ones overflows
    norm = float(np.linalg.norm(q)) if np.abs(q).max() <= 1.0 + QUATERNION_NORM_TOLERANCE else np.inf
    if abs(norm - 1.0) > QUATERNION_NORM_TOLERANCE:
        raise PoseError(PoseError.NOT_UNIT, f'quaternion {q} has norm {norm:.6g}')
    return geo.make_pose(t, quat_wxyz=q)


def matrix_to_pose_msg(T: np.ndarray, msgs: MessageFactory):
    t, q = _pose_parts(T)
    return msgs('geometry_msgs/msg/Pose',
                position=msgs('geometry_msgs/msg/Point', x=t[0], y=t[1], z=t[2]),
                orientation=msgs('geometry_msgs/msg/Quaternion', x=q[0], y=q[1], z=q[2], w=q[3]))


def pose_msg_to_matrix(pose) -> np.ndarray:
    return _pose_matrix(pose.position, pose.orientation)


def pose_to_odometry(T: np.ndarray, header, child_frame_id: str, msgs: MessageFactory,
                     linear_velocity: Sequence[float] = (0.0, 0.0, 0.0)):
    """4x4 pose of ``child_frame_id`` in ``header.frame_id`` -> nav_msgs/Odometry.

    The twist (velocity in the child frame) is optional; covariances stay zero (unknown)."""
    v = [float(x) for x in linear_velocity]
    twist = msgs('geometry_msgs/msg/Twist',
                 linear=msgs('geometry_msgs/msg/Vector3', x=v[0], y=v[1], z=v[2]))
    return msgs('nav_msgs/msg/Odometry', header=header, child_frame_id=child_frame_id,
                pose=msgs('geometry_msgs/msg/PoseWithCovariance', pose=matrix_to_pose_msg(T, msgs)),
                twist=msgs('geometry_msgs/msg/TwistWithCovariance', twist=twist))


def odometry_to_pose(msg) -> np.ndarray:
    return pose_msg_to_matrix(msg.pose.pose)


def pose_to_transform(T: np.ndarray, header, child_frame_id: str, msgs: MessageFactory):
    """4x4 ``T_parent_child`` -> geometry_msgs/TransformStamped (parent = header.frame_id)."""
    t, q = _pose_parts(T)
    return msgs('geometry_msgs/msg/TransformStamped', header=header, child_frame_id=child_frame_id,
                transform=msgs('geometry_msgs/msg/Transform',
                               translation=msgs('geometry_msgs/msg/Vector3', x=t[0], y=t[1], z=t[2]),
                               rotation=msgs('geometry_msgs/msg/Quaternion',
                                             x=q[0], y=q[1], z=q[2], w=q[3])))


def transform_to_pose(msg) -> np.ndarray:
    """geometry_msgs/TransformStamped or Transform -> 4x4."""
    tf = getattr(msg, 'transform', msg)
    return _pose_matrix(tf.translation, tf.rotation)


# --------------------------------------------------------------------------- object lists
def objects_to_cloud(objects: np.ndarray, header, msgs: MessageFactory):
    """(N,) object records (data.objects.OBJECT_DTYPE) -> object-list PointCloud2."""
    return array_to_cloud(np.asarray(objects).reshape(-1), header, msgs)


def cloud_to_objects(msg) -> np.ndarray:
    """Object-list PointCloud2 (ours or any cloud with the box fields) -> OBJECT_DTYPE records."""
    return as_objects(cloud_to_array(msg, require=BOX_FIELDS))


# --------------------------------------------------------------------------- markers
def label_colors(labels: np.ndarray) -> np.ndarray:
    """(N,) label indices -> (N, 4) RGBA."""
    labels = np.asarray(labels, dtype=np.int64)
    return LABEL_COLORS[np.where((labels >= 0) & (labels < len(CLASSES)), labels, -1)]


def default_texts(objects: np.ndarray, with_score: bool) -> list[str]:
    names = [CLASSES[i] if 0 <= i < len(CLASSES) else 'other' for i in objects['label']]
    if not with_score:
        return names
    return [f'{n} {s:.2f}' for n, s in zip(names, objects['score'])]


def objects_to_markers(objects: np.ndarray, header, msgs: MessageFactory, *,
                       colors: np.ndarray | None = None, texts: Sequence[str] | None = None,
                       ns: str = 'boxes', line_width: float = 0.08, text_height: float = 0.8):
    """Object records -> MarkerArray for RViz: DELETEALL, then per box a LINE_LIST wireframe
    (pose = box centre and heading, points in the box frame) and a TEXT_VIEW_FACING label.

    Colours default to the label colour; ``colors`` (N, 4) RGBA overrides them (e.g. by trust or
    source). Texts default to the class name and, when scores are not all 1, the score.
    """
    objects = np.asarray(objects).reshape(-1)
    boxes = object_boxes(objects)
    n = len(boxes)
    colors = label_colors(objects['label']) if colors is None else np.asarray(colors, np.float64)
    if texts is None:
        texts = default_texts(objects, with_score=bool(np.any(objects['score'] != 1.0)))
    local = boxes.copy()
    local[:, :3] = 0.0
    local[:, 6] = 0.0
    edges = geo.box_corners(local)[:, BOX_EDGES.reshape(-1)]  # (N, 24, 3) in the box frame
    q = geo.wxyz_to_xyzw(geo.yaw_to_quat_wxyz(boxes[:, 6]))

    def rgba(c):
        return msgs('std_msgs/msg/ColorRGBA', r=float(c[0]), g=float(c[1]), b=float(c[2]),
                    a=float(c[3]))

    def pose(i, dz):
        return msgs('geometry_msgs/msg/Pose',
                    position=msgs('geometry_msgs/msg/Point', x=boxes[i, 0], y=boxes[i, 1],
                                  z=boxes[i, 2] + dz),
                    orientation=msgs('geometry_msgs/msg/Quaternion',
                                     x=q[i, 0], y=q[i, 1], z=q[i, 2], w=q[i, 3]))

    markers = [msgs('visualization_msgs/msg/Marker', header=header, action=MARKER_DELETEALL)]
    for i in range(n):
        markers.append(msgs(
            'visualization_msgs/msg/Marker', header=header, ns=ns, id=i, type=MARKER_LINE_LIST,
            action=MARKER_ADD, pose=pose(i, 0.0),
            scale=msgs('geometry_msgs/msg/Vector3', x=line_width, y=0.0, z=0.0),
            color=rgba(colors[i]),
            points=[msgs('geometry_msgs/msg/Point', x=p[0], y=p[1], z=p[2]) for p in edges[i].tolist()]))
    for i in range(n):
        markers.append(msgs(
            'visualization_msgs/msg/Marker', header=header, ns=ns + '/labels', id=i,
            type=MARKER_TEXT_VIEW_FACING, action=MARKER_ADD,
            pose=pose(i, boxes[i, 5] / 2 + text_height),
            scale=msgs('geometry_msgs/msg/Vector3', x=0.0, y=0.0, z=text_height),
            color=rgba(colors[i]), text=texts[i]))
    return msgs('visualization_msgs/msg/MarkerArray', markers=markers)


def boxes_to_markers(boxes: np.ndarray, header, msgs: MessageFactory, *,
                     labels: np.ndarray | None = None, scores: np.ndarray | None = None, **kwargs):
    """(N, 7) boxes [+ labels, scores] -> MarkerArray (see objects_to_markers)."""
    columns = {k: v for k, v in (('label', labels), ('score', scores)) if v is not None}
    return objects_to_markers(make_objects(boxes, **columns), header, msgs, **kwargs)


def markers_to_boxes(msg) -> np.ndarray:
    """MarkerArray -> (N, 7) boxes of its LINE_LIST markers, in marker order."""
    boxes = []
    for m in msg.markers:
        if int(m.type) != MARKER_LINE_LIST or int(m.action) != MARKER_ADD or not m.points:
            continue
        pts = np.array([[p.x, p.y, p.z] for p in m.points])
        size = pts.max(0) - pts.min(0)
        p, o = m.pose.position, m.pose.orientation
        yaw = geo.quat_wxyz_to_yaw(geo.xyzw_to_wxyz([o.x, o.y, o.z, o.w]))
        boxes.append([p.x, p.y, p.z, size[0], size[1], size[2], yaw])
    return np.array(boxes, dtype=np.float64).reshape(-1, geo.BOX_DIM)

