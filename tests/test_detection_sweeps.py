"""Stacked sweeps: ego-motion compensation, ages, history resets, and the age voxel feature."""
from pathlib import Path

import numpy as np
import pytest

from coop_perception.detection.config import load_config, with_overrides
from coop_perception.detection.sweeps import Sweep, SweepHistory, stack_sweeps
from coop_perception.detection.voxelize import voxelize

CFG = with_overrides(load_config(Path(__file__).parents[1] / 'models' / 'detector.yaml'),
                     voxel={'sweeps': 3, 'sweep_max_age_s': 0.25})
MS = 1_000_000


def pose(x: float, yaw: float = 0.0) -> np.ndarray:
    T = np.eye(4)
    c, s = np.cos(yaw), np.sin(yaw)
    T[:2, :2] = [[c, -s], [s, c]]
    T[0, 3] = x
    return T


def test_static_point_lands_on_itself_after_ego_motion():
    # a world point at (20, 5, 0); the sensor moved 1 m forward and turned 0.1 rad in 0.1 s
    world = np.array([20.0, 5.0, 0.0, 1.0])
    T_prev, T_cur = pose(0.0), pose(1.0, 0.1)
    prev_pts = (np.linalg.inv(T_prev) @ world)[None, :3].astype(np.float32)
    cur_pts = (np.linalg.inv(T_cur) @ world)[None, :3].astype(np.float32)
    pts, ages = stack_sweeps(Sweep(cur_pts, T_cur, 100 * MS), [Sweep(prev_pts, T_prev, 0)], 0.25)
    assert pts.shape == (2, 3) and ages.tolist() == pytest.approx([0.0, 0.1])
    np.testing.assert_allclose(pts[1], pts[0], atol=1e-4)


def test_too_old_future_and_misshapen_sweeps_are_left_out():
    cur = Sweep(np.zeros((4, 4), np.float32), np.eye(4), 500 * MS)
    previous = [Sweep(np.ones((2, 4), np.float32), np.eye(4), 400 * MS),  # kept
                Sweep(np.ones((2, 4), np.float32), np.eye(4), 200 * MS),  # 0.3 s old
                Sweep(np.ones((2, 4), np.float32), np.eye(4), 600 * MS),  # newer than the scan
                Sweep(np.ones((2, 3), np.float32), np.eye(4), 450 * MS)]  # other columns
    pts, ages = stack_sweeps(cur, previous, 0.25)
    assert len(pts) == 6 and sorted(set(ages.tolist())) == pytest.approx([0.0, 0.1])


def test_history_keeps_the_last_sweeps_and_resets():
    hist = SweepHistory(3, 0.25)
    scan = np.zeros((5, 4), np.float32)
    sizes = [len(hist.stack(scan, np.eye(4), t * 100 * MS)[0]) for t in range(4)]
    assert sizes == [5, 10, 15, 15]
    # time going back (a looped bag) starts over; so does a scan without a pose
    assert len(hist.stack(scan, np.eye(4), 0)[0]) == 5
    assert len(hist.stack(scan, np.eye(4), 100 * MS)[0]) == 10
    pts, ages = hist.stack(scan, None, 200 * MS)
    assert len(pts) == 5 and not ages.any()
    assert len(hist.stack(scan, np.eye(4), 300 * MS)[0]) == 5
    # a gap longer than the max age stacks nothing old
    assert len(hist.stack(scan, np.eye(4), 900 * MS)[0]) == 5
    with pytest.raises(ValueError):
        SweepHistory(0, 0.25)


def test_age_is_a_voxel_feature():
    pts = np.array([[5.05, 5.05, -1.7], [5.15, 5.15, -1.6], [10.1, -5.1, 0.0]], np.float32)
    v = voxelize(pts, CFG.voxel, 1.8, ages=np.array([0.0, 0.2, 0.05], np.float32))
    assert v.features.shape == (2, CFG.voxel.num_features) == (2, 6)
    # mean age over sweep_max_age_s: (0 + 0.2) / 2 / 0.25 near x = 5, 0.05 / 0.25 at x = 10
    assert v.features[np.argsort(v.coords[:, 2]), -1].tolist() == pytest.approx([0.4, 0.2], abs=1e-5)
    # no ages: one sweep, every age 0; a wrong length is a shape error
    assert not voxelize(pts, CFG.voxel, 1.8).features[:, -1].any()
    with pytest.raises(ValueError):
        voxelize(pts, CFG.voxel, 1.8, ages=np.zeros(2))
    # a non-finite age drops its point like a non-finite coordinate
    v = voxelize(pts, CFG.voxel, 1.8, ages=np.array([0.0, np.nan, 0.1], np.float32))
    assert v.stats.dropped_nonfinite == 1


def test_a_checkpoint_config_from_before_sweeps_loads_as_one_sweep():
    from coop_perception.detection.config import DetectorConfig
    from coop_perception.errors import UserError

    d = load_config(Path(__file__).parents[1] / 'models' / 'detector.yaml').to_dict()
    for section, key in (('voxel', 'sweeps'), ('voxel', 'sweep_max_age_s'), ('decode', 'velocity_std')):
        del d[section][key]
    del d['train']['augment']['single_sweep']
    cfg = DetectorConfig.from_dict(d, 'old checkpoint', defaults_ok=True)
    assert cfg.voxel.sweeps == 1 and cfg.voxel.num_features == 5 and cfg.decode.velocity_std == 0.0
    with pytest.raises(UserError, match='missing keys'):  # a YAML file names every key
        DetectorConfig.from_dict(d, 'detector.yaml')
