"""On-disk cache of every agent's detector output (int8 BEV features + detections + pose + stamp),
so fusion training and sweeps never rerun the sparse encoder.

One file per (scene, frame, agent): ``{root}/{scene_name}/{frame:04d}_{agent}.npz``. Features are
stored with the codec's per-cell int8 quantisation (the same loss the wire has).

The scan's free-range profile (``Detections.free_range``, detection.free_range) is stored in the
view's file when the detector computed it; views cached before it existed get it from their scan
in a small file beside them, ``{frame:04d}_{agent}.free_range.npy`` (``add_free_ranges``), so that
an old cache is extended in seconds instead of rerunning the detector. A view with neither loads
with ``free_range`` None.

The vehicles' velocities measured from the scan sequence (detection.scan_velocity) are not in the
view either: they depend on the detector config's ``scan_velocity`` section, not on the weights,
so they live beside it in ``{frame:04d}_{agent}.scan_velocity-{key}.npy`` ((N, 3) vx, vy, noise
per box, noise 0 where not measured), ``key`` a hash of that section and of the method's version
(``add_scan_velocities``).
Changing the section computes new files in minutes; the detector does not run again.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..bev_grid import BevGrid
from ..detection.dataset import agent_sweeps
from ..detection.config import ScanVelocityConfig
from ..detection.decode import Detections
from ..detection.free_range import free_range_profile
from ..detection.scan_velocity import METHOD_VERSION, measure_velocities
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


def scan_velocity_key(cfg: ScanVelocityConfig) -> str | None:
    """The side files' key for ``cfg``; None when the measurement is off."""
    if not cfg.on:
        return None
    what = {'config': asdict(cfg), 'method': METHOD_VERSION}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]


def _scan_velocity_path(path: Path, key: str) -> Path:
    return path.with_name(path.name.removesuffix('.npz') + f'.scan_velocity-{key}.npy')


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


def load_view(path: Path, grid: BevGrid, velocity_std: float = 0.0,
              scan_velocity: str | None = None) -> CachedView:
    """``velocity_std``: the detector config's (``Detections.velocity_std``), not stored, so that
    setting it after measuring it on cached views needs no new cache. ``scan_velocity``: the key of
    the measured velocities to apply (``scan_velocity_key``), None for the detector's own."""
    z = np.load(path)
    H, W, C = z['q'].shape
    features = dequantise(z['q'].reshape(H * W, C), z['scale'].reshape(H * W)).T.reshape(C, H, W)
    det = Detections(boxes=z['boxes'], scores=z['scores'], labels=z['labels'], velocities=z['velocities'],
                     uncertainty=z['uncertainty'], features=np.ascontiguousarray(features),
                     confidence=z['confidence'].astype(np.float32), grid=grid,
                     sensor_height=float(z['sensor_height']), free_range=_load_free_range(z, path),
                     velocity_std=velocity_std)
    side = _scan_velocity_path(path, scan_velocity) if scan_velocity else None
    if side is not None and side.exists():
        measured = np.load(side)
        hit = measured[:, 2] > 0
        det.velocities = np.where(hit[:, None], measured[:, :2], det.velocities).astype(np.float32)
        det.velocity_std = np.where(hit, measured[:, 2], np.float32(velocity_std)).astype(np.float32)
    return CachedView(det, z['T_world_sensor'], int(z['stamp_ns']))


class FeatureCache:
    def __init__(self, root, grid: BevGrid, velocity_std: float = 0.0, scan_velocity: str | None = None):
        self.root = Path(root)
        self.grid, self.velocity_std, self.scan_velocity = grid, velocity_std, scan_velocity

    def path(self, scene: str, frame: int, agent: int) -> Path:
        return _path(self.root, scene, frame, agent)

    def has(self, scene: str, frame: int, agent: int) -> bool:
        return self.path(scene, frame, agent).exists()

    def load(self, scene: str, frame: int, agent: int) -> CachedView:
        return load_view(self.path(scene, frame, agent), self.grid, self.velocity_std, self.scan_velocity)


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
            det = detector.detect(points, ages=ages, measure_velocities=False)  # beside it: add_scan_velocities
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


def add_scan_velocities(dataset, root, cfg: ScanVelocityConfig, progress: bool = True) -> int:
    """Measure the vehicles' velocities of every cached view of ``dataset`` in ``root`` from its
    scan and the agent's previous ones (detection.scan_velocity), into the side files of ``cfg``'s
    key; returns files written. Resumable: existing files are kept."""
    key = scan_velocity_key(cfg)
    if key is None:
        return 0
    written = 0
    todo = [(s, f) for s in range(len(dataset.scenes)) for f in range(dataset.num_frames(s))]
    for s, f in tqdm(todo, desc='measure scan velocities', unit='frame', disable=not progress):
        sample = dataset.sample(s, f)
        for k in sample.agents:
            path = _path(Path(root), sample.scene_name, f, k)
            side = _scan_velocity_path(path, key)
            if not path.exists() or side.exists():
                continue
            with np.load(path) as z:
                boxes, labels, scores = z['boxes'], z['labels'], z['scores']
            points, ages = agent_sweeps(dataset, s, f, k, cfg.sweeps, cfg.max_age_s)
            v, noise = measure_velocities(boxes, labels, scores, points, ages, cfg)
            tmp = side.with_name(side.name + '.tmp.npy')
            np.save(tmp, np.column_stack([v, noise]).astype(np.float32))
            tmp.replace(side)
            written += 1
    return written


def feature_cache(dataset, detector, weights, root, progress: bool = True) -> tuple[FeatureCache, int]:
    """The cached detector output of every agent view of ``dataset``, in ``root/<weights id>``:
    keyed by the checkpoint file ``weights``, so a retrained detector never reads stale features,
    and by the detector's precision (bfloat16 where the CPU has AMX, float32 elsewhere).
    Views not cached yet are computed now, views cached without a free-range profile get one
    from their scan, and every view its measured velocities (``add_scan_velocities``) where the
    detector config measures them. -> (cache, views written now)."""
    weights_id = hashlib.sha256(Path(weights).read_bytes()).hexdigest()[:16]
    folder = Path(root) / (weights_id + ('-bf16' if detector.bf16 else ''))
    written = build_cache(dataset, detector, folder, progress=progress)
    add_free_ranges(dataset, folder, progress=progress)
    sv = detector.cfg.scan_velocity
    add_scan_velocities(dataset, folder, sv, progress=progress)
    return FeatureCache(folder, detector.grid(), detector.cfg.decode.velocity_std, scan_velocity_key(sv)), written
