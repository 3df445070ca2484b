"""Fuzzed inputs fed to the real nodes in this process (``ros.fuzz``): no exception escapes, every
rejection is counted by reason, no published box is NaN or beyond the sensor range, and a fuzzed
node answers valid input as a fresh one does. Plus the hand-written cases that once broke them."""
import numpy as np
import pytest

rclpy = pytest.importorskip('rclpy')

from rclpy.parameter import Parameter  # noqa: E402
from ros_fixtures import write_tiny_models  # noqa: E402

from coop_perception.ros import fuzz  # noqa: E402
from coop_perception.ros.env import use_local_discovery  # noqa: E402

DOMAIN_ID = 57
S = fuzz.NS_PER_S
CASES = 250                      # per input topic: about 25 s in all on a shared core
FAR = 10**6 * S                  # the valid sequence runs long after every fuzzed stamp


@pytest.fixture(scope='module')
def params(tmp_path_factory):
    models = write_tiny_models(tmp_path_factory.mktemp('models'))
    quiet = Parameter('warn_period_s', value=1e6)
    detector = [Parameter(k, value=models[k]) for k in ('detector_config', 'detector_weights')]
    return (detector + [Parameter('roi.score_threshold', value=0.0), quiet],
            detector + [Parameter('fusion_model', value=models['fusion_model']), quiet])


@pytest.fixture(scope='module')
def context():
    use_local_discovery()
    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=DOMAIN_ID)
    yield ctx
    rclpy.try_shutdown(context=ctx)


@pytest.fixture()
def harness(context, params):
    h = fuzz.FuzzHarness(context, *params)
    yield h
    h.destroy()


def test_fuzzed_inputs_are_rejected_by_reason_and_never_corrupt_the_output(context, params, harness):
    for seed, topic in enumerate(fuzz.FUZZ_TOPICS):
        report = fuzz.run_fuzz(harness, topic, CASES, seed)
        assert report.messages == CASES
        assert (report.crashes, report.unhandled) == (0, 0), report.errors
        assert report.bad_outputs == 0
        assert report.rejected and all(reason.split(':', 1)[1] for reason in report.rejected)
        assert sum(report.rejected.values()) >= CASES // 4, report.rejected   # most mutations must be caught
    fuzzed = harness.valid_output(FAR)
    fresh = fuzz.FuzzHarness(context, *params)
    try:
        expected = fresh.valid_output(FAR)
    finally:
        fresh.destroy()
    assert [node for node, _ in fuzzed] == [node for node, _ in expected]
    assert any(len(objects) for _, objects in expected)
    for (_, got), (_, want) in zip(fuzzed, expected):
        assert np.array_equal(got, want)


def _fed(harness, topic, spec) -> dict:
    """Feed one message, then a valid frame; the counts that grew, and no bad box published."""
    before = harness.counts()
    harness.feed(topic, spec)
    harness.t += fuzz.FRAME_NS
    harness.collaborator(harness.t - fuzz.FRAME_NS // 5)
    harness.ego_frame(harness.t)
    harness.detector_frame(harness.t)
    harness.status_json()
    outputs = harness.take_outputs()
    assert outputs and not sum(harness.bad_boxes(node, objects) for node, objects in outputs)
    return dict(harness.counts() - before)


@pytest.mark.parametrize('field,value,reason', [
    ('scale', 1e38, 'bad_features:bad_scale'),       # once gave NaN boxes and scores
    ('scale', 1e30, 'bad_features:bad_scale'),       # once gave boxes hundreds of km away
    ('vx', 1e6, 'bad_features:bad_velocity'),
    ('score', np.nan, 'bad_features:non_finite'),
])
def test_absurd_feature_values_are_rejected(harness, field, value, reason):
    harness.t += fuzz.FRAME_NS
    spec = harness.features.copy(harness.t).set(field, value, 0)
    assert _fed(harness, 'trust_fusion:v2x/features', spec) == {f'trust_fusion:{reason}': 1}


@pytest.mark.parametrize('field,value,reason', [
    ('label', 200, 'bad_features:bad_value'),
    ('l', 0, 'bad_features:bad_value'),
    ('cell', 65535, 'bad_features:out_of_grid'),
    ('vx', 32767, 'bad_features:bad_velocity'),
])
def test_absurd_compact_records_are_rejected(harness, field, value, reason):
    harness.t += fuzz.FRAME_NS
    spec = harness.compact_features.copy(harness.t).set(field, value, 0)
    assert _fed(harness, 'trust_fusion:v2x/features', spec) == {f'trust_fusion:{reason}': 1}


@pytest.mark.parametrize('topic', ['trust_fusion:odom', 'trust_fusion:v2x/odom', 'lidar_detector:odom'])
@pytest.mark.parametrize('position,quaternion', [((1e308, 0, 0), (0, 0, 0, 1)), ((0, 0, 0), (0, 0, 0, 3))])
def test_absurd_poses_are_rejected(harness, topic, position, quaternion):
    agent = {'trust_fusion:odom': fuzz.EGO, 'lidar_detector:odom': fuzz.DETECTOR_AGENT}.get(topic, fuzz.COLLABORATOR)
    spec = fuzz.OdomSpec(np.array(position, float), np.array(quaternion, float), harness.t + 1, f'agent{agent}/lidar')
    assert _fed(harness, topic, spec) == {f'{topic.split(":")[0]}:bad_pose': 1}


def test_an_ego_map_with_an_absurd_sensor_height_is_rejected(harness):
    harness.t += fuzz.FRAME_NS
    harness.feed('trust_fusion:odom', fuzz.odom_spec(fuzz.EGO, harness.t))
    spec = harness.ego_map.copy(harness.t).set('sensor_height', 1e30)
    assert _fed(harness, 'trust_fusion:coop/bev', spec) == {'trust_fusion:bad_ego_map:bad_sensor_height': 1}


def test_every_accepted_agent_id_is_fused_and_larger_ones_are_rejected(harness):
    accepted, rejected = (63, 64, 1023, 2**31 - 1), (2**31, 2**63, 10**30)
    harness.t += fuzz.FRAME_NS
    before = harness.counts()
    for agent in accepted + rejected:
        frame = f'agent{agent}/lidar'
        harness.feed('trust_fusion:v2x/odom', fuzz.OdomSpec(np.array([3.0, 0, 1.8]), np.array([0, 0, 0, 1.0]),
                                                            harness.t - 1, frame))
        spec = harness.features.copy(harness.t - 1)
        spec.frame_id = frame
        harness.feed('trust_fusion:v2x/features', spec)
    _fed(harness, 'trust_fusion:odom', fuzz.odom_spec(fuzz.EGO, harness.t))
    counts = harness.counts() - before
    assert counts.get('trust_fusion:bad_agent_id') == 2 * len(rejected)
    assert not [reason for reason in counts if ':error:' in reason]
    status = harness.fusion.status()
    for agent in accepted:              # used in the frame fused right after they spoke
        assert status['agents'][str(agent)]['inputs'] == 1
        assert status['agents'][str(agent)]['used_age_s'] == pytest.approx(0.1, abs=1e-6)
