"""rosbag2 recordings of V2X scenes, written and read with `rosbags` (no ROS install needed).

A scene bag holds, per agent ``k`` (frames ``agent{k}/base_link``, ``agent{k}/lidar``):

=========================  ==========================  ====================================
topic                      type                        content
=========================  ==========================  ====================================
``/agent{k}/lidar``        sensor_msgs/PointCloud2     x, y, z, intensity, ring (float32) in
                                                       ``agent{k}/lidar``; stamp = capture time
``/agent{k}/odom``         nav_msgs/Odometry           pose of ``agent{k}/lidar`` in ``map``
``/tf``                    tf2_msgs/TFMessage          ``map`` -> ``agent{k}/base_link``
``/tf_static``             tf2_msgs/TFMessage          ``agent{k}/base_link`` -> ``agent{k}/lidar``
                                                       (all agents in every message), latched
``/ground_truth/objects``  sensor_msgs/PointCloud2     object list (data.objects) in ``map``
``/ground_truth/markers``  visualization_msgs/         boxes for RViz
                           MarkerArray
=========================  ==========================  ====================================

Every message is logged at its header stamp, so a player reproduces the capture timing; an
agent's odometry comes before its scan of the same stamp. The
offered QoS recorded per topic is what a player should offer again: LiDAR best effort (as sensor
drivers publish), ``/tf_static`` transient local, the rest reliable.
"""
from __future__ import annotations

import re
import shutil
import sqlite3
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import apsw
import numpy as np
from rosbags.interfaces import (MessageDefinitionFormat, Qos, QosDurability, QosHistory, QosLiveliness, QosReliability,
                                QosTime)
from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.rosbag2.errors import ReaderError, WriterError
from rosbags.serde import SerdeError
from rosbags.typesys import Stores, TypesysError, get_types_from_idl, get_types_from_msg, get_typestore

from coop_perception.data import ros_msgs
from coop_perception.data.objects import make_objects
from coop_perception.errors import UserError

BAG_VERSION = 9
# Message definitions (and their hashes) are those of the ROS distro the bags are played on.
TYPESTORE = Stores.ROS2_KILTED
STORAGES = {'mcap': StoragePlugin.MCAP, 'sqlite3': StoragePlugin.SQLITE3}

MAP_FRAME = 'map'
TF_TOPIC = '/tf'
TF_STATIC_TOPIC = '/tf_static'
GT_OBJECTS_TOPIC = '/ground_truth/objects'
GT_MARKERS_TOPIC = '/ground_truth/markers'
POINTCLOUD2 = 'sensor_msgs/msg/PointCloud2'
ODOMETRY = 'nav_msgs/msg/Odometry'
TFMESSAGE = 'tf2_msgs/msg/TFMessage'
MARKER_ARRAY = 'visualization_msgs/msg/MarkerArray'
STRING = 'std_msgs/msg/String'

# (N, 5) float32 scans from the dataset readers map onto these fields in order.
LIDAR_DTYPE = np.dtype([('x', '<f4'), ('y', '<f4'), ('z', '<f4'), ('intensity', '<f4'),
                        ('ring', '<f4')])

_AGENT_TOPIC = re.compile(r'^/agent(\d+)/(lidar|odom)$')
_NS_PER_US = 1000


def lidar_topic(agent: int) -> str:
    return f'/agent{agent}/lidar'


def odom_topic(agent: int) -> str:
    return f'/agent{agent}/odom'


def lidar_frame(agent: int) -> str:
    return f'agent{agent}/lidar'


def base_frame(agent: int) -> str:
    return f'agent{agent}/base_link'


_AGENT_FRAME = re.compile(r'^/?agent(\d+)/')


def agent_from_frame(frame_id: str) -> int | None:
    """Agent id of a frame named ``agent{k}/...`` (a scan's frame, so also the frame of the
    features and detections derived from it), or None for any other frame."""
    m = _AGENT_FRAME.match(frame_id)
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------- QoS
# rosbag2 records DDS defaults as these "infinite" durations.
_INFINITE = QosTime(9223372036, 854775807)


def _qos(reliability: QosReliability, durability: QosDurability, depth: int) -> Qos:
    return Qos(QosHistory.KEEP_LAST, depth, reliability, durability, _INFINITE, _INFINITE,
               QosLiveliness.AUTOMATIC, _INFINITE, False)


SENSOR_QOS = _qos(QosReliability.BEST_EFFORT, QosDurability.VOLATILE, 5)
RELIABLE_QOS = _qos(QosReliability.RELIABLE, QosDurability.VOLATILE, 10)
TF_QOS = _qos(QosReliability.RELIABLE, QosDurability.VOLATILE, 100)
LATCHED_QOS = _qos(QosReliability.RELIABLE, QosDurability.TRANSIENT_LOCAL, 1)


# --------------------------------------------------------------------------- writing
def _resolve_scene(dataset, scene) -> int:
    names = [s.name for s in dataset.scenes]
    if isinstance(scene, str) and not scene.isdigit():
        if scene not in names:
            raise UserError(scene, f'no such scene; the dataset has: {", ".join(names)}')
        return names.index(scene)
    index = int(scene)
    if not 0 <= index < len(names):
        raise UserError(str(scene), f'scene index out of range 0..{len(names) - 1}')
    return index


class BagWriter:
    """A new rosbag2 bag: rosbags Writer plus lazily added connections and CDR serialisation.
    A context manager; leaving it on an exception aborts the bag."""

    def __init__(self, path: Path, storage: str):
        self.typestore = get_typestore(TYPESTORE)
        self.msgs = ros_msgs.RosbagsMessages(self.typestore)
        self.writer = Writer(path, version=BAG_VERSION, storage_plugin=STORAGES[storage])
        self.connections = {}

    def open(self) -> 'BagWriter':
        self.writer.open()
        return self

    def close(self) -> None:
        """Finish the bag (metadata.yaml, MCAP summary)."""
        self.writer.close()

    def __enter__(self):
        return self.open()

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self.writer.abort()

    def connect(self, topic: str, msgtype: str, qos: Qos):
        if topic not in self.connections:
            self.connections[topic] = self.writer.add_connection(
                topic, msgtype, typestore=self.typestore, offered_qos_profiles=[qos])
        return self.connections[topic]

    def write(self, topic: str, msgtype: str, qos: Qos, t_ns: int, msg) -> None:
        self.write_raw(topic, msgtype, qos, t_ns, self.typestore.serialize_cdr(msg, msgtype))

    def write_raw(self, topic: str, msgtype: str, qos: Qos, t_ns: int, data: bytes) -> None:
        """Log ``data`` (the CDR bytes of a ``msgtype`` message, as DDS delivers them) at ``t_ns``."""
        self.writer.write(self.connect(topic, msgtype, qos), t_ns, data)


def write_scene_bag(dataset, scene, out, *, storage: str = 'mcap', progress: bool = False) -> dict:
    """Record one scene of a V2X-Sim-format dataset (``data.v2xsim.V2XSimDataset`` or anything
    with its interface) as a rosbag2 bag at ``out`` (a new directory). ``scene`` is an index or a
    scene name. Returns a summary: scene name, frames, agents, messages per topic."""
    from tqdm import tqdm

    if storage not in STORAGES:
        raise UserError(storage, f'unknown storage; use one of {", ".join(STORAGES)}')
    out = Path(out)
    if out.exists():
        raise UserError(out, 'exists already; choose a new path or remove it')
    scene_index = _resolve_scene(dataset, scene)
    info = dataset.scenes[scene_index]
    n_frames = len(info.sample_tokens)
    instance_ids: dict[str, int] = {}
    static: dict[int, np.ndarray] = {}
    agents: set[int] = set()
    try:
        with BagWriter(out, storage) as bag:
            bag.writer.set_custom_data('coop_perception.scene', info.name)
            msgs = bag.msgs
            for frame in tqdm(range(n_frames), desc=f'{info.name} -> {out.name}', unit='frame',
                              disable=not progress):
                sample = dataset.sample(scene_index, frame)
                pending = []  # (t_ns, topic, msgtype, qos, msg)
                new_static = False
                for k in sorted(sample.agents):
                    a = sample.agents[k]
                    t_ns = int(a.timestamp_us) * _NS_PER_US
                    agents.add(k)
                    points = np.asarray(a.load_points(), dtype=np.float32)
                    dtype = np.dtype([(n, LIDAR_DTYPE[n]) for n in LIDAR_DTYPE.names[:points.shape[1]]])
                    # The pose of a scan is logged (so played) before the scan: a detector that
                    # takes the scan at once has the pose it tracks its detections with.
                    pending.append((t_ns, odom_topic(k), ODOMETRY, RELIABLE_QOS, ros_msgs.pose_to_odometry(
                        a.T_world_sensor, ros_msgs.make_header(msgs, t_ns, MAP_FRAME), lidar_frame(k), msgs)))
                    pending.append((t_ns, TF_TOPIC, TFMESSAGE, TF_QOS, msgs(TFMESSAGE, transforms=[
                        ros_msgs.pose_to_transform(a.T_world_ego, ros_msgs.make_header(msgs, t_ns, MAP_FRAME),
                                                   base_frame(k), msgs)])))
                    pending.append((t_ns, lidar_topic(k), POINTCLOUD2, SENSOR_QOS, ros_msgs.points_to_cloud(
                        points, dtype, ros_msgs.make_header(msgs, t_ns, lidar_frame(k)), msgs)))
                    if k not in static or not np.array_equal(static[k], a.T_ego_sensor):
                        static[k] = np.asarray(a.T_ego_sensor, dtype=np.float64)
                        new_static = True
                t_gt = int(sample.timestamp_us) * _NS_PER_US
                if new_static:
                    # Late joiners of a depth-1 latched topic see only the last message: it
                    # carries every agent's calibration.
                    t_static = min([p[0] for p in pending] + [t_gt])
                    pending.append((t_static, TF_STATIC_TOPIC, TFMESSAGE, LATCHED_QOS, msgs(
                        TFMESSAGE, transforms=[ros_msgs.pose_to_transform(
                            T, ros_msgs.make_header(msgs, t_static, base_frame(k)), lidar_frame(k), msgs)
                            for k, T in sorted(static.items())])))
                gt = sample.gt
                ids = [instance_ids.setdefault(tok, len(instance_ids)) for tok in gt.instance_tokens]
                objects = make_objects(gt.boxes, gt.velocities, label=np.asarray(gt.labels), id=ids, v_std=0.0)
                header = ros_msgs.make_header(msgs, t_gt, MAP_FRAME)
                pending.append((t_gt, GT_OBJECTS_TOPIC, POINTCLOUD2, RELIABLE_QOS,
                                ros_msgs.objects_to_cloud(objects, header, msgs)))
                pending.append((t_gt, GT_MARKERS_TOPIC, MARKER_ARRAY, RELIABLE_QOS,
                                ros_msgs.objects_to_markers(objects, header, msgs, ns='ground_truth')))
                for t_ns, topic, msgtype, qos, msg in sorted(pending, key=lambda p: p[0]):
                    bag.write(topic, msgtype, qos, t_ns, msg)
            counts = {c.topic: bag.writer.counts[c.id] for c in bag.writer.connections}
    except BaseException as err:
        # A half-written bag has no metadata.yaml and would block the rerun: it goes.
        shutil.rmtree(out, ignore_errors=True)
        if isinstance(err, WriterError):
            raise UserError(out, str(err)) from None
        raise
    return {'scene': info.name, 'frames': n_frames, 'agents': sorted(agents), 'messages': counts}


# --------------------------------------------------------------------------- reading
# What a damaged bag can raise from rosbags, SQLite (apsw, sqlite3), the YAML parser or the
# decompressors; all of them mean "this is not a readable bag", which the user gets as one line.
_BAG_ERRORS = (ReaderError, TypesysError, SerdeError, OSError, apsw.Error, sqlite3.Error, struct.error,
               EOFError, ValueError, KeyError, IndexError, TypeError, AssertionError, RuntimeError)


@dataclass
class TopicInfo:
    msgtype: str
    count: int
    qos: list = field(default_factory=list)   # offered rosbags Qos profiles, as recorded
    known: bool = True                         # False: no definition to deserialise it with


class BagReader:
    """A rosbag2 bag opened for reading; every failure surfaces as UserError(path, reason).

    Types are resolved from the definitions stored in the bag, falling back to the standard
    message set; a topic whose type is neither is reported as unknown when it is read.
    """

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.exists():
            raise UserError(self.path, 'no such bag')
        if self.path.is_dir() and not (self.path / 'metadata.yaml').exists():
            raise UserError(self.path, 'not a rosbag2 bag: metadata.yaml is missing')
        try:
            self._reader = Reader(self.path)
            self._reader.open()
        except _BAG_ERRORS as err:
            raise UserError(self.path, f'cannot open bag: {_reason(err)}') from None
        try:
            self.typestore = self._build_typestore()
        except _BAG_ERRORS as err:
            self._reader.close()
            raise UserError(self.path, f'bad message definitions in bag: {_reason(err)}') from None
        self.topics: dict[str, TopicInfo] = {}
        for c in self._reader.connections:
            t = self.topics.setdefault(c.topic, TopicInfo(
                c.msgtype, 0, list(c.ext.offered_qos_profiles),
                c.msgtype in self.typestore.fielddefs))
            t.count += c.msgcount

    def _build_typestore(self):
        typs = dict(get_typestore(TYPESTORE).fielddefs)
        for c in self._reader.connections:
            if c.msgdef.format == MessageDefinitionFormat.MSG and c.msgdef.data:
                typs.update(get_types_from_msg(c.msgdef.data, c.msgtype))
            elif c.msgdef.format == MessageDefinitionFormat.IDL and c.msgdef.data:
                sep = '=' * 80 + '\n'
                for part in c.msgdef.data.split(sep):
                    if part.startswith('IDL: '):
                        part = part.split('\n', 1)[1]
                    if part.strip():
                        typs.update(get_types_from_idl(part))
        store = get_typestore(Stores.EMPTY)
        store.register(typs)
        return store

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()

    def close(self) -> None:
        if self._reader.is_open:
            self._reader.close()

    @property
    def start_ns(self) -> int:
        return self._reader.start_time

    @property
    def duration_ns(self) -> int:
        """Log time from the first message to the last."""
        return self._reader.duration

    @property
    def custom_data(self) -> dict:
        meta = getattr(self._reader.storage, 'metadata', None)
        return (getattr(meta, 'custom', None) or {}) if meta is not None else {}

    def _connections(self, topics: Sequence[str] | None):
        if topics is None:
            return list(self._reader.connections)
        missing = [t for t in topics if t not in self.topics]
        if missing:
            raise UserError(self.path, f'no topic(s) {", ".join(missing)} in bag (has: '
                                       f'{", ".join(sorted(self.topics))})')
        return [c for c in self._reader.connections if c.topic in topics]

    def raw_messages(self, topics: Sequence[str] | None = None) -> Iterator[tuple[str, str, int, bytes]]:
        """(topic, msgtype, log time ns, CDR bytes) in log-time order."""
        conns = self._connections(topics)
        try:
            for c, t_ns, raw in self._reader.messages(connections=conns):
                yield c.topic, c.msgtype, t_ns, raw
        except _BAG_ERRORS as err:
            raise UserError(self.path, f'cannot read messages: {_reason(err)}') from None

    def messages(self, topics: Sequence[str] | None = None) -> Iterator[tuple[str, int, object]]:
        """(topic, log time ns, deserialised rosbags message) in log-time order."""
        names = topics if topics is not None else list(self.topics)
        unknown = [f'{t} ({self.topics[t].msgtype})' for t in names
                   if t in self.topics and not self.topics[t].known]
        if unknown:
            raise UserError(self.path, f'unknown message type for {", ".join(unknown)}: the bag '
                                       'has no definition for it')
        for topic, msgtype, t_ns, raw in self.raw_messages(topics):
            try:
                msg = self.typestore.deserialize_cdr(raw, msgtype)
            except _BAG_ERRORS as err:
                raise UserError(self.path, f'{topic}: cannot deserialise {msgtype} at t={t_ns} ns: '
                                           f'{_reason(err)}') from None
            yield topic, t_ns, msg


def _reason(err: BaseException) -> str:
    text = ' '.join(str(err).split()) or type(err).__name__
    return text if len(text) < 300 else text[:297] + '...'


@dataclass
class SceneRecording:
    """The arrays of a scene bag, per topic, in log-time order; times are header stamps (ns)."""
    scene: str | None = None
    lidar: dict[int, list[tuple[int, np.ndarray]]] = field(default_factory=dict)     # (N, C) f32
    odom: dict[int, list[tuple[int, np.ndarray]]] = field(default_factory=dict)      # T_map_lidar
    tf: dict[str, list[tuple[int, np.ndarray]]] = field(default_factory=dict)        # child frame
    tf_static: dict[str, tuple[str, np.ndarray]] = field(default_factory=dict)       # child: parent, T
    objects: list[tuple[int, np.ndarray]] = field(default_factory=list)              # OBJECT_DTYPE
    marker_boxes: list[tuple[int, np.ndarray]] = field(default_factory=list)         # (M, 7)


def read_scene_bag(path) -> SceneRecording:
    """Decode every topic of a scene bag (see module doc) back into arrays."""
    rec = SceneRecording()
    with BagReader(path) as bag:
        rec.scene = bag.custom_data.get('coop_perception.scene')
        wanted = [t for t in bag.topics if _AGENT_TOPIC.match(t) or t in (
            TF_TOPIC, TF_STATIC_TOPIC, GT_OBJECTS_TOPIC, GT_MARKERS_TOPIC)]
        for topic, _, msg in bag.messages(wanted):
            try:
                _decode_into(rec, topic, msg)
            except (ros_msgs.PointCloudError, ValueError, AttributeError) as err:
                raise UserError(bag.path, f'{topic}: {_reason(err)}') from None
    return rec


def _decode_into(rec: SceneRecording, topic: str, msg) -> None:
    m = _AGENT_TOPIC.match(topic)
    if m and m.group(2) == 'lidar':
        names = [f.name for f in msg.fields if f.name in LIDAR_DTYPE.names]
        rec.lidar.setdefault(int(m.group(1)), []).append(
            (ros_msgs.stamp_ns(msg.header.stamp), ros_msgs.cloud_to_points(msg, names)))
    elif m:
        rec.odom.setdefault(int(m.group(1)), []).append(
            (ros_msgs.stamp_ns(msg.header.stamp), ros_msgs.odometry_to_pose(msg)))
    elif topic == TF_TOPIC:
        for tf in msg.transforms:
            rec.tf.setdefault(tf.child_frame_id, []).append(
                (ros_msgs.stamp_ns(tf.header.stamp), ros_msgs.transform_to_pose(tf)))
    elif topic == TF_STATIC_TOPIC:
        for tf in msg.transforms:
            rec.tf_static[tf.child_frame_id] = (tf.header.frame_id, ros_msgs.transform_to_pose(tf))
    elif topic == GT_OBJECTS_TOPIC:
        rec.objects.append((ros_msgs.stamp_ns(msg.header.stamp), ros_msgs.cloud_to_objects(msg).copy()))
    elif topic == GT_MARKERS_TOPIC:
        stamps = [ros_msgs.stamp_ns(mk.header.stamp) for mk in msg.markers]
        rec.marker_boxes.append((stamps[0] if stamps else 0, ros_msgs.markers_to_boxes(msg)))
