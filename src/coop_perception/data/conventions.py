"""Which of the conventions a V2X-Sim-format dataset follows, detected from its data when opened.

Our writer and the real V2X-Sim 2.0 download share the layout but differ in what the fields mean:
timestamps (microseconds vs frame counters), category vocabulary (nuScenes names vs CARLA
blueprints), ``sample_data.width`` (point count vs 0) and per-agent point counts (stored vs
absent). Each is decided from the data; what the data cannot settle is an error naming the
option that does, never a guess.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from .labels import CLASSES
from .visibility import points_on_boxes

# Timestamps: steps between consecutive samples of a scene.
US_STEP_RANGE = (1_000, 10_000_000)   # µs: 1 ms .. 10 s covers every LiDAR sample rate
FRAME_STEP_MAX = 100                   # whole frames between consecutive samples
FRAME_COUNTER_MAX = 1_000_000          # no scene runs a million frames: larger stamps are µs
# Frame counters become µs after this (arbitrary) epoch, so no stamp is 0, which ROS takes for
# "unset" (and tf2 for "latest").
FRAME_EPOCH_US = 1_700_000_000_000_000

# Pose chain check: ground-truth boxes within NEAR_RANGE of an agent's LiDAR (its own vehicle
# left out) should hold some of its points when the points are placed with T_world_ego @
# T_ego_sensor. Fewer than MIN_NEAR_BOXES boxes decide nothing.
NEAR_RANGE = 25.0                      # m
MIN_NEAR_BOXES = 8
MIN_HIT_FRACTION = 0.5


@dataclass(frozen=True)
class TimeBase:
    """How the tables' timestamps become microseconds."""
    unit: str                          # 'us' or 'frame'
    period_s: float | None = None      # frame period, for 'frame'
    step: float | None = None          # median step between consecutive samples, in `unit`

    def to_us(self, value) -> int:
        if self.unit == 'us':
            return int(value)
        return FRAME_EPOCH_US + int(round(float(value) * self.period_s * 1e6))

    def describe(self) -> str:
        if self.unit == 'us':
            step = f', samples {self.step * 1e-6:g} s apart' if self.step else ''
            return f'microseconds{step}'
        return f'frame counters x {self.period_s:g} s (--frame-period)'


def detect_time_base(scene_stamps: dict[str, list[float]], lidar_offsets: np.ndarray,
                     frame_period_s: float | None, table: Path) -> TimeBase:
    """The timestamps' unit from the samples' stamps per scene (chain order) and the LiDAR
    sample_data stamps minus their sample's (``lidar_offsets``)."""
    steps = []
    for name, stamps in scene_stamps.items():
        d = np.diff(np.asarray(stamps, dtype=np.float64))
        if np.any(d <= 0):
            raise UserError(table, f'timestamps do not increase from one sample to the next in {name}')
        steps.append(d)
    steps = np.concatenate(steps) if steps else np.zeros(0)
    values = np.concatenate([np.asarray(s, np.float64) for s in scene_stamps.values()] or [np.zeros(0)])
    whole = bool(np.all(values == np.round(values)))
    if len(steps):
        step = float(np.median(steps))
        fits_us = bool(np.all((steps >= US_STEP_RANGE[0]) & (steps <= US_STEP_RANGE[1])))
        fits_frames = whole and bool(np.all(steps <= FRAME_STEP_MAX))
    else:  # no scene has two samples: only a magnitude no frame counter reaches can tell
        step = None
        fits_us = bool(len(values)) and values.max() > FRAME_COUNTER_MAX
        fits_frames = False
    if frame_period_s is not None:
        if fits_us:
            seen = f'samples {step:g} µs apart' if step else f'stamps above {FRAME_COUNTER_MAX}'
            raise UserError(table, f'timestamps are microseconds already ({seen}); '
                                   '--frame-period is only for frame-counter timestamps')
        base = TimeBase('frame', frame_period_s, step)
    elif fits_us:
        base = TimeBase('us', None, step)
    elif fits_frames:
        raise UserError(table, f'timestamps count frames (samples {step:g} apart), not microseconds: '
                               'give the frame period in seconds with --frame-period (e.g. 0.1 for 10 Hz)')
    else:
        seen = f'steps from {steps.min():g} to {steps.max():g}' if len(steps) else 'no scene has two samples'
        raise UserError(table, f'timestamps fit neither microseconds (samples 1 ms to 10 s apart) nor frame '
                               f'counters (whole steps of 1 to {FRAME_STEP_MAX}): {seen}; if they count '
                               'frames, give the frame period with --frame-period')
    if step is not None and len(lidar_offsets) and np.abs(lidar_offsets).max() > steps.max():
        raise UserError(table.parent / 'sample_data.json',
                        f'LiDAR timestamps lie up to {np.abs(lidar_offsets).max():g} from their sample\'s, '
                        f'more than the {steps.max():g} between samples: the tables disagree on the unit')
    return base


def check_pose_chain(samples, enough: int) -> dict:
    """Fraction of the boxes near each agent that hold its points, placed with the assumed pose
    chain and with x mirrored in the sensor frame (as coperception does): {'near_boxes', 'chain',
    'mirrored'} over `samples` (v2xsim.Sample, taken lazily until `enough` near boxes are seen)."""
    chain, mirrored = [], []
    for sample in samples:
        if sum(len(c) for c in chain) >= enough:
            break
        for k, a in sample.agents.items():
            boxes = sample.gt.boxes_at((a.timestamp_us - sample.timestamp_us) * 1e-6)
            T = a.T_world_sensor
            near = np.linalg.norm(boxes[:, :2] - T[:2, 3], axis=1) <= NEAR_RANGE
            own = sample.agent_box(k)
            if own >= 0:
                near[own] = False
            if not near.any():
                continue
            pts = a.load_points()
            chain.append(points_on_boxes(pts, T, boxes[near]) > 0)
            flipped = pts.copy()
            flipped[:, 0] *= -1
            mirrored.append(points_on_boxes(flipped, T, boxes[near]) > 0)
    if not chain:
        return {'near_boxes': 0, 'chain': 0.0, 'mirrored': 0.0}
    chain, mirrored = np.concatenate(chain), np.concatenate(mirrored)
    return {'near_boxes': len(chain), 'chain': float(chain.mean()), 'mirrored': float(mirrored.mean())}


def pose_verdict(pose: dict, where) -> str:
    """'ok' or 'unchecked' (too few boxes near agents); raises when the points miss the boxes."""
    if pose['near_boxes'] < MIN_NEAR_BOXES:
        return 'unchecked'
    if pose['chain'] >= MIN_HIT_FRACTION and pose['chain'] > pose['mirrored']:
        return 'ok'
    raise UserError(where, f"the boxes near each agent do not hold its points under T_world_ego @ T_ego_sensor "
                           f"({pose['chain']:.0%} of {pose['near_boxes']} boxes within {NEAR_RANGE:g} m do; with x "
                           f"mirrored {pose['mirrored']:.0%}): its poses or points follow a convention this reader "
                           "does not know")


@dataclass
class Conventions:
    """What `V2XSimDataset` found when it opened a dataset."""
    version: str
    version_given: bool
    time: TimeBase
    scene_order: list[str]
    categories: dict                   # labels.category_coverage
    row_lengths: dict[int, int]        # values per point -> files checked
    width_is_point_count: bool
    visibility: str                    # 'annotations' (agent_lidar_pts) or 'counted'
    count_cache: str | None            # where counted visibility is cached; None: memory
    pose: dict = field(default_factory=dict)   # check_pose_chain + 'verdict'

    def differences(self) -> list[str]:
        """What differs from our writer's conventions, one short phrase each (empty: nothing)."""
        c = self.categories
        out = []
        if self.time.unit == 'frame':
            out.append(f'timestamps are frame counters x {self.time.period_s:g} s')
        if 4 in self.row_lengths:
            out.append('some sweeps have 4 columns (ring = -1)')
        if not self.width_is_point_count:
            out.append('sample_data.width is not the point count (ignored)')
        if self.visibility == 'counted':
            out.append('per-agent point counts counted from the sweeps, cached in '
                       + (self.count_cache or 'memory only'))
        if c['fallback']:
            out.append('category names mapped to car only by the vehicle.* fallback: ' + ', '.join(c['fallback']))
        if c['unmapped']:
            out.append('unmapped category names, read as other: ' + ', '.join(c['unmapped']))
        if self.pose.get('verdict') == 'unchecked':
            out.append(f"pose chain unchecked (only {self.pose['near_boxes']} boxes near agents)")
        return out

    def to_dict(self) -> dict:
        out = asdict(self)
        out['row_lengths'] = {str(k): v for k, v in self.row_lengths.items()}
        return out

    def lines(self) -> list[str]:
        c = self.categories
        per_class = Counter(cls or 'not detected' for cls in c['classes'].values())
        mapped = ', '.join(f'{k} {per_class[k]}' for k in (*CLASSES, 'not detected') if per_class[k])
        cats = (f"{len(c['classes']) + len(c['unmapped'])} names -> {mapped or 'none mapped'}; "
                f"unmapped (read as other): {', '.join(c['unmapped']) or 'none'}")
        if c['fallback']:
            cats += '; car only by the vehicle.* fallback: ' + ', '.join(c['fallback'])
        rows = ', '.join(f'{n} files x {k} columns' for k, n in sorted(self.row_lengths.items(), reverse=True))
        if self.visibility == 'annotations':
            vis = 'per-agent point counts from the annotations (agent_lidar_pts)'
        else:
            vis = ('per-agent point counts counted from the sweeps (no agent_lidar_pts), cached in '
                   + (self.count_cache or 'memory only (no writable cache folder)'))
        p = self.pose
        pose = (f"T_world_ego @ T_ego_sensor {p['verdict']}: {p['chain']:.0%} of {p['near_boxes']} boxes within "
                f"{NEAR_RANGE:g} m of an agent hold its points (x mirrored: {p['mirrored']:.0%})")
        return [f"metadata folder: {self.version} ({'--version' if self.version_given else 'detected'})",
                f'timestamps: {self.time.describe()}',
                'scene order: table order (' + ', '.join(self.scene_order[:4])
                + (', ...' if len(self.scene_order) > 4 else '') + ')',
                f'categories: {cats}',
                f'points: {rows or "no files checked"}; sample_data.width '
                + ('is the point count' if self.width_is_point_count else 'is not the point count (ignored)'),
                f'visibility: {vis}',
                f'pose chain: {pose}']
