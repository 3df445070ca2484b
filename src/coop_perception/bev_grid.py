"""The BEV grid: the one place that converts between metres and cells.

Cell (row i, col j) covers x in ``origin[0] + [j, j+1) * cell_size`` and y in
``origin[1] + [i, i+1) * cell_size``: rows run along y, columns along x. A point belongs to the
cell that contains it, so conversion floors; a point just below or left of the origin is in row or
column -1, outside the grid, never in cell 0. Flat indices are row-major, ``row * W + col``.

Positions are in the frame of the sensor whose detector made the grid (m). Every function takes
arrays of any (broadcastable) shape and returns arrays of that shape.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the grid is a base type; only annotations may name the detector
    from coop_perception.detection.config import DetectorConfig


@dataclass(frozen=True)
class BevGrid:
    """Geometry of one detector's BEV maps (see the module docstring for the cell convention)."""
    origin: np.ndarray  # (2,) x, y (m) of the corner of cell (0, 0)
    cell_size: float  # m
    shape: tuple[int, int]  # (H, W) rows (y), columns (x)

    @classmethod
    def for_detector(cls, cfg: DetectorConfig) -> BevGrid:
        """The grid of the maps a detector with config ``cfg`` outputs."""
        x0, y0 = cfg.voxel.range_xy[:2]
        return cls(origin=np.array([x0, y0]), cell_size=cfg.cell_size, shape=cfg.bev_shape)

    # ----------------------------------------------------------------------- metres -> cells
    def cell_coords(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        """Positions x, y (m) -> (rows, cols) float64 in cell units, unrounded: cell (i, j) spans
        [i, i+1) x [j, j+1). For checks that must not floor, e.g. where a position may be
        non-finite or too large for int64."""
        return ((np.asarray(y, np.float64) - self.origin[1]) / self.cell_size,
                (np.asarray(x, np.float64) - self.origin[0]) / self.cell_size)

    def cells_of(self, x, y, clip: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Positions x, y (m) -> (rows, cols) int64 of the cells containing them (floor).

        Without ``clip`` a point off the grid keeps its row/column (negative or >= H/W; check
        with :meth:`inside`); with ``clip`` it goes to the nearest edge cell. Non-finite positions
        give undefined cells (NumPy's float -> int cast).
        """
        r, c = self.cell_coords(x, y)
        rows, cols = np.floor(r).astype(np.int64), np.floor(c).astype(np.int64)
        if clip:
            H, W = self.shape
            rows, cols = np.clip(rows, 0, H - 1), np.clip(cols, 0, W - 1)
        return rows, cols

    def centre_offset(self, x, y) -> np.ndarray:
        """Positions x, y (m) -> distance to the nearest cell centre in cells, the larger of the
        two axes (0 on a centre, 0.5 on a cell corner)."""
        r, c = self.cell_coords(x, y)
        return np.maximum(np.abs(c - 0.5 - np.rint(c - 0.5)), np.abs(r - 0.5 - np.rint(r - 0.5)))

    # ----------------------------------------------------------------------- cells -> metres
    def centre_of(self, rows, cols) -> tuple[np.ndarray, np.ndarray]:
        """Cells (rows, cols) -> (x, y) float64 of their centres (m). x takes the shape of
        ``cols`` and y that of ``rows``: they are not broadcast together, so a column vector of
        rows and a row vector of columns give the centres' axes of a window."""
        return (self.origin[0] + (np.asarray(cols) + 0.5) * self.cell_size,
                self.origin[1] + (np.asarray(rows) + 0.5) * self.cell_size)

    def centres(self) -> np.ndarray:
        """(H, W, 2) x, y of every cell centre (m)."""
        H, W = self.shape
        return np.stack(np.meshgrid(*self.centre_of(np.arange(H), np.arange(W))), -1)

    # ----------------------------------------------------------------------- cell indices
    def inside(self, rows, cols) -> np.ndarray:
        """Bool mask of (rows, cols) on the grid, broadcast together. Takes integer cells or
        the unrounded coordinates of :meth:`cell_coords` (the same answer as flooring first)."""
        H, W = self.shape
        return (rows >= 0) & (rows < H) & (cols >= 0) & (cols < W)

    def flat_index(self, rows, cols) -> np.ndarray:
        """Cells (rows, cols) -> row-major flat index row * W + col (int64 for int64 input).
        Meaningful only for cells :meth:`inside` the grid."""
        return rows * self.shape[1] + cols

    def unflatten(self, flat) -> tuple[np.ndarray, np.ndarray]:
        """Flat indices -> (rows, cols), the inverse of :meth:`flat_index`."""
        return np.divmod(flat, self.shape[1])
