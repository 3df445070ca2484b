"""Per-agent LiDAR point counts on the ground-truth boxes, for datasets that do not carry them.

Our own datasets store each agent's counts in the annotations (``agent_lidar_pts``); real
V2X-Sim does not. Then every agent's points are counted in the sample's boxes, moved to the agent's
capture time as training does, and the counts are cached as one small npz per sample: under the
dataset folder, or in the user's cache when that folder is not writable, or in memory.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from ..geometry import count_points_in_boxes, transform_points

# m at the bottom of every box that is not counted: ground returns around (and, through the
# wheel gap, under) an object fall in its box and would make an unseen object look seen.
GROUND_MARGIN = 0.1
# m the box grows by on its sides and top: returns lie on an object's faces and range noise puts
# half of them just outside; a far object hit by two rays would otherwise count as unseen.
FACE_MARGIN = 0.1
CACHE_FOLDER = 'visibility_cache'
_FORMAT = 1  # bump when the counting changes, so old cache files are recomputed


def points_on_boxes(points: np.ndarray, T_world_sensor: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(N, 3+) sensor-frame points, 4x4 pose, (M, 7) world boxes -> (M,) int64 points in each box,
    grown by FACE_MARGIN on its sides and top, above its bottom GROUND_MARGIN."""
    grown = np.array(boxes, dtype=np.float64).reshape(-1, 7)
    grown[:, 3:5] += 2 * FACE_MARGIN
    grown[:, 2] += (GROUND_MARGIN + FACE_MARGIN) / 2
    grown[:, 5] = np.maximum(grown[:, 5] - GROUND_MARGIN + FACE_MARGIN, 0.0)
    return count_points_in_boxes(transform_points(T_world_sensor, points[:, :3]), grown)


def count_sample(sample) -> dict[int, np.ndarray]:
    """agent -> (M,) counts for a `v2xsim.Sample` whose ground truth has no counts yet."""
    gt = sample.gt
    return {k: points_on_boxes(a.load_points(), a.T_world_sensor,
                               gt.boxes_at((a.timestamp_us - sample.timestamp_us) * 1e-6))
            for k, a in sample.agents.items()}


def _key(sample) -> str:
    """Changes with anything the counts depend on: boxes, capture times, poses, the sweep files."""
    files = []
    for k, a in sorted(sample.agents.items()):
        st = a.path.stat()
        files.append([k, a.sample_data_token, a.timestamp_us, np.round(a.T_world_sensor, 6).tolist(),
                      st.st_size, st.st_mtime_ns])
    gt = sample.gt
    blob = json.dumps([_FORMAT, GROUND_MARGIN, FACE_MARGIN, sample.timestamp_us, gt.instance_tokens,
                       np.round(gt.boxes, 4).tolist(), np.round(gt.velocities, 4).tolist(), files])
    return hashlib.md5(blob.encode()).hexdigest()


def user_cache_dir() -> Path:
    return Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'coop_perception'


class CountCache:
    """Counts per sample token. The folder is the first writable of ``root/visibility_cache/version``
    and a per-dataset folder in the user cache; with neither, counts live in memory."""

    def __init__(self, root: Path, version: str):
        tag = hashlib.md5(f'{Path(root).resolve()}/{version}'.encode()).hexdigest()[:16]
        self._candidates = [Path(root) / CACHE_FOLDER / version, user_cache_dir() / CACHE_FOLDER / tag]
        self._folder: Path | None = None
        self._chosen = False
        self._memory: dict[str, dict[int, np.ndarray]] = {}

    @property
    def folder(self) -> Path | None:
        """Where counts are stored; None: in memory only."""
        if not self._chosen:
            self._chosen = True
            self._folder = next((f for f in self._candidates if _writable(f)), None)
        return self._folder

    def counts(self, sample) -> dict[int, np.ndarray]:
        """agent -> (M,) counts of a `v2xsim.Sample`, counted once and then read back."""
        if self.folder is None:
            if sample.token not in self._memory:
                self._memory[sample.token] = count_sample(sample)
            return self._memory[sample.token]
        key = _key(sample)
        path = self.folder / f'{sample.token}.npz'
        try:
            with np.load(path) as z:
                if str(z['key']) == key:
                    return {int(k): z['counts'][i] for i, k in enumerate(z['agents'])}
        except (OSError, KeyError, ValueError):
            pass  # absent or unreadable: recount
        counts = count_sample(sample)
        agents = sorted(counts)
        table = np.stack([counts[k] for k in agents]) if agents else np.zeros((0, len(sample.gt.boxes)), np.int64)
        # Written aside and renamed, so a concurrent reader never sees half a file.
        with tempfile.NamedTemporaryFile(dir=self.folder, suffix='.npz', delete=False) as fh:
            np.savez(fh, key=key, agents=np.array(agents, np.int64), counts=table)
        os.replace(fh.name, path)
        return counts


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False
