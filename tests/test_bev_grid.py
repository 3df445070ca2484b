from pathlib import Path

import numpy as np
import pytest

from coop_perception.bev_grid import BevGrid
from coop_perception.detection.config import load_config

# 4 rows x 5 columns of 0.5 m cells; the origin is off zero so rows and columns cannot be swapped
# or the origin dropped without a test noticing.
GRID = BevGrid(origin=np.array([-1.0, -2.0]), cell_size=0.5, shape=(4, 5))


def test_cells_floor_below_and_left_of_the_origin():
    # a hair left of/below the origin is in column/row -1, not truncated to 0
    rows, cols = GRID.cells_of(np.array([-1.0 - 1e-9, -1.0, -3.2]), np.array([-2.0 - 1e-9, -2.0, -2.2]))
    assert rows.dtype == np.int64 and cols.dtype == np.int64
    assert rows.tolist() == [-1, 0, -1] and cols.tolist() == [-1, 0, -5]
    assert GRID.inside(rows, cols).tolist() == [False, True, False]


def test_negative_metres_inside_the_grid():
    # x in [-1, 1.5), y in [-2, 0): negative positions are ordinary cells here
    rows, cols = GRID.cells_of([-0.76, -0.01], [-1.26, -0.01])
    assert rows.tolist() == [1, 3] and cols.tolist() == [0, 1]


def test_clip_moves_off_grid_points_to_the_edge_cell():
    x = np.array([-1.0 - 1e-9, -50.0, 1.49, 1.5, 99.0])
    y = np.array([-2.0 - 1e-9, 0.0, -0.01, -2.0, 99.0])
    rows, cols = GRID.cells_of(x, y, clip=True)
    assert rows.tolist() == [0, 3, 3, 0, 3] and cols.tolist() == [0, 0, 4, 4, 4]
    assert GRID.inside(rows, cols).all()


def test_upper_edges_are_exclusive():
    rows, cols = GRID.cells_of([1.5, 1.4999], [0.0, -0.0001])
    assert rows.tolist() == [4, 3] and cols.tolist() == [5, 4]
    assert GRID.inside(rows, cols).tolist() == [False, True]


def test_inside_mask_broadcasts_and_takes_unrounded_coordinates():
    rows = np.arange(-1, 5)[:, None]
    cols = np.arange(-1, 6)[None, :]
    mask = GRID.inside(rows, cols)
    assert mask.shape == (6, 7) and mask.sum() == 4 * 5
    assert mask[1:5, 1:6].all()
    r, c = GRID.cell_coords(np.array([-1.0 - 1e-9, -1.0, 1.5]), np.array([-1.0, -1.0, -1.0]))
    assert GRID.inside(r, c).tolist() == [False, True, False]
    assert np.array_equal(GRID.inside(r, c), GRID.inside(*GRID.cells_of([-1.0 - 1e-9, -1.0, 1.5], [-1.0] * 3)))


def test_centres_round_trip_to_their_cells():
    centres = GRID.centres()
    assert centres.shape == (4, 5, 2)
    assert centres[0, 0].tolist() == [-0.75, -1.75] and centres[3, 4].tolist() == [1.25, -0.25]
    rows, cols = GRID.cells_of(centres[..., 0], centres[..., 1])
    r, c = np.mgrid[0:4, 0:5]
    assert np.array_equal(rows, r) and np.array_equal(cols, c)
    assert np.array_equal(GRID.flat_index(rows, cols), np.arange(20).reshape(4, 5))
    assert np.array_equal(np.stack(GRID.centre_of(r, c), -1), centres)
    # float32 centres (as on the wire) still land in their cells
    rows32, cols32 = GRID.cells_of(centres[..., 0].astype(np.float32), centres[..., 1].astype(np.float32))
    assert np.array_equal(rows32, r) and np.array_equal(cols32, c)


def test_flat_index_and_unflatten_are_inverse():
    rows, cols = np.mgrid[0:4, 0:5]
    flat = GRID.flat_index(rows.ravel(), cols.ravel())
    assert flat.tolist() == list(range(20))
    r, c = GRID.unflatten(flat)
    assert np.array_equal(r, rows.ravel()) and np.array_equal(c, cols.ravel())


def test_centre_of_keeps_row_and_column_shapes_apart():
    x, y = GRID.centre_of(np.arange(4)[:, None], np.arange(5)[None, :])
    assert x.shape == (1, 5) and y.shape == (4, 1)
    assert x.ravel().tolist() == [-0.75, -0.25, 0.25, 0.75, 1.25]


def test_centre_offset_in_cells():
    c = GRID.centres()[2, 3]
    off = GRID.centre_offset(np.array([c[0], c[0] + 0.1, c[0], c[0] + 0.25]),
                             np.array([c[1], c[1], c[1] - 0.2, c[1] + 0.25]))
    assert off == pytest.approx([0.0, 0.2, 0.4, 0.5])


def test_for_detector_matches_the_detector_config():
    cfg = load_config(Path(__file__).parents[1] / 'models' / 'detector.yaml')
    grid = BevGrid.for_detector(cfg)
    assert grid.shape == cfg.bev_shape and grid.cell_size == cfg.cell_size
    assert grid.origin.tolist() == list(cfg.voxel.range_xy[:2])
