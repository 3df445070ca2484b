"""Road layout of the synthetic town: a 4-way signalised intersection of a straight multi-lane
east-west avenue (3 lanes per direction) and a 2+2-lane north-south street, with bike lanes,
parking lanes and sidewalks; lane-following paths for every movement, including turns.

World frame: intersection centre at the origin, x east, y north, z up, metres. Right-hand traffic.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HEADINGS = {'E': np.array([1.0, 0.0]), 'N': np.array([0.0, 1.0]),
            'W': np.array([-1.0, 0.0]), 'S': np.array([0.0, -1.0])}
PATH_STEP = 0.5  # m between polyline samples


@dataclass(frozen=True)
class RoadLayout:
    lane_width: float = 3.5
    lanes_ew: int = 3          # per direction on the east-west avenue
    lanes_ns: int = 2          # per direction on the north-south street
    bike_width: float = 1.8
    parking_width: float = 2.5
    sidewalk_width: float = 4.0
    crosswalk: float = 3.0     # between the stop line and the crossing road's edge
    arm_length: float = 160.0  # from the centre to the end of each arm

    def lanes(self, heading: str) -> int:
        return self.lanes_ew if heading in 'EW' else self.lanes_ns

    def half_width(self, heading: str) -> float:
        """Half width of the carriageway incl. bike and parking lanes, for a road of this heading."""
        return self.lanes(heading) * self.lane_width + self.bike_width + self.parking_width

    def stop_distance(self, heading: str) -> float:
        """Distance from the centre to the stop line / exit line for traffic with this heading."""
        crossing = 'N' if heading in 'EW' else 'E'
        return self.half_width(crossing) + self.crosswalk

    def lane_offset(self, lane: int) -> float:
        """Lateral offset (to the right of the heading) of lane `lane` (0 = innermost)."""
        return (lane + 0.5) * self.lane_width

    def bike_offset(self, heading: str) -> float:
        return self.lanes(heading) * self.lane_width + self.bike_width / 2

    def parking_offset(self, heading: str) -> float:
        return self.lanes(heading) * self.lane_width + self.bike_width + self.parking_width / 2

    def sidewalk_offset(self, heading: str) -> float:
        return self.half_width(heading) + self.sidewalk_width / 2


def right_of(d: np.ndarray) -> np.ndarray:
    """Unit vector to the right of ground-plane direction d."""
    return np.array([d[1], -d[0]])


def turn(heading: str, movement: str) -> str:
    order = 'ENWS'  # counter-clockwise
    step = {'straight': 0, 'left': 1, 'right': -1}[movement]
    return order[(order.index(heading) + step) % 4]


@dataclass
class Path:
    """Arc-length-parametrised polyline. xy: (P, 2) m; s: (P,) m; yaw: (P,) rad."""
    xy: np.ndarray
    s: np.ndarray
    yaw: np.ndarray
    stop_s: float            # arc length of the stop line (inf: no signal on this path)
    approach: str            # heading of the approach, keys the traffic signal
    max_speed: np.ndarray    # (P,) m/s allowed by curvature, looking ahead

    @property
    def length(self) -> float:
        return float(self.s[-1])

    def at(self, s: np.ndarray):
        """Positions (n, 2) and yaws (n,) at arc lengths s (n,)."""
        s = np.clip(s, 0.0, self.length)
        x = np.interp(s, self.s, self.xy[:, 0])
        y = np.interp(s, self.s, self.xy[:, 1])
        yaw = np.interp(s, self.s, np.unwrap(self.yaw))
        return np.stack([x, y], -1), yaw

    def speed_limit(self, s: np.ndarray) -> np.ndarray:
        return np.interp(s, self.s, self.max_speed)


def _polyline(points: list[np.ndarray]) -> np.ndarray:
    """Resample a chain of (k, 2) pieces to PATH_STEP spacing."""
    xy = np.concatenate(points)
    keep = np.concatenate([[True], np.linalg.norm(np.diff(xy, axis=0), axis=1) > 1e-6])
    xy = xy[keep]
    seg = np.linalg.norm(np.diff(xy, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    s_new = np.arange(0.0, s[-1] + 1e-9, PATH_STEP)
    if s_new[-1] < s[-1]:
        s_new = np.append(s_new, s[-1])
    return np.stack([np.interp(s_new, s, xy[:, 0]), np.interp(s_new, s, xy[:, 1])], -1)


def make_path(xy_pieces: list[np.ndarray], stop_s: float, approach: str,
              lateral_accel: float = 2.0, lookahead: float = 25.0) -> Path:
    xy = _polyline(xy_pieces)
    d = np.gradient(xy, axis=0)
    yaw = np.arctan2(d[:, 1], d[:, 0])
    s = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(xy, axis=0), axis=1))])
    curvature = np.abs(np.gradient(np.unwrap(yaw), s, edge_order=1))
    vmax = np.sqrt(lateral_accel / np.maximum(curvature, 1e-4))
    # Brake before a curve: the limit at s is the tightest limit within the look-ahead window.
    n = max(1, int(lookahead / PATH_STEP))
    padded = np.concatenate([vmax, np.full(n, vmax[-1])])
    window = np.lib.stride_tricks.sliding_window_view(padded, n + 1)[: len(vmax)]
    return Path(xy, s, yaw, stop_s, approach, window.min(axis=1))


def _bezier(p0: np.ndarray, c: np.ndarray, p1: np.ndarray, n: int = 40) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * c + t ** 2 * p1


def vehicle_route(layout: RoadLayout, heading: str, lane: int, movement: str) -> Path:
    """Path of a vehicle approaching with `heading` in entry lane `lane` doing `movement`."""
    d_in = HEADINGS[heading]
    out = turn(heading, movement)
    d_out = HEADINGS[out]
    if movement == 'straight':
        lane_out = min(lane, layout.lanes(out) - 1)
    elif movement == 'right':
        lane_out = layout.lanes(out) - 1
    else:
        lane_out = 0
    o_in = layout.lane_offset(lane) * right_of(d_in)
    o_out = layout.lane_offset(lane_out) * right_of(d_out)
    start = o_in - layout.arm_length * d_in
    p0 = o_in - layout.stop_distance(heading) * d_in
    p1 = o_out + layout.stop_distance(out) * d_out
    end = o_out + layout.arm_length * d_out
    if movement == 'straight':
        mid = np.stack([p0, p1])
    else:
        mid = _bezier(p0, o_in + o_out, p1)
    stop_s = layout.arm_length - layout.stop_distance(heading)
    return make_path([np.stack([start, p0]), mid, np.stack([p1, end])], stop_s, heading)


def bike_route(layout: RoadLayout, heading: str) -> Path:
    """Straight path along the bike lane through the intersection."""
    d = HEADINGS[heading]
    o = layout.bike_offset(heading) * right_of(d)
    stop_s = layout.arm_length - layout.stop_distance(heading)
    return make_path([np.stack([o - layout.arm_length * d, o + layout.arm_length * d])],
                     stop_s, heading)


def sidewalk_route(layout: RoadLayout, heading: str, corner_turn: bool) -> Path:
    """Walk along the sidewalk right of `heading`; optionally round the corner to the right."""
    d = HEADINGS[heading]
    o = layout.sidewalk_offset(heading) * right_of(d)
    start = o - layout.arm_length * d
    if not corner_turn:
        return make_path([np.stack([start, o + layout.arm_length * d])], np.inf, heading)
    out = turn(heading, 'right')
    d_out = HEADINGS[out]
    corner = o + layout.sidewalk_offset(out) * right_of(d_out)
    end = corner + layout.arm_length * d_out
    return make_path([np.stack([start, corner, end])], np.inf, heading)


def all_vehicle_routes(layout: RoadLayout) -> list[Path]:
    routes = []
    for heading in 'ENWS':
        n = layout.lanes(heading)
        for lane in range(n):
            routes.append(vehicle_route(layout, heading, lane, 'straight'))
            if lane == n - 1:
                routes.append(vehicle_route(layout, heading, lane, 'right'))
            if lane == 0:
                routes.append(vehicle_route(layout, heading, lane, 'left'))
    return routes
