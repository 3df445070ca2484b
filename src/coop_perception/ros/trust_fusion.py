"""``trust_fusion`` node: the ego's cooperative detector (``fusion.pipeline.CooperativeDetector``,
the object offline evaluation runs).

Runs in the ego's namespace (``/agent{ego}``) and subscribes ``odom`` (the ego's poses),
``coop/bev`` (the ego's full feature map from its lidar_detector), and what the V2X channel
delivers: ``v2x/features`` and ``v2x/odom``, whose sender is the agent of the header's
(odometry: child) frame ``agent{k}/...``. Every ego map triggers one fusion with whatever has
arrived by then and publishes, with the ego scan's header:

- ``/coop/objects``: the fused object list (data.objects layout, ego sensor frame);
- ``/coop/detections``: the boxes for RViz, coloured from blue (ego evidence only) to green
  (fully trusted collaborator evidence), labelled with score, trust and contributing agents;
- ``/coop/detections_3d``: vision_msgs/Detection3DArray, when vision_msgs is installed;
- ``/coop/status``: JSON with end-to-end latency (ROS time from scan stamp to publication),
  per-agent input age, latency, trust, reputation and drops (wall-clock period);
- ``/coop/reputation``: a text marker above every collaborator with a reputation below 1 (the
  misbehaving-collaborator check, fusion.reputation), red when it is excluded.

Inputs that cannot be used are rejected with a throttled warning and counted: unreadable clouds,
non-finite or physically impossible values (fusion.codec, data.ros_msgs bounds), unknown agents or
agent ids above ``data.objects.MAX_AGENT_ID``, stamps too far ahead of the ego (or this node's
clock) or older than ``max_age_s``. Fused boxes that are non-finite or beyond the cooperative
range are not published and are counted in the status's ``dropped_boxes``.

Time and faults (docs/architecture.md, "State and faults"): one ego odometry or map message
stamped more than ``time_jump_back_s`` behind the ego's time is dropped and counted
(``pipeline_drops.stale_ego_stamp``); every buffer is emptied only when this node's clock jumps
back that far (``/clock`` of a looping bag) or ``time_jump_confirm`` ego maps in a row confirm that
the ego's stream restarted. Every ego map gives one output: the ego's own detections when its pose
at the map's stamp is unknown (an odometry gap; ``pipeline_drops.ego_pose_unknown``). A
collaborator silent for ``forget_after_s`` is forgotten, and at most ``max_agents`` are tracked.
"""
from __future__ import annotations

import sys
import time
from collections import Counter, defaultdict
from dataclasses import replace

import numpy as np
from rclpy.clock import Clock, ClockType
from rclpy.node import Node

from coop_perception.data import ros_msgs
from coop_perception.data.bag import MARKER_ARRAY, ODOMETRY, POINTCLOUD2, agent_from_frame
from coop_perception.data.labels import CLASSES
from coop_perception.data.objects import MAX_AGENT_ID, MAX_BOX_ABS_Z_M, grid_extent, make_objects
from coop_perception.errors import UserError
from coop_perception.fusion.codec import FeatureMessageError, decode
from coop_perception.detection.free_range import FREE_RANGE_BINS
from coop_perception.fusion.ego_map import decode_ego_message, decode_free_range, ego_features, empty_ego_detections
from coop_perception.fusion.methods import METHODS, ROS_METHODS
from coop_perception.fusion.model import load_method_models
from coop_perception.fusion.pipeline import BOX_CHOICES, CooperativeConfig, CooperativeDetector
from coop_perception.fusion.pose_buffer import PoseBufferConfig, PoseLookupError
from coop_perception.fusion.reputation import ReputationConfig
from coop_perception.fusion.velocity_lending import LendingConfig
from coop_perception.ros import convert as cv
from coop_perception.ros import topics
from coop_perception.ros.node import (LATEST_QOS, ODOM_QOS, RELIABLE_QOS, InputGuard, Param, Window, agent_id,
                                      ahead_of_clock_ns, declare_parameters, load_detector, model_file, ros_now_ns,
                                      status_publisher)
from coop_perception.ros.node import main as node_main

NODE_NAME = 'trust_fusion'
NS_PER_S = 1_000_000_000
# Fused boxes may lie this many grid widths beyond the ego's own grid: a collaborator whose grid
# overlaps the ego's sees that far, and anything further out is no use to the ego (or absurd).
COOPERATIVE_RANGE_GRIDS = 1.0
_DEFAULTS = CooperativeConfig()
_REPUTATION = ReputationConfig()
_LENDING = LendingConfig()
REPUTATION_MODES = ('auto', 'on', 'off')

PARAMS = (
    Param('ego_id', -1, 'the ego agent; -1: k of the namespace /agent{k}', (-1, 1023)),
    Param('agents', [], 'collaborators whose inputs are accepted; []: every agent but the ego', (0, 1023)),
    Param('method', _DEFAULTS.method, 'fusion method (those whose collaborators share features; late and '
                                      'early fusion are offline only)', choices=ROS_METHODS),
    Param('max_age_s', _DEFAULTS.max_age_s, 'collaborator inputs older than this (vs the ego frame) are not used',
          (0.0, 1e6)),
    Param('slots', _DEFAULTS.slots, 'collaborators fused per frame, newest first', (1, 64)),
    Param('roi_boxes', _DEFAULTS.roi_boxes, "methods trust and gate: also decode every collaborator ROI in "
                                            "the collaborator's grid and merge its trust-weighted box"),
    Param('history', _DEFAULTS.history, 'inputs kept per collaborator', (1, 10000)),
    Param('box_choice', _DEFAULTS.box_choice, "boxes of one object from several sources: 'average' (weighted by "
                                              "score / predicted variance), 'precise' (least uncertain box) or "
                                              "'score' (highest-scoring box)", choices=BOX_CHOICES),
    Param('average_iou', _DEFAULTS.average_iou, "box_choice average: boxes overlapping the least uncertain one by "
                                                'more than this BEV IoU are averaged', (0.0, 1.0)),
    Param('velocity_std', _DEFAULTS.velocity_std, 'how fast (m/s) a moved box\'s position error grows with its age, '
                                                  'for the merge', (0.0, 100.0)),
    Param('lend_velocities', _LENDING.enabled, "a collaborator's object whose sender does not know its velocity "
          'takes the velocity of the same object as the ego or another collaborator tracks it'),
    Param('lend_gate_m', _LENDING.gate_m, "velocity lending: the donor, run back to the borrower's stamp along its "
          'velocity, lies this close to where the borrower was seen (m)', (0.01, 100.0)),
    Param('lend_borrow_std', _LENDING.borrow_std, 'velocity lending: a sender this unsure of a velocity (standard '
          'deviation per axis, m/s) does not know it', (0.01, 100.0)),
    Param('lend_donor_std', _LENDING.lend_std, 'velocity lending: only tracks at most this unsure of their '
          'velocity lend it (m/s)', (0.01, 100.0)),
    Param('lend_min_speed', _LENDING.min_speed, 'velocity lending: slower donors lend nothing (m/s)', (0.01, 100.0)),
    Param('own_footprint_m', list(_DEFAULTS.own_footprint_m), "length and width (m) of the ego vehicle around "
          "its sensor: fused boxes centred inside are the ego itself as collaborators see it and are dropped; "
          "[]: keep them", (0.0, 100.0)),
    Param('detector_config', '', "detector config YAML (the ego detector's); '': the package's "
                                 'models/detector.yaml'),
    Param('detector_weights', '', "detector checkpoint (the ego detector's); '': the package's models/detector.pt"),
    Param('threads', -1, "torch threads (0: torch's default); -1: the detector config's runtime.threads",
          (-1, 256)),
    Param('device', 'cpu', 'where the networks run: auto, cpu, cuda or cuda:N (auto: a CUDA GPU when torch '
                           'sees one)'),
    Param('fusion_model', '', "fusion checkpoint for methods trust and gate; '': the package's models/fusion.pt"),
    Param('trust_gate', '', "calibrated gate for method gate; '': the package's models/trust_gate.yaml"),
    Param('time_jump_back_s', _DEFAULTS.time_jump_back_s, "an ego message stamped this far behind the ego's time "
          'is stale, and this node\'s clock going back this far empties every buffer (s)', (0.001, 1e6)),
    Param('time_jump_confirm', _DEFAULTS.time_jump_confirm, 'stale ego maps in a row (each near the one before) '
          "that confirm a restart of the ego's stream and empty every buffer", (1, 100)),
    Param('forget_after_s', _DEFAULTS.forget_after_s, 'a collaborator silent this long (ego time; status: wall '
          'time) is forgotten: its inputs, poses and status (s; never less than max_age_s)', (0.01, 1e6)),
    Param('max_agents', _DEFAULTS.max_agents, 'collaborators tracked at once; a new one beyond evicts the '
          'longest-silent', (1, 4096)),
    Param('ego_pose_wait_s', 0.2, 'an ego map waits this long (wall time) for the odometry at or after its stamp; '
          'then it is fused with the pose known, or gives the ego\'s own detections (s)', (0.0, 60.0)),
    Param('max_future_s', 0.5, "inputs stamped further ahead of the ego's newest stamp or of this node's "
                               'clock are rejected (s); keep it below the length of a looping bag, so that '
                               'messages from before a loop restart cannot pass', (0.0, 1e6)),
    Param('reputation', 'auto', "misbehaving collaborators: check every collaborator's boxes against the ego's "
                                "free space and boxes and exclude those with a low reputation; 'auto': on for "
                                'method trust', choices=REPUTATION_MODES),
    Param('reputation_exclude_below', _REPUTATION.exclude_below, 'a collaborator whose reputation (1: no '
          'suspicion) is below this is not fused; above, its trust is scaled by it', (0.01, 0.99)),
    Param('reputation_evidence_to_exclude', _REPUTATION.evidence_to_exclude, 'accumulated evidence '
          '(log-likelihood ratio) at which the reputation reaches reputation_exclude_below', (0.01, 1e6)),
    Param('reputation_check_range_m', _REPUTATION.check_range_m, "collaborator boxes are checked against the ego's "
          'free space this far from the ego (m)', (1.0, 1000.0)),
    Param('reputation_decay_s', _REPUTATION.decay_s, 'suspicion decays by e in this much ego time (s)', (0.01, 1e6)),
    Param('display_score_threshold', 0.3, 'lowest score drawn in /coop/detections', (0.0, 1.0)),
    Param('warn_period_s', 5.0, 'at most one warning per kind of bad input in this period (s)', (0.0, 1e6)),
    Param('status_period_s', 1.0, 'period of /coop/status (s, wall clock)', (0.01, 1e6)),
)


class _AgentStats:
    def __init__(self):
        self.inputs = 0
        self.last_stamp_ns = None
        self.heard = time.monotonic()   # wall time of the last input
        self.arrival_ms = Window()      # ROS time at arrival here minus capture stamp
        self.forget_frame()

    def forget_frame(self) -> None:
        self.used_age_s = None          # age of the input used in the last fused frame
        self.boxes = 0                  # fused boxes of the last frame this agent contributed to
        self.mean_trust = None
        self.reputation = None          # fusion.reputation.Reputation.summary, None without evidence

    def summary(self) -> dict:
        return {'inputs': self.inputs, 'last_stamp_ns': self.last_stamp_ns,
                'arrival_latency_ms': self.arrival_ms.summary(), 'used_age_s': self.used_age_s,
                'boxes': self.boxes, 'mean_trust': self.mean_trust, 'reputation': self.reputation}


class TrustFusionNode(Node):
    NODE_NAME = NODE_NAME

    def __init__(self, **node_kwargs):
        super().__init__(NODE_NAME, **node_kwargs)
        p = declare_parameters(self, PARAMS)
        self.ego = agent_id(self, p['ego_id'])
        self.allowed = set(p['agents'])
        if self.ego in self.allowed:
            raise UserError(f'{self.get_fully_qualified_name()}:agents', f'lists the ego {self.ego}')
        self.detector = load_detector(p['detector_config'], p['detector_weights'], threads=p['threads'],
                                      device=p['device'])
        self.method = p['method']
        method = METHODS[self.method]
        fusion_path = model_file(p['fusion_model'], 'fusion.pt', 'fusion_model') if method.needs_fusion_model else None
        gate_path = model_file(p['trust_gate'], 'trust_gate.yaml', 'trust_gate') if method.needs_gate else None
        fusion, gate = load_method_models([method], fusion_path, gate_path,
                                          channels=self.detector.cfg.model.feature_channels)
        fusion = fusion.to(self.detector.device) if fusion is not None else None
        if len(p['own_footprint_m']) not in (0, 2):
            raise UserError(f'{self.get_fully_qualified_name()}:own_footprint_m',
                            f'{p["own_footprint_m"]}: give [length, width] or []')
        self.jump_ns = int(p['time_jump_back_s'] * NS_PER_S)
        self.max_future_ns = int(p['max_future_s'] * NS_PER_S)
        self.max_age_ns = int(p['max_age_s'] * NS_PER_S)
        self.coop = CooperativeDetector(
            self.detector, self.ego,
            CooperativeConfig(method=self.method, max_age_s=p['max_age_s'], slots=p['slots'],
                              history=p['history'], gate=gate, roi_boxes=p['roi_boxes'],
                              box_choice=p['box_choice'], average_iou=p['average_iou'],
                              velocity_std=p['velocity_std'],
                              own_footprint_m=tuple(p['own_footprint_m']) or None,
                              forget_after_s=p['forget_after_s'], max_agents=p['max_agents'],
                              time_jump_back_s=p['time_jump_back_s'], time_jump_confirm=p['time_jump_confirm'],
                              reputation=_reputation_config(p), lending=_lending_config(p)),
            fusion, PoseBufferConfig(time_jump_back_s=p['time_jump_back_s'], jump_confirm=p['time_jump_confirm']))
        self.max_agents, self.forget_s = p['max_agents'], max(p['forget_after_s'], p['max_age_s'])
        self.grid = self.detector.grid()
        reach = COOPERATIVE_RANGE_GRIDS * float(max(self.grid.shape) * self.grid.cell_size)
        self.extent = grid_extent(self.grid, reach)
        self.dropped_boxes: Counter = Counter()
        self.channels = self.detector.cfg.model.feature_channels
        self.display_threshold = p['display_score_threshold']
        self.msgs = cv.RclpyMessages()
        self.guard = InputGuard(self.get_logger(), p['warn_period_s'])
        self.newest_ego_ns = None
        self.clock_ns = 0     # this node's newest ROS time (0: sim time not started)
        # (stamp, header, arrival perf_counter, decoded perf_counter) of an ego map without its pose yet
        self.waiting = None
        self.pose_wait_s = p['ego_pose_wait_s']
        self.frames = self.fused = 0
        self.latency_ms, self.processing_ms = Window(), Window()
        # wall ms of each part of processing_ms: decoding the ego map, waiting for its pose, the
        # pipeline's stages (FusedDetections.timings_ms), publishing
        self.stage_ms: defaultdict = defaultdict(Window)
        self.agents: dict[int, _AgentStats] = {}

        cloud, odom, markers = (self.msgs.get_class(t) for t in (POINTCLOUD2, ODOMETRY, MARKER_ARRAY))
        self.pub_objects = self.create_publisher(cloud, topics.FUSED_OBJECTS, RELIABLE_QOS)
        self.pub_markers = self.create_publisher(markers, topics.FUSED_MARKERS, RELIABLE_QOS)
        self.pub_reputation = self.create_publisher(markers, topics.REPUTATION_MARKERS, RELIABLE_QOS)
        self.pub_detection3d = None
        if self.msgs.has(cv.DETECTION3D_ARRAY):
            self.pub_detection3d = self.create_publisher(self.msgs.get_class(cv.DETECTION3D_ARRAY),
                                                         topics.FUSED_DETECTION3D, RELIABLE_QOS)
        status_publisher(self, self.msgs, topics.FUSION_STATUS, p['status_period_s'], self.status)
        # Poses first: when a pose and a map wait together, the executor takes the pose first.
        self.create_subscription(odom, topics.ODOM, self.guard.guarded(self.on_ego_odom), ODOM_QOS)
        self.create_subscription(odom, topics.V2X_ODOM, self.guard.guarded(self.on_collaborator_odom), RELIABLE_QOS)
        self.create_subscription(cloud, topics.V2X_FEATURES, self.guard.guarded(self.on_features), RELIABLE_QOS)
        self.create_subscription(cloud, topics.EGO_MAP, self.guard.guarded(self.on_ego_map), LATEST_QOS)
        fuse_overdue = self.guard.guarded(lambda _: self._fuse_overdue())
        self.create_timer(max(self.pose_wait_s, 0.01) / 2, lambda: fuse_overdue(None),
                          clock=Clock(clock_type=ClockType.STEADY_TIME))
        self.get_logger().info(f'ego {self.ego}: {self.method} fusion ready')

    # ------------------------------------------------------------------ checks
    def _ego_stamp_ok(self, stamp: int, what: str) -> bool:
        """Check an ego stamp against this node's clock (which restarts the ego's time when it
        went back) and, for a map, against the ego's time: odometry moves it on, a map may not
        run ahead of it (a map from before a jump back that arrives after it would otherwise
        restart the old time). Stale stamps are the pipeline's to judge (``_ego_taken``)."""
        self._check_clock()
        ahead = ahead_of_clock_ns(self, stamp)
        if ahead > self.max_future_ns:
            self.guard.reject('future_stamp', f'ego {what} stamped {ahead * 1e-9:.3f} s ahead of this node\'s clock')
            return False
        newest = self.newest_ego_ns
        if newest is not None and what == 'map' and stamp - newest > self.max_future_ns:
            self.guard.reject('future_stamp', f'ego map stamped {(stamp - newest) * 1e-9:.3f} s after the newest '
                                              'ego odometry')
            return False
        return True

    def _check_clock(self) -> None:
        """This node's ROS time going back (/clock of a looping bag) restarts the ego's time."""
        now = ros_now_ns(self)
        if now > 0 and now < self.clock_ns - self.jump_ns:
            self.get_logger().info(f'ROS time jumped back by {(self.clock_ns - now) * 1e-9:.2f} s: emptying every '
                                   'buffer')
            resets = self.coop.resets
            self.coop.restart_time()
            self._ego_taken(True, self.coop.ego_time_ns, resets)
            self.clock_ns = now
        self.clock_ns = max(self.clock_ns, now)

    def _ego_taken(self, taken: bool, stamp: int | None, resets: int) -> bool:
        """Follow the pipeline's verdict on an ego message: move the ego's time on, and after a
        reset (``resets`` before the message) start this node's frame state afresh."""
        if self.coop.resets != resets:
            self.waiting = None
            self.newest_ego_ns = None
            for stats in self.agents.values():
                stats.forget_frame()
        if taken and stamp is not None:
            self.newest_ego_ns = stamp if self.newest_ego_ns is None else max(self.newest_ego_ns, stamp)
        return taken

    def _collaborator(self, frame_id: str, stamp: int, what: str) -> int | None:
        """The sender of a collaborator input, or None (counted) when it must not be used."""
        self._check_clock()
        k = agent_from_frame(frame_id)
        if k is not None and k > MAX_AGENT_ID:
            self.guard.reject('bad_agent_id', f'{what} from frame {frame_id[:64]!r}: agent ids end at {MAX_AGENT_ID}')
            return None
        if k is None or k == self.ego or (self.allowed and k not in self.allowed):
            self.guard.reject('unknown_agent', f'{what} from frame {frame_id[:64]!r}: not a collaborator of ego '
                                               f'{self.ego}')
            return None
        if self.newest_ego_ns is not None:
            ahead = stamp - self.newest_ego_ns
            if ahead > self.max_future_ns:
                self.guard.reject('future_stamp', f'{what} of agent {k} stamped {ahead * 1e-9:.3f} s after the '
                                                  'newest ego frame')
                return None
            if -ahead > self.max_age_ns:
                self.guard.reject('stale', f'{what} of agent {k} is {-ahead * 1e-9:.3f} s older than the newest '
                                           'ego frame')
                return None
        elif ahead_of_clock_ns(self, stamp) > self.max_future_ns:   # e.g. in flight from before a loop restart
            ahead = ahead_of_clock_ns(self, stamp)
            self.guard.reject('future_stamp', f'{what} of agent {k} stamped {ahead * 1e-9:.3f} s ahead of this '
                                              "node's clock")
            return None
        return k

    def _pose(self, msg, who: str) -> np.ndarray | None:
        try:
            T = ros_msgs.odometry_to_pose(msg)
        except ValueError as e:  # a zero or NaN quaternion
            self.guard.reject('bad_pose', f'odometry of {who}: {e}')
            return None
        if not np.isfinite(T).all():
            self.guard.reject('bad_pose', f'odometry of {who} holds NaN or infinite values')
            return None
        return T

    # ------------------------------------------------------------------ inputs
    def on_ego_odom(self, msg) -> None:
        stamp = ros_msgs.stamp_ns(msg.header.stamp)
        if agent_from_frame(msg.child_frame_id) != self.ego:
            self.guard.reject('unknown_agent', f'ego odometry for frame {msg.child_frame_id!r}')
            return
        T = self._pose(msg, f'ego {self.ego}')
        if T is not None and self._ego_stamp_ok(stamp, 'odometry'):
            resets = self.coop.resets
            if self._ego_taken(self.coop.add_pose(self.ego, stamp, T), stamp, resets):
                self._fuse_when_posed()

    def on_collaborator_odom(self, msg) -> None:
        stamp = ros_msgs.stamp_ns(msg.header.stamp)
        k = self._collaborator(msg.child_frame_id, stamp, 'odometry')
        T = self._pose(msg, f'agent {k}') if k is not None else None
        if T is not None:
            self.coop.add_pose(k, stamp, T)

    def on_features(self, msg) -> None:
        stamp = ros_msgs.stamp_ns(msg.header.stamp)
        k = self._collaborator(msg.header.frame_id, stamp, 'features')
        if k is None:
            return
        try:
            features = decode(**cv.cloud_layout(msg), grid=self.grid, channels=self.channels, agent_id=k,
                              stamp_ns=stamp, num_classes=len(self.detector.cfg.classes))
        except FeatureMessageError as e:
            self.guard.reject(f'bad_features:{e.reason}', f'agent {k}: {e}')
            return
        self.coop.add_input(k, stamp, features)
        if k not in self.agents:
            self._forget_agents(self.max_agents - 1)
        stats = self.agents.setdefault(k, _AgentStats())
        stats.inputs += 1
        stats.last_stamp_ns = stamp
        stats.heard = time.monotonic()
        stats.arrival_ms.add((ros_now_ns(self) - stamp) * 1e-6)

    def on_ego_map(self, msg) -> None:
        t0 = time.perf_counter()
        stamp = ros_msgs.stamp_ns(msg.header.stamp)
        if agent_from_frame(msg.header.frame_id) != self.ego:
            self.guard.reject('unknown_agent', f'ego map in frame {msg.header.frame_id!r}, not agent{self.ego}/...')
            return
        if not self._ego_stamp_ok(stamp, 'map'):
            return
        try:
            ego_map, sensor_height = decode_ego_message(**cv.cloud_layout(msg), grid=self.grid,
                                                        channels=self.channels, agent_id=self.ego, stamp_ns=stamp)
            features = ego_features(ego_map, self.grid, self.channels)
        except FeatureMessageError as e:
            self.guard.reject(f'bad_ego_map:{e.reason}', str(e))
            return
        if features is not None and not abs(sensor_height) <= MAX_BOX_ABS_Z_M:
            self.guard.reject('bad_ego_map:bad_sensor_height', f'sensor height {sensor_height:.3g} m')
            return
        try:
            free_range = decode_free_range(**cv.cloud_layout(msg), bins=FREE_RANGE_BINS)
        except FeatureMessageError as e:
            self.guard.reject(f'bad_ego_map:{e.reason}', str(e))
            return
        resets = self.coop.resets
        if features is None:   # a scan without voxels: nothing of the ego's own
            taken = self.coop.add_ego_detections(stamp, empty_ego_detections(self.detector))
        else:
            taken = self.coop.add_ego_map(stamp, features, sensor_height, free_range, ego_map)
        if not self._ego_taken(taken, stamp, resets):   # stale: counted in coop.drops
            return
        self.frames += 1
        if self.waiting is not None:   # its odometry is late or missing: fuse with what is known
            self._fuse(*self.waiting)
        self.waiting = (stamp, msg.header, t0, time.perf_counter())
        self._fuse_when_posed()

    def _fuse_when_posed(self) -> None:
        """Fuse the waiting ego frame once the ego has a pose at or after its stamp, so that its
        pose is interpolated, never extrapolated. The executor takes one message per topic at a
        time: a map can overtake the odometry of its own scan when several are queued."""
        if self.waiting is None or self.ego not in self.coop.poses:
            return
        stamp, header, t0, decoded = self.waiting
        newest = self.coop.poses[self.ego].newest_ns
        if newest is None or newest < stamp:
            return
        self._fuse(stamp, header, t0, decoded)

    def _fuse_overdue(self) -> None:
        """Timer: a waiting ego map whose odometry is ego_pose_wait_s late is fused without it."""
        if self.waiting is not None and time.perf_counter() - self.waiting[2] >= self.pose_wait_s:
            self._fuse(*self.waiting)

    def _fuse(self, stamp: int, header, t0: float, decoded: float) -> None:
        self.waiting = None
        start = time.perf_counter()
        fused = self.coop.detect(stamp)
        if fused is None:  # the reason is counted in coop.drops
            return
        detected = time.perf_counter()
        fused = self._publishable(fused)
        self._publish(fused, header)
        self._publish_reputation(stamp, header)
        self.fused += 1
        self.latency_ms.add((ros_now_ns(self) - stamp) * 1e-6)
        end = time.perf_counter()
        self.processing_ms.add((end - t0) * 1e3)
        stages = {'decode_ego_map': decoded - t0, 'pose_wait': start - decoded, 'detect': detected - start,
                  'publish': end - detected}
        for name, seconds in stages.items():
            self.stage_ms[name].add(seconds * 1e3)
        for name, ms in (fused.timings_ms or {}).items():
            self.stage_ms[f'detect:{name}'].add(ms)
        self._update_agents(fused)

    # ------------------------------------------------------------------ outputs
    def _publishable(self, fused):
        """``fused`` without the boxes that must not go on the air (counted in dropped_boxes)."""
        keep = cv.publishable(fused.to_objects(), self.extent, self.dropped_boxes)
        if keep.all():
            return fused
        return replace(fused, boxes=fused.boxes[keep], scores=fused.scores[keep], labels=fused.labels[keep],
                       velocities=fused.velocities[keep], trust=np.asarray(fused.trust)[keep],
                       sources=np.asarray(fused.sources)[keep])

    def _publish(self, fused, header) -> None:
        objects = fused.to_objects()
        self.pub_objects.publish(ros_msgs.objects_to_cloud(objects, header, self.msgs))
        shown = np.flatnonzero(objects['score'] >= self.display_threshold)
        texts = [f'{CLASSES[label] if 0 <= label < len(CLASSES) else "other"} {objects["score"][i]:.2f} '
                 f'trust {objects["trust"][i]:.2f} agents {",".join(str(k) for k in fused.contributors(i))}'
                 for i, label in zip(shown, objects['label'][shown])]
        self.pub_markers.publish(ros_msgs.objects_to_markers(
            objects[shown], header, self.msgs, ns='fused', colors=cv.trust_colors(objects['trust'][shown]),
            texts=texts))
        if self.pub_detection3d is not None:
            self.pub_detection3d.publish(cv.objects_to_detection3d(objects, header, self.msgs))

    def _publish_reputation(self, stamp: int, header) -> None:
        """A text marker above every collaborator whose reputation is below 1, at its position at
        the ego stamp (ego frame): yellow while its trust is only scaled, red once excluded."""
        rep = self.coop.reputation
        suspects = [k for k in rep.agents() if rep.value(k) < 1.0]
        objects, texts, colors = [], [], []
        for k in suspects:
            try:
                T = np.linalg.inv(self.coop.poses.lookup(self.ego, stamp)) @ self.coop.poses.lookup(k, stamp)
            except PoseLookupError:
                continue
            objects.append((T[0, 3], T[1, 3], T[2, 3]))
            texts.append(f'agent {k} reputation {rep.value(k):.2f}' + (' EXCLUDED' if rep.excluded(k) else ''))
            colors.append((1.0, 0.1, 0.1, 1.0) if rep.excluded(k) else (1.0, 0.8, 0.1, 1.0))
        xyz = np.asarray(objects, np.float64).reshape(-1, 3)
        boxes = np.column_stack([xyz, np.tile([1.0, 1.0, 1.0, 0.0], (len(xyz), 1))])
        markers = ros_msgs.objects_to_markers(make_objects(boxes, np.zeros((len(xyz), 2))), header, self.msgs,
                                              ns='reputation', colors=np.asarray(colors).reshape(-1, 4), texts=texts)
        self.pub_reputation.publish(markers)

    def _forget_agents(self, keep: int) -> None:
        """Forget the status of agents silent for forget_after_s (wall time) and, beyond ``keep``,
        of the longest-silent ones."""
        now = time.monotonic()
        by_silence = sorted(self.agents, key=lambda k: self.agents[k].heard)
        cut = max(len(by_silence) - keep, sum(now - self.agents[k].heard > self.forget_s for k in by_silence))
        for k in by_silence[:cut]:
            del self.agents[k]

    def _update_agents(self, fused) -> None:
        self._forget_agents(self.max_agents)
        for k, stats in self.agents.items():
            stats.used_age_s = fused.ages_s.get(k)
            mine = fused.contributed(k)
            stats.boxes = int(mine.sum())
            stats.mean_trust = float(fused.trust[mine].mean()) if mine.any() else None
            stats.reputation = self.coop.reputation.summary(k)

    def status(self) -> dict:
        return {'ego': self.ego, 'method': self.method, 'frames': self.frames, 'fused': self.fused,
                'resets': self.coop.resets, 'forgotten_agents': self.coop.forgotten,
                'velocities_lent': self.coop.velocities_lent,
                'newest_ego_stamp_ns': self.newest_ego_ns,
                'latency_ms': self.latency_ms.summary(), 'processing_ms': self.processing_ms.summary(),
                'stage_ms': {name: w.summary() for name, w in self.stage_ms.items()},
                'rejected': dict(self.guard.counts), 'pipeline_drops': dict(self.coop.drops),
                'dropped_boxes': dict(self.dropped_boxes),
                'reputation_on': self.coop.reputation_on,
                'excluded_agents': sorted(k for k in self.coop.reputation.agents() if self.coop.reputation.excluded(k)),
                'agents': {str(k): s.summary() for k, s in sorted(self.agents.items())}}


def _reputation_config(p: dict) -> ReputationConfig:
    enabled = {'auto': None, 'on': True, 'off': False}[p['reputation']]
    return ReputationConfig(enabled=enabled, exclude_below=p['reputation_exclude_below'],
                            evidence_to_exclude=p['reputation_evidence_to_exclude'],
                            check_range_m=p['reputation_check_range_m'], decay_s=p['reputation_decay_s'])


def _lending_config(p: dict) -> LendingConfig:
    try:
        return LendingConfig(enabled=p['lend_velocities'], gate_m=p['lend_gate_m'], borrow_std=p['lend_borrow_std'],
                             lend_std=p['lend_donor_std'], min_speed=p['lend_min_speed'])
    except ValueError as err:
        raise UserError(f'{NODE_NAME}:lend_*', str(err)) from None


def main(argv: list[str] | None = None) -> int:
    return node_main(TrustFusionNode, argv)


if __name__ == '__main__':
    sys.exit(main())
