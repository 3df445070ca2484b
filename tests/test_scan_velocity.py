"""Velocities measured by registering each vehicle's points against the sensor's previous sweeps."""
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from coop_perception.detection.config import ScanVelocityConfig, load_config, with_overrides
from coop_perception.detection.scan_velocity import measure_velocities, register_shift
from coop_perception.detection.sweeps import newest_sweeps, sweep_slices
from coop_perception.errors import UserError
from coop_perception.fusion.motion import VelocityTracker

CFG = ScanVelocityConfig()
CAR = np.array([20.0, 5.0, 0.8, 4.5, 1.9, 1.6, 0.3])   # x, y, z (centre), l, w, h, yaw


def car_points(box: np.ndarray, rng: np.random.Generator, n: int = 120) -> np.ndarray:
    """(n, 4) points on the two faces of a box a sensor at the origin sees (its back and side,
    an L), plus ground under it; float32 x, y, z, intensity."""
    l, w, h, yaw = box[3], box[4], box[5], box[6]
    along = rng.uniform(-l / 2, l / 2, n // 2)
    across = rng.uniform(-w / 2, w / 2, n // 2)
    local = np.concatenate([np.column_stack([along, np.full(n // 2, -w / 2)]),
                            np.column_stack([np.full(n // 2, -l / 2), across])])
    c, s = np.cos(yaw), np.sin(yaw)
    xy = local @ np.array([[c, s], [-s, c]]) + box[:2]
    z = box[2] + rng.uniform(-h / 2 + 0.35, h / 2, n)
    ground = np.column_stack([xy[:20] + rng.normal(0, 0.5, (20, 2)), np.full(20, box[2] - h / 2)])
    pts = np.concatenate([np.column_stack([xy, z]), ground])
    return np.column_stack([pts, np.zeros(len(pts))]).astype(np.float32)


def stack(box: np.ndarray, velocity: np.ndarray, ages=(0.0, 0.1, 0.2, 0.3), seed: int = 0):
    """Stacked sweeps (newest first) of a car moving at ``velocity`` (m/s), each sampled anew."""
    rng = np.random.default_rng(seed)
    parts, tags = [], []
    for age in ages:
        b = box.copy()
        b[:2] -= velocity * age
        parts.append(car_points(b, rng))
        tags.append(np.full(len(parts[-1]), age, np.float32))
    return np.concatenate(parts), np.concatenate(tags)


def test_register_shift_finds_a_displacement_to_a_fraction_of_a_cell():
    rng = np.random.default_rng(1)
    before = np.column_stack([rng.uniform(-2, 2, 200), rng.choice([-0.9, 0.9], 200)])
    now = before + [0.73, -0.12]
    shift = register_shift(now, before, (2.5, 1.2), (2.0, 0.6), cell=0.1, blur=1.0)
    np.testing.assert_allclose(shift, [0.73, -0.12], atol=0.03)


@pytest.mark.parametrize('velocity', [(0.0, 0.0), (8.0, 3.0), (-4.0, 1.0)])
def test_a_cars_velocity_is_measured_from_its_first_scan(velocity):
    v = np.array(velocity)
    pts, ages = stack(CAR, v)
    est, noise = measure_velocities(CAR[None], np.array([0]), np.array([0.9]), pts, ages, CFG)
    assert noise[0] > 0
    np.testing.assert_allclose(est[0], v, atol=0.3)


def test_what_is_not_measured_gets_noise_0():
    pts, ages = stack(CAR, np.array([5.0, 0.0]))
    boxes = np.stack([CAR, CAR, CAR + [30, 0, 0, 0, 0, 0, 0]])
    # a pedestrian, a low score, and a box with no points around it
    _, noise = measure_velocities(boxes, np.array([2, 0, 0]), np.array([0.9, 0.1, 0.9]), pts, ages, CFG)
    assert noise.tolist() == [0, 0, 0]
    # one sweep only, and the measurement switched off
    assert not measure_velocities(CAR[None], [0], [0.9], pts[ages == 0], ages[ages == 0], CFG)[1].any()
    assert not measure_velocities(CAR[None], [0], [0.9], pts, ages, replace(CFG, sweeps=1))[1].any()


def test_sweeps_that_disagree_are_not_trusted():
    pts, ages = stack(CAR, np.array([5.0, 0.0]), ages=(0.0, 0.1))
    far = stack(CAR, np.array([-5.0, 0.0]), ages=(0.0, 0.2))
    old = far[1] > 0
    pts, ages = np.concatenate([pts, far[0][old]]), np.concatenate([ages, far[1][old]])
    _, noise = measure_velocities(CAR[None], [0], [0.9], pts, ages, replace(CFG, agree_m_s=1.0))
    assert noise[0] == 0


def test_noise_shrinks_with_points_and_span():
    pts, ages = stack(CAR, np.array([5.0, 0.0]))
    _, all4 = measure_velocities(CAR[None], [0], [0.9], pts, ages, CFG)
    short = ages <= 0.1
    _, two = measure_velocities(CAR[None], [0], [0.9], pts[short], ages[short], CFG)
    assert 0 < all4[0] < two[0]


def test_sweep_slices_and_newest_sweeps():
    ages = np.array([0, 0, 0.1, 0.1, 0.1, 0.2, 0.3], np.float32)
    assert [(round(a, 2), s.start, s.stop) for a, s in sweep_slices(ages)] == [
        (0.0, 0, 2), (0.1, 2, 5), (0.2, 5, 6), (0.3, 6, 7)]
    pts = np.arange(7)
    assert newest_sweeps(pts, ages, 1, 0.25)[0].tolist() == [0, 1]
    assert newest_sweeps(pts, ages, 3, 0.25)[0].tolist() == [0, 1, 2, 3, 4, 5]
    assert newest_sweeps(pts, ages, 4, 0.15)[0].tolist() == [0, 1, 2, 3, 4]
    assert len(newest_sweeps(pts, ages, 9, 1.0)[0]) == 7 and sweep_slices(np.zeros(0)) == []


def test_tracker_takes_a_velocity_per_box_and_ignores_unmeasured_ones():
    tracker = VelocityTracker()
    boxes = np.stack([CAR, CAR + [0, 10, 0, 0, 0, 0, 0]])
    v, std = tracker.update(boxes, np.array([0, 0]), np.eye(4), 0, np.array([[6.0, 0.0], [9.0, 9.0]]),
                            np.array([0.2, 0.0]))
    # the measured new track starts from its measurement; the unmeasured one from standing still,
    # with the spread of a guess
    np.testing.assert_allclose(v, [[6.0, 0.0], [0.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(std, [0.2, tracker.cfg.init_speed_std])
    moved = boxes + [[0.6, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0]]
    v, std = tracker.update(moved, np.array([0, 0]), np.eye(4), 100_000_000, np.zeros((2, 2)),
                            np.array([0.0, np.nan]))
    assert v[0, 0] == pytest.approx(6.0, abs=0.3) and np.abs(v[1]).max() < 1.0
    assert std[0] < 1.0 and std[1] < tracker.cfg.init_speed_std


def test_detector_config_validates_the_section():
    cfg = load_config(Path(__file__).parents[1] / 'models' / 'detector.yaml')
    assert cfg.scan_velocity.on and cfg.sweeps_needed == cfg.scan_velocity.sweeps
    with pytest.raises(UserError, match='scan_velocity'):
        with_overrides(cfg, scan_velocity={'classes': ['bus']})
    with pytest.raises(UserError, match='scan_velocity'):
        with_overrides(cfg, scan_velocity={'cell_m': 0})


def test_detector_network_sees_its_own_sweeps_and_measures_from_all():
    import torch

    from coop_perception.detection.model import Detector
    torch.manual_seed(0)
    cfg = with_overrides(load_config(Path(__file__).parents[1] / 'models' / 'detector.yaml'),
                         decode={'score_threshold': 0.02, 'mc_passes': 0},
                         scan_velocity={'min_score': 0.0, 'classes': ['car', 'truck', 'pedestrian', 'cyclist']})
    model = Detector(cfg).eval()
    rng = np.random.default_rng(0)
    r, a = rng.uniform(3, 45, 20000), rng.uniform(-np.pi, np.pi, 20000)
    ground = np.stack([r * np.cos(a), r * np.sin(a), np.full(20000, -1.8), np.zeros(20000)], 1).astype(np.float32)
    car = CAR + [-10, -5, -1.8, 0, 0, 0, 0]     # standing on the ground 1.8 m below the sensor
    pts, ages = stack(car, np.array([6.0, 0.0]))
    pts = np.concatenate([pts[ages == 0], ground, pts[ages > 0]])
    ages = np.concatenate([np.zeros((ages == 0).sum() + len(ground), np.float32), ages[ages > 0]])
    alone = model.detect(pts[ages == 0])
    det = model.detect(pts, ages=ages)
    np.testing.assert_array_equal(det.boxes, alone.boxes)          # a 1-sweep network: the newest only
    assert np.shape(det.velocity_std) == (len(det.boxes),) and 'scan_velocity' in det.timings_ms
    unmeasured = model.detect(pts, ages=ages, measure_velocities=False)
    assert np.ndim(unmeasured.velocity_std) == 0 and 'scan_velocity' not in unmeasured.timings_ms


def test_tracker_ignores_a_velocity_far_from_a_settled_track():
    tracker = VelocityTracker()
    box = CAR.copy()
    for i in range(8):   # a settled track at 5 m/s along x
        tracker.update(box[None] + [[0.5 * i, 0, 0, 0, 0, 0, 0]], [0], np.eye(4), i * 100_000_000,
                       np.array([[5.0, 0.0]]), np.array([0.2]))
    v, _ = tracker.update(box[None] + [[4.0, 0, 0, 0, 0, 0, 0]], [0], np.eye(4), 800_000_000,
                          np.array([[-15.0, 3.0]]), np.array([0.2]))
    assert v[0, 0] == pytest.approx(5.0, abs=0.3)


def test_an_ambiguous_registration_is_not_trusted():
    # a row of posts 1 m apart (a fence): every whole-metre shift overlaps the points as well
    rng = np.random.default_rng(2)
    posts = np.repeat(np.arange(-4.5, 5.0, 1.0), 20)
    before = np.column_stack([posts + rng.normal(0, 0.02, len(posts)), rng.normal(0, 0.02, len(posts))])
    now = before + [0.3, 0.0]
    args = (now, before, (5.0, 0.5), (2.0, 0.0), 0.1, 1.0)
    assert register_shift(*args) is not None
    assert register_shift(*args, max_ambiguity=0.85) is None
