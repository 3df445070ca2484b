"""Fusion training on a feature cache (resumable, loss finite) and the delay-sweep evaluation."""
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from coop_perception.data.objects import OBJECT_DTYPE
from coop_perception.data.v2xsim import V2XSimDataset
from coop_perception.detection.config import load_config, with_overrides
from coop_perception.detection.model import Detector
from coop_perception.eval.bench_fusion import STAGES, bench_fusion
from coop_perception.eval.delay_plot import plot_bytes_sweep
from coop_perception.eval.fusion_eval import evaluate_fusion, evaluate_sharing, format_results
from coop_perception.eval.gate_calibration import calibrate_gate
from coop_perception.fusion.cache import (FeatureCache, add_scan_velocities, build_cache, load_view, save_view,
                                         scan_velocity_key)
from coop_perception.fusion.model import FusionModel
from coop_perception.fusion.train import FusionExamples, FusionTrainConfig, delayed_frame, train_fusion
from coop_perception.fusion.trust import ThresholdTrust

CFG = load_config(Path(__file__).parents[1] / 'models' / 'detector.yaml')


@pytest.fixture(scope='module')
def setup(tiny_dataset, tmp_path_factory):
    torch.manual_seed(0)
    det = Detector(with_overrides(CFG, decode={'score_threshold': 0.05, 'mc_passes': 2})).eval()
    ds = V2XSimDataset(tiny_dataset)
    root = tmp_path_factory.mktemp('cache')
    assert build_cache(ds, det, root, progress=False) == 12
    assert build_cache(ds, det, root, progress=False) == 0        # resumable: nothing redone
    return det, ds, FeatureCache(root, det.grid())


def test_delayed_frame():
    stamps = np.array([0, 100, 200, 300]) * 1_000_000
    assert delayed_frame(stamps, 300_000_000, 0) == 3
    assert delayed_frame(stamps, 300_000_000, 150_000_000) == 1
    assert delayed_frame(stamps, 300_000_000, 400_000_000) is None


def test_cache_round_trip(setup, tmp_path):
    det, ds, cache = setup
    sample = ds.sample(0, 1)
    view = cache.load(sample.scene_name, 1, 2)
    assert view.stamp_ns == sample.agents[2].timestamp_us * 1000
    assert np.allclose(view.T_world_sensor, sample.agents[2].T_world_sensor)
    fresh = det.detect(sample.agents[2].load_points()[:, :4])
    save_view(tmp_path / 'v.npz', fresh, view.T_world_sensor, view.stamp_ns)
    back = load_view(tmp_path / 'v.npz', det.grid()).detections
    for name in ('boxes', 'scores', 'labels', 'velocities', 'uncertainty'):
        assert np.array_equal(getattr(back, name), getattr(fresh, name)), name
    err = np.linalg.norm(back.features - fresh.features) / np.linalg.norm(fresh.features)
    assert err < 0.01                                                   # int8 per-cell quantisation


LOW_ROI = {'score_threshold': 0.05}  # the untrained detector is never confident


def test_measured_velocities_live_beside_the_views(setup):
    det, ds, cache = setup
    sv = CFG.scan_velocity
    assert add_scan_velocities(ds, cache.root, sv, progress=False) == 12
    assert add_scan_velocities(ds, cache.root, sv, progress=False) == 0        # resumable
    key = scan_velocity_key(sv)
    assert key and key != scan_velocity_key(replace(sv, min_points=11))
    assert scan_velocity_key(replace(sv, sweeps=1)) is None
    sample = ds.sample(0, 1)
    plain = cache.load(sample.scene_name, 1, 2).detections
    measured = FeatureCache(cache.root, det.grid(), 0.0, key).load(sample.scene_name, 1, 2).detections
    assert np.ndim(plain.velocity_std) == 0
    assert np.shape(measured.velocity_std) == (len(plain.boxes),) and (measured.velocity_std >= 0).all()
    np.testing.assert_array_equal(measured.velocities[measured.velocity_std == 0],
                                  plain.velocities[measured.velocity_std == 0])


def test_examples_have_collaborators_and_targets(setup):
    det, ds, cache = setup
    ex = FusionExamples(ds, cache, LOW_ROI)
    assert len(ex) == 4 * 2                                            # frames x vehicle egos
    x, (boxes, labels, vel), h = ex.example(len(ex) - 1, np.random.default_rng(0),
                                            FusionTrainConfig(max_latency_ms=0.0, loss_probability=0.0))
    assert x.valid.sum() == 2 and x.roi[x.valid].any()
    assert boxes.shape[1] == 7 and len(boxes) == len(labels) == len(vel) and len(boxes) > 5


def test_training_runs_and_resumes(setup, tmp_path):
    det, ds, cache = setup
    ex = FusionExamples(ds, cache, LOW_ROI)
    cfg = FusionTrainConfig(iterations=2, checkpoint_every=1, batch_size=2)
    path = train_fusion(det, ex, tmp_path, cfg, progress=False)
    first = FusionModel.load(path)
    cfg.iterations = 3
    train_fusion(det, ex, tmp_path, cfg, progress=False)              # continues from iteration 2
    second = FusionModel.load(tmp_path / 'fusion.pt')
    assert any(not torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_evaluation_sweep(setup):
    det, ds, cache = setup
    result = evaluate_fusion(ds, det, cache, FusionModel(CFG.model.feature_channels),
                             ['ego', 'late', 'max', 'trust'], [0, 300], roi_policy=LOW_ROI, progress=False)
    rows = {(r['method'], r['delay_ms']): r for r in result['results']}
    assert len(rows) == 8
    assert rows[('ego', 0.0)]['bytes_per_agent_frame'] == 0
    assert 0 < rows[('late', 0.0)]['bytes_per_agent_frame'] <= 100 * OBJECT_DTYPE.itemsize   # <= max_boxes
    assert 0 < rows[('max', 0.0)]['bytes_per_agent_frame'] <= 20_000                       # cells' budget
    # trust fuses the default compact records, one packet a frame; max fuses cells
    assert 0 < rows[('trust', 300.0)]['bytes_per_agent_frame'] <= 1398
    assert rows[('trust', 300.0)]['bytes_per_agent_frame'] < rows[('max', 300.0)]['bytes_per_agent_frame']
    assert 'AP@0.7' in format_results(result)


def test_sharing_sweep_rows_name_their_layout_and_budget(setup, tmp_path):
    det, ds, cache = setup
    policies = [{**LOW_ROI, 'format': 'compact', 'max_bytes': 1398}, {**LOW_ROI, 'format': 'compact', 'max_bytes': 400},
                {**LOW_ROI, 'format': 'cells', 'max_bytes': 5000}]
    result = evaluate_sharing(ds, det, cache, FusionModel(CFG.model.feature_channels), ['late', 'trust'], [0],
                              policies, progress=False)
    rows = result['results']
    assert [r['method'] for r in rows] == ['late', 'trust', 'trust', 'trust']   # late runs once
    assert 'sharing' not in rows[0]
    by = {(r['sharing'], r['budget_bytes']): r['bytes_per_agent_frame'] for r in rows[1:]}
    assert 0 < by[('compact', 400)] <= 400 and by[('compact', 400)] <= by[('compact', 1398)] <= 1398
    assert by[('cells', 5000)] <= 5000
    assert 'compact' in format_results(result)
    assert plot_bytes_sweep(result, tmp_path / 'bytes.png').stat().st_size > 1000


def test_fusion_benchmark_times_every_stage(setup):
    det, ds, cache = setup
    result = bench_fusion(ds, det, cache, FusionModel(CFG.model.feature_channels), frames=3, progress=False)
    assert result['frames'] == 3 and result['collaborators'] >= 1
    stages = result['median_ms']
    assert all(stages[s] > 0 for s in STAGES)
    assert stages['total'] >= max(stages[s] for s in STAGES if s != 'total')


def test_trust_gate_calibration(setup):
    det, ds, cache = setup
    gate, summary = calibrate_gate(ds, cache, det.cfg.classes, min_score=0.05, progress=False)
    assert summary['true_positives'] + summary['false_positives'] > 0
    assert set(gate.thresholds) == {'cls_aleatoric', 'cls_epistemic', 'reg_aleatoric', 'reg_epistemic'}
    assert ThresholdTrust.from_dict(gate.to_dict()) == gate
