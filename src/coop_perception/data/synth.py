"""Multi-agent V2X scenario generator: town + traffic + one LiDAR per agent.

Agent 0 is a road-side unit (elevated LiDAR on the intersection corner), agents 1..N are
connected vehicles driving in the traffic. LiDARs are not phase-aligned: agent 1 captures at the
frame's reference time (when the ground truth is annotated), every other agent at a fixed random
phase within the frame period. Each agent's LiDAR is a `sensor_profiles` model, drawn per scene
when several are allowed. Deterministic from the seed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from ..geometry import make_pose
from . import roads
from .clutter import clear_of_actors, street_clutter
from .lidar import LidarSimulator
from .sensor_profiles import DEFAULT_PROFILE, PROFILES, SensorProfile
from .town import MATERIAL, TRIANGLES_PER_BOX, boxes_to_mesh, build_town, with_clutter
from .traffic import Actor, TrafficConfig, TrafficSimulator

RSU_AGENT = 0
SCENE_EPOCH_US = 1_700_000_000_000_000  # arbitrary recording epoch; scenes are 1000 s apart
# Seeds the draw of the agents' sensors apart from the world's generator, so that choosing other
# profiles or heights never changes a scene's town or traffic.
SENSOR_STREAM = 1
# The same for the street clutter: a scene with clutter has the town and traffic of the one without.
CLUTTER_STREAM = 2
CLUTTER_CLEAR_STEP = 0.05  # s between the actor positions clutter is kept clear of (a walker moves ~7 cm)


@dataclass
class ScenarioConfig:
    seed: int = 0
    vehicles: int = 4                 # connected vehicles (agents 1..N); agent 0 is the RSU
    frames: int = 40
    rate_hz: float = 10.0
    synchronous: bool = False         # every agent captures at the frame time (CARLA's synchronous mode)
    rsu_height: float = 5.5           # m, LiDAR above the ground at the corner
    roof_clearance: float = 0.25      # m, vehicle LiDAR above the roof (profiles without a mount height)
    # m, a LiDAR mounted at a fixed height still sits at least this far above its own roof (its
    # housing stands on the roof), so a tall van raises it
    min_roof_clearance: float = 0.1
    agent_radius: float = 60.0        # m, connected vehicles start within this of the centre
    # sensor_profiles names; every agent draws one per scene (one name: all agents have it)
    lidar_profiles: tuple[str, ...] = (DEFAULT_PROFILE,)
    # (low, high) m above the ground for the vehicles' LiDARs, drawn uniformly per agent and scene
    # (low == high: fixed); None: each profile's own mount height. The RSU keeps rsu_height.
    sensor_height: tuple[float, float] | None = None
    # The vehicle's own body in its scans (roof/hood returns, a blind zone around it). Off by default:
    # bodies are boxes as wide as the car, which hide far more of the near ground from a low roof
    # mount than a real, rounded roof does.
    own_body: bool = False
    # Street furniture and porous vegetation along the sidewalks (data/clutter.py): items per metre
    # relative to the clutter-heavy 1.0; 0 leaves the town as it was; (low, high): drawn per scene.
    clutter: float | tuple[float, float] = 0.0
    traffic: TrafficConfig = field(default_factory=TrafficConfig)
    layout: roads.RoadLayout = field(default_factory=roads.RoadLayout)


@dataclass
class AgentScan:
    agent_id: int
    timestamp_us: int                 # capture time
    T_world_ego: np.ndarray           # (4, 4) vehicle / RSU base on the ground
    T_ego_sensor: np.ndarray          # (4, 4) LiDAR mount
    points: np.ndarray                # (N, 5) float32 [x, y, z, intensity, ring], sensor frame
    lidar_profile: str                # sensor_profiles name of the LiDAR that took the scan


@dataclass
class Frame:
    index: int
    timestamp_us: int                 # reference time; ground truth is annotated at it
    scans: list[AgentScan]
    boxes: np.ndarray                 # (M, 7) world frame
    velocities: np.ndarray            # (M, 2) world frame, m/s
    categories: list[str]
    instance_ids: np.ndarray          # (M,) actor ids, stable within the scene
    attributes: list[str]
    agent_points: dict[int, np.ndarray]  # agent -> (M,) LiDAR points on each object


def actor_parts(actor: Actor) -> np.ndarray:
    """Boxes (k, 7) making up the actor's body, in its frame (origin at the bottom centre)."""
    l, w, h = actor.size
    if actor.kind in ('car', 'van'):
        split = 0.6 * h if actor.kind == 'car' else 0.75 * h
        return np.array([[0, 0, (0.25 + split) / 2, l, w, split - 0.25, 0],
                         [-0.05 * l, 0, (split + h) / 2, 0.55 * l, 0.92 * w, h - split, 0]])
    if actor.kind == 'truck':
        cab = 2.2
        return np.array([[l / 2 - cab / 2, 0, (0.4 + 0.8 * h) / 2, cab, w, 0.8 * h - 0.4, 0],
                         [-cab / 2 - 0.15, 0, (0.5 + h) / 2, l - cab - 0.3, w, h - 0.5, 0]])
    if actor.kind == 'bus':
        return np.array([[0, 0, (0.35 + h) / 2, l, w, h - 0.35, 0]])
    if actor.kind == 'cyclist':
        return np.array([[0, 0, 0.55, l, 0.15, 0.8, 0],
                         [-0.1, 0, (0.95 + h) / 2, 0.5, 0.45, h - 0.95, 0]])
    return np.array([[0, 0, h / 2, 0.6 * l, 0.7 * w, h, 0]])  # pedestrian: torso + legs


_KIND_MATERIAL = {'pedestrian': MATERIAL['pedestrian'], 'cyclist': MATERIAL['cyclist']}


@dataclass(frozen=True)
class AgentSensor:
    """An agent's LiDAR for one scene."""
    profile: SensorProfile
    # m above the ground for a vehicle; None: roof + roof_clearance (always None for the RSU, which
    # stands at rsu_height)
    height: float | None


class Scenario:
    """One scene: call `frames()` to iterate over its frames (ray casting happens lazily)."""

    def __init__(self, cfg: ScenarioConfig, scene_index: int = 0):
        self.cfg = cfg
        self.scene_index = scene_index
        self.rng = np.random.default_rng([cfg.seed, scene_index])
        self.world = build_town(cfg.layout, self.rng)
        duration = cfg.frames / cfg.rate_hz + 0.5
        self.traffic = TrafficSimulator(cfg.layout, cfg.traffic, self.rng).run(duration)
        if np.max(cfg.clutter) > 0:
            self.world = with_clutter(self.world, *self._street_clutter(duration))
        self.static_mesh = self.world.mesh()
        self.parts = {a.id: actor_parts(a) for a in self.traffic.actors}
        self.vehicle_agents = self._pick_vehicle_agents(duration)
        self.agent_ids = [RSU_AGENT] + list(range(1, len(self.vehicle_agents) + 1))
        period = 1.0 / cfg.rate_hz
        self.phase = {k: (0.0 if k == 1 else float(self.rng.uniform(0, period))) for k in self.agent_ids}
        if cfg.synchronous:  # after the draws, so the seed gives the same town and traffic either way
            self.phase = dict.fromkeys(self.agent_ids, 0.0)
        self.sensors = self._draw_sensors()
        self.simulators = {name: LidarSimulator(PROFILES[name].lidar)
                           for name in sorted({s.profile.name for s in self.sensors.values()})}
        lay = cfg.layout
        corner = np.array([lay.half_width('N') + 1.5, lay.half_width('E') + 1.5])
        self.rsu_pose = make_pose([corner[0], corner[1], 0.0], yaw=-0.75 * np.pi)
        self.start_us = SCENE_EPOCH_US + scene_index * 1_000_000_000

    def _street_clutter(self, duration: float) -> tuple[np.ndarray, list[str]]:
        """The scene's clutter (its own generator), without what an actor passes through."""
        rng = np.random.default_rng([self.cfg.seed, self.scene_index, CLUTTER_STREAM])
        density = self.cfg.clutter if np.isscalar(self.cfg.clutter) else rng.uniform(*self.cfg.clutter)
        boxes, materials = street_clutter(self.cfg.layout, float(density), rng)
        xy, radius, height = [], [], []
        for t in np.arange(0.0, duration + CLUTTER_CLEAR_STEP, CLUTTER_CLEAR_STEP):
            ids, at, _, _ = self.traffic.state(t)
            size = np.array([self.traffic.actors[a].size for a in ids]).reshape(-1, 3)
            xy.append(at)
            radius.append(0.5 * np.hypot(size[:, 0], size[:, 1]))
            height.append(size[:, 2])
        keep = clear_of_actors(boxes, np.concatenate(xy), np.concatenate(radius), np.concatenate(height))
        return boxes[keep], [m for m, k in zip(materials, keep) if k]

    def _pick_vehicle_agents(self, duration: float) -> list[int]:
        """Cars/vans present for the whole scene near the intersection, spread over approaches."""
        tr = self.traffic
        i0 = int(np.floor(-tr.t0 / tr.dt))
        i1 = min(len(tr.s) - 1, int(np.ceil((duration - tr.t0) / tr.dt)))
        ids, xy, _, _ = tr.state(0.0)
        dist = dict(zip(ids.tolist(), np.linalg.norm(xy, axis=1)))
        cands = [a for a in tr.actors
                 if a.path is not None and a.kind in ('car', 'van')
                 and np.all(np.isfinite(tr.s[i0:i1 + 1, a.id]))]
        chosen: list[int] = []
        for radius in (self.cfg.agent_radius, 1.7 * self.cfg.agent_radius, np.inf):
            pool = [a for a in cands if dist.get(a.id, np.inf) <= radius and a.id not in chosen]
            self.rng.shuffle(pool)
            # Round-robin over approach headings so the agents see the scene from different sides.
            by_approach: dict[str, list[int]] = {}
            for a in pool:
                by_approach.setdefault(a.path.approach, []).append(a.id)
            while len(chosen) < self.cfg.vehicles and any(by_approach.values()):
                for lst in by_approach.values():
                    if lst and len(chosen) < self.cfg.vehicles:
                        chosen.append(lst.pop())
            if len(chosen) == self.cfg.vehicles:
                break
        return chosen

    def _draw_sensors(self) -> dict[int, AgentSensor]:
        """Each agent's LiDAR profile and mount height for this scene."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, self.scene_index, SENSOR_STREAM])
        sensors = {}
        for k in self.agent_ids:
            profile = PROFILES[cfg.lidar_profiles[rng.integers(len(cfg.lidar_profiles))]]
            if k == RSU_AGENT:        # up on its pole at rsu_height
                height = None
            elif cfg.sensor_height is None:
                height = profile.mount_height
            else:
                height = float(rng.uniform(*cfg.sensor_height))
            sensors[k] = AgentSensor(profile, height)
        return sensors

    # ------------------------------------------------------------------ world at a time
    def _dynamic_mesh(self, ids, xy, yaw, own: int | None, own_body: bool):
        """Mesh of the road users at a time; the actor ``own`` (the scanning vehicle) is left out,
        or with ``own_body`` kept as a body that belongs to no object (its returns are clutter)."""
        boxes, mats, owners = [], [], []
        for i, (aid, p, h) in enumerate(zip(ids, xy, yaw)):
            if aid == own and not own_body:
                continue
            parts = self.parts[aid]
            c, s = np.cos(h), np.sin(h)
            world = parts.copy()
            world[:, 0] = p[0] + c * parts[:, 0] - s * parts[:, 1]
            world[:, 1] = p[1] + s * parts[:, 0] + c * parts[:, 1]
            world[:, 6] = h
            boxes.append(world)
            kind = self.traffic.actors[aid].kind
            mats.append(np.full(len(parts), _KIND_MATERIAL.get(kind, MATERIAL['vehicle'])))
            owners.append(np.full(len(parts), -1 if aid == own else i))
        if not boxes:
            z = np.zeros(0, np.int64)
            return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint32), z, z
        boxes = np.concatenate(boxes)
        v, t = boxes_to_mesh(boxes)
        return (v, t, np.repeat(np.concatenate(mats), TRIANGLES_PER_BOX),
                np.repeat(np.concatenate(owners), TRIANGLES_PER_BOX))

    def agent_pose(self, agent: int, state):
        """(T_world_ego, T_ego_sensor) of an agent in a world `state` = traffic.state(t)."""
        if agent == RSU_AGENT:
            return self.rsu_pose, make_pose([0.0, 0.0, self.cfg.rsu_height])
        actor = self.traffic.actors[self.vehicle_agents[agent - 1]]
        ids, xy, yaw, _ = state
        k = int(np.nonzero(ids == actor.id)[0][0])
        ego = make_pose([xy[k, 0], xy[k, 1], 0.0], yaw=yaw[k])
        roof, height = actor.size[2], self.sensors[agent].height
        z = roof + self.cfg.roof_clearance if height is None else max(height, roof + self.cfg.min_roof_clearance)
        return ego, make_pose([0.0, 0.0, z])

    def _boxes(self, ids, xy, yaw) -> np.ndarray:
        size = np.stack([self.traffic.actors[a].size for a in ids]) if len(ids) else np.zeros((0, 3))
        return np.concatenate([xy, size[:, 2:3] / 2, size, yaw[:, None]], 1)

    def frames(self) -> Iterator[Frame]:
        for f in range(self.cfg.frames):
            yield self.frame(f)

    def frame(self, f: int) -> Frame:
        t_ref = f / self.cfg.rate_hz
        ids, xy, yaw, vel = self.traffic.state(t_ref)
        gt_index = {aid: i for i, aid in enumerate(ids.tolist())}
        scans, counts = [], {}
        for k in self.agent_ids:
            t = t_ref + self.phase[k]
            state = self.traffic.state(t)
            T_we, T_es = self.agent_pose(k, state)
            a_ids, a_xy, a_yaw, _ = state
            own = None if k == RSU_AGENT else self.vehicle_agents[k - 1]
            sensor = self.sensors[k]
            hits = self.simulators[sensor.profile.name].scan(
                self.static_mesh, self._dynamic_mesh(a_ids, a_xy, a_yaw, own, self.cfg.own_body),
                T_we @ T_es, self.rng)
            per_actor = np.bincount(hits.owner[hits.owner >= 0], minlength=len(a_ids))
            c = np.zeros(len(ids), np.int64)
            for aid, n in zip(a_ids.tolist(), per_actor.tolist()):
                if aid in gt_index:
                    c[gt_index[aid]] = n
            counts[k] = c
            scans.append(AgentScan(k, self.start_us + int(round(t * 1e6)), T_we, T_es, hits.points,
                                   sensor.profile.name))
        actors = [self.traffic.actors[a] for a in ids]
        speed = np.linalg.norm(vel, axis=1)
        attributes = []
        for a, sp in zip(actors, speed):
            if a.kind == 'pedestrian':
                attributes.append('pedestrian.moving' if sp > 0.2 else 'pedestrian.standing')
            elif a.kind == 'cyclist':
                attributes.append('cycle.with_rider')
            else:
                attributes.append('vehicle.parked' if a.path is None
                                  else 'vehicle.moving' if sp > 0.2 else 'vehicle.stopped')
        return Frame(f, self.start_us + int(round(t_ref * 1e6)), scans, self._boxes(ids, xy, yaw),
                     vel, [a.category for a in actors], ids.astype(np.int64), attributes, counts)


# Named datasets with disjoint seeds: never train on what you report on.
PRESETS = {
    'train': dict(seed=1000, scenes=32, frames=20),
    'val': dict(seed=2000, scenes=4, frames=20),
    'test': dict(seed=3000, scenes=8, frames=20),
    'demo': dict(seed=4000, scenes=1, frames=40),
    # the test scenes (same seed: same towns and traffic) with heavy street clutter, for counting
    # what the clutter alone adds to the false detections
    'test_clutter': dict(seed=3000, scenes=8, frames=20, clutter=1.0),
}


def generate(out_dir, scenes: int, cfg: ScenarioConfig, version: str, progress: bool = True,
             layout=None) -> int:
    """Generate `scenes` scenes into a V2X-Sim-format dataset at out_dir; returns scans written.
    layout: a `v2xsim.Layout` (default: our own format)."""
    from tqdm import tqdm

    from .v2xsim import OWN_LAYOUT, V2XSimWriter

    layout = layout or OWN_LAYOUT
    writer = V2XSimWriter(out_dir, version, dataset=f'synth-seed{cfg.seed}', layout=layout)
    written = 0
    with tqdm(total=scenes * cfg.frames, unit='frame', disable=not progress, desc='synth') as bar:
        for n in range(scenes):
            scenario = Scenario(cfg, n)
            writer.begin_scene(f'scene_{layout.first_scene + n}',
                               f'synthetic town, seed {cfg.seed}, {len(scenario.agent_ids)} agents, {cfg.rate_hz:g} Hz')
            for frame in scenario.frames():
                writer.add_frame(frame)
                written += len(frame.scans)
                bar.update(1)
            writer.end_scene()
    writer.close()
    return written
