"""Detector network, decoding, NMS, uncertainty outputs, checkpoints and bad input."""
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from coop_perception.detection.bench import STAGES, bench_detector
from coop_perception.detection.checkpoint import load_detector, save_checkpoint
from coop_perception.detection.config import load_config, with_overrides
from coop_perception.detection.decode import UNCERTAINTY_FIELDS, decode, rotated_nms
from coop_perception.detection.model import Detector, apply_threads
from coop_perception.errors import UserError
from coop_perception.eval.detector_eval import evaluate_detector

CONFIG = Path(__file__).parents[1] / 'models' / 'detector.yaml'
CFG = load_config(CONFIG)


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    # a low threshold makes the untrained network emit boxes to check shapes on
    return Detector(with_overrides(CFG, decode={'score_threshold': 0.02})).eval()


def scan(rng, n=20000):
    r, a = rng.uniform(3, 45, n), rng.uniform(-np.pi, np.pi, n)
    ground = np.stack([r * np.cos(a), r * np.sin(a), np.full(n, -1.8), np.zeros(n)], 1)
    car = np.concatenate([rng.uniform([8, -1, -1.6], [12.5, 1, -0.2], (800, 3)), np.zeros((800, 1))], 1)
    return np.concatenate([ground, car]).astype(np.float32)


def test_forward_shapes_train_mode():
    torch.manual_seed(0)
    m = Detector(CFG).train()
    coords = torch.tensor([[0, 5, 100, 100], [0, 6, 100, 101], [1, 5, 30, 40]], dtype=torch.int32)
    out = m(coords, torch.rand(3, CFG.voxel.num_features), 2)
    H, W = CFG.bev_shape
    assert out['heatmap'].shape == (2, 4, H, W) and out['cls_logvar'].shape == (2, 4, H, W)
    assert out['reg'].shape == (2, 10, H, W) and out['reg_logvar'].shape == (2, 3, H, W)
    assert all(v.dtype == torch.float32 for v in out.values())


def test_detect_outputs(model):
    det = model.detect(scan(np.random.default_rng(0)))
    n = len(det.boxes)
    assert 0 < n <= CFG.decode.max_boxes
    assert det.boxes.shape == (n, 7) and det.velocities.shape == (n, 2)
    assert det.scores.shape == det.labels.shape == (n,) and np.all(np.diff(det.scores) <= 0)
    assert det.uncertainty.shape == (n, len(UNCERTAINTY_FIELDS)) and np.isfinite(det.uncertainty).all()
    assert (det.uncertainty >= 0).all() and (det.uncertainty[:, 4] <= np.log(2) + 1e-6).all()
    assert det.features.shape == (CFG.model.feature_channels, *CFG.bev_shape)
    assert det.confidence.shape == CFG.bev_shape and 0 <= det.confidence.min() <= det.confidence.max() <= 1
    assert det.grid.centres()[0, 0].tolist() == pytest.approx([-50.8, -50.8])
    assert det.sensor_height == pytest.approx(1.8, abs=0.05)
    assert {'voxelize', 'encoder', 'backbone_head', 'decode', 'mc', 'total'} <= set(det.timings_ms)


def test_mc_dropout_is_reproducible_and_optional(model):
    pts = scan(np.random.default_rng(1))
    a, b = model.detect(pts), model.detect(pts)
    np.testing.assert_allclose(a.uncertainty, b.uncertainty, rtol=1e-5)  # same masks every call
    assert a.uncertainty[:, 5].max() > 0  # dropout does move the centre
    off = model.detect(pts, mc_passes=0)
    assert np.isnan(off.uncertainty[:, 4:]).all() and np.isfinite(off.uncertainty[:, :4]).all()


@pytest.mark.parametrize('points, reason', [
    (np.zeros((0, 4), np.float32), 'empty scan'),
    (np.full((100, 4), np.nan, np.float32), 'non-finite'),
    (np.full((100, 4), 500.0, np.float32), 'outside the range'),
])
def test_bad_scans_give_empty_output_with_reason(model, points, reason, caplog):
    with caplog.at_level(logging.DEBUG, logger='coop_perception.detection'):
        det = model.detect(points)
    assert len(det.boxes) == 0 and reason in det.note and reason in caplog.text
    assert det.features.shape == (CFG.model.feature_channels, *CFG.bev_shape) and not det.confidence.any()


def test_huge_scan_is_clipped_not_fatal(model, caplog):
    rng = np.random.default_rng(0)
    pts = np.concatenate([rng.uniform(-50, 50, (2_000_000, 2)), rng.uniform(-1.8, 1, (2_000_000, 2))], 1)
    with caplog.at_level(logging.WARNING, logger='coop_perception.detection'):
        det = model.detect(pts.astype(np.float32))
    assert 'max_points' in det.note and 'max_points' in caplog.text
    assert det.stats.voxels <= CFG.voxel.max_voxels


def test_rotated_nms():
    boxes = np.array([[0, 0, 0, 4, 2, 1.5, 0], [1, 0, 0, 4, 2, 1.5, 0], [0, 0, 0, 4, 2, 1.5, np.pi / 2],
                      [10, 0, 0, 4, 2, 1.5, 0]])
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    # IoU(0, 1) = 0.6, IoU(0, 2) = 1/3
    assert rotated_nms(boxes, scores, 0.5).tolist() == [0, 2, 3]
    assert rotated_nms(boxes, scores, 0.2).tolist() == [0, 3]
    assert rotated_nms(boxes[:0], scores[:0], 0.2).tolist() == []


def test_decode_hand_made_maps(model):
    K, (H, W) = 4, CFG.bev_shape
    Ch = CFG.model.head_channels
    maps = {'heatmap': torch.full((1, K, H, W), -10.0), 'cls_logvar': torch.full((1, K, H, W), -10.0),
            'reg': torch.zeros(1, 10, H, W), 'reg_logvar': torch.zeros(1, 3, H, W),
            'cells': torch.rand(1, H, W, Ch), 'features': torch.rand(1, CFG.model.feature_channels, H, W)}
    car = [0.1, -0.2, 0.8, np.log(4.5), np.log(1.9), np.log(1.6), np.sin(0.3), np.cos(0.3), 2.0, 1.0]
    maps['heatmap'][0, 0, 64, 70] = 5.0
    maps['reg'][0, :, 64, 70] = torch.tensor(car)
    maps['reg_logvar'][0, :, 64, 70] = torch.tensor(np.log([0.04, 0.09, 0.01]))
    maps['heatmap'][0, 0, 64, 71] = 4.0  # next to a stronger peak: not a peak
    maps['heatmap'][0, 0, 64, 73] = 3.0  # its box overlaps the first (IoU 0.8): NMS removes it
    maps['reg'][0, :, 64, 73] = torch.tensor([-1.8, *car[1:]])
    maps['heatmap'][0, 2, 10, 10] = 2.0  # a pedestrian elsewhere
    maps['reg'][0, :, 10, 10] = torch.tensor([0, 0, 0.9, np.log(0.6), np.log(0.6), np.log(1.8), 0, 1, 0, 0])
    det = decode(model.head, maps, model.cfg, model.grid(), 1.8, 4, {})
    assert det.labels.tolist() == [0, 2]
    assert det.scores[0] == pytest.approx(1 / (1 + np.exp(-5)), rel=1e-4)
    # cell (64, 70) centre: x = -51.2 + 70.5 * 0.8 = 5.2, y = -51.2 + 64.5 * 0.8 = 0.4
    np.testing.assert_allclose(det.boxes[0], [5.3, 0.2, 0.8 - 1.8, 4.5, 1.9, 1.6, 0.3], atol=1e-5)
    np.testing.assert_allclose(det.velocities[0], [2, 1])
    np.testing.assert_allclose(det.uncertainty[0, :4], [0.04, 0.09, 0.01, np.exp(-10)], rtol=1e-4)
    np.testing.assert_allclose(det.boxes[1, :2], [-51.2 + 10.5 * 0.8] * 2, atol=1e-5)


def test_checkpoint_roundtrip_and_mismatch(tmp_path, model):
    path = tmp_path / 'detector.pt'
    save_checkpoint(path, model)
    pts = scan(np.random.default_rng(2))
    loaded = load_detector(path, CONFIG)
    assert loaded.cfg.decode.score_threshold == CFG.decode.score_threshold  # the YAML wins here
    np.testing.assert_allclose(loaded.detect(pts).confidence, model.detect(pts).confidence, rtol=1e-5)

    other = tmp_path / 'other.yaml'
    other.write_text(CONFIG.read_text().replace('head_channels: 64', 'head_channels: 32')
                     .replace('count_norm: 8.0', 'count_norm: 4.0'))
    with pytest.raises(UserError) as e:
        load_detector(path, other)
    assert 'model.head_channels: 64 vs 32' in str(e.value) and 'voxel.count_norm: 8.0 vs 4.0' in str(e.value)


def test_config_rejects_unknown_and_missing_keys(tmp_path):
    bad = tmp_path / 'bad.yaml'
    bad.write_text(CONFIG.read_text().replace('  dropout: 0.1', '  dropuot: 0.1'))
    with pytest.raises(UserError, match=r"model\.: unknown keys \['dropuot'\], missing keys \['dropout'\]"):
        load_config(bad)


def test_evaluation_report_is_plain_json(model):
    pts = scan(np.random.default_rng(3))
    ex = (pts, np.array([[10.25, 0.0, -0.9, 4.5, 2.0, 1.4, 0.0]]), np.array([0]), np.zeros((1, 2)))
    report = evaluate_detector(model, [ex, ex], max_range=50.0, progress=False)
    json.dumps(report, allow_nan=False)
    assert report['frames'] == 2 and report['gt']['car'] == 2 and set(report['ap']) == set(CFG.classes)
    assert set(report['uncertainty']['auroc']) == {*UNCERTAINTY_FIELDS, 'ale_corner'}
    assert 'score_auroc' in report['uncertainty']
    assert set(report['false_positives_per_scan']) == {*CFG.classes, 'all'}
    assert report['latency_ms']['median'] > 0


def test_detect_from_features_matches_detect(model):
    pts = scan(np.random.default_rng(4))
    det = model.detect(pts)
    again = model.detect_from_features(det.features, det.sensor_height)
    np.testing.assert_allclose(again.boxes, det.boxes, atol=1e-4)
    np.testing.assert_allclose(again.uncertainty, det.uncertainty, rtol=1e-4, atol=1e-6)


def test_decode_regresses_kept_cells_like_full_box_maps(model):
    feats = model.detect(scan(np.random.default_rng(5))).features
    x = torch.from_numpy(feats)[None]
    with torch.inference_mode():
        full, lean = model.head(x), model.head(x, boxes=False)
        assert 'reg' not in lean and 'reg_logvar' not in lean
        a = decode(model.head, {**full, 'features': x}, model.cfg, model.grid(), 1.8, 4, {})
        b = decode(model.head, {**lean, 'features': x}, model.cfg, model.grid(), 1.8, 4, {})
    assert len(a.boxes) > 0
    np.testing.assert_allclose(b.boxes, a.boxes, atol=1e-5)
    np.testing.assert_allclose(b.uncertainty, a.uncertainty, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(b.velocities, a.velocities, atol=1e-5)


def test_apply_threads():
    before = torch.get_num_threads()
    try:
        apply_threads(with_overrides(CFG, runtime={'threads': 1}))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_bench_reports_every_stage(model):
    pts = scan(np.random.default_rng(5))
    stacked = np.concatenate([pts, pts + [0.5, 0, 0, 0]])
    ages = np.repeat(np.array([0.0, 0.1], np.float32), len(pts))
    report = bench_detector(model, [(pts, None), (stacked, ages), (np.zeros((0, 4), np.float32), None)], warmup=1)
    assert report['scans'] == 3 and set(report['median_ms']) == set(STAGES)
    assert report['median_ms']['total'] >= report['median_ms']['encoder'] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason='the patch applies to CPU-only torch')
def test_spconv_cpu_patch_is_installed():
    import spconv.pytorch.ops as ops
    assert ops.get_current_stream() == 0
