"""Faults during a live run, with real nodes: a collaborator's ``lidar_detector`` as its own
process (killed and restarted, paused and resumed) and the ego's ``trust_fusion`` in this process,
which hears the detector's features and odometry directly (remapped, no V2X channel). The test
plays the sensors: agent 2's scans and odometry, the ego's odometry and map, 100 ms of stamps per
frame, in the past of the wall clock so that stamps never count as ahead of it.

The tests share one running system and follow its life; each checks that fusion gave an output
for every ego frame and that the collaborator is fused again once it is back.
"""
import json
import os
import signal
import time

import numpy as np
import pytest

rclpy = pytest.importorskip('rclpy')

from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from ros_fixtures import valid_scan, write_tiny_models  # noqa: E402

from coop_perception.data import ros_msgs  # noqa: E402
from coop_perception.data.bag import LIDAR_DTYPE  # noqa: E402
from coop_perception.fusion import codec  # noqa: E402
from coop_perception.fusion.ego_map import encode_ego_map  # noqa: E402
from coop_perception.fusion.pipeline import collaborator_message  # noqa: E402
from coop_perception.geometry import make_pose  # noqa: E402
from coop_perception.ros import convert as cv  # noqa: E402
from coop_perception.ros.env import use_local_discovery  # noqa: E402
from coop_perception.ros.launcher import Launch, NodeSpec  # noqa: E402
from coop_perception.ros.node import RELIABLE_QOS  # noqa: E402
from coop_perception.ros.trust_fusion import TrustFusionNode  # noqa: E402

pytestmark = pytest.mark.slow

DOMAIN_ID = 63
EGO, OTHER = 1, 2
S = 1_000_000_000
FRAME = S // 10
MSGS = cv.RclpyMessages()
DETECTOR = f'agent{OTHER}/lidar_detector'
# Start-up of a detector process (it imports torch) on a loaded machine.
START_TIMEOUT_S = 120


class System:
    """The detector process, the fusion node and the sensors; ``frame()`` plays 100 ms."""

    def __init__(self, tmp):
        models = write_tiny_models(tmp / 'models')
        self.env = use_local_discovery(dict(os.environ, ROS_DOMAIN_ID=str(DOMAIN_ID)))
        self.spec = NodeSpec('lidar_detector', 'lidar_detector', f'agent{OTHER}', {
            'detector_config': models['detector_config'], 'detector_weights': models['detector_weights'],
            'roi.score_threshold': 0.0, 'roi.format': 'cells', 'threads': 1},   # max fuses cells
            uses_config=False)
        self.logs = tmp / 'logs'
        self.launch = None
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=DOMAIN_ID)
        self.fusion = TrustFusionNode(
            context=self.context, namespace=f'agent{EGO}',
            cli_args=['--ros-args', '-r', f'v2x/features:=/agent{OTHER}/coop/features',
                      '-r', f'v2x/odom:=/agent{OTHER}/odom'],
            parameter_overrides=[Parameter(k, value=v) for k, v in dict(
                agents=[OTHER], method='max', detector_config=models['detector_config'],
                detector_weights=models['detector_weights'], ego_pose_wait_s=0.05, forget_after_s=1.5,
                status_period_s=0.5).items()])
        self.peer = rclpy.create_node('fault_peer', context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        for node in (self.fusion, self.peer):
            self.executor.add_node(node)
        cloud, odom = MSGS.get_class('sensor_msgs/msg/PointCloud2'), MSGS.get_class('nav_msgs/msg/Odometry')
        self.pubs = {name: self.peer.create_publisher(odom if name.endswith('odom') else cloud, name, RELIABLE_QOS)
                     for name in (f'/agent{EGO}/odom', f'/agent{EGO}/coop/bev', f'/agent{OTHER}/odom',
                                  f'/agent{OTHER}/lidar', f'/agent{OTHER}/coop/features')}
        self.outputs = []
        self.peer.create_subscription(cloud, '/coop/objects',
                                      lambda m: self.outputs.append(ros_msgs.stamp_ns(m.header.stamp)), RELIABLE_QOS)
        model = self.fusion.detector
        self.ego_map = encode_ego_map(model.detect(valid_scan(1)), EGO, 0)
        self.features = codec.encode(collaborator_message(model.detect(valid_scan(2)), OTHER, 0,
                                                          {'score_threshold': 0.0, 'format': 'cells'}))
        points = valid_scan(3)
        self.scan = np.concatenate([points, np.zeros((len(points), 1), np.float32)], 1)
        self.t = time.time_ns() - 600 * S
        self.frames = []
        deadline = time.monotonic() + 10
        while not all(self.pubs[f'/agent{EGO}/{t}'].get_subscription_count() for t in ('odom', 'coop/bev')):
            assert time.monotonic() < deadline, 'the fusion node does not subscribe the ego topics'
            self.spin(0.05)

    def start_detector(self):
        self.launch = Launch([self.spec], None, env=self.env, log_dir=self.logs).start()

    def spin(self, seconds):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.executor.spin_once(timeout_sec=0.01)

    def odom(self, agent, stamp):
        self.pubs[f'/agent{agent}/odom'].publish(ros_msgs.pose_to_odometry(
            make_pose([5.0 * (agent - EGO), 0.0, 1.8]), ros_msgs.make_header(MSGS, stamp, 'map'),
            f'agent{agent}/lidar', MSGS))

    def cloud(self, topic, encoded, agent, stamp):
        fields, data, step = encoded
        header = ros_msgs.make_header(MSGS, stamp, f'agent{agent}/lidar')
        self.pubs[topic].publish(cv.buffer_to_cloud(fields, data, step, header, MSGS))

    def frame(self, ego_odom=True):
        """100 ms: agent 2's odometry and scan, then the ego's odometry and map; waits for the
        fused output of the ego frame."""
        self.t += FRAME
        self.odom(OTHER, self.t)
        header = ros_msgs.make_header(MSGS, self.t, f'agent{OTHER}/lidar')
        self.pubs[f'/agent{OTHER}/lidar'].publish(ros_msgs.points_to_cloud(self.scan, LIDAR_DTYPE, header, MSGS))
        self.spin(0.03)
        if ego_odom:
            self.odom(EGO, self.t)
            self.spin(0.01)
        self.cloud(f'/agent{EGO}/coop/bev', self.ego_map, EGO, self.t)
        self.frames.append(self.t)
        deadline = time.monotonic() + 10
        while self.t not in self.outputs and time.monotonic() < deadline:
            self.executor.spin_once(timeout_sec=0.01)
        assert self.t in self.outputs, self.log()

    def used(self) -> bool:
        """Whether agent 2 contributed an input to the last fused frame."""
        stats = self.fusion.agents.get(OTHER)
        return stats is not None and stats.used_age_s is not None

    def frames_until(self, condition, timeout_s):
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert time.monotonic() < deadline, self.log()
            self.frame()

    def missing_outputs(self) -> list:
        return sorted(set(self.frames) - set(self.outputs))

    def log(self) -> str:
        return '\n'.join(p.read_text()[-3000:] for p in sorted(self.logs.glob('*.log'))) + str(self.fusion.status())

    def close(self):
        if self.launch is not None:
            self.launch.stop()
        self.executor.shutdown()
        self.fusion.destroy_node()
        self.peer.destroy_node()
        rclpy.try_shutdown(context=self.context)


@pytest.fixture(scope='module')
def system(tmp_path_factory):
    s = System(tmp_path_factory.mktemp('faults'))
    s.start_detector()
    yield s
    s.close()


def test_collaborator_is_fused(system):
    system.frames_until(system.used, START_TIMEOUT_S)
    assert not system.missing_outputs()


def test_killed_and_restarted_detector_is_fused_again(system):
    system.launch.signal(DETECTOR, signal.SIGKILL)
    for _ in range(25):                                 # 2.5 s: past max_age_s and forget_after_s
        system.frame()
    assert not system.used()
    system.launch.stop()
    system.start_detector()
    system.frames_until(system.used, START_TIMEOUT_S)
    assert not system.missing_outputs()


def test_paused_and_resumed_detector_is_fused_again(system):
    pid = system.launch.processes[DETECTOR].pid
    os.kill(pid, signal.SIGSTOP)
    try:
        for _ in range(25):
            system.frame()
        assert not system.used()
    finally:
        os.kill(pid, signal.SIGCONT)
    system.frames_until(system.used, 60)
    assert not system.missing_outputs() and system.launch.poll()[DETECTOR] is None


def test_ego_odometry_gap_gives_the_ego_detections_for_every_frame(system):
    drops = system.fusion.coop.drops['ego_pose_unknown']
    for _ in range(100):                                # 10 s without ego odometry
        system.frame(ego_odom=False)
    assert system.fusion.coop.drops['ego_pose_unknown'] - drops >= 95
    system.frames_until(system.used, 30)                # poses return: the collaborator too
    assert not system.missing_outputs()


def test_one_stale_ego_message_does_not_empty_the_buffers(system):
    system.frames_until(system.used, 30)
    resets, drops = system.fusion.coop.resets, system.fusion.coop.drops['stale_ego_stamp']
    stale = system.t - 5 * S                            # an ego frame fused 50 frames ago
    system.odom(EGO, stale)
    system.cloud(f'/agent{EGO}/coop/bev', system.ego_map, EGO, stale)
    system.spin(0.3)
    assert system.fusion.coop.drops['stale_ego_stamp'] == drops + 2
    assert len(system.fusion.coop.poses[OTHER]) and system.fusion.coop._inputs[OTHER]
    system.frame()
    assert system.used() and system.fusion.coop.resets == resets
    assert system.outputs.count(stale) == 1              # the stale map gave no second output


def test_duplicated_and_reordered_features_are_counted(system):
    drops = system.fusion.coop.drops['duplicate_input']
    ms = S // 1000
    base = system.t + 30 * ms                           # off the detector's 100 ms grid
    for stamp in (base - 10 * ms, base, base - 10 * ms, base - 20 * ms, base):
        system.odom(OTHER, stamp)
        system.cloud(f'/agent{OTHER}/coop/features', system.features, OTHER, stamp)
    system.spin(0.3)
    assert system.fusion.coop.drops['duplicate_input'] - drops == 2
    for _ in range(3):
        system.frame()
    status = system.fusion.status()
    assert not [r for r in status['rejected'] if r.startswith('error:')], status
    assert not system.missing_outputs()
    # where each frame's processing time went, for a live breakdown of processing_ms
    stages = status['stage_ms']
    assert {'decode_ego_map', 'pose_wait', 'detect', 'publish', 'detect:fusion'} <= set(stages), stages
    assert all(v['p50'] >= 0 for v in stages.values())


def test_soak_command_prints_rss_and_counts_frames_without_output(tmp_path, capsys):
    from coop_perception import cli

    models = write_tiny_models(tmp_path / 'models')
    out = tmp_path / 'soak.json'
    assert cli.main(['bench', 'soak', '--agents', '2', '--minutes', '0.05', '--every', '1', '--churn', '20',
                     '--detector-config', models['detector_config'], '--detector-weights',
                     models['detector_weights'], '--fusion-model', models['fusion_model'], '--json', str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith('RSS growth after warm-up') and 'ego frames without output: 0 of 30' in lines[-1]
    result = json.loads(out.read_text())
    assert result['frames'] == 30 and result['frames_without_output'] == 0 and result['churned_ids'] == 60
    assert [row['tracked_agents'] for row in result['samples']] == [22, 42, 62]   # forgotten after 5 s
