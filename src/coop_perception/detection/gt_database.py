"""Ground-truth database sampling: objects cut out of other training scans and pasted into a scan,
as SECOND and OpenPCDet do, so that a scan full of clutter still shows cars next to it and rare
classes are seen more often.

Each object keeps the place and heading it had relative to the sensor that scanned it, so its
point density and the side it shows still fit its range and bearing; heights are stored above the
ground below that sensor and pasted above the ground below the new one (mounting heights differ
between sensor profiles). A pasted object never overlaps a box of the scan or another pasted one;
the scan's points inside a pasted box are removed. Occlusion is not modelled (a pasted car can sit
behind a wall), as in those packages.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from coop_perception.geometry import bev_iou, points_in_boxes

from .voxelize import resolve_sensor_height

# Boxes are grown by this much (m, every side) when cutting an object's points out and when
# clearing the scan under a pasted one, so that returns on the box's skin come along / go too.
_MARGIN_M = 0.1


@dataclass(frozen=True)
class GroundTruthDatabase:
    """M objects: ``boxes`` (M, 7) sensor frame with z above the ground below the sensor (m),
    ``labels`` (M,), ``velocities`` (M, 2) m/s along the sensor axes, and their points, all
    stacked in ``points`` (P, C) float32 (z above the ground too); object i's are
    ``points[offsets[i]:offsets[i + 1]]``."""
    boxes: np.ndarray
    labels: np.ndarray
    velocities: np.ndarray
    points: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.boxes)

    def object_points(self, i: int) -> np.ndarray:
        return self.points[self.offsets[i]:self.offsets[i + 1]]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tmp = path.with_suffix('.tmp.npz')
        np.savez(tmp, boxes=self.boxes, labels=self.labels, velocities=self.velocities, points=self.points,
                 offsets=self.offsets)
        tmp.replace(path)  # a killed run never leaves half a database behind
        return path

    @classmethod
    def load(cls, path: str | Path) -> GroundTruthDatabase:
        with np.load(path) as z:
            return cls(z['boxes'], z['labels'], z['velocities'], z['points'], z['offsets'])


def build_database(examples: Sequence, voxel_cfg, min_points: int, progress: bool = True) -> GroundTruthDatabase:
    """Every ground-truth object with at least ``min_points`` returns in the newest sweep of
    ``examples`` (TrainExample-like items, sensor frame; ignored labels, -1, left out), heights made
    relative to the ground (``resolve_sensor_height`` with ``voxel_cfg``, as training does)."""
    from .train import TrainExample  # train builds the database: imported here, not at the top

    boxes, labels, vels, pts, counts = [], [], [], [], []
    width = 4
    for i in tqdm(range(len(examples)), desc='ground-truth database', unit='scan', disable=not progress):
        ex = TrainExample(*examples[i])
        scan = ex.points if ex.ages is None else ex.points[ex.ages == 0]
        if not len(ex.boxes) or not len(scan):
            continue
        h, width = resolve_sensor_height(scan, voxel_cfg, ex.sensor_height), scan.shape[1]
        inside = points_in_boxes(scan, grown(ex.boxes))
        for j in np.flatnonzero((inside.sum(1) >= min_points) & (np.asarray(ex.labels) >= 0)):
            obj = np.array(scan[inside[j]], np.float32)
            obj[:, 2] += h
            box = np.array(ex.boxes[j], np.float64)
            box[2] += h
            boxes.append(box)
            labels.append(ex.labels[j])
            vels.append(ex.velocities[j])
            pts.append(obj)
            counts.append(len(obj))
    return GroundTruthDatabase(
        boxes=np.array(boxes, np.float64).reshape(-1, 7), labels=np.array(labels, np.int64),
        velocities=np.array(vels, np.float64).reshape(-1, 2),
        points=np.concatenate(pts) if pts else np.zeros((0, width), np.float32),
        offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))


def grown(boxes: np.ndarray, margin: float = _MARGIN_M) -> np.ndarray:
    """(N, 7) boxes with every side moved out by ``margin`` metres."""
    out = np.array(boxes, np.float64).reshape(-1, 7)
    out[:, 3:6] += 2 * margin
    return out


def paste_objects(points: np.ndarray, ages: np.ndarray | None, boxes: np.ndarray, labels: np.ndarray,
                  velocities: np.ndarray, sensor_height: float, db: GroundTruthDatabase,
                  per_class: Sequence[int], rng: np.random.Generator):
    """Paste up to ``per_class[k]`` objects of class k from ``db`` into one sensor-frame scan:
    points (N, C) with ``ages`` (N,) or None, boxes (B, 7), labels (B,), velocities (B, 2), the
    sensor ``sensor_height`` m above the ground. Candidates overlapping a box of the scan or one
    already pasted (BEV, grown by the margin) are dropped. -> (points, ages, boxes, labels,
    velocities): new arrays when anything was pasted (its points at age 0), else the inputs."""
    chosen: list[int] = []
    for k, n in enumerate(per_class):
        pool = np.flatnonzero(db.labels == k)
        if n > 0 and len(pool):
            chosen.extend(rng.choice(pool, size=min(n, len(pool)), replace=False).tolist())
    if not chosen:
        return points, ages, boxes, labels, velocities
    rng.shuffle(chosen)
    candidates = db.boxes[chosen].copy()
    candidates[:, 2] -= sensor_height
    placed = grown(boxes)
    keep = []
    for i, box in enumerate(candidates):
        if len(placed) and bev_iou(grown(box[None]), placed).max() > 0:
            continue
        keep.append(i)
        placed = np.concatenate([placed, grown(box[None])])
    if not keep:
        return points, ages, boxes, labels, velocities
    ids, new_boxes = [chosen[i] for i in keep], candidates[keep]
    clear = ~points_in_boxes(points, grown(new_boxes)).any(0)
    new_points = np.concatenate([db.object_points(i) for i in ids]).astype(points.dtype)
    new_points[:, 2] -= sensor_height
    out_ages = None if ages is None else np.concatenate([ages[clear], np.zeros(len(new_points), ages.dtype)])
    return (np.concatenate([points[clear], new_points[:, :points.shape[1]]]), out_ages,
            np.concatenate([boxes.reshape(-1, 7), new_boxes]),
            np.concatenate([labels, db.labels[ids]]).astype(np.asarray(labels).dtype),
            np.concatenate([velocities.reshape(-1, 2), db.velocities[ids]]))
