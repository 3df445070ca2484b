"""On-disk cache of every agent's detector output (int8 BEV features + detections + pose + stamp),
so fusion training and sweeps never rerun the sparse encoder.

One file per (scene, frame, agent): ``{root}/{scene_name}/{frame:04d}_{agent}.npz``. Features are
stored with the codec's per-cell int8 quantisation (the same loss the wire has).

The scan's free-range profile (``Detections.free_range``, detection.free_range) is stored in the
view's file when the detector computed it; views cached before it existed get it from their scan
in a small file beside them, ``{frame:04d}_{agent}.free_range.npy`` (``add_free_ranges``), so that
an old cache is extended in seconds instead of rerunning the detector. A view with neither loads
with ``free_range`` None.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..bev_grid import BevGrid
from ..detection.dataset import agent_sweeps
from ..detection.decode import Detections
from ..detection.free_range import free_range_profile
from .codec import dequantise, quantise


@dataclass
class CachedView:
    """One agent's scan as the detector saw it."""
    detections: Detections          # features dequantised, sensor frame
    T_world_sensor: np.ndarray      # (4, 4)
    stamp_ns: int                   # capture time


def _path(root: Path, scene: str, frame: int, agent: int) -> Path:
    return root / scene / f'{frame:04d}_{agent}.npz'


def _free_range_path(path: Path) -> Path:
    return path.with_name(path.name.removesuffix('.npz') + '.free_range.npy')


def save_view(path: Path, det: Detections, T_world_sensor: np.ndarray, stamp_ns: int) -> None:
    C, H, W = det.features.shape
    q, scale = quantise(det.features.reshape(C, H * W).T)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix('.tmp.npz')
    free = {} if det.free_range is None else {'free_range': np.asarray(det.free_range, np.float32)}
    np.savez(tmp, q=q.reshape(H, W, C), scale=scale.reshape(H, W), confidence=det.confidence.astype(np.float16),
             boxes=det.boxes, scores=det.scores, labels=det.labels, velocities=det.velocities,
             uncertainty=det.uncertainty, sensor_height=det.sensor_height,
             T_world_sensor=T_world_sensor, stamp_ns=np.int64(stamp_ns), **free)
    tmp.replace(path)  # a killed run never leaves a half-written view behind


def _load_free_range(z, path: Path) -> np.ndarray | None:
    if 'free_range' in z.files:
        return z['free_range']
    side = _free_range_path(path)
    return np.load(side) if side.exists() else None


def load_view(path: Path, grid: BevGrid, velocity_std: float = 0.0) -> CachedView:
    """``velocity_std``: the detector config's (``Detections.velocity_std``), not stored, so that
    setting it after measuring it on cached views needs no new cache."""
    z = np.load(path)
    H, W, C = z['q'].shape
    features = dequantise(z['q'].reshape(H * W, C), z['scale'].reshape(H * W)).T.reshape(C, H, W)
    det = Detections(boxes=z['boxes'], scores=z['scores'], labels=z['labels'], velocities=z['velocities'],
                     uncertainty=z['uncertainty'], features=np.ascontiguousarray(features),
                     confidence=z['confidence'].astype(np.float32), grid=grid,
                     sensor_height=float(z['sensor_height']), free_range=_load_free_range(z, path),
                     velocity_std=velocity_std)
    return CachedView(det, z['T_world_sensor'], int(z['stamp_ns']))


class FeatureCache:
    def __init__(self, root, grid: BevGrid, velocity_std: float = 0.0):
        self.root = Path(root)
        self.grid, self.velocity_std = grid, velocity_std

    def path(self, scene: str, frame: int, agent: int) -> Path:
        return _path(self.root, scene, frame, agent)

    def has(self, scene: str, frame: int, agent: int) -> bool:
        return self.path(scene, frame, agent).exists()

    def load(self, scene: str, frame: int, agent: int) -> CachedView:
        return load_view(self.path(scene, frame, agent), self.grid, self.velocity_std)


def build_cache(dataset, detector, root, progress: bool = True) -> int:
    """Run the detector on every agent scan of `dataset` not cached yet; returns views written.
    Resumable: existing files are kept."""
    cache = FeatureCache(root, detector.grid())
    todo = [(s, f) for s in range(len(dataset.scenes)) for f in range(dataset.num_frames(s))]
    written = 0
    vox = detector.cfg.voxel
    for s, f in tqdm(todo, desc='cache features', unit='frame', disable=not progress):
        sample = dataset.sample(s, f)
        for k, agent in sample.agents.items():
            path = cache.path(sample.scene_name, f, k)
            if path.exists():
                continue
            points, ages = agent_sweeps(dataset, s, f, k, vox.sweeps, vox.sweep_max_age_s)
            det = detector.detect(points, ages=ages)
            save_view(path, det, agent.T_world_sensor, agent.timestamp_us * 1000)
            written += 1
    return written


def add_free_ranges(dataset, root, progress: bool = True) -> int:
    """Give every cached view of ``dataset`` in ``root`` that has no free-range profile one,
    computed from its scan with the sensor height the detector used (beside the view, see the
    module docstring); returns profiles written. ~10 ms a view, mostly reading the scan."""
    written = 0
    todo = [(s, f) for s in range(len(dataset.scenes)) for f in range(dataset.num_frames(s))]
    for s, f in tqdm(todo, desc='cache free ranges', unit='frame', disable=not progress):
        sample = dataset.sample(s, f)
        for k, agent in sample.agents.items():
            path = _path(Path(root), sample.scene_name, f, k)
            side = _free_range_path(path)
            if not path.exists() or side.exists():
                continue
            with np.load(path) as z:
                if 'free_range' in z.files:
                    continue
                height = float(z['sensor_height'])
            tmp = side.with_name(side.name + '.tmp.npy')
            np.save(tmp, free_range_profile(agent.load_points()[:, :3], height))
            tmp.replace(side)
            written += 1
    return written


def feature_cache(dataset, detector, weights, root, progress: bool = True) -> tuple[FeatureCache, int]:
    """The cached detector output of every agent view of ``dataset``, in ``root/<weights id>``:
    keyed by the checkpoint file ``weights``, so a retrained detector never reads stale features.
    Views not cached yet are computed now, views cached without a free-range profile get one
    from their scan. -> (cache, views written now)."""
    weights_id = hashlib.sha256(Path(weights).read_bytes()).hexdigest()[:16]
    folder = Path(root) / weights_id
    written = build_cache(dataset, detector, folder, progress=progress)
    add_free_ranges(dataset, folder, progress=progress)
    return FeatureCache(folder, detector.grid(), detector.cfg.decode.velocity_std), written
