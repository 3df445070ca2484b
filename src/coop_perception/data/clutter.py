"""Street furniture and porous vegetation along the sidewalks: what a real street puts in a LiDAR
scan besides cars and facades, and what a detector trained on a clean town mistakes for objects.

Two bands of every sidewalk are used, clear of the pedestrians' walking line and the street trees:
the curb band (0.3-0.8 m from the carriageway: bollards, signs, lamp posts, bins, parked bicycles)
and the frontage band (3.0-4.0 m: fences, railings, porous hedges, planters, bus shelters, cabinets,
dumpsters, small trees, grass). Pedestrians spread over the whole sidewalk, so whatever stands
where one walks during the scene is left out (a gap in a fence or a hedge where people pass).
Hedges, shrubs and crowns are clusters of small cubes, so beams pass through their gaps and
return from inside them, as from leaves. Nothing here is labelled: every return on it is
background. Boxes come as ``(N, 7)`` world-frame boxes (x, y, z centre, l, w, h,
yaw; m, rad) with a material name per box, drawn from the caller's generator only.
"""
from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from .roads import RoadLayout

CURB_BAND = (0.3, 0.8)         # m from the carriageway's edge
FRONTAGE_BAND = (3.0, 4.0)     # m; the walking line is at 2.0 and the street trees at 1.0
CORNER_CLEARANCE = 2.0         # m beyond the crossing road's sidewalk
# mean gap (m) between two items of one band at density 1
MEAN_GAP = {'curb': 7.0, 'frontage': 6.0}
LEAF = (0.15, 0.3)             # m, edge of one leaf-cluster cube
LEAF_FILL = 0.25               # cubes x their volume / the volume they fill


def _box(along, across, z0, l_along, w_across, h, axis, sign, yaw=0.0):
    """A box given along/across the road (sign: which side) -> (7,) world box."""
    if axis == 0:
        return [along, sign * across, z0 + h / 2, l_along, w_across, h, yaw]
    return [sign * across, along, z0 + h / 2, w_across, l_along, h, yaw]


def _porous(rng, along, across, z0, l_along, w_across, h, axis, sign):
    """Leaf-cluster cubes scattered through a box volume (porous hedge, shrub or crown)."""
    size = rng.uniform(*LEAF)
    n = max(1, int(LEAF_FILL * l_along * w_across * h / size ** 3))
    inset = size / np.sqrt(2)   # a turned cube's half diagonal: the cubes stay inside the volume
    a = along + rng.uniform(-1, 1, n) * max(l_along / 2 - inset, 0.0)
    c = across + rng.uniform(-1, 1, n) * max(w_across / 2 - inset, 0.0)
    z = z0 + rng.uniform(0.0, max(h - size, 0.0), n)
    yaw = rng.uniform(0, np.pi / 2, n)
    return [_box(a[i], c[i], z[i], size, size, size, axis, sign, yaw[i]) for i in range(n)]


def _curb_item(rng, along, edge, axis, sign):
    """One curb-band item ``edge`` m (the carriageway's half width) from the road's axis: its
    boxes and materials, and its length along the road."""
    across = edge + rng.uniform(*CURB_BAND)
    kind = rng.choice(['bollards', 'sign', 'lamp', 'bin', 'bicycles'], p=[0.25, 0.2, 0.2, 0.15, 0.2])
    parts = []
    if kind == 'bollards':
        n = int(rng.integers(3, 7))
        for i in range(n):
            parts.append((_box(along + 1.5 * i, across, 0.0, 0.2, 0.2, 0.9, axis, sign), 'metal'))
        return parts, 1.5 * n
    if kind == 'sign':
        parts.append((_box(along, across, 0.0, 0.08, 0.08, 2.4, axis, sign), 'metal'))
        parts.append((_box(along, across, 1.8, 0.05, 0.7, 0.7, axis, sign), 'metal'))
        return parts, 1.0
    if kind == 'lamp':
        parts.append((_box(along, across, 0.0, 0.22, 0.22, 7.5, axis, sign), 'pole'))
        parts.append((_box(along, across - 1.0, 7.3, 0.15, 2.0, 0.15, axis, sign), 'pole'))
        return parts, 1.0
    if kind == 'bin':
        parts.append((_box(along, across, 0.0, 0.6, 0.6, 1.0, axis, sign), 'plastic'))
        return parts, 1.0
    n = int(rng.integers(2, 6))  # bicycles parked along the curb, one behind the other
    for i in range(n):
        a = along + 1.9 * i
        parts.append((_box(a, across, 0.3, 1.7, 0.08, 0.55, axis, sign), 'metal'))
        parts.append((_box(a + 0.6, across, 0.9, 0.08, 0.6, 0.1, axis, sign), 'metal'))
    return parts, 1.9 * n


def _frontage_item(rng, along, edge, axis, sign):
    """One frontage-band item (``edge`` as for :func:`_curb_item`): its boxes and materials, and its
    length along the road."""
    lo, hi = edge + FRONTAGE_BAND[0], edge + FRONTAGE_BAND[1]
    kind = rng.choice(['railing', 'fence', 'hedge', 'planter', 'shelter', 'cabinet', 'dumpster', 'tree', 'grass'],
                      p=[0.12, 0.1, 0.2, 0.1, 0.06, 0.1, 0.08, 0.14, 0.1])
    parts = []
    if kind in ('railing', 'fence'):
        length = rng.uniform(6, 20)
        across = rng.uniform(lo + 0.2, hi - 0.2)
        step = 2.0 if kind == 'railing' else rng.uniform(0.12, 0.2)
        height = 1.1 if kind == 'railing' else rng.uniform(1.0, 1.8)
        for a in np.arange(along, along + length, step):
            parts.append((_box(a, across, 0.0, 0.06, 0.06, height, axis, sign), 'metal'))
        for z in ((0.45, height - 0.05) if kind == 'railing' else (0.2, height - 0.15)):
            parts.append((_box(along + length / 2, across, z, length, 0.05, 0.06, axis, sign), 'metal'))
        return parts, length
    if kind == 'hedge':
        length, width, height = rng.uniform(2, 8), rng.uniform(0.7, 1.0), rng.uniform(0.8, 1.8)
        boxes = _porous(rng, along + length / 2, (lo + hi) / 2, 0.0, length, width, height, axis, sign)
        return [(b, 'vegetation') for b in boxes], length
    if kind == 'planter':
        length, width = rng.uniform(1.2, 2.0), rng.uniform(0.6, 0.9)
        parts.append((_box(along + length / 2, (lo + hi) / 2, 0.0, length, width, 0.6, axis, sign), 'wall'))
        shrub = _porous(rng, along + length / 2, (lo + hi) / 2, 0.6, length, width, rng.uniform(0.5, 1.0), axis, sign)
        return parts + [(b, 'vegetation') for b in shrub], length
    if kind == 'shelter':
        length = rng.uniform(4, 6)
        mid = along + length / 2
        parts.append((_box(mid, (lo + hi) / 2, 2.4, length, 1.0, 0.1, axis, sign), 'metal'))
        parts.append((_box(mid, hi - 0.05, 0.1, length, 0.05, 2.2, axis, sign), 'glass'))
        for a in (along + 0.1, along + length - 0.1):
            parts.append((_box(a, hi - 0.1, 0.0, 0.1, 0.1, 2.4, axis, sign), 'metal'))
        parts.append((_box(mid, hi - 0.4, 0.0, 2.0, 0.4, 0.45, axis, sign), 'metal'))
        return parts, length
    if kind == 'cabinet':
        length = rng.uniform(0.8, 1.5)
        parts.append((_box(along + length / 2, hi - 0.3, 0.0, length, rng.uniform(0.4, 0.6), rng.uniform(1.2, 1.6),
                           axis, sign), 'metal'))
        return parts, length
    if kind == 'dumpster':
        length = rng.uniform(1.8, 2.2)
        parts.append((_box(along + length / 2, (lo + hi) / 2, 0.0, length, 0.95, rng.uniform(1.3, 1.6), axis, sign),
                       'plastic'))
        return parts, length
    if kind == 'tree':
        crown, z0 = rng.uniform(2.0, 3.5), rng.uniform(1.8, 2.6)
        mid = along + crown / 2
        parts.append((_box(mid, (lo + hi) / 2, 0.0, 0.2, 0.2, z0 + 0.5, axis, sign), 'vegetation'))
        boxes = _porous(rng, mid, (lo + hi) / 2, z0, crown, min(crown, 1.0), rng.uniform(2.0, 3.5), axis, sign)
        return parts + [(b, 'vegetation') for b in boxes], crown
    length = rng.uniform(2, 6)
    parts.append((_box(along + length / 2, (lo + hi) / 2, 0.0, length, 0.9, rng.uniform(0.1, 0.4), axis, sign),
                   'vegetation'))
    return parts, length


def street_clutter(layout: RoadLayout, density: float, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """Clutter along every sidewalk of the intersection -> boxes (N, 7) world frame and N material
    names. ``density`` scales how often items come (1: about one every 6-7 m of each band; 0:
    nothing)."""
    boxes, materials = [], []
    if density <= 0:
        return np.zeros((0, 7)), materials
    for heading, axis in (('E', 0), ('N', 1)):
        edge = layout.half_width(heading)
        start = layout.half_width('N' if heading == 'E' else 'E') + layout.sidewalk_width + CORNER_CLEARANCE
        for side in (-1.0, 1.0):
            for arm in (-1.0, 1.0):
                for band, item in (('curb', _curb_item), ('frontage', _frontage_item)):
                    along = start + rng.exponential(MEAN_GAP[band] / density)
                    while along < layout.arm_length - 5:
                        parts, length = item(rng, along, edge, axis, side)
                        for box, material in parts:
                            # laid out on the positive arm, mirrored onto the negative one (the
                            # cubes' yaws are random anyway)
                            box[axis] = arm * box[axis]
                            boxes.append(box)
                            materials.append(material)
                        along += length + rng.exponential(MEAN_GAP[band] / density)
    return np.asarray(boxes, np.float64).reshape(-1, 7), materials


def clear_of_actors(boxes: np.ndarray, actor_xy: np.ndarray, actor_radius: np.ndarray,
                    actor_height: np.ndarray, margin: float = 0.2) -> np.ndarray:
    """Which clutter boxes (N, 7) no actor touches: actors given as footprint discs at every
    sampled time, centres (K, 2) m, radii (K,) m (half the footprint's diagonal) and heights (K,) m.
    A box is touched when its footprint's disc comes within ``margin`` of an actor's and its
    bottom is below the actor's top. -> (N,) bool, True: keep."""
    keep = np.ones(len(boxes), bool)
    if len(boxes) == 0 or len(actor_xy) == 0:
        return keep
    radius = 0.5 * np.hypot(boxes[:, 3], boxes[:, 4])
    bottom = boxes[:, 2] - boxes[:, 5] / 2
    near = cKDTree(actor_xy).query_ball_point(boxes[:, :2], radius + actor_radius.max() + margin)
    for i, idx in enumerate(near):
        if not idx:
            continue
        idx = np.asarray(idx)
        gap = np.linalg.norm(actor_xy[idx] - boxes[i, :2], axis=1) - actor_radius[idx] - radius[i]
        keep[i] = not np.any((gap < margin) & (bottom[i] < actor_height[idx]))
    return keep
