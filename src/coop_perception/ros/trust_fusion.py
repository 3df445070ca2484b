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
  per-agent input age, latency, trust and drops (wall-clock period).

Inputs that cannot be used are rejected with a throttled warning and counted: unreadable clouds,
non-finite values, unknown agents, stamps too far ahead of the ego (or this node's clock) or
older than ``max_age_s``. An ego stamp further than ``time_jump_back_s`` behind the newest one
(a looping bag) empties every buffer before it is used.
"""
from __future__ import annotations

import sys
import time

import numpy as np
from rclpy.node import Node

from coop_perception.data import ros_msgs
from coop_perception.data.bag import MARKER_ARRAY, ODOMETRY, POINTCLOUD2, agent_from_frame
from coop_perception.data.labels import CLASSES
from coop_perception.errors import UserError
from coop_perception.fusion.codec import FeatureMessageError, decode
from coop_perception.fusion.ego_map import decode_ego_features, empty_ego_detections
from coop_perception.fusion.methods import METHODS, ROS_METHODS
from coop_perception.fusion.model import load_method_models
from coop_perception.fusion.pipeline import CooperativeConfig, CooperativeDetector
from coop_perception.fusion.pose_buffer import PoseBufferConfig
from coop_perception.ros import convert as cv
from coop_perception.ros import topics
from coop_perception.ros.node import (LATEST_QOS, ODOM_QOS, RELIABLE_QOS, InputGuard, Param, Window, agent_id,
                                      ahead_of_clock_ns, declare_parameters, load_detector, model_file, ros_now_ns,
                                      status_publisher)
from coop_perception.ros.node import main as node_main

NODE_NAME = 'trust_fusion'
NS_PER_S = 1_000_000_000
_DEFAULTS = CooperativeConfig()

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
    Param('own_footprint_m', list(_DEFAULTS.own_footprint_m), "length and width (m) of the ego vehicle around "
          "its sensor: fused boxes centred inside are the ego itself as collaborators see it and are dropped; "
          "[]: keep them", (0.0, 100.0)),
    Param('detector_config', '', "detector config YAML (the ego detector's); '': the package's "
                                 'models/detector.yaml'),
    Param('detector_weights', '', "detector checkpoint (the ego detector's); '': the package's models/detector.pt"),
    Param('threads', -1, "torch threads (0: torch's default); -1: the detector config's runtime.threads",
          (-1, 256)),
    Param('fusion_model', '', "fusion checkpoint for methods trust and gate; '': the package's models/fusion.pt"),
    Param('trust_gate', '', "calibrated gate for method gate; '': the package's models/trust_gate.yaml"),
    Param('time_jump_back_s', 0.5, 'an ego stamp this far behind the newest one resets every buffer (s)',
          (0.001, 1e6)),
    Param('max_future_s', 0.5, "inputs stamped further ahead of the ego's newest stamp or of this node's "
                               'clock are rejected (s); keep it below the length of a looping bag, so that '
                               'messages from before a loop restart cannot pass', (0.0, 1e6)),
    Param('display_score_threshold', 0.3, 'lowest score drawn in /coop/detections', (0.0, 1.0)),
    Param('warn_period_s', 5.0, 'at most one warning per kind of bad input in this period (s)', (0.0, 1e6)),
    Param('status_period_s', 1.0, 'period of /coop/status (s, wall clock)', (0.01, 1e6)),
)


class _AgentStats:
    def __init__(self):
        self.inputs = 0
        self.last_stamp_ns = None
        self.arrival_ms = Window()      # ROS time at arrival here minus capture stamp
        self.forget_frame()

    def forget_frame(self) -> None:
        self.used_age_s = None          # age of the input used in the last fused frame
        self.boxes = 0                  # fused boxes of the last frame this agent contributed to
        self.mean_trust = None

    def summary(self) -> dict:
        return {'inputs': self.inputs, 'last_stamp_ns': self.last_stamp_ns,
                'arrival_latency_ms': self.arrival_ms.summary(), 'used_age_s': self.used_age_s,
                'boxes': self.boxes, 'mean_trust': self.mean_trust}


class TrustFusionNode(Node):
    NODE_NAME = NODE_NAME

    def __init__(self, **node_kwargs):
        super().__init__(NODE_NAME, **node_kwargs)
        p = declare_parameters(self, PARAMS)
        self.ego = agent_id(self, p['ego_id'])
        self.allowed = set(p['agents'])
        if self.ego in self.allowed:
            raise UserError(f'{self.get_fully_qualified_name()}:agents', f'lists the ego {self.ego}')
        self.detector = load_detector(p['detector_config'], p['detector_weights'], threads=p['threads'])
        self.method = p['method']
        method = METHODS[self.method]
        fusion_path = model_file(p['fusion_model'], 'fusion.pt', 'fusion_model') if method.needs_fusion_model else None
        gate_path = model_file(p['trust_gate'], 'trust_gate.yaml', 'trust_gate') if method.needs_gate else None
        fusion, gate = load_method_models([method], fusion_path, gate_path,
                                          channels=self.detector.cfg.model.feature_channels)
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
                              own_footprint_m=tuple(p['own_footprint_m']) or None),
            fusion, PoseBufferConfig(time_jump_back_s=p['time_jump_back_s']))
        self.grid = self.detector.grid()
        self.channels = self.detector.cfg.model.feature_channels
        self.display_threshold = p['display_score_threshold']
        self.msgs = cv.RclpyMessages()
        self.guard = InputGuard(self.get_logger(), p['warn_period_s'])
        self.newest_ego_ns = None
        self.waiting = None  # (stamp, header, arrival perf_counter) of an ego map without its pose yet
        self.frames = self.fused = self.resets = 0
        self.latency_ms, self.processing_ms = Window(), Window()
        self.agents: dict[int, _AgentStats] = {}

        cloud, odom, markers = (self.msgs.get_class(t) for t in (POINTCLOUD2, ODOMETRY, MARKER_ARRAY))
        self.pub_objects = self.create_publisher(cloud, topics.FUSED_OBJECTS, RELIABLE_QOS)
        self.pub_markers = self.create_publisher(markers, topics.FUSED_MARKERS, RELIABLE_QOS)
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
        self.get_logger().info(f'ego {self.ego}: {self.method} fusion ready')

    # ------------------------------------------------------------------ checks
    def _ego_stamp_ok(self, stamp: int, what: str) -> bool:
        """Check an ego stamp against this node's clock and the ego's time so far; a jump back
        empties every buffer. Odometry moves the ego's time on; a map may not run ahead of it (a
        map from before a jump back that arrives after it would otherwise restart the old time)."""
        ahead = ahead_of_clock_ns(self, stamp)
        if ahead > self.max_future_ns:
            self.guard.reject('future_stamp', f'ego {what} stamped {ahead * 1e-9:.3f} s ahead of this node\'s clock')
            return False
        newest = self.newest_ego_ns
        if newest is not None and stamp < newest - self.jump_ns:
            self.get_logger().info(f'ego time jumped back by {(newest - stamp) * 1e-9:.2f} s: emptying every buffer')
            self.coop.reset()
            self.waiting = None
            for stats in self.agents.values():
                stats.forget_frame()
            self.resets += 1
            newest = None
        elif newest is not None and what == 'map' and stamp - newest > self.max_future_ns:
            self.guard.reject('future_stamp', f'ego map stamped {(stamp - newest) * 1e-9:.3f} s after the newest '
                                              'ego odometry')
            return False
        self.newest_ego_ns = stamp if newest is None else max(newest, stamp)
        return True

    def _collaborator(self, frame_id: str, stamp: int, what: str) -> int | None:
        """The sender of a collaborator input, or None (counted) when it must not be used."""
        k = agent_from_frame(frame_id)
        if k is None or k == self.ego or (self.allowed and k not in self.allowed):
            self.guard.reject('unknown_agent', f'{what} from frame {frame_id!r}: not a collaborator of ego {self.ego}')
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
            self.coop.add_pose(self.ego, stamp, T)
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
                              stamp_ns=stamp)
        except FeatureMessageError as e:
            self.guard.reject(f'bad_features:{e.reason}', f'agent {k}: {e}')
            return
        self.coop.add_input(k, stamp, features)
        stats = self.agents.setdefault(k, _AgentStats())
        stats.inputs += 1
        stats.last_stamp_ns = stamp
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
            features, sensor_height = decode_ego_features(**cv.cloud_layout(msg), grid=self.grid,
                                                          channels=self.channels, agent_id=self.ego, stamp_ns=stamp)
        except FeatureMessageError as e:
            self.guard.reject(f'bad_ego_map:{e.reason}', str(e))
            return
        self.frames += 1
        if features is None:   # a scan without voxels: nothing of the ego's own
            self.coop.add_ego_detections(stamp, empty_ego_detections(self.detector))
        else:
            self.coop.add_ego_map(stamp, features, sensor_height)
        if self.waiting is not None:
            self.guard.reject('no_ego_pose', f'no ego odometry at or after {self.waiting[0]} ns came before the '
                                             'next map; that frame is skipped')
        self.waiting = (stamp, msg.header, t0)
        self._fuse_when_posed()

    def _fuse_when_posed(self) -> None:
        """Fuse the waiting ego frame once the ego has a pose at or after its stamp, so that its
        pose is interpolated, never extrapolated. The executor takes one message per topic at a
        time: a map can overtake the odometry of its own scan when several are queued."""
        if self.waiting is None or self.ego not in self.coop.poses:
            return
        stamp, header, t0 = self.waiting
        newest = self.coop.poses[self.ego].newest_ns
        if newest is None or newest < stamp:
            return
        self.waiting = None
        fused = self.coop.detect(stamp)
        if fused is None:  # the reason is counted in coop.drops
            return
        self._publish(fused, header)
        self.fused += 1
        self.latency_ms.add((ros_now_ns(self) - stamp) * 1e-6)
        self.processing_ms.add((time.perf_counter() - t0) * 1e3)
        self._update_agents(fused)

    # ------------------------------------------------------------------ outputs
    def _publish(self, fused, header) -> None:
        objects = fused.to_objects()
        self.pub_objects.publish(ros_msgs.objects_to_cloud(objects, header, self.msgs))
        shown = objects['score'] >= self.display_threshold
        texts = [f'{CLASSES[label] if 0 <= label < len(CLASSES) else "other"} {score:.2f} trust {trust:.2f} '
                 f'agents {",".join(str(k) for k in range(int(sources).bit_length()) if sources >> k & 1)}'
                 for label, score, trust, sources in zip(objects['label'][shown], objects['score'][shown],
                                                         objects['trust'][shown], fused.sources[shown])]
        self.pub_markers.publish(ros_msgs.objects_to_markers(
            objects[shown], header, self.msgs, ns='fused', colors=cv.trust_colors(objects['trust'][shown]),
            texts=texts))
        if self.pub_detection3d is not None:
            self.pub_detection3d.publish(cv.objects_to_detection3d(objects, header, self.msgs))

    def _update_agents(self, fused) -> None:
        sources = np.asarray(fused.sources, np.int64)
        for k, stats in self.agents.items():
            stats.used_age_s = fused.ages_s.get(k)
            mine = (sources >> k) & 1 == 1
            stats.boxes = int(mine.sum())
            stats.mean_trust = float(fused.trust[mine].mean()) if mine.any() else None

    def status(self) -> dict:
        return {'ego': self.ego, 'method': self.method, 'frames': self.frames, 'fused': self.fused,
                'resets': self.resets, 'newest_ego_stamp_ns': self.newest_ego_ns,
                'latency_ms': self.latency_ms.summary(), 'processing_ms': self.processing_ms.summary(),
                'rejected': dict(self.guard.counts), 'pipeline_drops': dict(self.coop.drops),
                'agents': {str(k): s.summary() for k, s in sorted(self.agents.items())}}


def main(argv: list[str] | None = None) -> int:
    return node_main(TrustFusionNode, argv)


if __name__ == '__main__':
    sys.exit(main())
