"""`coop-perception demo --per-vehicle`: the per-vehicle bag (the ego's own sensor topics merged
with the collaborator traffic delivered to it, at delivery time) and, end to end on a tiny scene,
the real-time replay of the ego's pipeline alone. The end-to-end test runs tiny random-weight
models: what it checks (delivery times, every frame fused at rate 1, latencies) does not depend on
their accuracy, and the shipped detector and fusion (~135 ms each a frame on this shared machine
when it is busy) could not keep up with 10 Hz here, so every-frame output would be a coin toss."""
import json
import os
import shutil

import numpy as np
import pytest
from ros_fixtures import write_tiny_models

from coop_perception.data import ros_msgs
from coop_perception.data.bag import (ODOMETRY, POINTCLOUD2, RELIABLE_QOS, BagReader, BagWriter, lidar_topic,
                                      odom_topic, write_scene_bag)
from coop_perception.data.v2xsim import V2XSimDataset
from coop_perception.errors import UserError
from coop_perception.eval.live_eval import WallToBag
from coop_perception.ros.demo import DemoSettings, LiveRunSettings, write_parameters
from coop_perception.ros.env import use_local_discovery
from coop_perception.ros.per_vehicle import (BagMessage, build_per_vehicle_bag, delivered_messages, find_recording,
                                             format_report, merge_by_bag_time, run_per_vehicle)

EGO, SENDER = 1, 2
FEATURES, V2X_ODOM = f'/agent{EGO}/v2x/features', f'/agent{EGO}/v2x/odom'
DELAY_NS = 150_000_000      # the delivery delay of the hand-made recording


def test_wall_to_bag_runs_at_the_rate():
    wall0, bag0 = 1_800_000_000_000_000_000, 1_700_000_000_000_000_000
    slow = WallToBag(wall0, bag0, 0.1)
    assert slow(wall0) == bag0
    assert slow(wall0 + 1_000_000_000) == bag0 + 100_000_000      # 1 s of wall time is 100 ms of bag time
    assert slow(wall0 - 50_000_000) == bag0 - 5_000_000
    assert WallToBag(wall0, bag0, 1.0)(wall0 + 123_456_789) == bag0 + 123_456_789


def _m(t, topic, msgtype=POINTCLOUD2, raw=b''):
    return BagMessage(t, topic, msgtype, RELIABLE_QOS, raw or topic.encode())


def test_merge_orders_by_bag_time_odometry_first_and_keeps_stream_order():
    own = [_m(10, '/a/odom', ODOMETRY), _m(10, '/a/lidar'), _m(30, '/a/lidar', raw=b'late'), _m(20, '/a/lidar')]
    delivered = [_m(20, 'f', raw=b'f1'), _m(20, 'o', ODOMETRY), _m(20, 'f', raw=b'f2'), _m(5, 'f', raw=b'f0')]
    merged = merge_by_bag_time(own, delivered)
    assert [m.t_ns for m in merged] == [5, 10, 10, 20, 20, 20, 20, 30]
    assert [m.topic for m in merged[1:3]] == ['/a/odom', '/a/lidar']
    at20 = merged[3:7]
    assert at20[0].topic == 'o'                                       # odometry first at a tie
    assert [m.raw for m in at20[1:]] == [b'/a/lidar', b'f1', b'f2']   # then the streams in order, each as it came
    assert sorted(merged, key=lambda m: m.t_ns) == merged and len(merged) == len(own) + len(delivered)


@pytest.fixture(scope='module')
def scene_bag(tiny_dataset, tmp_path_factory):
    bag = tmp_path_factory.mktemp('per_vehicle') / 'bag'
    write_scene_bag(V2XSimDataset(tiny_dataset), 0, bag)
    return bag


def _write_recording(path, scene_bag, log_offset_ns=DELAY_NS, first=0, within_bag=True):
    """A live-run recording as the recorder writes it: what the channel delivered to the ego (the
    sender's odometry, then its features) logged ``log_offset_ns`` after each scan's stamp from the
    ``first`` on, plus a topic that is no delivered traffic. ``within_bag``: as a recorder on the
    player's /clock, which stops with the bag, logs nothing after the bag's last message."""
    with BagReader(scene_bag) as bag:
        odoms = {ros_msgs.stamp_ns(m.header.stamp): m for _, _, m in bag.messages([odom_topic(SENDER)])}
        end = bag.start_ns + bag.duration_ns if within_bag else None
    writer = BagWriter(path, 'mcap')
    msgs = ros_msgs.RosbagsMessages(writer.typestore)
    logged = []
    with writer:
        for i, stamp in enumerate(sorted(odoms)[first:]):
            header = ros_msgs.make_header(msgs, stamp, f'agent{SENDER}/lidar')
            odom = ros_msgs.pose_to_odometry(ros_msgs.odometry_to_pose(odoms[stamp]),
                                             ros_msgs.make_header(msgs, stamp, 'map'), f'agent{SENDER}/lidar', msgs)
            cloud = ros_msgs.array_to_cloud(np.array([(float(i), 2.0)], [('x', '<f4'), ('y', '<f4')]), header, msgs)
            t = stamp + log_offset_ns
            if end is not None and t > end:
                break
            writer.write(V2X_ODOM, ODOMETRY, RELIABLE_QOS, t, odom)
            writer.write(FEATURES, POINTCLOUD2, RELIABLE_QOS, t, cloud)
            writer.write('/coop/status', 'std_msgs/msg/String', RELIABLE_QOS, t, msgs('std_msgs/msg/String', data='{}'))
            logged.append((t, stamp))
    return logged


def test_per_vehicle_bag_holds_the_egos_sensors_and_the_delivered_traffic_at_delivery_time(scene_bag, tmp_path):
    logged = _write_recording(tmp_path / 'record', scene_bag)
    summary = build_per_vehicle_bag(scene_bag, tmp_path / 'record', tmp_path / 'pv', EGO)

    with BagReader(scene_bag) as scene:
        own = {t: list(scene.raw_messages([t])) for t in (lidar_topic(EGO), odom_topic(EGO))}
    with BagReader(tmp_path / 'record') as rec:
        sent = {t: list(rec.raw_messages([t])) for t in (FEATURES, V2X_ODOM)}
    with BagReader(tmp_path / 'pv') as pv:
        assert set(pv.topics) == {lidar_topic(EGO), odom_topic(EGO), FEATURES, V2X_ODOM}
        for topic, expected in {**own, **sent}.items():
            got = list(pv.raw_messages([topic]))
            # every message as it was recorded: same bytes, same time
            assert [(t, bytes(r)) for _, _, t, r in got] == [(t, bytes(r)) for _, _, t, r in expected], topic
        times = [t for _, _, t, _ in pv.raw_messages()]
        features = [(t, ros_msgs.stamp_ns(m.header.stamp)) for _, t, m in pv.messages([FEATURES])]
        assert pv.topics[FEATURES].qos[0].reliability == RELIABLE_QOS.reliability
    assert times == sorted(times)
    assert features == logged and all(t - stamp == DELAY_NS for t, stamp in features)
    assert len(own[lidar_topic(EGO)]) == 4 and len(logged) >= 2         # the tiny scene's frames
    assert summary['delivered_features_by_agent'] == {str(SENDER): len(logged)}
    assert summary['age_at_delivery_ms'] == {'min': 150.0, 'p50': 150.0, 'max': 150.0}
    assert summary['messages'][FEATURES] == len(logged)


def test_a_recording_not_in_bag_time_or_without_delivered_traffic_is_refused(scene_bag, tmp_path):
    with BagReader(scene_bag) as bag:
        span = (bag.start_ns, bag.start_ns + bag.duration_ns)
    _write_recording(tmp_path / 'early', scene_bag, log_offset_ns=-1_000_000, first=1)   # 1 ms before capture
    with pytest.raises(UserError, match='before its stamp'):
        delivered_messages(tmp_path / 'early', EGO, span)
    _write_recording(tmp_path / 'wall', scene_bag, log_offset_ns=10**12, within_bag=False)   # not this bag's time
    with pytest.raises(UserError, match='outside it'):
        delivered_messages(tmp_path / 'wall', EGO, span)
    logged = _write_recording(tmp_path / 'ok', scene_bag)
    assert len(delivered_messages(tmp_path / 'ok', EGO, span)) == 2 * len(logged) > 0
    with pytest.raises(UserError, match='holds no /agent1/v2x/features'):
        build_per_vehicle_bag(scene_bag, scene_bag, tmp_path / 'pv', EGO)     # a scene bag is no recording
    with pytest.raises(UserError, match='agent 7 cannot be the ego'):
        build_per_vehicle_bag(scene_bag, tmp_path / 'early', tmp_path / 'pv', 7)


def test_a_recording_is_reused_only_with_the_same_settings(scene_bag, tmp_path):
    s = DemoSettings(out=tmp_path / 'demo', live=LiveRunSettings(agents=3, ego=EGO, rate=0.1))
    s.out.mkdir()
    params = write_parameters(tmp_path / 'params.yaml', s)
    _write_recording(s.out / 'record', scene_bag)
    meta = {'agents': 3, 'ego': EGO, 'settings': {'rate': 0.1, 'parameters': params}}
    (s.out / 'demo.json').write_text(json.dumps(meta))
    assert find_recording(s, params, scene_bag) == s.out / 'record'
    other = DemoSettings(out=s.out, latency_ms=100.0, live=s.live)
    assert find_recording(other, write_parameters(tmp_path / 'other.yaml', other), scene_bag) is None
    assert find_recording(DemoSettings(out=s.out, live=LiveRunSettings(agents=3, ego=EGO, rate=0.2)), params,
                          scene_bag) is None
    shutil.rmtree(s.out / 'record')
    _write_recording(s.out / 'record', scene_bag, log_offset_ns=10**12, within_bag=False)   # another bag's time
    assert find_recording(s, params, scene_bag) is None


DOMAIN_ID = 67
AGENTS, FRAMES = 3, 8
RECORDING_RATE = 0.1
MIN_LATENCY_MS, MAX_LATENCY_MS = 100.0, 300.0   # the demo's channel: uniform, 200 ms mean, spread 0.5
CHANNEL_TICK_MS = 10.0                          # v2x_channel's tick_hz 100 (ROS time)
CLOCK_STEP_MS = 1e3 * RECORDING_RATE / 100.0    # the recorder's /clock steps at the recording rate


@pytest.mark.slow
def test_per_vehicle_replays_the_egos_pipeline_at_real_time(tmp_path):
    pytest.importorskip('rclpy')
    out = tmp_path / 'demo'
    models = write_tiny_models(tmp_path / 'models')
    settings = DemoSettings(out=out, seed=3, frames=FRAMES, detector_config=models['detector_config'],
                            detector_weights=models['detector_weights'], fusion_model=models['fusion_model'],
                            live=LiveRunSettings(agents=AGENTS, ego=EGO, rate=RECORDING_RATE, drain_idle_s=2.0))
    env = use_local_discovery(dict(os.environ, ROS_DOMAIN_ID=str(DOMAIN_ID), TMPDIR=str(tmp_path)))
    result = run_per_vehicle(settings, env=env, progress=False)
    report = format_report(result)
    saved = json.loads((out / 'per_vehicle.json').read_text())
    assert saved['ego_frames'] == FRAMES and saved['settings']['rate'] == 1.0, report

    # the recording pass ran (no demo before it) and recorded the channel's deliveries
    recording = out / 'per_vehicle' / 'recording' / 'record'
    assert not saved['recording']['reused'] and saved['recording']['record'] == str(recording)
    with BagReader(recording) as rec:
        delivered = [(t, bytes(r)) for _, _, t, r in rec.raw_messages([FEATURES])]
    # the per-vehicle bag: the ego's scans and odometry, and exactly the delivered messages at the
    # bag time they were delivered, each within the channel's latency of its capture
    with BagReader(out / 'per_vehicle' / 'bag') as pv:
        assert set(pv.topics) == {lidar_topic(EGO), odom_topic(EGO), FEATURES, V2X_ODOM}, report
        assert pv.topics[lidar_topic(EGO)].count == FRAMES
        assert [(t, bytes(r)) for _, _, t, r in pv.raw_messages([FEATURES])] == delivered
        ages = {}
        for _, t, msg in pv.messages([FEATURES]):
            ages.setdefault(msg.header.frame_id, []).append((t - ros_msgs.stamp_ns(msg.header.stamp)) * 1e-6)
    assert set(ages) == {f'agent{k}/lidar' for k in range(AGENTS) if k != EGO}, report
    for frame, values in ages.items():
        # /clock stops with the bag, so messages due after its last one are never delivered
        assert len(values) >= FRAMES // 2, (frame, values)
        assert min(values) >= MIN_LATENCY_MS - CLOCK_STEP_MS, (frame, values)
        assert max(values) <= MAX_LATENCY_MS + CHANNEL_TICK_MS + CLOCK_STEP_MS, (frame, values)

    # the real-time run: only the ego's two nodes, fed by that bag; every frame fused, with the
    # collaborators' delivered features, latencies measured
    live = saved['live']
    assert set(live['run']['exit_codes']) == {f'agent{EGO}/lidar_detector', f'agent{EGO}/trust_fusion', 'bag_player'}
    assert all(code == 0 for code in live['run']['exit_codes'].values()), live['run']['exit_codes']
    assert live['frames_with_output'] >= FRAMES - 1, report
    assert live['stray_outputs'] == 0, report
    assert live['collaborator_inputs'] == {str(k): len(ages[f'agent{k}/lidar']) for k in (0, 2)}, report
    lat = live['latency_ms']
    assert lat['n'] == live['frames_with_output'] and 0 < lat['p50'] <= lat['p95'] <= lat['max'], report
    # the ego's own detections come before the fused ones of the same scan
    frames = [f for f in live['frames'] if f['fused_latency_ms'] is not None and f['ego_only_latency_ms'] is not None]
    assert frames and all(0 < f['ego_only_latency_ms'] < f['fused_latency_ms'] for f in frames), report
    assert live['fused']['ap50'] is not None and live['fused']['summary']['frames'] == FRAMES, report
    assert saved['recording_pass']['fused']['ap50'] is not None
    assert 'end-to-end latency' in report and 'AP@0.7' in report

    # a second call would reuse the recording pass
    params = json.loads((out / 'per_vehicle' / 'recording' / 'recording.json').read_text())['settings']['parameters']
    assert find_recording(settings, params, out / 'bag') == recording
