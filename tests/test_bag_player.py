"""bag_player as its own process, received by an independent rclpy subscriber in this process."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

rclpy = pytest.importorskip('rclpy')

from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from rosbags.rosbag2 import StoragePlugin, Writer  # noqa: E402
from rosbags.typesys import Stores, get_types_from_msg, get_typestore  # noqa: E402

from coop_perception import cli  # noqa: E402
from coop_perception.data import bag as bagmod  # noqa: E402
from coop_perception.data import ros_msgs  # noqa: E402
from coop_perception.data.v2xsim import V2XSimDataset  # noqa: E402
from coop_perception.ros import bag_player  # noqa: E402
from coop_perception.ros import convert as cv  # noqa: E402
from coop_perception.ros.env import use_local_discovery  # noqa: E402

DOMAIN_ID = 53
MSGS = cv.RclpyMessages()
BEST_EFFORT = QoSProfile(depth=100, reliability=ReliabilityPolicy.BEST_EFFORT)
RELIABLE = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL)


@pytest.fixture(scope='module')
def env():
    return use_local_discovery(dict(os.environ, ROS_DOMAIN_ID=str(DOMAIN_ID)))


@pytest.fixture()
def ros(env):
    """A node of our own on the test domain, with its own context."""
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=DOMAIN_ID)
    node = rclpy.create_node('test_listener', context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    yield node, executor
    executor.shutdown()
    node.destroy_node()
    rclpy.try_shutdown(context=context)


def _player(env, bag, *args):
    cmd = [sys.executable, '-m', 'coop_perception.ros.bag_player', str(bag),
           '--wait-for-subscribers', '20', '--delay', '0.5', *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _spin_until(executor, done, timeout_s):
    deadline = time.monotonic() + timeout_s
    while not done() and time.monotonic() < deadline:
        executor.spin_once(timeout_sec=0.02)


def _listen(node, topic, msgtype, qos, sink):
    """Collect (topic, publication time ns at the player, message)."""
    def on_message(msg, info):
        sink.append((topic, info['source_timestamp'], msg))
    node.create_subscription(MSGS.get_class(msgtype), topic, on_message, qos)


def _stamp(msg):
    header = msg.markers[0].header if hasattr(msg, 'markers') else msg.header
    return ros_msgs.stamp_ns(header.stamp)


@pytest.fixture(scope='module')
def scene_bag(tiny_dataset, tmp_path_factory):
    path = tmp_path_factory.mktemp('player') / 'scene'
    bagmod.write_scene_bag(V2XSimDataset(tiny_dataset), 0, path)
    return path


def test_replay_delivers_every_message_in_order(ros, env, scene_bag):
    node, executor = ros
    with bagmod.BagReader(scene_bag) as bag:
        playable = {t: i for t, i in bag.topics.items() if MSGS.has(i.msgtype)}
        expected = {t: [] for t in playable}
        for topic, _, t_ns, _ in bag.raw_messages(list(playable)):
            expected[topic].append(t_ns)
    recording = bagmod.read_scene_bag(scene_bag)
    got, clocks = [], []
    for topic, info in playable.items():
        _listen(node, topic, info.msgtype, BEST_EFFORT if topic.endswith('/lidar') else RELIABLE, got)
    node.create_subscription(MSGS.get_class('rosgraph_msgs/msg/Clock'), '/clock',
                             lambda m: clocks.append(ros_msgs.stamp_ns(m.clock)), BEST_EFFORT)

    player = _player(env, scene_bag, '--clock-hz', '50')
    _spin_until(executor, lambda: got, 30)
    qos = {t: node.get_publishers_info_by_topic(t)[0].qos_profile for t in ('/agent0/lidar', '/ground_truth/objects')}
    _spin_until(executor, lambda: player.poll() is not None and len(got) >= sum(map(len, expected.values())), 30)
    _spin_until(executor, lambda: False, 0.3)
    _, stderr = player.communicate(timeout=10)
    assert player.returncode == 0, stderr

    assert qos['/agent0/lidar'].reliability == ReliabilityPolicy.BEST_EFFORT
    assert qos['/ground_truth/objects'].reliability == ReliabilityPolicy.RELIABLE
    for topic, stamps in expected.items():
        assert [_stamp(m) for t, _, m in got if t == topic] == stamps, topic
    # Across topics, the order of publication is the recorded order (callbacks of different
    # subscriptions may run in any order).
    published = [_stamp(m) for _, _, m in sorted(got, key=lambda g: g[1])]
    assert published == sorted(published)
    for k, scans in recording.lidar.items():
        received = [m for t, _, m in got if t == f'/agent{k}/lidar']
        for (_, points), msg in zip(scans, received):
            np.testing.assert_array_equal(ros_msgs.cloud_to_points(msg, ['x', 'y', 'z', 'intensity', 'ring']),
                                          points)
    objects = [ros_msgs.cloud_to_objects(m) for t, _, m in got if t == '/ground_truth/objects']
    assert [o.tobytes() for o in objects] == [o.tobytes() for _, o in recording.objects]
    assert clocks == sorted(clocks) and clocks[0] >= min(min(s) for s in expected.values())
    assert clocks[-1] >= max(max(s) for s in expected.values())
    if not MSGS.has('tf2_msgs/msg/TFMessage'):
        assert 'skipping topics whose message type is not installed: /tf ' in stderr


def _timing_bag(path):
    """1 latched String at t0, then an Int32 counter every 100 ms for 2 s."""
    store = get_typestore(Stores.ROS2_KILTED)
    t0 = 1_000_000_000_000
    with Writer(path, version=9, storage_plugin=StoragePlugin.SQLITE3) as w:
        latched = w.add_connection('/latched', 'std_msgs/msg/String', typestore=store,
                                   offered_qos_profiles=[bagmod.LATCHED_QOS])
        count = w.add_connection('/count', 'std_msgs/msg/Int32', typestore=store,
                                 offered_qos_profiles=[bagmod.RELIABLE_QOS])
        w.write(latched, t0, store.serialize_cdr(store.types['std_msgs/msg/String'](data='map v1'),
                                                 'std_msgs/msg/String'))
        for i in range(20):
            w.write(count, t0 + i * 100_000_000,
                    store.serialize_cdr(store.types['std_msgs/msg/Int32'](data=i), 'std_msgs/msg/Int32'))
    return t0


def test_offset_rate_loop_latched_and_interrupt(ros, env, tmp_path):
    node, executor = ros
    t0 = _timing_bag(tmp_path / 'timing')
    got, clocks = [], []
    _listen(node, '/count', 'std_msgs/msg/Int32', RELIABLE, got)
    _listen(node, '/latched', 'std_msgs/msg/String', LATCHED, got)
    node.create_subscription(MSGS.get_class('rosgraph_msgs/msg/Clock'), '/clock',
                             lambda m: clocks.append(ros_msgs.stamp_ns(m.clock)), BEST_EFFORT)
    player = _player(env, tmp_path / 'timing', '--start-offset', '0.45', '--rate', '2', '--loop')
    try:
        counts = lambda: [m.data for t, _, m in got if t == '/count']  # noqa: E731
        _spin_until(executor, lambda: len(counts()) >= 30, 30)
        assert counts()[:30] == list(range(5, 20)) * 2
        # A subscriber that joins late still gets the latched message.
        late = []
        _listen(node, '/latched', 'std_msgs/msg/String', LATCHED, late)
        _spin_until(executor, lambda: late, 10)
        assert [m.data for _, _, m in late][:1] == ['map v1']
        assert [m.data for t, _, m in got if t == '/latched'][:1] == ['map v1']
        first_loop = [w for t, w, _ in got if t == '/count'][:15]
        # 14 intervals of 100 ms recorded time at rate 2.
        assert 0.6 < (first_loop[-1] - first_loop[0]) * 1e-9 < 0.9
        assert min(clocks) >= t0 + 450_000_000
    finally:
        player.send_signal(signal.SIGINT)
        _, stderr = player.communicate(timeout=15)
    assert player.returncode == 0, stderr
    assert 'Traceback' not in stderr


def _unplayable_bag(path):
    store = get_typestore(Stores.ROS2_KILTED)
    store.register(get_types_from_msg('int32 value', 'foo_msgs/msg/Bar'))
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as w:
        conn = w.add_connection('/foo', 'foo_msgs/msg/Bar', typestore=store)
        w.write(conn, 1, store.serialize_cdr(store.types['foo_msgs/msg/Bar'](value=1), 'foo_msgs/msg/Bar'))
    return path


def _truncated(scene_bag, path):
    import shutil

    shutil.copytree(scene_bag, path)
    f = next(path.glob('*.mcap'))
    os.truncate(f, f.stat().st_size // 3)
    return path


@pytest.mark.parametrize('case, reason', [
    ('truncated', 'cannot open bag'),
    ('no-metadata', 'metadata.yaml is missing'),
    ('unknown-types', 'unknown message types: none of /foo (foo_msgs/msg/Bar)'),
    ('unknown-topic', 'no topic(s) /nope in bag'),
    ('unplayed-wait', '--wait-topics /nope not played'),
    ('unplayed-wait-count', '--wait-topics /nope not played'),
    ('missing', 'no such bag'),
])
def test_bad_input_is_one_line_and_exit_2(scene_bag, tmp_path, capsys, case, reason):
    args = []
    if case == 'truncated':
        bag = _truncated(scene_bag, tmp_path / 'bag')
    elif case == 'no-metadata':
        bag = tmp_path / 'bag'
        bag.mkdir()
        (bag / 'bag.mcap').write_bytes(b'\x89MCAP0\r\n')
    elif case == 'unknown-types':
        bag = _unplayable_bag(tmp_path / 'bag')
    elif case == 'unknown-topic':
        bag, args = scene_bag, ['--topics', '/nope']
    elif case == 'unplayed-wait':
        bag, args = scene_bag, ['--wait-topics', '/nope']
    elif case == 'unplayed-wait-count':
        bag, args = scene_bag, ['--wait-topics', bagmod.lidar_topic(0), '/nope:2']
    else:
        bag = tmp_path / 'nothing'
    assert bag_player.main([str(bag), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'error: {bag}: ') and reason in err and err.count('\n') == 1
    assert cli.main(['play', str(bag), *args]) == 2
    assert capsys.readouterr().err == err


@pytest.mark.parametrize('bad', ['/agent0/lidar:0', '/agent0/lidar:two'])
def test_bad_wait_count_is_a_usage_error(scene_bag, capsys, bad):
    with pytest.raises(SystemExit) as exit_:
        bag_player.main([str(scene_bag), '--wait-topics', bad])
    assert exit_.value.code == 2 and bad in capsys.readouterr().err


def test_console_script_exit_code(env, tmp_path):
    """The installed entry point, as `ros2 run` would start it: no traceback, exit code 2."""
    out = subprocess.run([sys.executable, '-c', 'import sys; from coop_perception.ros.bag_player import main; '
                          'sys.exit(main())', str(tmp_path / 'missing'), '--ros-args', '-r', '__node:=p'],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip() == f'error: {tmp_path / "missing"}: no such bag'
