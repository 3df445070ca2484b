"""The ego's full map between its detector and fusion nodes, fused object lists, small helpers."""
import numpy as np
import pytest
import torch
from ros_fixtures import ROOT, TINY, valid_scan

from coop_perception.data.bag import agent_from_frame
from coop_perception.data.channel import channel_for_mean_latency, channel_from_settings
from coop_perception.data.objects import OBJECT_DTYPE
from coop_perception.data.pointcloud import fields_to_dtype
from coop_perception.detection.config import load_config, with_overrides
from coop_perception.detection.model import Detector
from coop_perception.fusion.codec import FeatureMessageError, dequantise, quantise
from coop_perception.fusion.ego_map import SENSOR_HEIGHT_FIELD, decode_ego_map, encode_ego_map
from coop_perception.fusion.pipeline import FusedDetections


@pytest.fixture(scope='module')
def detector():
    torch.manual_seed(0)
    return Detector(with_overrides(load_config(ROOT / 'models' / 'detector.yaml'), **TINY)).eval()


def _decode(detector, fields, data, step):
    return decode_ego_map(fields, data, step, width=len(data) // step, detector=detector, agent_id=1, stamp_ns=7)


def test_round_trip_gives_the_detections_of_the_quantised_map(detector):
    det = detector.detect(valid_scan(0))
    fields, data, step = encode_ego_map(det, 1, 7)
    assert SENSOR_HEIGHT_FIELD in [f.name for f in fields]
    got = _decode(detector, fields, data, step)
    # What offline evaluation fuses: the map with the feature cache's per-cell int8 quantisation.
    C, H, W = det.features.shape
    q, scale = quantise(det.features.reshape(C, -1).T)
    expected = detector.detect_from_features(dequantise(q, scale).T.reshape(C, H, W), det.sensor_height, mc_passes=0)
    np.testing.assert_allclose(got.features, expected.features)
    np.testing.assert_array_equal(got.boxes, expected.boxes)
    assert got.sensor_height == pytest.approx(det.sensor_height, abs=1e-6)
    assert len(got.boxes) and np.abs(got.scores - det.scores).max() < 0.02


def test_empty_scan_and_bad_maps(detector):
    empty = detector.detect(np.zeros((0, 4), np.float32))
    got = _decode(detector, *encode_ego_map(empty, 1, 7))
    assert len(got.boxes) == 0 and got.features.shape == empty.features.shape
    det = detector.detect(valid_scan(1))
    fields, data, step = encode_ego_map(det, 1, 7)
    rec = np.frombuffer(data, fields_to_dtype(fields, step)).copy()
    rec[SENSOR_HEIGHT_FIELD][3] = np.nan
    with pytest.raises(FeatureMessageError) as e:
        _decode(detector, fields, rec.tobytes(), step)
    assert e.value.reason == FeatureMessageError.NON_FINITE
    without = [f for f in fields if f.name != SENSOR_HEIGHT_FIELD]
    with pytest.raises(FeatureMessageError) as e:
        _decode(detector, without, data, step)
    assert e.value.reason == FeatureMessageError.MISSING_FIELD


def test_fused_objects_name_the_single_source():
    n = 4
    fused = FusedDetections(boxes=np.arange(n * 7, dtype=float).reshape(n, 7), scores=np.full(n, 0.5),
                            labels=np.arange(n), velocities=np.ones((n, 2)), trust=np.array([0, 0.5, 1, 0.2]),
                            sources=np.array([0b10, 0b110, 0b1, 0b1000]), stamp_ns=1, ages_s={})
    objects = fused.to_objects()
    assert objects.dtype == OBJECT_DTYPE
    assert objects['source'].tolist() == [1, -1, 0, 3]
    assert objects['trust'].tolist() == pytest.approx([0, 0.5, 1, 0.2])
    assert objects['x'].tolist() == [0, 7, 14, 21] and objects['label'].tolist() == [0, 1, 2, 3]


def test_agent_from_frame():
    assert agent_from_frame('agent3/lidar') == 3 and agent_from_frame('/agent12/base_link') == 12
    assert agent_from_frame('lidar') is None and agent_from_frame('agentX/lidar') is None
    assert agent_from_frame('agent3') is None


def test_channel_from_flat_settings_uses_what_the_model_takes():
    flat = {'spread': 0.25, 'frame_ms': 100.0, 'trials': 10, 'bandwidth_mbps': 10.0, 'jitter_ms': 0.0,
            'loss': 0.1, 'seed': 3, 'clock_offset_ms': 0.0, 'clock_offset_std_ms': 0.0}
    for model in ('fixed', 'uniform', 'bernoulli_frames', 'bandwidth'):
        channel = channel_from_settings(model, 200.0, flat)
        assert channel.mean_latency_s() == pytest.approx(0.2) and channel.loss == 0.1
    assert channel_from_settings('uniform', 200.0, flat).spec == channel_for_mean_latency(
        200.0, 'uniform', spread=0.25, loss=0.1, seed=3, clock_offset_ms=0.0, clock_offset_std_ms=0.0).spec
    with pytest.raises(ValueError, match='channel model'):
        channel_from_settings('carrier_pigeon', 200.0, flat)


def test_free_range_rides_on_the_ego_map(detector):
    from coop_perception.detection.free_range import FREE_RANGE_BINS
    from coop_perception.fusion.ego_map import FREE_RANGE_FIELD, decode_free_range

    det = detector.detect(valid_scan(0))
    fields, data, step = encode_ego_map(det, 1, 7)
    width = len(data) // step
    assert width >= FREE_RANGE_BINS and FREE_RANGE_FIELD in [f.name for f in fields]
    got = decode_free_range(fields, data, step, width=width, bins=FREE_RANGE_BINS)
    np.testing.assert_array_equal(got, det.free_range)
    # a detector without the field, or a map with fewer cells than bins, carries none
    without = [f for f in fields if f.name != FREE_RANGE_FIELD]
    assert decode_free_range(without, data, step, width=width, bins=FREE_RANGE_BINS) is None
    assert decode_free_range(fields, data[:step * 10], step, width=10, bins=FREE_RANGE_BINS) is None
    rec = np.frombuffer(data, fields_to_dtype(fields, step)).copy()
    for bad, reason in ((np.inf, FeatureMessageError.NON_FINITE), (-1.0, FeatureMessageError.BAD_VALUE)):
        rec[FREE_RANGE_FIELD][5] = bad
        with pytest.raises(FeatureMessageError) as e:
            decode_free_range(fields, rec.tobytes(), step, width=width, bins=FREE_RANGE_BINS)
        assert e.value.reason == reason
