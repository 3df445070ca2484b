"""The nodes in this process with real rclpy (own ROS domain): outputs, bad input, sim time."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

rclpy = pytest.importorskip('rclpy')

from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from ros_fixtures import valid_scan, write_tiny_models  # noqa: E402

from coop_perception.bev_grid import BevGrid  # noqa: E402
from coop_perception.data import ros_msgs  # noqa: E402
from coop_perception.data.bag import LIDAR_DTYPE  # noqa: E402
from coop_perception.detection.checkpoint import load_detector  # noqa: E402
from coop_perception.fusion import codec  # noqa: E402
from coop_perception.fusion.ego_map import encode_ego_map  # noqa: E402
from coop_perception.fusion.pipeline import collaborator_message  # noqa: E402
from coop_perception.geometry import make_pose  # noqa: E402
from coop_perception.ros import convert as cv  # noqa: E402
from coop_perception.ros.env import use_local_discovery  # noqa: E402
from coop_perception.ros.lidar_detector import LidarDetectorNode  # noqa: E402
from coop_perception.ros.node import RELIABLE_QOS, InputGuard  # noqa: E402
from coop_perception.ros.qos import CLOCK_QOS  # noqa: E402
from coop_perception.ros.trust_fusion import TrustFusionNode  # noqa: E402
from coop_perception.ros.v2x_channel import V2XChannelNode  # noqa: E402

DOMAIN_ID = 61
MSGS = cv.RclpyMessages()
CLOUD, ODOM, STRING = 'sensor_msgs/msg/PointCloud2', 'nav_msgs/msg/Odometry', 'std_msgs/msg/String'
S = 1_000_000_000
CELLS = {'score_threshold': 0.0, 'format': 'cells'}   # what the max fusion of these tests fuses


@pytest.fixture(scope='module')
def models(tmp_path_factory):
    return write_tiny_models(tmp_path_factory.mktemp('models'))


@pytest.fixture()
def ros():
    """A context on the test domain with one executor; ``ros.add(node)``; ``ros.node`` talks."""
    use_local_discovery()
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=DOMAIN_ID)
    executor = SingleThreadedExecutor(context=context)

    class Ros:
        def __init__(self):
            self.context, self.nodes = context, []
            self.node = self.add(rclpy.create_node('test_peer', context=context))

        def add(self, node):
            self.nodes.append(node)
            executor.add_node(node)
            return node

        def spin(self, until=lambda: False, timeout_s=5.0):
            deadline = time.monotonic() + timeout_s
            while not until() and time.monotonic() < deadline:
                executor.spin_once(timeout_sec=0.01)
            return until()

        def publisher(self, topic, msgtype, qos=RELIABLE_QOS):
            return self.node.create_publisher(MSGS.get_class(msgtype), topic, qos)

        def collect(self, topic, msgtype=CLOUD):
            got = []
            self.node.create_subscription(MSGS.get_class(msgtype), topic, got.append, RELIABLE_QOS)
            return got

        def connect(self, *publishers):
            """Wait until every publisher has a subscriber."""
            assert self.spin(lambda: all(p.get_subscription_count() for p in publishers), 10)

    ros = Ros()
    yield ros
    executor.shutdown()
    for node in ros.nodes:
        node.destroy_node()
    rclpy.try_shutdown(context=context)


def params(**values):
    return [Parameter(k, value=v) for k, v in values.items()]


def scan_msg(points, stamp, frame='agent1/lidar'):
    pts = np.concatenate([points, np.zeros((len(points), 1), np.float32)], 1)
    return ros_msgs.points_to_cloud(pts, LIDAR_DTYPE, ros_msgs.make_header(MSGS, stamp, frame), MSGS)


def odom_msg(agent, stamp):
    return ros_msgs.pose_to_odometry(make_pose([float(agent), 0.0, 1.8]),
                                     ros_msgs.make_header(MSGS, stamp, 'map'), f'agent{agent}/lidar', MSGS)


def last_status(statuses):
    return json.loads(statuses[-1].data) if statuses else {}


# --------------------------------------------------------------------------- lidar_detector
def test_detector_outputs_carry_the_scan_header_and_bad_scans_are_counted(ros, models):
    node = ros.add(LidarDetectorNode(context=ros.context, namespace='agent2', parameter_overrides=params(
        detector_config=models['detector_config'], detector_weights=models['detector_weights'],
        publish_bev=True, **{'roi.score_threshold': 0.0}, status_period_s=0.1)))
    outputs = {t: ros.collect(f'/agent2/coop/{t}', STRING if t == 'detector_status' else
                              ('visualization_msgs/msg/MarkerArray' if t == 'detections' else CLOUD))
               for t in ('features', 'objects', 'detections', 'bev', 'detector_status')}
    lidar = ros.publisher('/agent2/lidar', CLOUD)
    ros.connect(lidar)
    now = ros.node.get_clock().now().nanoseconds
    lidar.publish(scan_msg(valid_scan(0), now, 'agent2/lidar'))
    assert ros.spin(lambda: all(outputs[t] for t in ('features', 'objects', 'detections', 'bev')))
    for topic in ('features', 'objects', 'bev'):
        header = outputs[topic][0].header
        assert (ros_msgs.stamp_ns(header.stamp), header.frame_id) == (now, 'agent2/lidar'), topic
    assert ros_msgs.stamp_ns(outputs['detections'][0].markers[0].header.stamp) == now
    features = codec.decode(**cv.cloud_layout(outputs['features'][0]), grid=node.detector.grid(), channels=16,
                            agent_id=2, stamp_ns=now)
    assert features.num_cells > 0
    objects = ros_msgs.cloud_to_objects(outputs['objects'][0])
    assert len(objects) and set(objects['source']) == {2}

    truncated = scan_msg(valid_scan(1), now)
    truncated.data = truncated.data[:-7]
    no_z = ros_msgs.points_to_cloud(valid_scan(1)[:, :2], np.dtype([('x', '<f4'), ('y', '<f4')]),
                                    ros_msgs.make_header(MSGS, now, 'agent2/lidar'), MSGS)
    nan = valid_scan(2)
    nan[::10] = np.nan
    for msg in (truncated, no_z, scan_msg(valid_scan(3), now + 60 * S, 'agent2/lidar'),
                scan_msg(nan, now + S // 10, 'agent2/lidar')):
        lidar.publish(msg)
        ros.spin(timeout_s=0.3)
    assert ros.spin(lambda: len(outputs['objects']) == 2 and last_status(outputs['detector_status'])
                    .get('rejected', {}).get('nonfinite_points') == 1)
    status = last_status(outputs['detector_status'])
    # no odometry is published here, so both used scans share the detector's own velocities
    assert status['rejected'] == {'malformed_scan': 2, 'future_stamp': 1, 'nonfinite_points': 1,
                                  'no_pose_for_velocity': 2}
    assert status['scans'] == 2 and status['agent'] == 2


def test_one_stale_odometry_keeps_the_detectors_pose_history(ros, models):
    node = ros.add(LidarDetectorNode(context=ros.context, namespace='agent2', parameter_overrides=params(
        detector_config=models['detector_config'], detector_weights=models['detector_weights'],
        status_period_s=0.1)))
    statuses, features = ros.collect('/agent2/coop/detector_status', STRING), ros.collect('/agent2/coop/features')
    odom, lidar = ros.publisher('/agent2/odom', ODOM), ros.publisher('/agent2/lidar', CLOUD)
    ros.connect(odom, lidar)
    now = ros.node.get_clock().now().nanoseconds - S
    for i in range(3):
        odom.publish(odom_msg(2, now + i * S // 10))
    assert ros.spin(lambda: len(node.poses) == 3)
    odom.publish(odom_msg(2, now - 5 * S))    # one stray message from 5 s ago (late, replayed or forged)
    assert ros.spin(lambda: last_status(statuses).get('rejected', {}).get('stale_odometry') == 1)
    assert len(node.poses) == 3
    lidar.publish(scan_msg(valid_scan(0), now + 2 * S // 10, 'agent2/lidar'))
    assert ros.spin(lambda: features and last_status(statuses).get('scans') == 1)
    assert 'no_pose_for_velocity' not in last_status(statuses)['rejected']


def test_input_guard_counts_everything_and_warns_once_per_period():
    class Logger:
        def __init__(self):
            self.lines = []

        def warning(self, text):
            self.lines.append(text)

    logger = Logger()
    guard = InputGuard(logger, period_s=60.0)
    for _ in range(5):
        guard.reject('stale', 'old')
    guard.reject('future_stamp', 'new')
    guard.guarded(lambda msg: 1 / 0)(None)
    assert guard.counts == {'stale': 5, 'future_stamp': 1, 'error:ZeroDivisionError': 1}
    assert len(logger.lines) == 3 and logger.lines[0].startswith('stale: old (1 so far')


# --------------------------------------------------------------------------- v2x_channel
def test_channel_delays_in_ros_time_and_drops_messages_in_flight_when_time_jumps_back(ros):
    ros.add(V2XChannelNode(context=ros.context, namespace='agent1', parameter_overrides=params(
        use_sim_time=True, agents=[2], **{'channel.model': 'fixed', 'channel.mean_latency_ms': 200.0},
        status_period_s=0.1)))
    clock = ros.publisher('/clock', 'rosgraph_msgs/msg/Clock', CLOCK_QOS)
    features, odom = ros.publisher('/agent2/coop/features', CLOUD), ros.publisher('/agent2/odom', ODOM)
    got = ros.collect('/agent1/v2x/features')
    odoms = ros.collect('/agent1/v2x/odom', ODOM)
    statuses = ros.collect('/agent1/v2x/status', STRING)
    ros.connect(clock, features, odom)

    def tick(t_ns, wait_s=0.15):
        clock.publish(cv.make_clock(MSGS, t_ns))
        ros.spin(timeout_s=wait_s)

    def message(stamp, frame='agent2/lidar'):
        return cv.buffer_to_cloud(*codec.encode(_feature_message(stamp)), ros_msgs.make_header(MSGS, stamp, frame),
                                  MSGS)

    t0 = 100 * S
    tick(t0)
    for dt in (-S // 10, 0, S // 10):
        odom.publish(odom_msg(2, t0 + dt))
    features.publish(message(t0))
    features.publish(message(t0, frame='agent3/lidar'))          # not the sender of this topic
    tick(t0 + S // 10)
    tick(t0 + S * 15 // 100)
    assert not got                                               # due at t0 + 200 ms
    tick(t0 + S // 4)
    assert ros.spin(lambda: got)
    assert [ros_msgs.stamp_ns(m.header.stamp) for m in got] == [t0]
    assert [ros_msgs.stamp_ns(m.header.stamp) for m in odoms] == [t0]  # the pose at the message's stamp

    features.publish(message(t0 + S // 10))                      # due at t0 + 300 ms
    tick(t0 + S * 26 // 100)
    tick(t0 - 5 * S)                                             # the bag looped
    tick(t0 + S)
    assert ros.spin(lambda: last_status(statuses).get('time_jumps') == 1)
    status = last_status(statuses)
    assert len(got) == 1 and status['in_flight'] == 0
    assert status['links']['2']['dropped_on_jump'] == 1 and status['links']['2']['delivered'] == 1
    assert status['rejected'] == {'agent_mismatch': 1}
    assert status['links']['2']['latency_ms']['p50'] == 200.0


def test_channel_keeps_a_senders_poses_through_one_stale_odometry_message(ros):
    node = ros.add(V2XChannelNode(context=ros.context, namespace='agent1', parameter_overrides=params(agents=[2])))
    link, t0 = node.links[2], 100 * S
    for dt in (0, S // 10, S // 5):
        node.on_odom(2, odom_msg(2, t0 + dt))
    node.on_odom(2, odom_msg(2, t0 - 50 * S))           # one stray old message: dropped, counted
    assert link.odom_stamps == [t0, t0 + S // 10, t0 + S // 5]
    assert node.guard.counts['stale_odometry'] == 1
    t1 = t0 - 5 * S                                       # the sender's time restarted: three confirm it
    for dt in (0, S // 10, S // 5):
        node.on_odom(2, odom_msg(2, t1 + dt))
    assert link.odom_stamps == [t1, t1 + S // 10, t1 + S // 5]
    node.on_odom(2, odom_msg(2, t1 + S * 3 // 10))       # and the new time goes on
    assert link.odom_stamps[-1] == t1 + S * 3 // 10 and node.guard.counts['stale_odometry'] == 3


def _feature_message(stamp, agent=2, cells=3):
    """A valid message of ``cells`` cells in the tiny detector's grid."""
    grid = BevGrid(origin=np.array([-12.8, -12.8]), cell_size=0.8, shape=(32, 32))
    rng = np.random.default_rng(stamp % 1000)
    return codec.FeatureMessage(
        agent_id=agent, stamp_ns=stamp, grid=grid,
        cells=np.array([[0.4 + 0.8 * i, 0.4] for i in range(cells)], np.float32),
        features=rng.integers(-127, 127, (cells, 16)).astype(np.int8), scale=np.full(cells, 0.01, np.float32),
        confidence=np.full(cells, 0.5, np.float32), uncertainty=np.full((cells, 4), 0.1, np.float32),
        velocity=np.zeros((cells, 2), np.float32), roi=np.zeros(cells, np.int16), score=np.full(cells, 0.6, np.float32))


# --------------------------------------------------------------------------- trust_fusion
def test_fusion_uses_collaborators_rejects_bad_input_and_resets_when_time_jumps_back(ros, models):
    node = ros.add(TrustFusionNode(context=ros.context, namespace='agent1', parameter_overrides=params(
        agents=[2], method='max', status_period_s=0.1, detector_config=models['detector_config'],
        detector_weights=models['detector_weights'], ego_pose_wait_s=5.0)))
    detector = load_detector(models['detector_weights'], models['detector_config'])
    pubs = {t: ros.publisher(f'/agent1/{t}', ODOM if t.endswith('odom') else CLOUD)
            for t in ('odom', 'coop/bev', 'v2x/features', 'v2x/odom')}
    objects = ros.collect('/coop/objects')
    markers = ros.collect('/coop/detections', 'visualization_msgs/msg/MarkerArray')
    statuses = ros.collect('/coop/status', STRING)
    ros.connect(*pubs.values())

    def frame(stamp, fused=True):
        pubs['odom'].publish(odom_msg(1, stamp))
        ros.spin(timeout_s=0.05)
        det = detector.detect(valid_scan(int(stamp // S)))
        pubs['coop/bev'].publish(cv.buffer_to_cloud(*encode_ego_map(det, 1, stamp),
                                                    ros_msgs.make_header(MSGS, stamp, 'agent1/lidar'), MSGS))
        n = len(objects)
        assert ros.spin(lambda: len(objects) > n, timeout_s=5.0 if fused else 0.3) == fused
        return objects[-1]

    def collaborator(stamp, agent=2, frame_id=None, message=None, with_pose=True):
        if with_pose:
            pubs['v2x/odom'].publish(odom_msg(agent, stamp))
        msg = message or collaborator_message(detector.detect(valid_scan(7)), agent, stamp, CELLS)
        pubs['v2x/features'].publish(cv.buffer_to_cloud(
            *codec.encode(msg), ros_msgs.make_header(MSGS, stamp, frame_id or f'agent{agent}/lidar'), MSGS))
        ros.spin(timeout_s=0.1)

    t = 50 * S
    early = cv.buffer_to_cloud(*encode_ego_map(detector.detect(valid_scan(4)), 1, t - S // 5),
                               ros_msgs.make_header(MSGS, t - S // 5, 'agent1/lidar'), MSGS)
    pubs['coop/bev'].publish(early)                                 # the map overtakes its scan's pose
    ros.spin(timeout_s=0.3)
    assert not objects
    pubs['odom'].publish(odom_msg(1, t - S // 5))
    assert ros.spin(lambda: objects) and ros_msgs.stamp_ns(objects[0].header.stamp) == t - S // 5
    frame(t - S // 10)
    collaborator(t - S // 20)
    out = frame(t)
    assert (ros_msgs.stamp_ns(out.header.stamp), out.header.frame_id) == (t, 'agent1/lidar')
    assert ros.spin(lambda: len(markers) == 3) and ros_msgs.stamp_ns(markers[-1].markers[0].header.stamp) == t
    assert ros.spin(lambda: last_status(statuses).get('agents', {}).get('2', {}).get('used_age_s') is not None)
    assert last_status(statuses)['agents']['2']['used_age_s'] == pytest.approx(0.05)
    assert ros_msgs.cloud_to_objects(out)['source'].max() <= 2

    collaborator(t, agent=3, with_pose=False)                       # not in agents
    collaborator(t, frame_id='velodyne', with_pose=False)           # no agent in the frame
    collaborator(t, agent=1, with_pose=False)                       # the ego itself
    collaborator(t + 10 * S, with_pose=False)                       # far ahead of the ego
    collaborator(t - 5 * S, with_pose=False)                        # older than max_age
    nan_scale, off_grid = _feature_message(t), _feature_message(t)
    nan_scale.scale[0] = np.nan
    off_grid.cells[:] = 99.0
    collaborator(t, message=nan_scale, with_pose=False)
    collaborator(t, message=off_grid, with_pose=False)
    nan_position, zero_rotation = odom_msg(2, t), odom_msg(2, t)
    nan_position.pose.pose.position.x = float('nan')
    zero_rotation.pose.pose.orientation.w = 0.0
    pubs['v2x/odom'].publish(nan_position)
    pubs['v2x/odom'].publish(zero_rotation)
    truncated = cv.buffer_to_cloud(*encode_ego_map(detector.detect(valid_scan(3)), 1, t + S // 10),
                                   ros_msgs.make_header(MSGS, t + S // 10, 'agent1/lidar'), MSGS)
    truncated.data = truncated.data[:-5]
    pubs['coop/bev'].publish(truncated)
    ros.spin(timeout_s=0.3)

    # The bag starts over: the ego's time goes back and stays back for time_jump_confirm maps
    # (one stale map alone is dropped: test_faults.py), every buffer empties, fusion goes on.
    frame(2 * S, fused=False)
    frame(2 * S + S // 10, fused=False)
    out = frame(2 * S + S // 5)
    assert ros_msgs.stamp_ns(out.header.stamp) == 2 * S + S // 5
    assert 2 not in node.coop.poses and len(node.coop.poses[1]) == 3
    collaborator(t)                                                 # still in flight from the last loop
    frame(2 * S + 3 * S // 10)
    assert ros.spin(lambda: last_status(statuses).get('resets') == 1 and last_status(statuses)['fused'] == 5)
    status = last_status(statuses)
    assert status['rejected'] == {'unknown_agent': 3, 'future_stamp': 3, 'stale': 1, 'bad_pose': 2,
                                  'bad_features:bad_scale': 1, 'bad_features:out_of_grid': 1,
                                  'bad_ego_map:layout': 1}
    assert status['frames'] == 5 and status['latency_ms']['n'] == 5


@pytest.mark.parametrize('node, args, error', [
    ('lidar_detector', ['-p', 'mc_passes:=99'], 'error: /agent1/lidar_detector:mc_passes: '),
    ('trust_fusion', ['-p', 'detector_weights:=/missing.pt'],
     'error: /missing.pt: not found (parameter detector_weights)'),
    ('v2x_channel', ['-p', 'channel.model:=carrier_pigeon'], "'carrier_pigeon' is not one of fixed, uniform"),
])
def test_start_up_problems_are_one_line_and_exit_2(node, args, error):
    env = use_local_discovery(dict(os.environ, ROS_DOMAIN_ID=str(DOMAIN_ID)))
    out = subprocess.run([sys.executable, '-m', f'coop_perception.ros.{node}', '--ros-args', '-r', '__ns:=/agent1',
                          *args], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count('\n') == 1 and error in out.stderr, out.stderr
