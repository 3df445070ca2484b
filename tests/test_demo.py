"""`coop-perception demo` end to end on a tiny scene with the shipped models: real ROS processes
replay it, the recorder writes a bag, the recording is scored against offline evaluation (which it
must match) and drawn. The shipped models, not random tiny ones: those score 0 AP live and offline
alike, so the live-vs-offline comparison would check nothing."""
import json
import os

import pytest

rclpy = pytest.importorskip('rclpy')

from PIL import Image  # noqa: E402

from coop_perception.data import ros_msgs  # noqa: E402
from coop_perception.data.bag import BagReader  # noqa: E402
from coop_perception.ros.demo import DemoSettings, LiveRunSettings, format_report, run_demo  # noqa: E402
from coop_perception.ros.env import use_local_discovery  # noqa: E402
from coop_perception.ros.per_vehicle import find_recording  # noqa: E402

pytestmark = pytest.mark.slow

DOMAIN_ID = 63
AGENTS, EGO, FRAMES = 3, 1, 8
RATE = 0.1             # the demo's: every detector keeps up with every scan on 2 shared cores
AP_TOLERANCE = 0.02    # live vs offline `eval fusion`: 2 AP points (AP is a fraction here)


def test_demo_replays_records_scores_and_draws(tmp_path):
    out = tmp_path / 'demo'
    settings = DemoSettings(out=out, seed=3, frames=FRAMES,    # models: the shipped ones (defaults)
                            live=LiveRunSettings(agents=AGENTS, ego=EGO, rate=RATE, drain_idle_s=2.0))
    env = use_local_discovery(dict(os.environ, ROS_DOMAIN_ID=str(DOMAIN_ID), TMPDIR=str(tmp_path)))
    result = run_demo(settings, env=env, progress=False)
    report = format_report(result)

    saved = json.loads((out / 'demo.json').read_text())
    assert saved['ego_frames'] == FRAMES and saved['agents'] == AGENTS
    live = saved['live']
    for which in ('ego_only', 'fused'):
        assert {'ap50', 'ap70', 'summary'} <= set(live[which])
    assert live['fused']['summary']['frames'] == FRAMES     # every ego frame is scored, with output or not
    # (nearly) every ego frame gets fused output: at most one without
    assert live['fused']['frames_with_output'] >= FRAMES - 1, report
    assert live['fused_fraction'] == pytest.approx(live['fused']['frames_with_output'] / FRAMES)
    assert 0 < live['latency_ms']['p50'] <= live['latency_ms']['p95'], report
    assert live['latency_wall_ms']['p50'] == pytest.approx(live['latency_ms']['p50'] / RATE, abs=0.1)
    assert live['stray_outputs'] == 0, report
    assert set(saved['offline']) == {'ego', 'trust'} and saved['offline']['trust']['frames'] == FRAMES
    assert set(saved['live_minus_offline']) == {'ap50', 'ap70'}
    # the live system scores what offline `eval fusion` scores on the same scene, ego, method and
    # channel: fused vs offline trust, the ego's own detector vs offline ego, at AP@0.5 and AP@0.7
    offline = saved['offline']
    for key in ('ap50', 'ap70'):
        values = (live['fused'][key], offline['trust'][key], live['ego_only'][key], offline['ego'][key])
        assert None not in values, (key, report)     # the scene has cars to score
        assert min(offline['trust'][key], offline['ego'][key]) >= 0.3, (key, report)   # a comparison of substance
        assert saved['live_minus_offline'][key] == pytest.approx(live['fused'][key] - offline['trust'][key])
        assert abs(live['fused'][key] - offline['trust'][key]) <= AP_TOLERANCE, (key, report)
        assert abs(live['ego_only'][key] - offline['ego'][key]) <= AP_TOLERANCE, (key, report)
    assert all(code == 0 for code in live['run']['exit_codes'].values()), live['run']['exit_codes']
    assert 'AP@0.5' in report and 'offline trust' in report

    assert (out / 'bev.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    with Image.open(out / 'replay.gif') as gif:
        assert gif.n_frames == FRAMES

    with BagReader(out / 'record') as bag:
        assert bag.topics['/coop/objects'].count == live['fused']['frames_with_output'], report
        assert bag.topics[f'/agent{EGO}/coop/objects'].count >= 1 and bag.topics['/coop/status'].count >= 1
        # what the channel delivered to the ego's fusion, for `demo --per-vehicle`: a pose with every message
        delivered = bag.topics[f'/agent{EGO}/v2x/features'].count
        assert delivered >= 1 and bag.topics[f'/agent{EGO}/v2x/odom'].count >= delivered
        objects = [ros_msgs.cloud_to_objects(msg) for _, _, msg in bag.messages(['/coop/objects'])]
        frames = {msg.header.frame_id for _, _, msg in bag.messages(['/coop/objects'])}
    assert frames == {f'agent{EGO}/lidar'} and all(o.dtype.names for o in objects)
    # `demo --per-vehicle` with the same settings takes the delivered traffic from this recording
    assert find_recording(settings, saved['settings']['parameters'], out / 'bag') == out / 'record'
