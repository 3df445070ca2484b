"""numpy <-> ROS message conversion, with rosbags messages and (where installed) rclpy messages."""
import array

import numpy as np
import pytest
from rosbags.typesys import Stores, get_types_from_msg, get_typestore

from coop_perception import geometry as geo
from coop_perception.data import pointcloud as pc
from coop_perception.data import ros_msgs
from coop_perception.data.objects import OBJECT_DTYPE, make_objects, object_boxes, object_velocities
from coop_perception.ros import convert as cv

TYPESTORE = get_typestore(Stores.ROS2_KILTED)


def _factories():
    out = [pytest.param(ros_msgs.RosbagsMessages(TYPESTORE), id='rosbags')]
    try:
        import rclpy  # noqa: F401
        out.append(pytest.param(cv.RclpyMessages(), id='rclpy'))
    except ImportError:
        pass
    return out


@pytest.fixture(params=_factories())
def msgs(request):
    return request.param


def _as_data(msgs, data: np.ndarray):
    """A uint8 buffer as each library stores PointCloud2.data."""
    return data if isinstance(msgs, ros_msgs.RosbagsMessages) else array.array('B', data.tobytes())


def _header(msgs, t_ns=1_700_000_000_123_456_789, frame='agent1/lidar'):
    return ros_msgs.make_header(msgs, t_ns, frame)


# A layout with everything a generic decoder must handle: mixed types, a gap, a count > 1 field,
# and trailing padding.
MIXED = np.dtype({'names': ['x', 'y', 'z', 'ring', 'feat', 'intensity'],
                  'formats': ['<f4', '<f4', '<f4', '<u2', ('<i1', (3,)), '<f8'],
                  'offsets': [0, 4, 8, 12, 16, 24], 'itemsize': 40})


def _mixed_points(n=7, dtype=MIXED):
    rng = np.random.default_rng(0)
    pts = np.zeros(n, dtype=dtype)
    for name in ('x', 'y', 'z'):
        pts[name] = rng.normal(size=n).astype(np.float32)
    pts['ring'] = rng.integers(0, 64, n)
    pts['feat'] = rng.integers(-128, 128, (n, 3))
    pts['intensity'] = rng.random(n)
    return pts


# --------------------------------------------------------------------------- PointCloud2
def test_mixed_layout_round_trip(msgs):
    pts = _mixed_points()
    msg = ros_msgs.array_to_cloud(pts, _header(msgs), msgs)
    assert (msg.height, msg.width, msg.point_step, msg.row_step) == (1, 7, 40, 280)
    assert [(f.name, f.offset, f.datatype, f.count) for f in msg.fields] == [
        ('x', 0, pc.FLOAT32, 1), ('y', 4, pc.FLOAT32, 1), ('z', 8, pc.FLOAT32, 1),
        ('ring', 12, pc.UINT16, 1), ('feat', 16, pc.INT8, 3), ('intensity', 24, pc.FLOAT64, 1)]
    back = ros_msgs.cloud_to_array(msg)
    assert back.dtype == MIXED
    assert back.tobytes() == pts.tobytes()
    assert ros_msgs.stamp_ns(msg.header.stamp) == 1_700_000_000_123_456_789


def test_big_endian_round_trip(msgs):
    pts = _mixed_points().astype(MIXED.newbyteorder('>'))
    msg = ros_msgs.array_to_cloud(pts, _header(msgs), msgs)
    assert msg.is_bigendian
    back = ros_msgs.cloud_to_array(msg)
    for name in MIXED.names:
        np.testing.assert_array_equal(back[name], pts[name])
    # The flag, not the machine, decides how bytes read: the same bytes flagged little-endian
    # decode to different numbers.
    msg.is_bigendian = False
    assert not np.array_equal(ros_msgs.cloud_to_array(msg)['x'], pts['x'])


def test_organised_cloud_with_row_padding(msgs):
    pts = _mixed_points(12).reshape(3, 4)
    msg = ros_msgs.array_to_cloud(pts, _header(msgs), msgs)
    # Re-pack with 8 bytes of padding after every row.
    rows = np.frombuffer(pts.tobytes(), np.uint8).reshape(3, 160)
    padded = np.concatenate([rows, np.full((3, 8), 0xAB, np.uint8)], 1).reshape(-1)
    msg.row_step, msg.data = 168, _as_data(msgs, padded)
    back = ros_msgs.cloud_to_array(msg, organized=True)
    assert back.shape == (3, 4)
    for name in MIXED.names:
        np.testing.assert_array_equal(back[name], pts[name])
    np.testing.assert_array_equal(ros_msgs.cloud_to_array(msg)['feat'], pts['feat'].reshape(12, 3))


def test_points_matrix_round_trip_is_exact(msgs):
    rng = np.random.default_rng(1)
    pts = rng.normal(scale=50, size=(5000, 5)).astype(np.float32)
    dtype = np.dtype([(n, '<f4') for n in ('x', 'y', 'z', 'intensity', 'ring')])
    msg = ros_msgs.points_to_cloud(pts, dtype, _header(msgs), msgs)
    assert msg.point_step == 20 and len(msg.data) == 5000 * 20
    np.testing.assert_array_equal(ros_msgs.cloud_to_points(msg, dtype.names), pts)


def test_empty_cloud(msgs):
    msg = ros_msgs.array_to_cloud(np.zeros(0, MIXED), _header(msgs), msgs)
    assert msg.width == 0 and len(msg.data) == 0
    assert ros_msgs.cloud_to_array(msg).shape == (0,)


@pytest.mark.parametrize('mutate, reason', [
    (lambda m: setattr(m, 'fields', [f for f in m.fields if f.name != 'z']), 'missing field(s) z'),
    (lambda m: setattr(m, 'point_step', 30), 'does not fit in point_step 30'),
    (lambda m: setattr(m, 'row_step', m.row_step - 1), 'row_step 279 < width 7 x point_step 40'),
    (lambda m: setattr(m, 'width', 8), 'row_step 280 < width 8'),
    (lambda m: (setattr(m, 'width', 6), setattr(m, 'row_step', 240)), 'data has 280 bytes, expected'),
    (lambda m: setattr(m, 'height', 2), 'expected height 2 x row_step 280 = 560'),
    (lambda m: setattr(m.fields[3], 'datatype', 42), "field 'ring' has unknown datatype 42"),
    (lambda m: setattr(m.fields[1], 'offset', 2), "fields 'x' and 'y' overlap"),
    (lambda m: setattr(m.fields[3], 'name', 'x'), "field 'x' appears twice"),
])
def test_inconsistent_clouds_are_rejected_with_the_reason(msgs, mutate, reason):
    msg = ros_msgs.array_to_cloud(_mixed_points(), _header(msgs), msgs)
    mutate(msg)
    with pytest.raises(ros_msgs.PointCloudError, match=reason.replace('(', r'\(').replace(')', r'\)')):
        ros_msgs.cloud_to_array(msg)


def test_truncated_data_is_rejected(msgs):
    pts = _mixed_points()
    msg = ros_msgs.array_to_cloud(pts, _header(msgs), msgs)
    msg.data = _as_data(msgs, np.frombuffer(pts.tobytes()[:-3], np.uint8))
    with pytest.raises(ros_msgs.PointCloudError, match='data has 277 bytes'):
        ros_msgs.cloud_to_array(msg)


def test_a_coordinate_with_several_values_a_point_is_rejected():
    # found by `bench fuzz` (10,000 scans): a PointField count of 2 on x reached the detector
    points = np.zeros(3, np.dtype([('x', '<f4', (2,)), ('y', '<f4'), ('z', '<f4')]))
    with pytest.raises(pc.PointCloudError, match="field 'x' holds 2 values a point"):
        pc.field_matrix(points, ('x', 'y', 'z'))


def test_dtype_field_mapping_rejects_non_pointfield_types():
    with pytest.raises(pc.PointCloudError, match='not a PointField type'):
        pc.dtype_to_fields(np.dtype([('x', '<f4'), ('c', '<c8')]))
    with pytest.raises(pc.PointCloudError, match='mix byte orders'):
        pc.dtype_to_fields(np.dtype([('x', '<f4'), ('y', '>f4')]))


# --------------------------------------------------------------------------- poses
def _pose(yaw=0.7, t=(123.25, -45.5, 1.75), pitch=0.05):
    T = geo.make_pose(np.array(t), yaw=yaw)
    c, s = np.cos(pitch), np.sin(pitch)
    T[:3, :3] = T[:3, :3] @ np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return T


def test_odometry_round_trip(msgs):
    T = _pose()
    msg = ros_msgs.pose_to_odometry(T, _header(msgs, frame='map'), 'agent1/lidar', msgs,
                                    linear_velocity=(3.0, 0.0, 0.0))
    assert msg.header.frame_id == 'map' and msg.child_frame_id == 'agent1/lidar'
    assert msg.twist.twist.linear.x == 3.0
    np.testing.assert_allclose(ros_msgs.odometry_to_pose(msg), T, atol=1e-12)
    assert msg.pose.pose.orientation.w >= 0


def test_transform_round_trip(msgs):
    T = _pose(yaw=-2.5)
    msg = ros_msgs.pose_to_transform(T, _header(msgs, frame='agent1/base_link'), 'agent1/lidar', msgs)
    assert msg.header.frame_id == 'agent1/base_link' and msg.child_frame_id == 'agent1/lidar'
    np.testing.assert_allclose(ros_msgs.transform_to_pose(msg), T, atol=1e-12)


# --------------------------------------------------------------------------- object lists, markers
def _objects(n=6):
    rng = np.random.default_rng(2)
    boxes = np.column_stack([rng.uniform(-300, 300, (n, 2)), rng.uniform(0, 2, n),
                             rng.uniform(1, 5, (n, 3)), rng.uniform(-np.pi, np.pi, n)])
    return make_objects(boxes, rng.normal(size=(n, 2)), label=np.arange(n) % 5 - 1,
                        score=rng.random(n).astype(np.float32), id=np.arange(n) + 10)


def test_object_list_cloud_is_exact(msgs):
    objects = _objects()
    msg = ros_msgs.objects_to_cloud(objects, _header(msgs, frame='map'), msgs)
    assert [f.name for f in msg.fields] == list(OBJECT_DTYPE.names)
    assert msg.width == len(objects)
    back = ros_msgs.cloud_to_objects(msg)
    assert back.dtype == OBJECT_DTYPE
    assert back.tobytes() == objects.tobytes()
    np.testing.assert_array_equal(object_boxes(back), object_boxes(objects))
    np.testing.assert_array_equal(object_velocities(back), object_velocities(objects))


def test_foreign_object_cloud_gets_defaults(msgs):
    boxes = np.zeros(2, dtype=[(n, '<f4') for n in ('x', 'y', 'z', 'l', 'w', 'h', 'yaw')] + [('score', '<f4')])
    boxes['l'], boxes['score'] = 4.0, 0.5
    back = ros_msgs.cloud_to_objects(ros_msgs.array_to_cloud(boxes, _header(msgs), msgs))
    assert back.dtype == OBJECT_DTYPE
    assert list(back['l']) == [4.0, 4.0] and list(back['score']) == [0.5, 0.5]
    assert list(back['label']) == [-1, -1] and list(back['trust']) == [1.0, 1.0]
    missing_yaw = ros_msgs.array_to_cloud(np.zeros(1, [('x', '<f4'), ('y', '<f4'), ('z', '<f4')]),
                                          _header(msgs), msgs)
    with pytest.raises(ros_msgs.PointCloudError, match='missing field'):
        ros_msgs.cloud_to_objects(missing_yaw)


def test_markers(msgs):
    objects = _objects()
    msg = ros_msgs.objects_to_markers(objects, _header(msgs, frame='map'), msgs, ns='gt')
    first, rest = msg.markers[0], msg.markers[1:]
    assert first.action == ros_msgs.MARKER_DELETEALL
    lines = [m for m in rest if m.type == ros_msgs.MARKER_LINE_LIST]
    texts = [m for m in rest if m.type == ros_msgs.MARKER_TEXT_VIEW_FACING]
    assert len(lines) == len(texts) == len(objects)
    assert all(len(m.points) == 24 and m.color.a == 1.0 and m.scale.x > 0 for m in lines)
    assert len({(m.ns, m.id) for m in rest}) == len(rest)
    assert texts[1].text.startswith('car ') and texts[0].text.startswith('other ')
    assert all(m.header.frame_id == 'map' for m in msg.markers)
    # Colours follow the label unless given.
    np.testing.assert_allclose([lines[1].color.r, lines[1].color.g, lines[1].color.b],
                               ros_msgs.LABEL_COLORS[0, :3])
    boxes = ros_msgs.markers_to_boxes(msg)
    expected = object_boxes(objects)
    np.testing.assert_allclose(boxes[:, :6], expected[:, :6], atol=1e-9)
    np.testing.assert_allclose(geo.wrap_angle(boxes[:, 6] - expected[:, 6]), 0, atol=1e-9)
    custom = ros_msgs.boxes_to_markers(expected, _header(msgs), msgs, colors=np.tile([1, 0, 1, 0.5], (6, 1)),
                                       texts=[str(i) for i in range(6)])
    assert custom.markers[1].color.b == 1.0 and custom.markers[7].text == '0'


def test_marker_corners_match_geometry(msgs):
    box = np.array([[10.0, 5.0, 1.0, 4.0, 2.0, 1.5, 0.3]])
    m = ros_msgs.boxes_to_markers(box, _header(msgs), msgs).markers[1]
    T = ros_msgs.pose_msg_to_matrix(m.pose)
    pts = np.array([[p.x, p.y, p.z] for p in m.points]) @ T[:3, :3].T + T[:3, 3]
    corners = geo.box_corners(box)[0]
    assert all(np.min(np.linalg.norm(corners - p, axis=1)) < 1e-9 for p in pts)
    assert {tuple(np.round(p, 9)) for p in pts} == {tuple(np.round(c, 9)) for c in corners}


VISION_MSGS = {
    'vision_msgs/msg/ObjectHypothesis': 'string class_id\nfloat64 score',
    'vision_msgs/msg/ObjectHypothesisWithPose': ('vision_msgs/ObjectHypothesis hypothesis\n'
                                                 'geometry_msgs/PoseWithCovariance pose'),
    'vision_msgs/msg/BoundingBox3D': 'geometry_msgs/Pose center\ngeometry_msgs/Vector3 size',
    'vision_msgs/msg/Detection3D': ('std_msgs/Header header\nvision_msgs/ObjectHypothesisWithPose[] results\n'
                                    'vision_msgs/BoundingBox3D bbox\nstring id'),
    'vision_msgs/msg/Detection3DArray': 'std_msgs/Header header\nvision_msgs/Detection3D[] detections',
}


def test_detection3d_array_with_registered_vision_msgs():
    store = get_typestore(Stores.ROS2_KILTED)
    assert not ros_msgs.RosbagsMessages(store).has(cv.DETECTION3D_ARRAY)
    for name, text in VISION_MSGS.items():
        store.register(get_types_from_msg(text, name))
    msgs = ros_msgs.RosbagsMessages(store)
    assert msgs.has(cv.DETECTION3D_ARRAY)
    objects = _objects()
    msg = cv.objects_to_detection3d(objects, _header(msgs, frame='map'), msgs)
    assert msg.detections[1].results[0].hypothesis.class_id == 'car'
    raw = store.serialize_cdr(msg, cv.DETECTION3D_ARRAY)
    back = cv.detection3d_to_objects(store.deserialize_cdr(raw, cv.DETECTION3D_ARRAY))
    np.testing.assert_allclose(object_boxes(back)[:, :6], object_boxes(objects)[:, :6], atol=1e-9)
    np.testing.assert_array_equal(back['label'], objects['label'])
    np.testing.assert_array_equal(back['id'], objects['id'])
    np.testing.assert_allclose(back['score'], objects['score'], rtol=1e-6)


# --------------------------------------------------------------------------- both libraries
def test_rosbags_and_rclpy_messages_share_the_wire_format():
    pytest.importorskip('rclpy')
    from rclpy.serialization import deserialize_message, serialize_message

    rb, rc = ros_msgs.RosbagsMessages(TYPESTORE), cv.RclpyMessages()
    pts = _mixed_points(50)
    raw = TYPESTORE.serialize_cdr(ros_msgs.array_to_cloud(pts, _header(rb), rb), 'sensor_msgs/msg/PointCloud2')
    ros_msg = deserialize_message(bytes(raw), rc.get_class('sensor_msgs/msg/PointCloud2'))
    assert ros_msgs.cloud_to_array(ros_msg).tobytes() == pts.tobytes()
    markers = ros_msgs.objects_to_markers(_objects(), _header(rc), rc)
    back = TYPESTORE.deserialize_cdr(serialize_message(markers), 'visualization_msgs/msg/MarkerArray')
    np.testing.assert_array_equal(ros_msgs.markers_to_boxes(back), ros_msgs.markers_to_boxes(markers))


def test_rclpy_factory_stores_sequences_as_arrays():
    pytest.importorskip('rclpy')
    msg = ros_msgs.array_to_cloud(_mixed_points(), _header(cv.RclpyMessages()), cv.RclpyMessages())
    assert isinstance(msg.data, array.array) and msg.data.typecode == 'B'
    assert not cv.RclpyMessages().has('no_such_msgs/msg/Nothing')


@pytest.mark.parametrize('position,quaternion,reason', [
    ((1e308, 0.0, 0.0), (0, 0, 0, 1), ros_msgs.PoseError.FAR_AWAY),      # once put boxes hundreds of km away
    ((0.0, -1e7 - 1, 0.0), (0, 0, 0, 1), ros_msgs.PoseError.FAR_AWAY),
    ((float('nan'), 0.0, 0.0), (0, 0, 0, 1), ros_msgs.PoseError.NON_FINITE),
    ((0.0, 0.0, 0.0), (0, 0, float('inf'), 1), ros_msgs.PoseError.NON_FINITE),
    ((0.0, 0.0, 0.0), (0, 0, 0, 0), ros_msgs.PoseError.NOT_UNIT),
    ((0.0, 0.0, 0.0), (0, 0, 0, 2), ros_msgs.PoseError.NOT_UNIT),
])
def test_odometry_beyond_physical_bounds_is_rejected_with_a_reason(msgs, position, quaternion, reason):
    odom = ros_msgs.pose_to_odometry(np.eye(4), _header(msgs), 'agent1/lidar', msgs)
    p, q = odom.pose.pose.position, odom.pose.pose.orientation
    p.x, p.y, p.z = position
    q.x, q.y, q.z, q.w = (float(v) for v in quaternion)
    with pytest.raises(ros_msgs.PoseError) as info:
        ros_msgs.odometry_to_pose(odom)
    assert info.value.reason == reason and isinstance(info.value, ValueError)


def test_poses_within_bounds_and_float32_quaternions_pass(msgs):
    T = geo.make_pose([5e6, -3e6, 40.0], yaw=0.3)
    odom = ros_msgs.pose_to_odometry(T, _header(msgs), 'agent1/lidar', msgs)
    q = odom.pose.pose.orientation
    q.z, q.w = float(np.float32(q.z)) * 1.001, float(np.float32(q.w))
    assert np.allclose(ros_msgs.odometry_to_pose(odom), T, atol=1e-2)


def test_only_plausible_boxes_may_be_published():
    from collections import Counter
    boxes = np.tile([1.0, 2.0, -1.0, 4.5, 1.9, 1.6, 0.3], (7, 1))
    boxes[1, 0] = np.nan                   # non-finite
    boxes[2, 1] = 3e5                      # hundreds of km away
    boxes[3, 2] = 50.0                     # far above the sensor
    boxes[4, 3] = 0.0                      # no size
    vel = np.zeros((7, 2))
    vel[5, 0] = 1e6
    scores = np.full(7, 0.5)
    scores[6] = np.nan
    dropped = Counter()
    keep = cv.publishable(make_objects(boxes, vel, score=scores), (-50.0, -50.0, 50.0, 50.0), dropped)
    assert keep.tolist() == [True] + [False] * 6
    assert dropped == {'non_finite': 2, 'out_of_range': 2, 'bad_size': 1, 'bad_velocity': 1}
