"""Traffic simulation for the synthetic town: vehicles and cyclists follow lane paths with the
Intelligent Driver Model (IDM), yield to whatever is ahead of them and stop at a protected-phase
traffic signal; pedestrians walk along sidewalks; parked vehicles line the parking lanes.

The simulation runs once per scene on a fixed time step; any capture time is then answered by
interpolating the recorded arc lengths, so each agent's LiDAR sees the scene at its own time.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..geometry import wrap_angle
from . import roads

# kind -> (category, (mean l, w, h), (std l, w, h))
KINDS = {
    'car': ('vehicle.car', (4.5, 1.85, 1.5), (0.3, 0.08, 0.08)),
    'van': ('vehicle.van', (5.2, 2.0, 2.1), (0.3, 0.08, 0.12)),
    'truck': ('vehicle.truck', (9.0, 2.5, 3.5), (1.0, 0.05, 0.2)),
    'bus': ('vehicle.bus.rigid', (11.8, 2.55, 3.2), (0.5, 0.03, 0.1)),
    'pedestrian': ('human.pedestrian.adult', (0.65, 0.65, 1.75), (0.08, 0.08, 0.1)),
    'cyclist': ('vehicle.bicycle', (1.8, 0.7, 1.75), (0.1, 0.05, 0.08)),
}
VEHICLE_MIX = {'car': 0.70, 'van': 0.12, 'truck': 0.10, 'bus': 0.08}
# Higher priority wins when two road users each have the other ahead of them.
PRIORITY = {'pedestrian': 3, 'cyclist': 2}


@dataclass
class TrafficConfig:
    dt: float = 0.05                 # s, simulation step
    warmup: float = 40.0             # s simulated before t = 0 so queues and flows settle
    vehicle_rate: float = 1 / 14.0   # arrivals per second per vehicle route
    bike_rate: float = 1 / 45.0      # arrivals per second per bike lane
    pedestrians: int = 28            # walkers placed on the sidewalks at t = 0
    parked_fill: float = 0.35        # fraction of parking slots taken
    green: float = 8.0               # s of green per approach (protected phases E, N, W, S)
    clearance: float = 2.5           # s of all-red after each green
    idm_accel: float = 1.8           # m/s^2
    idm_decel: float = 3.0           # m/s^2, comfortable braking
    idm_gap: float = 2.0             # m, standstill gap
    idm_headway: float = 1.2         # s
    hard_decel: float = 6.0          # m/s^2: closer to a turning-red signal than this, drive on


@dataclass
class Actor:
    id: int
    kind: str
    size: np.ndarray                 # (3,) l, w, h in metres
    path: roads.Path | None = None   # None: static (parked) at `pose`
    pose: np.ndarray | None = None   # (3,) x, y, yaw for static actors
    desired_speed: float = 0.0       # m/s
    priority: float = 1.0
    lateral: float = 0.0             # m to the right of the path (walkers spread over the sidewalk)

    def locate(self, s: np.ndarray):
        """Positions (n, 2) and yaws (n,) at arc lengths s (n,) along the path."""
        xy, yaw = self.path.at(s)
        if self.lateral:
            xy = xy + self.lateral * np.stack([np.sin(yaw), -np.cos(yaw)], -1)
        return xy, yaw

    @property
    def category(self) -> str:
        return KINDS[self.kind][0]


@dataclass
class Trajectories:
    """Recorded arc lengths and speeds; s, v: (steps, actors), NaN where an actor is absent."""
    t0: float
    dt: float
    s: np.ndarray
    v: np.ndarray
    actors: list[Actor] = field(default_factory=list)

    def state(self, t: float):
        """World state at time t (s).

        Returns (ids (n,), xy (n, 2), yaw (n,), vel (n, 2)) for actors present at t, with the
        parked ones included (zero velocity).
        """
        f = (t - self.t0) / self.dt
        i0 = int(np.clip(np.floor(f), 0, len(self.s) - 2))
        a = f - i0
        s = (1 - a) * self.s[i0] + a * self.s[i0 + 1]
        v = (1 - a) * self.v[i0] + a * self.v[i0 + 1]
        ids, xy, yaw, vel = [], [], [], []
        for actor in self.actors:
            if actor.path is None:
                ids.append(actor.id)
                xy.append(actor.pose[None, :2])
                yaw.append(actor.pose[2:3])
                vel.append(np.zeros((1, 2)))
                continue
            if not np.isfinite(s[actor.id]):
                continue
            p, h = actor.locate(np.array([s[actor.id]]))
            ids.append(actor.id)
            xy.append(p)
            yaw.append(h)
            vel.append(v[actor.id] * np.stack([np.cos(h), np.sin(h)], -1))
        if not ids:
            return np.zeros(0, int), np.zeros((0, 2)), np.zeros(0), np.zeros((0, 2))
        return np.array(ids), np.concatenate(xy), np.concatenate(yaw), np.concatenate(vel)


def _sample_size(rng: np.random.Generator, kind: str) -> np.ndarray:
    _, mean, std = KINDS[kind]
    return np.maximum(rng.normal(mean, std), 0.3 * np.array(mean))


def signal_green(t: float, approach: str, cfg: TrafficConfig, offset: float) -> bool:
    slot = cfg.green + cfg.clearance
    phase = (t + offset) % (4 * slot)
    k = int(phase // slot)
    return 'ENWS'[k] == approach and (phase - k * slot) < cfg.green


class TrafficSimulator:
    def __init__(self, layout: roads.RoadLayout, cfg: TrafficConfig, rng: np.random.Generator):
        self.layout, self.cfg, self.rng = layout, cfg, rng
        self.vehicle_routes = roads.all_vehicle_routes(layout)
        self.bike_routes = [roads.bike_route(layout, h) for h in 'ENWS']
        self.walk_routes = [roads.sidewalk_route(layout, h, c) for h in 'ENWS' for c in (False, True)]
        self.signal_offset = float(rng.uniform(0, 4 * (cfg.green + cfg.clearance)))
        self.actors: list[Actor] = []

    # ---------------------------------------------------------------- populating
    def _new_actor(self, kind: str, **kw) -> Actor:
        actor = Actor(id=len(self.actors), kind=kind, size=_sample_size(self.rng, kind), **kw)
        self.actors.append(actor)
        return actor

    @staticmethod
    def _movement_rank(path: roads.Path) -> float:
        """0 for straight routes, 0.5 for turns: turning vehicles give way in a standoff."""
        return 0.5 if abs(wrap_angle(path.yaw[-1] - path.yaw[0])) > 0.5 else 0.0

    def _parked(self):
        lay = self.layout
        for heading in 'ENWS':
            d = roads.HEADINGS[heading]
            side = lay.parking_offset(heading) * roads.right_of(d)
            start = lay.stop_distance(heading) + 8.0
            for along in np.arange(start, lay.arm_length - 10, 6.5):
                for sign in (-1.0, 1.0):  # before and after the intersection
                    if self.rng.random() > self.cfg.parked_fill:
                        continue
                    kind = 'van' if self.rng.random() < 0.2 else 'car'
                    xy = side + sign * along * d
                    yaw = np.arctan2(d[1], d[0]) + self.rng.normal(0, 0.03)
                    self._new_actor(kind, pose=np.array([xy[0], xy[1], yaw]))

    @staticmethod
    def _spawn_clear(path: roads.Path, pos: np.ndarray, gap: float) -> bool:
        return bool(np.all(np.linalg.norm(pos - path.xy[0], axis=1) > gap))

    # ---------------------------------------------------------------- simulation
    def run(self, duration: float) -> Trajectories:
        cfg, rng = self.cfg, self.rng
        self._parked()
        t_start = -cfg.warmup
        steps = int(round((duration + cfg.warmup) / cfg.dt)) + 2
        active: list[int] = []
        s_cur: dict[int, float] = {}
        v_cur: dict[int, float] = {}
        log_s, log_v = [], []

        # Pedestrians enter shortly before t = 0 at random places so they exist throughout.
        walkers = []
        for _ in range(self.cfg.pedestrians):
            path = self.walk_routes[rng.integers(len(self.walk_routes))]
            speed = 0.0 if rng.random() < 0.2 else float(rng.uniform(0.8, 1.6))
            lateral = float(rng.uniform(-0.4, 0.4) * self.layout.sidewalk_width)
            a = self._new_actor('pedestrian', path=path, desired_speed=speed,
                                priority=PRIORITY['pedestrian'], lateral=lateral)
            s0 = float(rng.uniform(0.2, 0.8) * path.length)
            walkers.append((a.id, s0))
        ped_enter_step = max(0, int(round((cfg.warmup - 1.0) / cfg.dt)))

        for step in range(steps):
            t = t_start + step * cfg.dt
            if step == ped_enter_step:
                for aid, s0 in walkers:
                    active.append(aid)
                    s_cur[aid], v_cur[aid] = s0, self.actors[aid].desired_speed
            pos = self._positions(active, s_cur)
            self._spawn(active, s_cur, v_cur, pos)
            if active:
                self._step(t, active, s_cur, v_cur)
            active = [a for a in active if s_cur[a] < self.actors[a].path.length]
            log_s.append({a: s_cur[a] for a in active})
            log_v.append({a: v_cur[a] for a in active})

        n = len(self.actors)
        S = np.full((steps, n), np.nan)
        V = np.full((steps, n), np.nan)
        for k, (ls, lv) in enumerate(zip(log_s, log_v)):
            if ls:
                idx = np.fromiter(ls.keys(), int)
                S[k, idx] = np.fromiter(ls.values(), float)
                V[k, idx] = np.fromiter(lv.values(), float)
        return Trajectories(t_start, cfg.dt, S, V, self.actors)

    def _positions(self, active, s_cur) -> np.ndarray:
        if not active:
            return np.zeros((0, 2))
        return np.concatenate([self.actors[a].locate(np.array([s_cur[a]]))[0] for a in active])

    def _spawn(self, active, s_cur, v_cur, pos):
        cfg, rng = self.cfg, self.rng
        for path in self.vehicle_routes:
            if rng.random() < cfg.vehicle_rate * cfg.dt and self._spawn_clear(path, pos, 14.0):
                kind = rng.choice(list(VEHICLE_MIX), p=list(VEHICLE_MIX.values()))
                speed = float(rng.uniform(9.0, 14.0) if kind in ('car', 'van') else rng.uniform(8.0, 11.0))
                a = self._new_actor(kind, path=path, desired_speed=speed,
                                    priority=1.0 - self._movement_rank(path) - 0.01 * rng.random())
                self._enter(a, active, s_cur, v_cur, speed * 0.8)
        for path in self.bike_routes:
            if rng.random() < cfg.bike_rate * cfg.dt and self._spawn_clear(path, pos, 8.0):
                speed = float(rng.uniform(4.0, 6.5))
                a = self._new_actor('cyclist', path=path, desired_speed=speed,
                                    priority=PRIORITY['cyclist'])
                self._enter(a, active, s_cur, v_cur, speed)

    @staticmethod
    def _enter(actor, active, s_cur, v_cur, speed):
        active.append(actor.id)
        s_cur[actor.id], v_cur[actor.id] = 0.0, speed

    def _step(self, t, active, s_cur, v_cur):
        cfg = self.cfg
        acts = [self.actors[a] for a in active]
        s = np.array([s_cur[a] for a in active])
        v = np.array([v_cur[a] for a in active])
        xy = np.zeros((len(acts), 2))
        yaw = np.zeros(len(acts))
        for i, a in enumerate(acts):
            p, h = a.locate(s[i:i + 1])
            xy[i], yaw[i] = p[0], h[0]
        size = np.stack([a.size for a in acts])
        prio = np.array([a.priority for a in acts])
        walker = np.array([a.kind == 'pedestrian' for a in acts])

        # Who has whom ahead: inside a corridor as wide as both road users, up to 60 m.
        hdg = np.stack([np.cos(yaw), np.sin(yaw)], -1)
        d = xy[None, :, :] - xy[:, None, :]
        lon = np.einsum('ijk,ik->ij', d, hdg)
        lat = np.abs(d[..., 0] * hdg[:, None, 1] - d[..., 1] * hdg[:, None, 0])
        rel = yaw[None, :] - yaw[:, None]
        half_ext = 0.5 * (np.abs(np.cos(rel)) * size[None, :, 0] + np.abs(np.sin(rel)) * size[None, :, 1])
        half_lat = 0.5 * (np.abs(np.sin(rel)) * size[None, :, 0] + np.abs(np.cos(rel)) * size[None, :, 1])
        ahead = (lon > 0) & (lon < 60.0) & (lat < half_lat + 0.5 * size[:, None, 1] + 0.4)
        np.fill_diagonal(ahead, False)
        mutual = ahead & ahead.T
        ahead &= ~(mutual & (prio[:, None] > prio[None, :]))
        gap = np.where(ahead, lon - 0.5 * size[:, None, 0] - half_ext, np.inf)
        lead = np.argmin(gap, axis=1)
        gap_min = gap[np.arange(len(acts)), lead]
        v_lead = np.where(np.isfinite(gap_min), v[lead] * np.cos(rel[np.arange(len(acts)), lead]), 0.0)

        # A red signal is a standing obstacle at the stop line unless it is too late to stop.
        for i, a in enumerate(acts):
            if walker[i] or not np.isfinite(a.path.stop_s):
                continue
            to_line = a.path.stop_s - s[i] - 0.5 * size[i, 0]
            if to_line < -0.5 or signal_green(t, a.path.approach, cfg, self.signal_offset):
                continue
            if to_line > v[i] ** 2 / (2 * cfg.hard_decel) and to_line < gap_min[i]:
                gap_min[i], v_lead[i] = max(to_line, 0.0), 0.0

        desired = np.array([a.desired_speed for a in acts])
        v0 = np.maximum(np.minimum(desired, [a.path.speed_limit(si) for a, si in zip(acts, s)]), 0.1)
        s_star = cfg.idm_gap + v * cfg.idm_headway + v * (v - v_lead) / (2 * np.sqrt(cfg.idm_accel * cfg.idm_decel))
        with np.errstate(divide='ignore'):
            interaction = np.where(np.isfinite(gap_min), (np.maximum(s_star, 0) / np.maximum(gap_min, 0.1)) ** 2, 0.0)
        acc = cfg.idm_accel * (1 - (v / v0) ** 4 - interaction)
        acc = np.maximum(acc, -3 * cfg.hard_decel)
        v_new = np.where(desired > 0, np.maximum(v + acc * cfg.dt, 0.0), 0.0)
        s_new = s + 0.5 * (v + v_new) * cfg.dt
        for i, a in enumerate(active):
            s_cur[a], v_cur[a] = float(s_new[i]), float(v_new[i])
