"""Voxelisation: features, bad input (NaN/Inf, empty, out of range, huge scans), ground height."""
from pathlib import Path

import numpy as np
import pytest

from coop_perception.detection.config import load_config, with_overrides
from coop_perception.detection.voxelize import estimate_sensor_height, resolve_sensor_height, voxelize

CFG = load_config(Path(__file__).parents[1] / 'models' / 'detector.yaml')
VOX = CFG.voxel
H_SENSOR = 1.8


def test_config_grid():
    assert VOX.grid_shape == (20, 256, 256)
    assert CFG.bev_shape == (128, 128) and CFG.cell_size == pytest.approx(0.8)


def test_voxel_features():
    # two points in one voxel, one in another; z = -1.8 is the ground below a 1.8 m sensor
    pts = np.array([[0.05, 0.05, -1.7], [0.15, 0.15, -1.6], [10.1, -5.1, 0.0]], np.float32)
    v = voxelize(pts, VOX, H_SENSOR)
    assert v.stats.voxels == 2 and v.stats.dropped_out_of_range == 0
    assert v.coords.dtype == np.int32 and v.features.shape == (2, VOX.num_features)
    # ground-relative heights 0.1, 0.2 -> z index floor((0.15 + 1) / 0.25) = 4; x, y index 128
    i = int(np.flatnonzero(v.coords[:, 2] == 128)[0])
    assert v.coords[i].tolist() == [4, 128, 128]
    f = v.features[i]
    assert f[0] == pytest.approx((0.1 - 0.2) / 0.4, abs=1e-5)  # mean x offset from voxel centre
    assert f[3] == pytest.approx((0.15 + 1.0) / 5.0, abs=1e-5)  # height above range bottom
    assert f[4] == pytest.approx(2 / VOX.count_norm)


def test_nonfinite_points_are_dropped_and_counted():
    pts = np.array([[1, 1, -1], [np.nan, 0, 0], [0, np.inf, 0], [2, 2, -np.inf], [3, 3, -1]], np.float32)
    v = voxelize(pts, VOX, H_SENSOR)
    assert v.stats.dropped_nonfinite == 3 and v.stats.voxels == 2
    assert v.stats.clipped and 'non-finite' in v.stats.reason()
    assert np.isfinite(v.features).all()


@pytest.mark.parametrize('pts', [np.zeros((0, 4), np.float32), np.zeros((0, 3)), np.array([])])
def test_empty_scan(pts):
    v = voxelize(pts, VOX, H_SENSOR)
    assert v.coords.shape == (0, 3) and v.features.shape == (0, VOX.num_features)
    assert v.stats.reason() == 'empty scan'


def test_out_of_range_points():
    pts = np.array([[60, 0, 0], [0, -51.3, 0], [0, 0, 5.0], [0, 0, -3.0], [51.19, 51.19, 0]], np.float32)
    v = voxelize(pts, VOX, H_SENSOR)  # z range is -2.8 .. 2.2 in the sensor frame
    assert v.stats.dropped_out_of_range == 4 and v.stats.voxels == 1
    assert not v.stats.clipped  # ordinary, not a warning
    assert v.coords.max(0).tolist() == [11, 255, 255]


def test_wrong_shape_raises():
    with pytest.raises(ValueError):
        voxelize(np.zeros((10, 2), np.float32), VOX, H_SENSOR)


def test_huge_scan_is_capped():
    rng = np.random.default_rng(0)
    pts = np.concatenate([rng.uniform(-60, 60, (2_000_000, 2)), rng.uniform(-2, 2, (2_000_000, 1)),
                          rng.uniform(0, 1, (2_000_000, 1))], 1).astype(np.float32)
    v = voxelize(pts, VOX, H_SENSOR)
    s = v.stats
    assert s.dropped_point_cap > 0 and s.points_in == 2_000_000
    assert s.points_in == s.dropped_out_of_range + s.dropped_point_cap + VOX.max_points
    assert s.voxels <= VOX.max_voxels


def test_voxel_cap_keeps_nearest():
    vox = with_overrides(CFG, voxel={'max_voxels': 2}).voxel
    pts = np.array([[1, 0, 0], [20, 0, 0], [5, 0, 0], [5.1, 0.1, 0], [40, 0, 0]], np.float32)
    v = voxelize(pts, vox, H_SENSOR)
    assert v.stats.voxels == 2 and v.stats.voxels_dropped == 2 and v.stats.dropped_voxel_cap == 2
    assert sorted(v.coords[:, 2].tolist()) == [130, 140]  # x = 1 m and 5 m
    assert 'max_voxels' in v.stats.reason()


def ground_scan(height, rng, n=20000):
    """Ground ring returns plus a wall and a few objects above it."""
    r = rng.uniform(2, 40, n)
    a = rng.uniform(-np.pi, np.pi, n)
    ground = np.stack([r * np.cos(a), r * np.sin(a), rng.normal(-height, 0.02, n)], 1)
    wall = np.stack([np.full(n // 2, 8.0), rng.uniform(-20, 20, n // 2), rng.uniform(-height, 6 - height, n // 2)], 1)
    return np.concatenate([ground, wall]).astype(np.float32)


@pytest.mark.parametrize('height', [1.8, 5.5])
def test_sensor_height_estimate(height):
    pts = ground_scan(height, np.random.default_rng(1))
    assert estimate_sensor_height(pts, 1.8) == pytest.approx(height, abs=0.05)


def test_sensor_height_fallbacks():
    assert estimate_sensor_height(np.zeros((0, 4)), 1.8) == 1.8
    assert estimate_sensor_height(np.array([[5.0, 0, np.nan]] * 100), 1.7) == 1.7
    pts = ground_scan(5.5, np.random.default_rng(2))
    assert resolve_sensor_height(pts, VOX, 2.0) == 2.0  # explicit wins over 'auto'
    fixed = with_overrides(CFG, voxel={'sensor_height': 1.6}).voxel
    assert resolve_sensor_height(pts, fixed, None) == 1.6
