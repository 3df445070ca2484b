"""Reading nuScenes / V2X-Sim ``.pcd.bin`` sweeps: float32 rows of 5 (x, y, z, intensity, ring)
or 4 (no ring) values, with no header saying which.

The row length is decided per file: by the file size (a length it does not divide is out), then by
the data. Rows read with the wrong length interleave the fields cyclically, so every column holds
the same mixture of x, y, z, ...; rows read right have a z spread far below the x, y spread. A
damaged 5-column file whose size happens to divide by 4 therefore reads as neither and is an
error, not a silent 4-column misread.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UserError

ROW_LENGTHS = (5, 4)
# z interquartile range above this fraction of the larger x / y one: not a LiDAR sweep read right
# (cyclically mixed columns give 0.9-1.05; synthetic 32-beam scans read right 0.15-0.35).
MAX_Z_SPREAD = 0.5
PROBE_ROWS = 2048     # evenly spaced over the file, so damage anywhere in it shows
MIN_TEST_ROWS = 64    # below this many rows the data cannot decide


def read_pcd_bin(path: Path, expected_points: int = 0, row_length_hint: int | None = None) -> np.ndarray:
    """(N, 5) float32 [x, y, z, intensity, ring] in the sensor frame; ring = -1 for 4-column files.

    expected_points: the point count when the dataset states it reliably (0: it does not).
    row_length_hint: the dataset's usual row length, used only when a file is too small to tell."""
    raw = _read_floats(path)
    if expected_points:
        lengths = [c for c in ROW_LENGTHS if raw.size == c * expected_points]
        if not lengths:
            raise UserError(path, f'truncated: {raw.size} floats, expected {expected_points} points x 5 (or 4)')
        columns = lengths[0]
    else:
        columns = row_length(raw, path, row_length_hint)
    pts = raw.reshape(-1, columns)
    if columns == 4:
        pts = np.concatenate([pts, np.full((len(pts), 1), -1, np.float32)], 1)
    return pts


def sweep_shape(path: Path, hint: int | None = None) -> tuple[int, int]:
    """(points, values per point) of a sweep, from its size and data (``hint``: the row length to
    take when the file is too small to tell)."""
    raw = _read_floats(path)
    columns = row_length(raw, path, hint)
    return raw.size // columns, columns


def _read_floats(path: Path) -> np.ndarray:
    try:
        raw = np.fromfile(path, dtype=np.float32)
    except FileNotFoundError:
        raise UserError(path, 'LiDAR file is missing') from None
    size = path.stat().st_size
    if size % 4:
        raise UserError(path, f'truncated: {size} bytes is not a whole number of float32')
    return raw


def row_length(raw: np.ndarray, path, hint: int | None = None) -> int:
    """Row length (5 or 4) of a sweep's float32 values, from its size and its data."""
    if raw.size == 0:
        return ROW_LENGTHS[0]
    fits = [c for c in ROW_LENGTHS if raw.size % c == 0]
    if not fits:
        raise UserError(path, f'truncated: {raw.size} floats is neither N x 5 nor N x 4')
    plausible = [c for c in fits if _reads_as_points(raw.reshape(-1, c))]
    if len(plausible) == 1:
        return plausible[0]
    if not plausible:
        raise UserError(path, f'truncated or damaged: {raw.size} floats read as rows of '
                              f'{" or ".join(map(str, fits))} do not look like x, y, z points')
    if hint in plausible:
        return hint
    raise UserError(path, f'{raw.size} floats are too few to tell 5-column rows from 4-column ones')


def _reads_as_points(rows: np.ndarray) -> bool:
    if len(rows) < MIN_TEST_ROWS:
        return True
    probe = rows[np.linspace(0, len(rows) - 1, PROBE_ROWS).astype(np.int64), :3].astype(np.float64)
    if not np.all(np.isfinite(probe)):
        return False
    q75, q25 = np.percentile(probe, [75, 25], axis=0)
    iqr = q75 - q25
    return bool(iqr[2] <= MAX_Z_SPREAD * max(iqr[0], iqr[1]))
