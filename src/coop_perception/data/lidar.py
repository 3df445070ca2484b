"""Spinning-LiDAR model ray-cast with Open3D; the published sensor models are in `sensor_profiles`.

The scan is treated as instantaneous at its capture time (no rolling shutter); each agent casts
against the world posed at its own capture time.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .town import REFLECTIVITY

# Rays rotated per BLAS call. OpenBLAS splits a larger (R, 3) x (3, 3) product over threads, and
# waking them costs tens of milliseconds a scan on a busy machine; below this it stays on one.
ROTATE_CHUNK = 1 << 15


def uniform_beams(top_deg: float, bottom_deg: float, beams: int) -> tuple[float, ...]:
    """Elevations (degrees) of ``beams`` evenly spaced beams from ``top_deg`` down to ``bottom_deg``."""
    return tuple(np.linspace(top_deg, bottom_deg, beams).tolist())


@dataclass(frozen=True)
class LidarConfig:
    """One LiDAR model. Ring ids are elevation ranks (ring 0 = the top beam), not a maker's laser
    ids, so every profile's rings mean the same thing."""
    elevations_deg: tuple[float, ...]   # (beams,) beam table in degrees, top beam first
    azimuth_res_deg: float              # degrees between firings of one beam
    max_range: float                    # m
    min_range: float                    # m, closer returns are discarded (as the sensors do)
    range_noise: float                  # m, std of the Gaussian range error
    dropout: float                      # probability that a return is lost at random
    intensity_noise: float              # std, relative to full scale
    # Datasheets state the maximum range for a reflective target; the returned power falls as
    # reflectivity / range^2, so a surface of reflectivity rho is seen out to
    # max_range * sqrt(rho / reference_reflectivity). None: every surface out to max_range.
    reference_reflectivity: float | None = None

    def __post_init__(self):
        if np.any(np.diff(self.elevations_deg) >= 0):
            raise ValueError('elevations_deg must be strictly decreasing (ring 0 is the top beam)')
        if not 0 < self.min_range < self.max_range:
            raise ValueError(f'need 0 < min_range < max_range, got {self.min_range}, {self.max_range}')

    @property
    def beams(self) -> int:
        return len(self.elevations_deg)

    def elevations(self) -> np.ndarray:
        """(beams,) elevation angles in radians, top beam first (ring 0)."""
        return np.deg2rad(np.asarray(self.elevations_deg, dtype=np.float64))

    def directions(self):
        """Unit ray directions in the sensor frame (R, 3) float32 and their ring ids (R,)."""
        el = self.elevations()
        az = np.deg2rad(np.arange(0.0, 360.0, self.azimuth_res_deg))
        el_g, az_g = np.meshgrid(el, az, indexing='ij')
        d = np.stack([np.cos(el_g) * np.cos(az_g), np.cos(el_g) * np.sin(az_g), np.sin(el_g)], -1)
        ring = np.broadcast_to(np.arange(self.beams)[:, None], el_g.shape)
        return d.reshape(-1, 3).astype(np.float32), ring.reshape(-1).astype(np.float32)


@dataclass
class Hits:
    """One scan. points: (N, 5) float32 [x, y, z, intensity 0..255, ring] in the sensor frame;
    owner: (N,) int index of the dynamic object hit, -1 for the static world (and for the
    sensor's own vehicle, which is no object to detect)."""
    points: np.ndarray
    owner: np.ndarray


class LidarSimulator:
    def __init__(self, cfg: LidarConfig):
        self.cfg = cfg
        self.dirs, self.ring = cfg.directions()

    def scan(self, static_mesh, dynamic_mesh, T_world_sensor: np.ndarray,
             rng: np.random.Generator) -> Hits:
        """Cast every ray of the sensor at pose T_world_sensor (4, 4).

        static_mesh: (vertices (V, 3), triangles (T, 3), material per triangle (T,))
        dynamic_mesh: same plus owner per triangle (T,) -> (verts, tris, materials, owners)
        """
        # imported here: only ray casting needs open3d (0.75 s to import, and a system libusb)
        import open3d as o3d

        cfg = self.cfg
        scene = o3d.t.geometry.RaycastingScene()
        sv, st, smat = static_mesh
        dv, dt, dmat, downer = dynamic_mesh
        static_id = scene.add_triangles(o3d.core.Tensor(sv), o3d.core.Tensor(st))
        if len(dt):
            scene.add_triangles(o3d.core.Tensor(dv), o3d.core.Tensor(dt))
        R = T_world_sensor[:3, :3].astype(np.float32)
        chunks = np.split(self.dirs, range(ROTATE_CHUNK, len(self.dirs), ROTATE_CHUNK))
        dirs_world = np.concatenate([d @ R.T for d in chunks])
        origin = np.broadcast_to(T_world_sensor[:3, 3].astype(np.float32), dirs_world.shape)
        rays = o3d.core.Tensor(np.ascontiguousarray(np.concatenate([origin, dirs_world], 1)))
        ans = scene.cast_rays(rays)
        t = ans['t_hit'].numpy()
        geom = ans['geometry_ids'].numpy()
        prim = ans['primitive_ids'].numpy()
        normal = ans['primitive_normals'].numpy()

        keep = np.isfinite(t) & (t >= cfg.min_range) & (t <= cfg.max_range)
        keep &= rng.random(len(t)) >= cfg.dropout
        idx = np.nonzero(keep)[0]
        is_static = geom[idx] == static_id
        prim_idx = prim[idx].astype(np.int64)
        material = np.where(is_static, smat[np.where(is_static, prim_idx, 0)],
                            dmat[np.where(is_static, 0, prim_idx)] if len(dt) else 0)
        owner = np.where(is_static, -1, downer[np.where(is_static, 0, prim_idx)] if len(dt) else -1)
        if cfg.reference_reflectivity is not None:
            reach = cfg.max_range * np.sqrt(REFLECTIVITY[material] / cfg.reference_reflectivity)
            seen = t[idx] <= reach
            idx, material, owner = idx[seen], material[seen], owner[seen]

        rng_m = t[idx] + rng.normal(0.0, cfg.range_noise, len(idx)).astype(np.float32)
        xyz = self.dirs[idx] * rng_m[:, None]
        cos_inc = np.abs(np.einsum('ij,ij->i', normal[idx], dirs_world[idx]))
        intensity = REFLECTIVITY[material] * (0.3 + 0.7 * cos_inc)
        intensity = intensity + rng.normal(0.0, cfg.intensity_noise, len(idx))
        intensity = np.clip(intensity, 0.0, 1.0) * 255.0
        points = np.concatenate([xyz, intensity[:, None], self.ring[idx, None]], 1).astype(np.float32)
        return Hits(points, owner.astype(np.int64))
