"""Synthetic twins of other producers' layouts: `coop-perception synth --mimic NAME` writes our
scenes the way that producer's files most likely look, so every reader path is tested here.

``v2xsim-real``, the real V2X-Sim 2.0 download: timestamps are frame counters (so every agent
captures at the frame time, as in CARLA's synchronous mode), categories are CARLA blueprint ids,
``sample_data.width`` is 0, annotations carry neither ``agent_lidar_pts`` nor ``velocity``, the
metadata folder is the full release's ``v2.0``, and scenes are numbered from 9 so that two of them
already sort wrongly by name (scene_10 before scene_9).
"""
from __future__ import annotations

from .labels import CARLA_CARS, CARLA_TWO_WHEELERS
from .v2xsim import Layout

# Our categories (traffic.KINDS) -> the blueprints that stand for them, taken by instance id.
_BLUEPRINTS = {
    'vehicle.car': CARLA_CARS,
    'vehicle.van': ('vehicle.volkswagen.t2',),
    'vehicle.truck': ('vehicle.carlamotors.carlacola', 'vehicle.tesla.cybertruck'),
    'vehicle.bus.rigid': ('vehicle.mitsubishi.fusorosa',),
    'human.pedestrian.adult': ('human.pedestrian',),
    'vehicle.bicycle': CARLA_TWO_WHEELERS,
}


def carla_name(category: str, instance: int) -> str:
    names = _BLUEPRINTS[category]
    return names[instance % len(names)]


MIMICS = {
    'v2xsim-real': Layout(version='v2.0', frame_counters=True, category_name=carla_name,
                          width_is_point_count=False, agent_points=False, velocity=False, first_scene=9,
                          lidar_profile=False),
}
