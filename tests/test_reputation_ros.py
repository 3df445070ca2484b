"""trust_fusion with real rclpy (own ROS domain): the ego map's free range reaches the pipeline, and
collaborators' reputations are reported in /coop/status and drawn on /coop/reputation."""
import json
import time

import numpy as np
import pytest

rclpy = pytest.importorskip('rclpy')

from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from ros_fixtures import valid_scan, write_tiny_models  # noqa: E402

from coop_perception.data import ros_msgs  # noqa: E402
from coop_perception.detection.checkpoint import load_detector  # noqa: E402
from coop_perception.fusion import codec  # noqa: E402
from coop_perception.fusion.ego_map import encode_ego_map  # noqa: E402
from coop_perception.fusion.pipeline import collaborator_message  # noqa: E402
from coop_perception.fusion.reputation import Evidence  # noqa: E402
from coop_perception.geometry import make_pose  # noqa: E402
from coop_perception.ros import convert as cv  # noqa: E402
from coop_perception.ros.env import use_local_discovery  # noqa: E402
from coop_perception.ros.node import RELIABLE_QOS  # noqa: E402
from coop_perception.ros.trust_fusion import TrustFusionNode  # noqa: E402

DOMAIN_ID = 66
MSGS = cv.RclpyMessages()
CLOUD, ODOM, STRING, MARKERS = ('sensor_msgs/msg/PointCloud2', 'nav_msgs/msg/Odometry', 'std_msgs/msg/String',
                                'visualization_msgs/msg/MarkerArray')
S = 1_000_000_000


def test_reputation_is_reported_and_drawn(tmp_path):
    use_local_discovery()
    models = write_tiny_models(tmp_path)
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=DOMAIN_ID)
    executor = SingleThreadedExecutor(context=context)
    node = TrustFusionNode(context=context, namespace='agent1', parameter_overrides=[
        Parameter(k, value=v) for k, v in dict(agents=[2], method='max', reputation='on', status_period_s=0.1,
                                               detector_config=models['detector_config'],
                                               detector_weights=models['detector_weights']).items()])
    peer = rclpy.create_node('test_peer', context=context)
    for n in (node, peer):
        executor.add_node(n)

    def spin(until, timeout_s=5.0):
        deadline = time.monotonic() + timeout_s
        while not until() and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.01)
        return until()

    try:
        pubs = {t: peer.create_publisher(MSGS.get_class(ODOM if t.endswith('odom') else CLOUD), f'/agent1/{t}',
                                         RELIABLE_QOS) for t in ('odom', 'coop/bev', 'v2x/features', 'v2x/odom')}
        got = {topic: [] for topic in ('/coop/objects', '/coop/status', '/coop/reputation')}
        for topic, kind in zip(got, (CLOUD, STRING, MARKERS)):
            peer.create_subscription(MSGS.get_class(kind), topic, got[topic].append, RELIABLE_QOS)
        assert spin(lambda: all(p.get_subscription_count() for p in pubs.values()), 10)
        detector = load_detector(models['detector_weights'], models['detector_config'])

        def odom(agent, stamp):
            return ros_msgs.pose_to_odometry(make_pose([float(agent), 0.0, 1.8]),
                                             ros_msgs.make_header(MSGS, stamp, 'map'), f'agent{agent}/lidar', MSGS)

        def frame(stamp):
            pubs['v2x/odom'].publish(odom(2, stamp - S // 20))
            msg = collaborator_message(detector.detect(valid_scan(7)), 2, stamp - S // 20,
                                       {'score_threshold': 0.0, 'format': 'cells'})   # max fuses cells
            pubs['v2x/features'].publish(cv.buffer_to_cloud(
                *codec.encode(msg), ros_msgs.make_header(MSGS, stamp - S // 20, 'agent2/lidar'), MSGS))
            pubs['odom'].publish(odom(1, stamp))
            spin(lambda: False, 0.1)
            det = detector.detect(valid_scan(1))
            n = len(got['/coop/objects'])
            pubs['coop/bev'].publish(cv.buffer_to_cloud(*encode_ego_map(det, 1, stamp),
                                                        ros_msgs.make_header(MSGS, stamp, 'agent1/lidar'), MSGS))
            assert spin(lambda: len(got['/coop/objects']) > n)
            return det

        t = 50 * S
        det = frame(t)
        # the free-range profile the ego's detector computed is what the pipeline holds for the frame
        np.testing.assert_array_equal(node.coop._ego[t][0].free_range, det.free_range)

        def status():
            return json.loads(got['/coop/status'][-1].data) if got['/coop/status'] else {}

        assert spin(lambda: status().get('agents', {}).get('2', {}).get('reputation') is not None)
        assert status()['reputation_on'] and status()['excluded_agents'] == []
        assert status()['agents']['2']['reputation']['messages'] == 1
        # agent 2 lies (evidence as the pipeline takes it from its messages): excluded, reported, drawn red
        node.coop.reputation.observe(2, t, t, Evidence(checked=6, conflicts=6))
        frame(t + S // 10)
        assert spin(lambda: status().get('excluded_agents') == [2]
                    and status()['agents']['2']['reputation']['excluded'])
        assert status()['pipeline_drops']['low_reputation'] == 1
        assert spin(lambda: any(m.text.startswith('agent 2 reputation') and m.text.endswith('EXCLUDED')
                                for m in got['/coop/reputation'][-1].markers))
        red = [m for m in got['/coop/reputation'][-1].markers if m.text.endswith('EXCLUDED')][0]
        assert (red.color.r, red.color.g) == (pytest.approx(1.0), pytest.approx(0.1))
        assert red.pose.position.x == pytest.approx(1.0, abs=1e-3)       # agent 2 sits 1 m ahead of the ego
    finally:
        executor.shutdown()
        for n in (node, peer):
            n.destroy_node()
        rclpy.try_shutdown(context=context)
