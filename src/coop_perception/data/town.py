"""Static world of the synthetic town (ground, buildings, walls, trees, bushes, poles; street
clutter from ``clutter.py`` on request) and the box-to-triangle-mesh conversion shared with the
moving actors.

Everything static is a set of (N, 7) boxes with a material per box; meshes are plain numpy
vertex/triangle arrays so the ray caster can take them as they are.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..geometry import box_corners
from .roads import RoadLayout

# Material ids index REFLECTIVITY; lidar intensity = reflectivity x incidence cosine.
# New materials go at the end: the ids of the others are in every generated scan's intensities.
MATERIALS = ('ground', 'building', 'wall', 'vegetation', 'pole', 'vehicle', 'pedestrian', 'cyclist',
             'metal', 'plastic', 'glass')
REFLECTIVITY = np.array([0.12, 0.35, 0.3, 0.2, 0.5, 0.6, 0.3, 0.45, 0.55, 0.25, 0.08], dtype=np.float32)
MATERIAL = {name: i for i, name in enumerate(MATERIALS)}

# Triangles of a box whose corners come in box_corners order (bottom ccw, then top ccw).
_BOX_TRIANGLES = np.array([
    [0, 2, 1], [0, 3, 2], [4, 5, 6], [4, 6, 7],        # bottom, top
    [0, 1, 5], [0, 5, 4], [1, 2, 6], [1, 6, 5],        # sides
    [2, 3, 7], [2, 7, 6], [3, 0, 4], [3, 4, 7],
], dtype=np.uint32)
TRIANGLES_PER_BOX = len(_BOX_TRIANGLES)


def boxes_to_mesh(boxes: np.ndarray):
    """(N, 7) boxes -> vertices (8N, 3) float32, triangles (12N, 3) uint32."""
    if len(boxes) == 0:
        return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint32)
    verts = box_corners(boxes).reshape(-1, 3).astype(np.float32)
    offsets = (np.arange(len(boxes), dtype=np.uint32) * 8)[:, None, None]
    tris = (_BOX_TRIANGLES[None] + offsets).reshape(-1, 3)
    return verts, tris


@dataclass
class StaticWorld:
    boxes: np.ndarray       # (N, 7) occluders (buildings, walls, trees, ...), world frame
    materials: np.ndarray   # (N,) int material id
    ground_size: float      # the ground is a square of this half size at z = 0

    def mesh(self):
        """Vertices (V, 3), triangles (T, 3) and per-triangle material (T,), ground first."""
        g = self.ground_size
        gv = np.array([[-g, -g, 0], [g, -g, 0], [g, g, 0], [-g, g, 0]], np.float32)
        gt = np.array([[0, 1, 2], [0, 2, 3]], np.uint32)
        bv, bt = boxes_to_mesh(self.boxes)
        verts = np.concatenate([gv, bv])
        tris = np.concatenate([gt, bt + len(gv)])
        mats = np.concatenate([[MATERIAL['ground']] * 2, np.repeat(self.materials, TRIANGLES_PER_BOX)])
        return verts, tris, mats.astype(np.int32)


def _box(x, y, z0, l, w, h, yaw=0.0):
    return [x, y, z0 + h / 2, l, w, h, yaw]


def build_town(layout: RoadLayout, rng: np.random.Generator) -> StaticWorld:
    """Buildings and walls behind the sidewalks, trees and bushes along them, poles at corners."""
    boxes, mats = [], []

    def add(box, material):
        boxes.append(box)
        mats.append(MATERIAL[material])

    for heading, axis in (('E', 0), ('N', 1)):
        # Frontage along a road running along `axis`: both sides, both arms.
        edge = layout.half_width(heading) + layout.sidewalk_width
        crossing_edge = layout.half_width('N' if heading == 'E' else 'E') + layout.sidewalk_width
        start = crossing_edge + (2.0 if axis == 0 else 22.0)
        for side in (-1.0, 1.0):
            for arm in (-1.0, 1.0):
                along = start
                while along < layout.arm_length - 5:
                    width = rng.uniform(8, 28)
                    depth = rng.uniform(10, 20)
                    setback = rng.uniform(0.5, 4.0)
                    centre_along = arm * (along + width / 2)
                    centre_across = side * (edge + setback + depth / 2)
                    if rng.random() < 0.85:
                        height = rng.uniform(5, 24)
                        l, w = (width, depth) if axis == 0 else (depth, width)
                        xy = (centre_along, centre_across) if axis == 0 else (centre_across, centre_along)
                        add(_box(*xy, 0.0, l, w, height), 'building')
                        if rng.random() < 0.5:  # bushes in front of the facade
                            bush_across = side * (edge + setback * 0.5)
                            bl, bw = (width * 0.6, 1.0) if axis == 0 else (1.0, width * 0.6)
                            bxy = (centre_along, bush_across) if axis == 0 else (bush_across, centre_along)
                            add(_box(*bxy, 0.0, bl, bw, rng.uniform(0.6, 1.3)), 'vegetation')
                    gap = rng.uniform(2, 9)
                    if rng.random() < 0.4:  # a wall closes the gap between two buildings
                        wall_along = arm * (along + width + gap / 2)
                        wall_across = side * (edge + 1.0)
                        l, w = (gap, 0.3) if axis == 0 else (0.3, gap)
                        xy = (wall_along, wall_across) if axis == 0 else (wall_across, wall_along)
                        add(_box(*xy, 0.0, l, w, rng.uniform(1.8, 3.0)), 'wall')
                    along += width + gap
                # Street trees at the curb.
                curb = side * (layout.half_width(heading) + 1.0)
                along = crossing_edge + 4.0
                while along < layout.arm_length - 5:
                    if rng.random() < 0.55:
                        xy = (arm * along, curb) if axis == 0 else (curb, arm * along)
                        add(_box(*xy, 0.0, 0.35, 0.35, 2.6), 'vegetation')
                        crown = rng.uniform(2.5, 4.5)
                        z0 = rng.uniform(2.2, 3.0)
                        for yaw in (0.0, np.pi / 4):
                            add(_box(*xy, z0, crown, crown, rng.uniform(2.5, 4.0), yaw), 'vegetation')
                    along += rng.uniform(10, 20)
    # Signal / light poles on the four corners.
    cx = layout.half_width('N') + 0.8
    cy = layout.half_width('E') + 0.8
    for sx in (-1, 1):
        for sy in (-1, 1):
            add(_box(sx * cx, sy * cy, 0.0, 0.3, 0.3, 6.5), 'pole')
    return StaticWorld(np.array(boxes, dtype=np.float64), np.array(mats, dtype=np.int32),
                       ground_size=layout.arm_length + 60.0)


def with_clutter(world: StaticWorld, boxes: np.ndarray, materials: list[str]) -> StaticWorld:
    """The world with more static boxes (N, 7) and their material names."""
    mats = np.array([MATERIAL[m] for m in materials], np.int32)
    return StaticWorld(np.concatenate([world.boxes, boxes.reshape(-1, 7)]),
                       np.concatenate([world.materials, mats]), world.ground_size)
