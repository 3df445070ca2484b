import numpy as np
import pytest
from scipy import ndimage

from coop_perception.bev_grid import BevGrid
from coop_perception.fusion.align import warp_boxes, warp_to_ego
from coop_perception.fusion.codec import FeatureMessage, quantise
from coop_perception.geometry import make_pose

C = 8
CELL = 0.8
# 40 x 40 cells of 0.8 m centred on the sensor: centres at +-0.4, +-1.2, ... so that 90 degree
# rotations and whole-cell translations map centres onto centres.
GRID = BevGrid(origin=np.array([-16.0, -16.0]), cell_size=CELL, shape=(40, 40))
MS = 1_000_000
IDENTITY = np.eye(4)


def message(rows, cols, roi=None, score=None, velocity=None, confidence=None, stamp_ns=0, seed=0):
    """A message with cells at grid (rows, cols) and random features."""
    rows, cols = np.asarray(rows).ravel(), np.asarray(cols).ravel()
    m = len(rows)
    rng = np.random.default_rng(seed)
    q, scale = quantise(rng.normal(size=(m, C)).astype(np.float32))
    roi = np.zeros(m, np.int16) if roi is None else np.asarray(roi, np.int16)

    def full(v, k=None):
        return np.broadcast_to(np.asarray(v, np.float32), (m,) if k is None else (m, k)).copy()

    return FeatureMessage(
        agent_id=1, stamp_ns=stamp_ns, grid=GRID,
        cells=np.stack(GRID.centre_of(rows, cols), 1).astype(np.float32),
        features=q, scale=scale,
        confidence=full(rng.uniform(0.2, 1, m) if confidence is None else confidence),
        uncertainty=full(rng.uniform(0, 1, (m, 4)), 4),
        velocity=full(np.zeros(2) if velocity is None else velocity, 2),
        roi=roi, score=full(np.where(roi >= 0, 0.7, 0.0) if score is None else score))


def block(r0, c0, h, w):
    r, c = np.mgrid[r0:r0 + h, c0:c0 + w]
    return r.ravel(), c.ravel()


def test_identity_warp_is_exact():
    rng = np.random.default_rng(3)
    flat = rng.choice(40 * 40, 300, replace=False)
    rows, cols = np.divmod(flat, 40)
    msg = message(rows, cols, roi=rng.integers(-1, 5, 300))
    out = warp_to_ego(msg, IDENTITY, IDENTITY, GRID, 0)
    assert out.dropped == 0 and out.age_s == 0.0 and out.occupied.sum() == 300
    assert np.array_equal(out.features[:, rows, cols].T, msg.dequantised())
    assert out.features.dtype == np.float32 and out.features.shape == (C, 40, 40)
    assert not out.features[:, ~out.occupied].any()
    for name in ('confidence', 'score', 'uncertainty', 'roi'):
        assert np.array_equal(getattr(out, name)[rows, cols], getattr(msg, name)), name
    assert (out.roi[~out.occupied] == -1).all()


def test_known_translation_and_rotation_move_cells_to_the_right_ego_cells():
    rows, cols = block(12, 15, 4, 6)
    msg = message(rows, cols)
    # sender 8 m (10 cells) ahead of the ego along x, both facing +x
    out = warp_to_ego(msg, make_pose([8.0, 0, 0]), IDENTITY, GRID, 0)
    assert np.array_equal(out.features[:, rows, cols + 10].T, msg.dequantised())
    assert out.occupied.sum() == len(rows)

    # sender turned by +90 deg at (2.4, -1.6) m: sender (x, y) -> ego (2.4 - y, -1.6 + x)
    out = warp_to_ego(msg, make_pose([2.4, -1.6, 1.0], yaw=np.pi / 2), make_pose([0, 0, 0.5]), GRID, 0)
    x, y = msg.cells[:, 0].astype(float), msg.cells[:, 1].astype(float)
    ex, ey = 2.4 - y, -1.6 + x
    r, c = np.floor((ey + 16) / CELL).astype(int), np.floor((ex + 16) / CELL).astype(int)
    assert np.array_equal(out.features[:, r, c].T, msg.dequantised())
    assert out.occupied.sum() == len(rows) and out.dropped == 0

    # the ego's own pose counts as well: ego moved by the same translation sees no shift
    out = warp_to_ego(msg, make_pose([5.0, -3.0, 0]), make_pose([5.0, -3.0, 2.0]), GRID, 0)
    assert np.array_equal(out.features[:, rows, cols].T, msg.dequantised())


@pytest.mark.parametrize('yaw_deg,t', [(30, [1.3, -0.7]), (45, [0.0, 0.0]), (45, [0.4, 0.4]),
                                       (-63, [0.2, 0.1]), (89, [0.4, 0.4])])
def test_rotated_roi_covers_about_as_many_cells_without_holes(yaw_deg, t):
    rows, cols = block(15, 14, 6, 10)  # a 4.8 x 8 m ROI, 60 cells
    msg = message(rows, cols)
    out = warp_to_ego(msg, make_pose([*t, 0], yaw=np.deg2rad(yaw_deg)), IDENTITY, GRID, 0)
    assert abs(out.occupied.sum() - 60) <= 5
    assert np.array_equal(ndimage.binary_fill_holes(out.occupied), out.occupied)
    assert ndimage.label(out.occupied)[1] == 1
    # every filled cell holds one of the message's feature vectors, unchanged
    vectors = {v.tobytes() for v in msg.dequantised()}
    assert all(v.tobytes() in vectors for v in out.features[:, out.occupied].T)


def test_motion_compensation_moves_roi_cells_by_v_dt_and_clears_the_old_place():
    roi_rows, roi_cols = block(18, 16, 3, 8)
    bg_rows, bg_cols = block(30, 30, 2, 2)
    rows, cols = np.concatenate([roi_rows, bg_rows]), np.concatenate([roi_cols, bg_cols])
    roi = np.r_[np.zeros(24, np.int16), np.full(4, -1, np.int16)]
    vel = np.r_[np.tile([[8.0, 0.0]], (24, 1)), np.zeros((4, 2))]
    msg = message(rows, cols, roi=roi, velocity=vel, stamp_ns=1_000 * MS)
    # sender turned +90 deg at the ego's place, so its +x is the ego's +y; 500 ms old:
    # the ROI moves 8 m/s * 0.5 s = 4 m = 5 cells along ego +y
    T_world_sender = make_pose([0, 0, 0], yaw=np.pi / 2)
    out = warp_to_ego(msg, T_world_sender, IDENTITY, GRID, 1_500 * MS)
    static = warp_to_ego(msg, T_world_sender, IDENTITY, GRID, 1_500 * MS, motion_compensation=False)
    assert out.age_s == pytest.approx(0.5)
    moved = static.occupied & (static.roi == 0)
    r, c = np.nonzero(moved)
    assert len(r) == 24  # 8 rows x 3 columns in the ego grid
    assert np.array_equal(out.features[:, r + 5, c], static.features[:, r, c])
    assert (out.roi[r + 5, c] == 0).all()
    assert np.allclose(out.speed[r + 5, c], 8.0) and not out.speed[out.roi < 0].any()
    # the sender turned about the ego's place: a cell's range from it is its ego centre's norm
    assert np.allclose(static.range_m[r, c], np.hypot(*GRID.centre_of(r, c)), atol=1e-4)
    old_only = moved.copy()
    old_only[r + 5, c] = False
    assert old_only.sum() == 15 and not out.occupied[old_only].any()  # 5 of 8 rows vacated
    assert not out.features[:, old_only].any()
    background = static.occupied & (static.roi == -1)
    assert background.sum() == 4 and np.array_equal(out.features[:, background], static.features[:, background])


def test_collisions_keep_the_higher_score_then_confidence():
    # one row of cells; velocities of +-1 cell per second, 1 s old:
    #   col 5  ROI 0 (0.4) -> col 6, where ROI 1 (0.9) stays: ROI 1 wins
    #   col 9  ROI 3 (0.6) -> col 8, a background cell of higher confidence: ROI 3 wins
    #   col 11 ROI 4 (0.95) -> col 10, where ROI 5 (0.5) stays: ROI 4 wins
    cols = np.array([5, 6, 8, 9, 10, 11])
    msg = message(np.full(6, 5), cols, roi=[0, 1, -1, 3, 5, 4], score=[0.4, 0.9, 0.0, 0.6, 0.5, 0.95],
                  confidence=[0.9, 0.5, 1.0, 0.5, 0.5, 0.5],
                  velocity=[[CELL, 0], [0, 0], [0, 0], [-CELL, 0], [0, 0], [-CELL, 0]], stamp_ns=0)
    out = warp_to_ego(msg, IDENTITY, IDENTITY, GRID, 1_000 * MS)
    assert out.roi[5, 5:12].tolist() == [-1, 1, -1, 3, -1, 4, -1]
    assert np.array_equal(out.features[:, 5, 8], msg.dequantised()[3])

    # equal scores: the higher confidence wins
    msg = message([5, 5], [5, 6], roi=[0, 1], score=[0.5, 0.5], confidence=[0.3, 0.8],
                  velocity=[[CELL, 0], [0, 0]], stamp_ns=0)
    out = warp_to_ego(msg, IDENTITY, IDENTITY, GRID, 1_000 * MS)
    assert out.roi[5, 6] == 1 and out.confidence[5, 6] == pytest.approx(0.8)
    assert not out.occupied[5, 5]


def test_cells_outside_the_ego_grid_are_dropped_and_counted():
    rows, cols = block(10, 30, 3, 10)  # columns 30..39, x in [8, 16) m
    msg = message(rows, cols)
    out = warp_to_ego(msg, make_pose([4.0, 0, 0]), IDENTITY, GRID, 0)  # +5 columns
    assert out.dropped == 15 and out.occupied.sum() == 15
    assert out.occupied[10:13, 35:40].all()
    # motion that carries an ROI off the map counts too
    msg = message(rows, cols, velocity=[100.0, 0.0], stamp_ns=0)
    out = warp_to_ego(msg, IDENTITY, IDENTITY, GRID, 100 * MS)
    assert out.dropped == 30 and not out.occupied.any()


def test_warp_boxes_transforms_and_moves_boxes_to_the_ego_stamp():
    boxes = np.array([[5.0, 0.0, -1.0, 4.5, 1.9, 1.6, 0.0], [0.0, 3.0, -1.0, 4.5, 1.9, 1.6, 0.5]])
    vel = np.array([[2.0, 0.0], [0.0, 0.0]])
    # sender at (10, 0) turned +90 deg; its +x is the world's +y
    out, v = warp_boxes(boxes, vel, make_pose([10.0, 0, 0], yaw=np.pi / 2), IDENTITY, 0, 500 * MS)
    assert np.allclose(v, [[0.0, 2.0], [0.0, 0.0]])
    assert np.allclose(out[0, :3], [10.0, 5.0 + 1.0, -1.0])
    assert np.allclose(out[1, :3], [7.0, 0.0, -1.0])
    assert np.allclose(out[:, 6], [np.pi / 2, 0.5 + np.pi / 2]) and np.allclose(out[:, 3:6], boxes[:, 3:6])
    still, _ = warp_boxes(boxes, vel, make_pose([10.0, 0, 0], yaw=np.pi / 2), IDENTITY, 0, 500 * MS,
                          motion_compensation=False)
    assert np.allclose(still[0, :2], [10.0, 5.0])
