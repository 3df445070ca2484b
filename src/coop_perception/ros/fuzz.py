"""Fuzzing the nodes' inputs in this process: seeded mutations of valid messages fed to the real
``lidar_detector`` and ``trust_fusion`` nodes' subscription callbacks, with every output checked.

Each input topic gets valid messages mutated by a seeded ``numpy`` Generator: PointCloud2 layouts
(field types, counts, offsets, names, endianness, steps, lengths), values (NaN, inf, absurd
dequantisation scales and velocities; integer fields' extremes), feature messages in both
layouts (cells and compact records), stamps, frame ids and agent ids up to 2^31 and beyond;
odometry gets NaN, infinite, huge and non-unit poses. After every fuzzed message the node gets a
valid frame (the detector a scan, the fusion an ego pose and map), so each case also runs the
pipeline on whatever state the fuzzed message left. The harness checks that

- no exception leaves a callback (``crashes``) and none is caught by the node's guard, which
  would be a bug handled by luck (``unhandled``: guard reasons ``error:...``);
- every published object list holds only finite boxes within the node's sensor range, and every
  feature message the detector publishes decodes at the fusion;
- everything rejected is counted by reason (``rejected``: the nodes' reasons and the pipeline's).

``FuzzHarness.valid_output`` runs a fixed valid sequence far later in time; on a fuzzed node it
must give what it gives on a fresh one. ``tests/test_fuzz.py`` runs a few hundred cases per topic,
``coop-perception bench fuzz`` as many as asked.
"""
from __future__ import annotations

import array
import json
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from coop_perception.data import pointcloud as pc
from coop_perception.data import ros_msgs
from coop_perception.data.bag import LIDAR_DTYPE
from coop_perception.fusion import codec
from coop_perception.fusion.ego_map import encode_ego_map
from coop_perception.fusion.pipeline import collaborator_message
from coop_perception.ros import convert as cv

NS_PER_S = 1_000_000_000
FRAME_NS = NS_PER_S // 10          # stamps advance 100 ms per case
EGO, COLLABORATOR, DETECTOR_AGENT = 1, 2, 2
# Agent ids the mutations put into frame names: edges of the accepted range and far beyond it.
AGENT_IDS = (0, 3, 62, 63, 64, 1023, 1024, 2**31 - 1, 2**31, 2**63, 2**64 + 5, 10**30)
# Values written into float fields: non-finite, huge, tiny, and just outside physical bounds.
# Integer fields (the compact layout's fixed-point values) get their type's extremes, 0 and 1.
ODD_FLOATS = (np.nan, np.inf, -np.inf, 1e38, -1e38, 1e30, 1e6, -1e6, 1e-45, 101.0, -1.0, 8.0, 0.0)
CLOUD_MUTATIONS = ('endianness', 'datatype', 'count', 'offset', 'drop_field', 'rename_field', 'duplicate_field',
                   'truncate', 'extend', 'point_step', 'row_step', 'width', 'height', 'value', 'scale', 'bytes',
                   'stamp', 'frame_id', 'agent_id', 'empty')
ODOM_MUTATIONS = ('position', 'quaternion', 'stamp', 'frame_id', 'child_frame_id')


# --------------------------------------------------------------------------- message specs
@dataclass
class CloudSpec:
    """A PointCloud2 as plain values, so mutations never fight the message classes' setters."""
    fields: list            # [name, offset, datatype, count] per field
    data: bytearray
    point_step: int
    width: int
    height: int = 1
    row_step: int | None = None
    is_bigendian: bool = False
    stamp_ns: int = 0
    frame_id: str = ''

    @classmethod
    def from_buffer(cls, fields, data: bytes, point_step: int, stamp_ns: int, frame_id: str) -> CloudSpec:
        return cls([[f.name, f.offset, f.datatype, f.count] for f in fields], bytearray(data), point_step,
                   len(data) // point_step if point_step else 0, stamp_ns=stamp_ns, frame_id=frame_id)

    def copy(self, stamp_ns: int) -> CloudSpec:
        return CloudSpec([list(f) for f in self.fields], bytearray(self.data), self.point_step, self.width,
                         self.height, self.row_step, self.is_bigendian, stamp_ns, self.frame_id)

    def set(self, name: str, value, rows=slice(None)) -> CloudSpec:
        """Write ``value`` into field ``name`` of ``rows`` (valid layouts only); returns self."""
        dtype = pc.fields_to_dtype([pc.Field(*f) for f in self.fields], self.point_step, self.is_bigendian)
        np.frombuffer(self.data, dtype)[name][rows] = value
        return self

    def message(self, msgs):
        row_step = self.width * self.point_step if self.row_step is None else self.row_step
        return msgs('sensor_msgs/msg/PointCloud2', header=ros_msgs.make_header(msgs, self.stamp_ns, self.frame_id),
                    height=_u32(self.height), width=_u32(self.width),
                    fields=[msgs('sensor_msgs/msg/PointField', name=str(n), offset=_u32(o), datatype=int(d) % 256,
                                 count=_u32(c)) for n, o, d, c in self.fields],
                    is_bigendian=bool(self.is_bigendian), point_step=_u32(self.point_step), row_step=_u32(row_step),
                    data=array.array('B', bytes(self.data)), is_dense=True)


@dataclass
class OdomSpec:
    position: np.ndarray     # (3,) m
    quaternion: np.ndarray   # (4,) x, y, z, w
    stamp_ns: int
    child_frame_id: str
    frame_id: str = 'map'

    def message(self, msgs):
        p, q = (float(v) for v in self.position), (float(v) for v in self.quaternion)
        pose = msgs('geometry_msgs/msg/Pose', position=msgs('geometry_msgs/msg/Point', **dict(zip('xyz', p))),
                    orientation=msgs('geometry_msgs/msg/Quaternion', **dict(zip('xyzw', q))))
        return msgs('nav_msgs/msg/Odometry', header=ros_msgs.make_header(msgs, self.stamp_ns, self.frame_id),
                    child_frame_id=self.child_frame_id,
                    pose=msgs('geometry_msgs/msg/PoseWithCovariance', pose=pose))


def _u32(value: int) -> int:
    return int(value) % 2**32


def _stamp(value: int) -> int:
    """A stamp that a builtin_interfaces/Time holds (int32 seconds)."""
    return int(np.clip(value, -2**31 * NS_PER_S, (2**31 - 1) * NS_PER_S))


# --------------------------------------------------------------------------- mutations
def mutate_cloud(spec: CloudSpec, rng: np.random.Generator) -> list[str]:
    """Apply 1 to 3 random mutations to ``spec`` in place; returns their names."""
    kinds = [str(k) for k in rng.choice(CLOUD_MUTATIONS, size=int(rng.integers(1, 4)))]
    for kind in kinds:
        if kind in ('value', 'scale', 'bytes'):
            _mutate_values(spec, kind, rng)
        else:
            _mutate_layout(spec, kind, rng)
    return kinds


def _mutate_values(spec: CloudSpec, kind: str, rng: np.random.Generator) -> None:
    if kind == 'bytes':
        if spec.data:
            idx = rng.integers(0, len(spec.data), size=int(rng.integers(1, 16)))
            for i in idx:
                spec.data[i] = int(rng.integers(0, 256))
        return
    try:
        dtype = pc.fields_to_dtype([pc.Field(*f) for f in spec.fields], spec.point_step, spec.is_bigendian)
        rec = np.frombuffer(spec.data, dtype, count=len(spec.data) // spec.point_step)
    except (pc.PointCloudError, ValueError, ZeroDivisionError):
        return
    scalars = [n for n in dtype.names if dtype.fields[n][0].kind in 'fiu' and dtype.fields[n][0].shape == ()]
    if kind == 'scale' and 'scale' in scalars:
        name = 'scale'
    elif scalars:
        name = str(rng.choice(scalars))
    else:
        return
    if len(rec):
        rows = rng.integers(0, len(rec), size=int(rng.integers(1, len(rec) + 1)))
        t = dtype.fields[name][0]
        # integer fields (the compact layout's fixed-point values): their extremes and 0
        rec[name][rows] = (rng.choice(ODD_FLOATS) if t.kind == 'f'
                           else rng.choice([np.iinfo(t).min, np.iinfo(t).max, 0, 1]))


def _mutate_layout(spec: CloudSpec, kind: str, rng: np.random.Generator) -> None:
    f = spec.fields[int(rng.integers(len(spec.fields)))] if spec.fields else None
    n = len(spec.data)
    if kind == 'endianness':
        spec.is_bigendian = not spec.is_bigendian
    elif kind == 'datatype' and f:
        f[2] = int(rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 255]))
    elif kind == 'count' and f:
        f[3] = int(rng.choice([0, 2, 3, 1000, 2**32 - 1]))
    elif kind == 'offset' and f:
        f[1] = int(rng.choice([0, 1, f[1] + 1, spec.point_step, 2**32 - 1]))
    elif kind == 'drop_field' and f:
        spec.fields.remove(f)
    elif kind == 'rename_field' and f:
        f[0] = str(rng.choice(['', 'X', 'features', 'scale', 'x', 'ünïcödé', 'a' * 300]))
    elif kind == 'duplicate_field' and f:
        spec.fields.append(list(f))
    elif kind == 'truncate':
        del spec.data[int(rng.integers(0, n + 1)):]
    elif kind == 'extend':
        spec.data.extend(bytes(int(rng.integers(1, 200))))
    elif kind in ('point_step', 'row_step', 'width', 'height'):
        current = getattr(spec, kind) or 0
        setattr(spec, kind, int(rng.choice([0, 1, current + 1, max(current - 1, 0), 2 * current, 2**32 - 1])))
    elif kind == 'stamp':
        spec.stamp_ns = _stamp(spec.stamp_ns + int(rng.choice([-10**12, -NS_PER_S, -1, 1, NS_PER_S, 10**12,
                                                               2**62])))
    elif kind == 'frame_id':
        spec.frame_id = str(rng.choice(['', 'map', 'agent/lidar', 'agent-1/lidar', 'agent1', 'velodyne',
                                        '/agent1/lidar', 'agent٣/lidar']))
    elif kind == 'agent_id':
        spec.frame_id = f'agent{int(rng.choice(AGENT_IDS))}/lidar'
    elif kind == 'empty':
        spec.data, spec.width = bytearray(), 0


def mutate_odom(spec: OdomSpec, rng: np.random.Generator) -> list[str]:
    """Apply 1 or 2 random mutations to ``spec`` in place; returns their names."""
    kinds = [str(k) for k in rng.choice(ODOM_MUTATIONS, size=int(rng.integers(1, 3)))]
    for kind in kinds:
        if kind == 'position':
            spec.position[int(rng.integers(3))] = rng.choice((*ODD_FLOATS, 1e308, -1e308, 1e7 + 1, 5e6))
        elif kind == 'quaternion':
            spec.quaternion = np.asarray(rng.choice([[0, 0, 0, 0], [0, 0, 0, 2], [np.nan, 0, 0, 1], [0, 0, 0, np.inf],
                                                     [0, 0, 0.7071, 0.7071], [0, 0, 0.5, 0.5], [1e300, 0, 0, 1]]),
                                         np.float64)
        elif kind == 'stamp':
            spec.stamp_ns = _stamp(spec.stamp_ns + int(rng.choice([-10**12, -NS_PER_S, -1, NS_PER_S // 3, 10**12])))
        elif kind == 'frame_id':
            spec.frame_id = str(rng.choice(['', 'odom', 'agent1/lidar']))
        else:
            spec.child_frame_id = f'agent{int(rng.choice(AGENT_IDS))}/lidar'
    return kinds


# --------------------------------------------------------------------------- valid inputs
def valid_scan(seed: int, n: int = 6000) -> np.ndarray:
    """(n + 800, 4) float32 x, y, z, intensity: ground around a sensor 1.8 m up and a car-sized block."""
    rng = np.random.default_rng(seed)
    r, a = rng.uniform(3, 12, n), rng.uniform(-np.pi, np.pi, n)
    ground = np.stack([r * np.cos(a), r * np.sin(a), np.full(n, -1.8), np.zeros(n)], 1)
    car = np.concatenate([rng.uniform([5, -1, -1.6], [9.5, 1, -0.2], (800, 3)), np.zeros((800, 1))], 1)
    return np.concatenate([ground, car]).astype(np.float32)


def scan_spec(points: np.ndarray, stamp_ns: int, frame_id: str) -> CloudSpec:
    rec = pc.structured({'x': points[:, 0], 'y': points[:, 1], 'z': points[:, 2], 'intensity': points[:, 3]},
                        LIDAR_DTYPE)
    fields, _, step, data = pc.array_to_buffer(rec)
    return CloudSpec.from_buffer(fields, data, step, stamp_ns, frame_id)


def odom_spec(agent: int, stamp_ns: int, x: float = 0.0) -> OdomSpec:
    return OdomSpec(np.array([x, 0.0, 1.8]), np.array([0.0, 0.0, 0.0, 1.0]), stamp_ns, f'agent{agent}/lidar')


@dataclass
class TopicReport:
    """What fuzzing one input topic did (the ``bench fuzz`` JSON per topic)."""
    messages: int = 0
    crashes: int = 0                                 # exceptions that left a subscription callback
    unhandled: int = 0                               # exceptions the node's guard caught (bugs)
    rejected: Counter = field(default_factory=Counter)   # reason -> count (node, codec, pipeline)
    bad_outputs: int = 0     # published boxes with NaN or beyond the range, undecodable feature messages
    errors: list = field(default_factory=list)       # the first few crash / unhandled descriptions

    def to_dict(self) -> dict:
        return {'messages': self.messages, 'crashes': self.crashes, 'unhandled': self.unhandled,
                'rejected': dict(sorted(self.rejected.items())), 'bad_outputs': self.bad_outputs,
                'errors': self.errors[:10]}


def report_json(reports: dict[str, TopicReport]) -> str:
    return json.dumps({topic: r.to_dict() for topic, r in reports.items()}, indent=2, sort_keys=True)


# --------------------------------------------------------------------------- the harness
FUZZ_TOPICS = ('lidar_detector:lidar', 'lidar_detector:odom', 'trust_fusion:v2x/features',
               'trust_fusion:v2x/odom', 'trust_fusion:odom', 'trust_fusion:coop/bev')


class _Capture:
    """Stands in for a node's publisher: keeps what the node publishes."""

    def __init__(self):
        self.messages: list = []

    def publish(self, msg) -> None:
        self.messages.append(msg)


class FuzzHarness:
    """A ``lidar_detector`` (agent 2) and a ``trust_fusion`` (ego 1) on ``context``, fed through
    their own subscription callbacks, in sim time that never starts (no clock checks, stamps are
    the harness's). ``detector_params`` and ``fusion_params`` are rclpy Parameters (models,
    method); the nodes' namespaces and ``use_sim_time`` are set here."""

    def __init__(self, context, detector_params: list, fusion_params: list, start_ns: int = 1000 * NS_PER_S):
        # imported here: the nodes import rclpy and torch, the mutations above need neither
        from rclpy.parameter import Parameter

        from coop_perception.ros.lidar_detector import LidarDetectorNode
        from coop_perception.ros.trust_fusion import TrustFusionNode

        sim = [Parameter('use_sim_time', value=True)]
        self.detector = LidarDetectorNode(context=context, namespace=f'agent{DETECTOR_AGENT}',
                                          parameter_overrides=sim + list(detector_params))
        self.fusion = TrustFusionNode(context=context, namespace=f'agent{EGO}',
                                      parameter_overrides=sim + list(fusion_params))
        self.nodes = (self.detector, self.fusion)
        self.outputs = {}
        for node in self.nodes:
            for name in ('pub_objects', 'pub_markers', 'pub_features', 'pub_bev', 'pub_detection3d'):
                if getattr(node, name, None) is not None:
                    setattr(node, name, self.outputs.setdefault((node.NODE_NAME, name), _Capture()))
        self.callbacks = {f'{node.NODE_NAME}:{sub.topic_name.split("/", 2)[-1]}': sub.callback
                          for node in self.nodes for sub in node.subscriptions}
        self.msgs = cv.RclpyMessages()
        self.t = start_ns
        model = self.fusion.detector
        det = model.detect(valid_scan(7))
        self.features = CloudSpec.from_buffer(*codec.encode(collaborator_message(
            det, COLLABORATOR, 0, {'score_threshold': 0.0, 'format': 'cells'})), 0, f'agent{COLLABORATOR}/lidar')
        # the one-packet layout (fusion.compact_codec) arrives on the same topic
        self.compact_features = CloudSpec.from_buffer(
            *codec.encode(collaborator_message(det, COLLABORATOR, 0, {'score_threshold': 0.0, 'format': 'compact'})),
            0, f'agent{COLLABORATOR}/lidar')
        self.ego_map = CloudSpec.from_buffer(*encode_ego_map(model.detect(valid_scan(1)), EGO, 0), 0,
                                             f'agent{EGO}/lidar')
        self.scan = scan_spec(valid_scan(3), 0, f'agent{DETECTOR_AGENT}/lidar')

    def destroy(self) -> None:
        for node in self.nodes:
            node.destroy_node()

    # ------------------------------------------------------------------ feeding
    def feed(self, topic: str, spec) -> None:
        """One message (a CloudSpec or OdomSpec) to the callback of ``topic`` (FUZZ_TOPICS)."""
        self.callbacks[topic](spec.message(self.msgs))

    def ego_frame(self, stamp_ns: int) -> None:
        """The ego's pose and map at ``stamp_ns``: one fusion."""
        self.feed('trust_fusion:odom', odom_spec(EGO, stamp_ns))
        self.feed('trust_fusion:coop/bev', self.ego_map.copy(stamp_ns))

    def collaborator(self, stamp_ns: int) -> None:
        self.feed('trust_fusion:v2x/odom', odom_spec(COLLABORATOR, stamp_ns, x=5.0))
        self.feed('trust_fusion:v2x/features', self.features.copy(stamp_ns))

    def detector_frame(self, stamp_ns: int) -> None:
        self.feed('lidar_detector:odom', odom_spec(DETECTOR_AGENT, stamp_ns))
        self.feed('lidar_detector:lidar', self.scan.copy(stamp_ns))

    def fuzz_case(self, topic: str, rng: np.random.Generator) -> list[str]:
        """One mutated message on ``topic`` amid valid traffic; returns the mutations applied."""
        self.t += FRAME_NS
        t, before = self.t, self.t - FRAME_NS // 5
        node = topic.split(':')[0]
        if topic.endswith('odom'):
            agent = {'lidar_detector:odom': DETECTOR_AGENT, 'trust_fusion:odom': EGO}.get(topic, COLLABORATOR)
            spec = odom_spec(agent, before if agent == COLLABORATOR else t)
            kinds = mutate_odom(spec, rng)
        else:
            features = self.compact_features if rng.random() < 0.5 else self.features
            spec = {'lidar_detector:lidar': self.scan, 'trust_fusion:v2x/features': features,
                    'trust_fusion:coop/bev': self.ego_map}[topic].copy(before if 'features' in topic else t)
            kinds = mutate_cloud(spec, rng)
        if topic == 'trust_fusion:v2x/features':
            self.feed('trust_fusion:v2x/odom', odom_spec(COLLABORATOR, before, x=5.0))
        elif topic == 'trust_fusion:coop/bev':
            self.feed('trust_fusion:odom', odom_spec(EGO, t))
        self.feed(topic, spec)
        if node == 'lidar_detector':
            self.detector_frame(t + FRAME_NS // 2)
        else:
            if topic != 'trust_fusion:v2x/features':
                self.collaborator(before)
            self.ego_frame(t + FRAME_NS // 2)
        return kinds

    # ------------------------------------------------------------------ checking
    def counts(self) -> Counter:
        """Every rejection and drop so far, by 'node:reason'."""
        out = Counter()
        for node in self.nodes:
            out.update({f'{node.NODE_NAME}:{k}': v for k, v in node.guard.counts.items()})
            out.update({f'{node.NODE_NAME}:dropped_box:{k}': v for k, v in node.dropped_boxes.items()})
        out.update({f'trust_fusion:pipeline:{k}': v for k, v in self.fusion.coop.drops.items()})
        return out

    def undecodable_features(self) -> int:
        """Feature messages published by the detector since the last ``take_outputs`` that the
        fusion would reject: a detector must never put such a message on the air."""
        bad = 0
        for msg in self.outputs[('lidar_detector', 'pub_features')].messages:
            try:
                codec.decode(**cv.cloud_layout(msg), grid=self.fusion.grid, channels=self.fusion.channels,
                             agent_id=DETECTOR_AGENT, stamp_ns=0)
            except codec.FeatureMessageError:
                bad += 1
        return bad

    def take_outputs(self) -> list[tuple[str, np.ndarray]]:
        """(node, object records) of every object list published since the last call."""
        out = []
        for (node, name), capture in self.outputs.items():
            if name == 'pub_objects':
                out += [(node, ros_msgs.cloud_to_objects(m)) for m in capture.messages]
            capture.messages.clear()
        return out

    def bad_boxes(self, node: str, objects: np.ndarray) -> int:
        """Published boxes with a non-finite value or a centre beyond the node's sensor range."""
        x_min, y_min, x_max, y_max = {'lidar_detector': self.detector, 'trust_fusion': self.fusion}[node].extent
        values = np.stack([objects[n].astype(np.float64) for n in objects.dtype.names], axis=-1)
        values = values.reshape(len(objects), len(objects.dtype.names))
        inside = (objects['x'] >= x_min) & (objects['x'] <= x_max) & (objects['y'] >= y_min) & (objects['y'] <= y_max)
        return int((~np.isfinite(values).all(axis=1) | ~inside).sum())

    def status_json(self) -> None:
        """Build both nodes' status messages, as their timers do (a bad agent id once broke them)."""
        for node in self.nodes:
            json.dumps(node.status(), sort_keys=True)

    def valid_output(self, start_ns: int, frames: int = 3) -> list:
        """Object records of each node for a fixed valid sequence of ``frames`` frames from
        ``start_ns`` on; the same on a fuzzed node as on a fresh one. An ego frame of its own one
        frame before ``start_ns`` (not returned) first moves the fusion's ego time to the new
        stamps: collaborators heard while the ego time still stood at the fuzzing's would count
        as silent since then and be forgotten."""
        self.ego_frame(start_ns - FRAME_NS)
        self.take_outputs()
        for i in range(frames):
            t = start_ns + i * FRAME_NS
            self.detector_frame(t)
            # the ego's time first: a collaborator far ahead of a fuzzed node's ego time is rejected
            self.feed('trust_fusion:odom', odom_spec(EGO, t))
            self.collaborator(t - FRAME_NS // 5)
            self.ego_frame(t)
        return self.take_outputs()


def run_fuzz(harness: FuzzHarness, topic: str, cases: int, seed: int) -> TopicReport:
    """``cases`` mutated messages on ``topic``; everything the nodes did is in the report."""
    rng = np.random.default_rng(seed)
    report = TopicReport()
    counts = harness.counts()
    for _ in range(cases):
        report.messages += 1
        try:
            kinds = harness.fuzz_case(topic, rng)
            harness.status_json()
        except Exception as e:  # noqa: BLE001 - a crash is what is being counted
            report.crashes += 1
            report.errors.append(f'crash: {type(e).__name__}: {e}')
            kinds = []
        now = harness.counts()
        for reason, n in (now - counts).items():
            if ':error:' in reason:
                report.unhandled += n
                report.errors.append(f'unhandled {reason} after mutations {kinds}')
            else:
                report.rejected[reason] += n
        counts = now
        report.bad_outputs += harness.undecodable_features()
        for node, objects in harness.take_outputs():
            report.bad_outputs += harness.bad_boxes(node, objects)
    return report
