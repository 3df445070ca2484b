"""``lidar_detector`` node: one agent's LiDAR detector, what it shares over V2X and shows in RViz.

In the agent's namespace (``/agent{k}``) it subscribes ``lidar`` (sensor QoS: best effort, only the
newest scan) and publishes, each with the scan's header:

- ``coop/features``: the ROI cells of the BEV feature map (fusion.codec wire layout), for V2X;
- ``coop/objects``: the local detections as an object list (data.objects layout);
- ``coop/detections``: the same boxes for RViz (MarkerArray);
- ``coop/bev`` (when ``publish_bev``): the whole feature map for the agent's own fusion node
  (fusion.ego_map);
- ``coop/detector_status``: JSON counters and timings (wall-clock period).

A scan that cannot be read (inconsistent layout, missing fields) or is stamped in the future is
rejected with a throttled warning and counted; non-finite points are dropped by the detector and
counted. Detections that are non-finite or outside the grid (+ ``DETECTION_MARGIN_M``) are not
published and are counted in the status's ``dropped_boxes``.
"""
from __future__ import annotations

import sys
import time
from collections import Counter

from rclpy.node import Node

from coop_perception.data import ros_msgs
from coop_perception.data.bag import MARKER_ARRAY, ODOMETRY, POINTCLOUD2
from coop_perception.data.objects import grid_extent, make_objects
from coop_perception.detection.sweeps import SweepHistory
from coop_perception.detection.voxelize import MAX_POINT_ABS_M, usable_points
from coop_perception.fusion import codec, sharing
from coop_perception.fusion.ego_map import encode_ego_map
from coop_perception.fusion.pipeline import Sender, collaborator_message
from coop_perception.fusion.pose_buffer import PoseBuffer, PoseBufferConfig, PoseLookupError
from coop_perception.ros import convert as cv
from coop_perception.ros import topics
from coop_perception.ros.node import (LATEST_QOS, ODOM_QOS, RELIABLE_QOS, SCAN_QOS, InputGuard, Param, Window, agent_id,
                                      ahead_of_clock_ns, declare_parameters, load_detector, status_publisher)
from coop_perception.ros.node import main as node_main

NODE_NAME = 'lidar_detector'
# A detected box's centre may lie this far outside the detector's grid: the head regresses it from
# the cell of its peak, and half a long vehicle can overhang the grid's edge.
DETECTION_MARGIN_M = 5.0

PARAMS = (
    Param('agent_id', -1, 'agent id of this detector; -1: k of the namespace /agent{k}', (-1, 1023)),
    Param('detector_config', '', "detector config YAML; '': the package's models/detector.yaml"),
    Param('detector_weights', '', "detector checkpoint; '': the package's models/detector.pt"),
    Param('mc_passes', -1, "MC-dropout passes for the epistemic uncertainty (0: none); -1: the "
                           "detector config's decode.mc_passes", (-1, 64)),
    Param('score_threshold', -1.0, "lowest detection score kept; -1: the detector config's "
                                   'decode.score_threshold', (-1.0, 1.0)),
    Param('threads', -1, "torch threads (0: torch's default); -1: the detector config's runtime.threads",
          (-1, 256)),
    Param('device', 'cpu', 'where the networks run: auto, cpu, cuda or cuda:N (auto: a CUDA GPU when torch '
                           'sees one)'),
    Param('roi.score_threshold', sharing.ROI_SCORE_THRESHOLD,
          'sharing policy: detections with at least this score become shared ROIs', (0.0, 1.0)),
    Param('roi.max_rois', sharing.ROI_MAX, 'sharing policy: at most this many ROIs per scan', (0, 10000)),
    Param('roi.margin_m', sharing.ROI_MARGIN_M, 'sharing policy: ROI footprint grown by this on every side (m)',
          (0.0, 100.0)),
    Param('roi.min_confidence', sharing.ROI_MIN_CONFIDENCE,
          'sharing policy: ROI cells below this detector confidence are left out', (0.0, 1.0)),
    Param('roi.format', sharing.DEFAULT_SHARING, "sharing policy: the feature messages' wire layout: cells "
                                                 '(every ROI cell with its features, ~19 kB a scan) or compact '
                                                 '(one 28-byte record per ROI, one V2X packet)',
          choices=sharing.SHARING_FORMATS),
    Param('roi.max_bytes', -1, f"sharing policy: message data budget in bytes; 0: no limit; -1: the layout's "
                               f'own ({sharing.ROI_MAX_BYTES} cells, {sharing.COMPACT_MAX_BYTES} compact)',
          (-1, 1 << 30)),
    Param('publish_bev', False, 'also publish the whole feature map on coop/bev (the ego agent, for its '
                                'fusion node)'),
    Param('display_score_threshold', 0.3, 'lowest score drawn in coop/detections', (0.0, 1.0)),
    Param('max_future_s', 1.0, "scans stamped further ahead of this node's clock are rejected (s)",
          (0.0, 1e6)),
    Param('time_jump_confirm', 3, 'this many odometry messages in a row more than 1 s behind the newest (each '
                                  'near the one before) restart the pose history, the tracks and the sweeps; '
                                  'a single one is dropped as stale', (1, 1000)),
    Param('warn_period_s', 5.0, 'at most one warning per kind of bad input in this period (s)', (0.0, 1e6)),
    Param('status_period_s', 1.0, 'period of coop/detector_status (s, wall clock)', (0.01, 1e6)),
)


class LidarDetectorNode(Node):
    NODE_NAME = NODE_NAME

    def __init__(self, **node_kwargs):
        super().__init__(NODE_NAME, **node_kwargs)
        p = declare_parameters(self, PARAMS)
        self.agent = agent_id(self, p['agent_id'])
        self.detector = load_detector(p['detector_config'], p['detector_weights'], mc_passes=p['mc_passes'],
                                      score_threshold=p['score_threshold'], threads=p['threads'],
                                      device=p['device'])
        self.roi_policy = {'score_threshold': p['roi.score_threshold'], 'max_rois': p['roi.max_rois'],
                           'margin_m': p['roi.margin_m'], 'min_confidence': p['roi.min_confidence'],
                           'format': p['roi.format']}
        if p['roi.max_bytes'] >= 0:
            self.roi_policy['max_bytes'] = p['roi.max_bytes'] or None
        self.fields = ('x', 'y', 'z', 'intensity') if self.detector.cfg.voxel.use_intensity else ('x', 'y', 'z')
        self.display_threshold = p['display_score_threshold']
        self.max_future_ns = int(p['max_future_s'] * 1e9)
        self.msgs = cv.RclpyMessages()
        self.guard = InputGuard(self.get_logger(), p['warn_period_s'])
        self.scans = 0
        self.last_stamp_ns = None
        self.detect_ms, self.feature_bytes = Window(), Window()
        self.extent = grid_extent(self.detector.grid(), DETECTION_MARGIN_M)
        self.dropped_boxes: Counter = Counter()
        # Shared ROI velocities come from tracking this agent's own detections in the map frame
        # (fusion.motion), exactly as offline evaluation does; that needs this agent's odometry.
        self.sender = Sender()
        self.poses = PoseBuffer(PoseBufferConfig(jump_confirm=p['time_jump_confirm']))
        # The detector sees this agent's previous sweeps too, moved with the same odometry: the
        # network where it was trained on several, the velocity measurement (scan_velocity) always.
        self.sweeps = SweepHistory(self.detector.cfg.sweeps_needed, self.detector.cfg.sweep_max_age_s)

        cloud = self.msgs.get_class(POINTCLOUD2)
        self.pub_features = self.create_publisher(cloud, topics.FEATURES, RELIABLE_QOS)
        self.pub_objects = self.create_publisher(cloud, topics.LOCAL_OBJECTS, RELIABLE_QOS)
        self.pub_markers = self.create_publisher(self.msgs.get_class(MARKER_ARRAY), topics.LOCAL_MARKERS,
                                                 RELIABLE_QOS)
        self.pub_bev = self.create_publisher(cloud, topics.EGO_MAP, LATEST_QOS) if p['publish_bev'] else None
        status_publisher(self, self.msgs, topics.DETECTOR_STATUS, p['status_period_s'], self.status)
        # Subscribing last: a publisher waiting for subscribers (bag_player) starts once we can work.
        self.create_subscription(self.msgs.get_class(ODOMETRY), topics.ODOM, self.guard.guarded(self.on_odom), ODOM_QOS)
        self.create_subscription(cloud, topics.LIDAR, self.guard.guarded(self.on_scan), SCAN_QOS)
        self.get_logger().info(f'agent {self.agent}: detector ready ({self.detector.cfg.bev_shape[0]}x'
                               f'{self.detector.cfg.bev_shape[1]} BEV cells); bev '
                               f'{"on" if self.pub_bev else "off"}')

    def on_odom(self, msg) -> None:
        stale = self.poses.stale
        try:
            jumped = self.poses.insert(ros_msgs.stamp_ns(msg.header.stamp), ros_msgs.odometry_to_pose(msg))
        except ValueError as e:
            self.guard.reject('bad_pose', f'odometry: {e}')
            return
        if self.poses.stale > stale:
            self.guard.reject('stale_odometry', 'odometry stamped more than 1 s behind the newest dropped (the '
                                                'history restarts only after time_jump_confirm in a row)')
        if jumped:  # the clock went back (bag loop): old tracks and sweeps mean nothing now
            self.sender.tracker.reset()
            self.sweeps.reset()

    def on_scan(self, msg) -> None:
        stamp = ros_msgs.stamp_ns(msg.header.stamp)
        ahead = ahead_of_clock_ns(self, stamp)
        if ahead > self.max_future_ns:
            self.guard.reject('future_stamp', f'scan stamped {ahead * 1e-9:.3f} s ahead of this node\'s clock')
            return
        try:
            points = ros_msgs.cloud_to_points(msg, self.fields)
        except ros_msgs.PointCloudError as e:
            self.guard.reject('malformed_scan', str(e))
            return
        points, bad = usable_points(points)
        if bad:
            self.guard.reject('nonfinite_points', f'{bad} of {bad + len(points)} points are NaN, infinite or '
                                                  f'beyond {MAX_POINT_ABS_M:g} m (dropped, scan used)')
        try:
            T_world_sensor = self.poses.lookup(stamp)
        except PoseLookupError as e:
            T_world_sensor = None
            self.guard.reject('no_pose_for_velocity', f'scan detected alone and shared with the detector\'s '
                                                      f'own velocities: {e}')
        t0 = time.perf_counter()
        stacked, ages = self.sweeps.stack(points, T_world_sensor, stamp)
        det = self.detector.detect(stacked, ages=ages)
        self.detect_ms.add((time.perf_counter() - t0) * 1e3)
        if T_world_sensor is not None:
            det = self.sender.prepare(det, T_world_sensor, stamp)
        self.scans += 1
        self.last_stamp_ns = stamp
        header = msg.header
        if self.pub_bev is not None:
            self.pub_bev.publish(cv.buffer_to_cloud(*encode_ego_map(det, self.agent, stamp), header, self.msgs))
        fields, data, step = codec.encode(collaborator_message(det, self.agent, stamp, self.roi_policy))
        self.feature_bytes.add(len(data))
        self.pub_features.publish(cv.buffer_to_cloud(fields, data, step, header, self.msgs))
        objects = make_objects(det.boxes, det.velocities, score=det.scores, label=det.labels, source=self.agent,
                               v_std=det.velocity_std)
        objects = objects[cv.publishable(objects, self.extent, self.dropped_boxes)]
        self.pub_objects.publish(ros_msgs.objects_to_cloud(objects, header, self.msgs))
        shown = objects[objects['score'] >= self.display_threshold]
        self.pub_markers.publish(ros_msgs.objects_to_markers(shown, header, self.msgs, ns=f'agent{self.agent}'))

    def status(self) -> dict:
        return {'agent': self.agent, 'scans': self.scans, 'last_stamp_ns': self.last_stamp_ns,
                'rejected': dict(self.guard.counts), 'dropped_boxes': dict(self.dropped_boxes),
                'detect_ms': self.detect_ms.summary(), 'feature_bytes': self.feature_bytes.summary(0)}


def main(argv: list[str] | None = None) -> int:
    return node_main(LidarDetectorNode, argv, large_messages=True)


if __name__ == '__main__':
    sys.exit(main())
