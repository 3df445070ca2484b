"""Targets, augmentation, schedule, the training loop (smoke test: the loss decreases) and resume."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from coop_perception.bev_grid import BevGrid
from coop_perception.detection.augment import augment_scene
from coop_perception.detection.checkpoint import load_detector
from coop_perception.detection.config import load_config, with_overrides
from coop_perception.detection.decode import boxes_from_regression
from coop_perception.detection.targets import example_targets
from coop_perception.detection.train import TrainExample, batch_indices, lr_at, prepare_batch, train
from coop_perception.errors import UserError
from coop_perception.geometry import points_in_boxes

CFG = load_config(Path(__file__).parents[1] / 'models' / 'detector.yaml')
SENSOR_H = 1.8


def toy_scene(rng):
    """Ground returns plus points on the surfaces of two cars and a pedestrian (sensor frame)."""
    boxes = np.array([[10.0, 3.0, -1.0, 4.5, 1.9, 1.6, 0.4],
                      [-8.0, -6.0, -1.05, 4.2, 1.8, 1.5, -1.2],
                      [5.0, -9.0, -0.95, 0.6, 0.6, 1.7, 0.0]])
    n = 6000
    r, a = rng.uniform(3, 40, n), rng.uniform(-np.pi, np.pi, n)
    parts = [np.stack([r * np.cos(a), r * np.sin(a), rng.normal(-SENSOR_H, 0.02, n)], 1)]
    for b in boxes:
        local = rng.uniform(-0.5, 0.5, (400, 3)) * b[3:6]
        face = rng.integers(0, 3, 400)
        local[np.arange(400), face] = np.sign(local[np.arange(400), face]) * b[3 + face] / 2
        c, s = np.cos(b[6]), np.sin(b[6])
        parts.append(local @ np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]]) + b[:3])
    pts = np.concatenate(parts)
    pts = np.concatenate([pts, np.zeros((len(pts), 1))], 1).astype(np.float32)
    return TrainExample(pts, boxes, np.array([0, 0, 2]), np.array([[3.0, 1.0], [0.0, 0.0], [1.0, 0.0]]), SENSOR_H)


def test_targets_roundtrip():
    ex = toy_scene(np.random.default_rng(0))
    heatmap, index, reg = example_targets(ex.boxes, ex.labels, ex.velocities, SENSOR_H, CFG)
    H, W = CFG.bev_shape
    assert heatmap.shape == (4, H, W) and heatmap.max() == 1.0
    grid = BevGrid.for_detector(CFG)
    rows, cols = grid.unflatten(index)
    boxes, vel = boxes_from_regression(reg, rows, cols, grid, SENSOR_H)
    order = np.argsort(np.hypot(ex.boxes[:, 0], ex.boxes[:, 1]))  # targets list nearest first
    np.testing.assert_allclose(boxes, ex.boxes[order], atol=1e-5)
    np.testing.assert_allclose(vel, ex.velocities[order], atol=1e-6)
    assert heatmap[ex.labels[order], rows, cols].tolist() == [1.0, 1.0, 1.0]
    assert (heatmap[1] == 0).all() and (heatmap[3] == 0).all()


def test_targets_skip_unusable_boxes():
    boxes = np.array([[70.0, 0, -1, 4, 2, 1.5, 0], [5, 5, -1, 4, 2, 1.5, 0], [6, 6, -1, 4, 2, 1.5, 0],
                      [7, 7, -1, np.nan, 2, 1.5, 0]])
    heatmap, index, reg = example_targets(boxes, np.array([0, -1, 1, 0]), np.zeros((4, 2)), SENSOR_H, CFG)
    assert len(index) == 1 and heatmap[1].max() == 1.0 and heatmap[0].max() == 0.0


def test_augmentation_keeps_points_in_their_boxes():
    ex = toy_scene(np.random.default_rng(0))
    surface = ex.points[6000:]  # object points lie on the box faces: test against 1 cm larger boxes
    def count(pts, boxes):
        grown = boxes.copy()
        grown[:, 3:6] += 0.01
        return points_in_boxes(pts, grown).sum(1)
    aug = with_overrides(CFG, train={'augment': {'rotation': 3.0, 'scale': [0.9, 1.1]}}).train.augment
    for seed in range(4):
        pts, boxes, vel, h = augment_scene(surface, ex.boxes, ex.velocities, SENSOR_H, aug,
                                           np.random.default_rng(seed))
        np.testing.assert_array_equal(count(pts, boxes), [400, 400, 400])
        scale = h / SENSOR_H
        np.testing.assert_allclose(np.linalg.norm(vel, axis=1), scale * np.linalg.norm(ex.velocities, axis=1))
        # the heading still points along the velocity of the first car
        assert np.cos(boxes[0, 6] - np.arctan2(vel[0, 1], vel[0, 0])) == pytest.approx(
            np.cos(ex.boxes[0, 6] - np.arctan2(1.0, 3.0)), abs=1e-6)


def test_schedule_and_batch_order():
    tc = CFG.train
    assert lr_at(0, tc) == pytest.approx(0.1 * tc.lr)
    assert lr_at(tc.warmup_iterations, tc) == pytest.approx(tc.lr)
    assert lr_at(tc.iterations, tc) == pytest.approx(0.01 * tc.lr)
    epoch = [i for it in range(5) for i in batch_indices(it, 10, 2, 0)]
    assert sorted(epoch) == list(range(10))  # one epoch = a permutation
    assert batch_indices(7, 10, 2, 0) == batch_indices(7, 10, 2, 0)


def small_train_config(**train):
    base = {'iterations': 12, 'batch_size': 1, 'lr': 0.004, 'warmup_iterations': 0, 'checkpoint_every': 6,
            'log_every': 1, 'augment': {'rotation': 0.0, 'flip': False, 'scale': [1.0, 1.0]}}
    base.update(train)
    return with_overrides(CFG, train=base)


def test_training_smoke_loss_decreases_and_checkpoint_loads(tmp_path):
    cfg = small_train_config()
    examples = [toy_scene(np.random.default_rng(0))]
    summary = train(cfg, examples, tmp_path, progress=False)
    log = [json.loads(line) for line in (tmp_path / 'train_log.jsonl').read_text().splitlines()]
    losses = [row['loss'] for row in log]
    assert len(losses) == 12 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])
    model = load_detector(summary.weights)
    assert not model.training and model.cfg.train.iterations == 12


def test_resume_continues_where_it_stopped(tmp_path):
    examples = [toy_scene(np.random.default_rng(0)), toy_scene(np.random.default_rng(1))]
    train(small_train_config(iterations=4, checkpoint_every=2), examples, tmp_path / 'a', progress=False)
    state = torch.load(tmp_path / 'a' / 'checkpoint.pt', weights_only=True)
    assert state['iteration'] == 4
    with open(tmp_path / 'a' / 'train_log.jsonl', 'a') as f:  # as if a run had crashed after logging 5
        f.write(json.dumps({'iteration': 5, 'loss': 1.0}) + '\n')
    train(small_train_config(iterations=6, checkpoint_every=2), examples, tmp_path / 'a', progress=False)
    log = [json.loads(line)['iteration'] for line in (tmp_path / 'a' / 'train_log.jsonl').read_text().splitlines()]
    assert log == [1, 2, 3, 4, 5, 6]  # no iteration repeated


def test_fine_tuning_starts_from_given_weights_and_resumes_its_own_checkpoint(tmp_path):
    examples = [toy_scene(np.random.default_rng(0))]
    base = train(small_train_config(iterations=2), examples, tmp_path / 'base', progress=False).weights
    start = load_detector(base).state_dict()
    # zero iterations: the weights written are the ones it started from
    tuned = train(small_train_config(iterations=0), examples, tmp_path / 'zero', progress=False, init=base).weights
    assert all(torch.equal(v, load_detector(tuned).state_dict()[k]) for k, v in start.items())
    fresh = train(small_train_config(iterations=0), examples, tmp_path / 'fresh', progress=False).weights
    assert not all(torch.equal(v, load_detector(fresh).state_dict()[k]) for k, v in start.items())
    # a run folder with a checkpoint resumes it; init is not applied on top
    train(small_train_config(iterations=2), examples, tmp_path / 'tune', progress=False, init=base)
    before = torch.load(tmp_path / 'tune' / 'checkpoint.pt', weights_only=True)['model']
    train(small_train_config(iterations=2), examples, tmp_path / 'tune', progress=False, init=fresh)
    after = load_detector(tmp_path / 'tune' / 'detector.pt').state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    bad = with_overrides(small_train_config(iterations=1), model={'head_channels': 16})
    with pytest.raises(UserError, match='does not match the training config'):
        train(bad, examples, tmp_path / 'bad', progress=False, init=base)


def test_prepare_batch_handles_empty_examples():
    ex = toy_scene(np.random.default_rng(0))
    empty = TrainExample(np.zeros((0, 4), np.float32), np.zeros((0, 7)), np.zeros(0, int), np.zeros((0, 2)), None)
    b = prepare_batch([ex, empty], CFG, np.random.default_rng(0))
    assert b.size == 2 and set(b.coords[:, 0].tolist()) == {0}
    assert b.targets.mask.sum() == 3 and b.targets.heatmap.shape[0] == 2
