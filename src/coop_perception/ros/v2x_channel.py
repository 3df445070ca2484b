"""``v2x_channel`` node: the emulated V2X link from every collaborator to the ego.

Runs in the ego's namespace. For each collaborator ``k`` in ``agents`` it subscribes
``/agent{k}/coop/features`` and ``/agent{k}/odom``; every features message draws its fate from a
seeded ``data.channel`` model (one link per collaborator, as offline evaluation draws them) and,
unless lost, is published on ``v2x/features`` when ROS time reaches its due time, right after the
sender's odometry around its stamp on ``v2x/odom`` (a V2X message carries the sender's pose).
Times are ROS time, so a replay with ``use_sim_time`` is delayed in bag time.

``latency_reference: capture`` (default) makes a message due at its capture stamp plus the drawn
latency, as offline evaluation counts it: the sender's processing time is part of the latency,
and a message that reaches the channel after its due time is forwarded at once (counted as
``overdue``). ``arrival`` counts the latency from when the channel receives the message. With a
clock offset configured, relayed stamps are shifted by the sender's offset.

When ROS time jumps back (a looping bag), messages in flight are dropped; a sender's buffered
odometry only when its own stamps go back for ``time_jump_confirm`` messages in a row (one stray
old message is dropped as stale).
Per-link statistics go to ``v2x/status`` (JSON, wall-clock period).
"""
from __future__ import annotations

import bisect
import copy
import heapq
import itertools
import sys

from rclpy.clock import JumpThreshold
from rclpy.duration import Duration
from rclpy.node import Node

from coop_perception.data import ros_msgs
from coop_perception.data.bag import ODOMETRY, POINTCLOUD2, agent_from_frame, odom_topic
from coop_perception.data.channel import MODEL_SETTINGS, BernoulliFramesLatency, channel_from_settings
from coop_perception.errors import UserError
from coop_perception.fusion.pose_buffer import BackJump, insert_stamped
from coop_perception.ros import convert as cv
from coop_perception.ros import topics
from coop_perception.ros.node import (ODOM_QOS, RELIABLE_QOS, InputGuard, Param, Window, ahead_of_clock_ns,
                                      declare_parameters, ros_now_ns, status_publisher)
from coop_perception.ros.node import main as node_main

NODE_NAME = 'v2x_channel'
NS_PER_S = 1_000_000_000
_BERNOULLI = BernoulliFramesLatency(0.0)

PARAMS = (
    Param('agents', [], 'collaborators whose features are relayed to the ego', (0, 1023)),
    Param('channel.model', 'uniform', 'latency model (data.channel)', choices=tuple(MODEL_SETTINGS)),
    Param('channel.mean_latency_ms', 100.0, 'mean latency of a delivered message (ms)', (0.0, 1e6)),
    Param('channel.spread', 0.5, 'uniform: latencies in mean x [1 - spread, 1 + spread]', (0.0, 1.0)),
    Param('channel.frame_ms', _BERNOULLI.frame_ms, 'bernoulli_frames: delay unit (ms)', (1e-3, 1e6)),
    Param('channel.trials', _BERNOULLI.trials, 'bernoulli_frames: trials per message', (1, 1000)),
    Param('channel.bandwidth_mbps', 10.0, 'bandwidth: link rate (Mbit/s)', (1e-6, 1e6)),
    Param('channel.jitter_ms', 0.0, 'bandwidth: mean exponential queueing delay (ms)', (0.0, 1e6)),
    Param('channel.loss', 0.0, 'probability that a message is lost', (0.0, 0.999)),
    Param('channel.seed', 0, 'seed of the per-link random streams', (0, 2**31 - 1)),
    Param('channel.clock_offset_ms', 0.0, "mean offset of the senders' clocks (ms)", (-1e6, 1e6)),
    Param('channel.clock_offset_std_ms', 0.0, "per-link spread of the senders' clock offsets (ms)", (0.0, 1e6)),
    Param('latency_reference', 'capture', 'latency counted from the capture stamp or from arrival at the channel',
          choices=('capture', 'arrival')),
    Param('tick_hz', 100.0, 'how often due messages are sent (Hz of ROS time)', (1.0, 10000.0)),
    Param('odom_history', 50, 'odometry messages kept per collaborator', (2, 100000)),
    Param('time_jump_back_s', 0.5, 'ROS time going back further than this drops messages in flight (s)',
          (0.0, 1e6)),
    Param('time_jump_confirm', 3, "a sender's odometry this many times in a row further back than "
                                  'time_jump_back_s (each near the one before) restarts its pose history; '
                                  'a single one is dropped as stale', (1, 1000)),
    Param('max_future_s', 1.0, "messages stamped further ahead of this node's clock are rejected (s)",
          (0.0, 1e6)),
    Param('warn_period_s', 5.0, 'at most one warning per kind of bad input in this period (s)', (0.0, 1e6)),
    Param('status_period_s', 1.0, 'period of v2x/status (s, wall clock)', (0.01, 1e6)),
)


class _Link:
    def __init__(self, jump_ns: int, jump_confirm: int):
        # one stray old odometry message (late, replayed or forged) must not erase the sender's
        # poses; only a confirmed restart of its time does
        self.odom_time = BackJump(jump_ns, jump_confirm)
        self.odom_stamps: list[int] = []
        self.odoms: list = []
        self.counts = {'received': 0, 'delivered': 0, 'lost': 0, 'overdue': 0, 'dropped_on_jump': 0}
        self.bytes = 0
        self.latency_ms = Window()          # drawn latency of delivered messages
        self.age_ms = Window()              # ROS time at delivery minus capture stamp

    def add_odom(self, stamp: int, msg, history: int) -> None:
        insert_stamped(self.odom_stamps, self.odoms, stamp, msg)
        del self.odom_stamps[:-history], self.odoms[:-history]

    def odoms_around(self, stamp: int) -> list:
        """The odometry at ``stamp``, else the pair around it (or the one nearest end)."""
        i = bisect.bisect_left(self.odom_stamps, stamp)
        if i < len(self.odom_stamps) and self.odom_stamps[i] == stamp:
            return [self.odoms[i]]
        return self.odoms[max(i - 1, 0):i + 1]

    def clear(self) -> None:
        self.odom_stamps.clear()
        self.odoms.clear()


class V2XChannelNode(Node):
    NODE_NAME = NODE_NAME

    def __init__(self, **node_kwargs):
        super().__init__(NODE_NAME, **node_kwargs)
        p = declare_parameters(self, PARAMS)
        settings = {k.split('.', 1)[1]: v for k, v in p.items() if k.startswith('channel.')}
        try:
            self.channel = channel_from_settings(settings.pop('model'), settings.pop('mean_latency_ms'), settings)
        except ValueError as e:
            raise UserError(f'{self.get_fully_qualified_name()}:channel', str(e)) from None
        self.from_capture = p['latency_reference'] == 'capture'
        self.odom_history = p['odom_history']
        self.jump_ns = int(p['time_jump_back_s'] * NS_PER_S)
        self.max_future_ns = int(p['max_future_s'] * NS_PER_S)
        self.msgs = cv.RclpyMessages()
        self.guard = InputGuard(self.get_logger(), p['warn_period_s'])
        self.links = {k: _Link(self.jump_ns, p['time_jump_confirm']) for k in p['agents']}
        self.pending: list = []  # heap of (due ns, sequence, agent, msg, capture stamp, latency s, clock offset ns)
        self._sequence = itertools.count()
        self.jumps = 0
        # A due time from before a jump back would hold its message until ROS time catches up.
        self._jump_handle = self.get_clock().create_jump_callback(
            JumpThreshold(min_forward=None, min_backward=Duration(nanoseconds=-self.jump_ns), on_clock_change=False),
            post_callback=self._drop_in_flight)

        cloud, odom = self.msgs.get_class(POINTCLOUD2), self.msgs.get_class(ODOMETRY)
        self.pub_features = self.create_publisher(cloud, topics.V2X_FEATURES, RELIABLE_QOS)
        self.pub_odom = self.create_publisher(odom, topics.V2X_ODOM, RELIABLE_QOS)
        status_publisher(self, self.msgs, topics.V2X_STATUS, p['status_period_s'], self.status)
        self.create_timer(1.0 / p['tick_hz'], self.tick)
        for k in self.links:
            self.create_subscription(odom, odom_topic(k), self.guard.guarded(lambda m, k=k: self.on_odom(k, m)),
                                     ODOM_QOS)
            self.create_subscription(cloud, topics.agent_topic(k, topics.FEATURES),
                                     self.guard.guarded(lambda m, k=k: self.on_features(k, m)), RELIABLE_QOS)
        self.get_logger().info(f'relaying agents {sorted(self.links)}: {self.channel.spec}, latency from '
                               f'{p["latency_reference"]}')

    # ------------------------------------------------------------------ inputs
    def _sender_ok(self, k: int, frame_id: str, stamp: int, what: str) -> bool:
        sender = agent_from_frame(frame_id)
        if sender != k:
            self.guard.reject('agent_mismatch', f'{what} on /agent{k} is in frame {frame_id!r}, not agent{k}/...')
            return False
        ahead = ahead_of_clock_ns(self, stamp)
        if ahead > self.max_future_ns:
            self.guard.reject('future_stamp', f'{what} of agent {k} stamped {ahead * 1e-9:.3f} s ahead of '
                                              "this node's clock")
            return False
        return True

    def on_odom(self, k: int, msg) -> None:
        stamp = ros_msgs.stamp_ns(msg.header.stamp)
        if not self._sender_ok(k, msg.child_frame_id, stamp, 'odometry'):
            return
        link = self.links[k]
        verdict, held = link.odom_time.observe(stamp, msg)
        if verdict == BackJump.STALE:
            self.guard.reject('stale_odometry', f'odometry of agent {k} stamped '
                                                f'{(link.odom_time.newest_ns - stamp) * 1e-9:.2f} s behind its newest')
            return
        if verdict == BackJump.JUMP:
            link.clear()  # the sender's time went back: its old poses belong to another timeline
            for m in held:
                link.add_odom(ros_msgs.stamp_ns(m.header.stamp), m, self.odom_history)
            return
        link.add_odom(stamp, msg, self.odom_history)

    def on_features(self, k: int, msg) -> None:
        stamp = ros_msgs.stamp_ns(msg.header.stamp)
        if not self._sender_ok(k, msg.header.frame_id, stamp, 'features'):
            return
        try:
            ros_msgs.cloud_to_array(msg, require=())
        except ros_msgs.PointCloudError as e:
            self.guard.reject('malformed_features', f'agent {k}: {e}')
            return
        link = self.links[k]
        link.counts['received'] += 1
        nbytes = len(msg.data)
        link.bytes += nbytes
        delivery = self.channel.send(k, nbytes)
        if not delivery.delivered:
            link.counts['lost'] += 1
            return
        now = ros_now_ns(self)
        due = (stamp if self.from_capture else now) + round(delivery.latency_s * NS_PER_S)
        if due < now:
            link.counts['overdue'] += 1
        offset_ns = delivery.stamp_ns(0)
        heapq.heappush(self.pending, (max(due, now), next(self._sequence), k, msg, stamp, delivery.latency_s,
                                      offset_ns))

    # ------------------------------------------------------------------ delivery
    def tick(self) -> None:
        now = ros_now_ns(self)
        while self.pending and self.pending[0][0] <= now:
            _, _, k, msg, stamp, latency_s, offset_ns = heapq.heappop(self.pending)
            link = self.links[k]
            for odom in link.odoms_around(stamp):
                self.pub_odom.publish(self._shifted(odom, offset_ns))
            self.pub_features.publish(self._shifted(msg, offset_ns))
            link.counts['delivered'] += 1
            link.latency_ms.add(latency_s * 1e3)
            link.age_ms.add((now - stamp) * 1e-6)

    def _shifted(self, msg, offset_ns: int):
        """``msg`` as the sender's clock stamped it (a copy: odometry may go out with several messages)."""
        if not offset_ns:
            return msg
        msg = copy.deepcopy(msg)
        msg.header.stamp = ros_msgs.to_stamp(self.msgs, ros_msgs.stamp_ns(msg.header.stamp) + offset_ns)
        return msg

    def _drop_in_flight(self, jump) -> None:
        self.jumps += 1
        for _, _, k, *_ in self.pending:
            self.links[k].counts['dropped_on_jump'] += 1
        self.get_logger().info(f'ROS time jumped back by {-jump.delta.nanoseconds * 1e-9:.2f} s: dropped '
                               f'{len(self.pending)} messages in flight and the buffered odometry')
        self.pending.clear()
        for link in self.links.values():
            link.clear()

    def status(self) -> dict:
        return {'channel': self.channel.spec, 'in_flight': len(self.pending), 'time_jumps': self.jumps,
                'rejected': dict(self.guard.counts),
                'links': {str(k): {**link.counts, 'bytes': link.bytes, 'latency_ms': link.latency_ms.summary(),
                                   'age_at_delivery_ms': link.age_ms.summary()}
                          for k, link in self.links.items()}}


def main(argv: list[str] | None = None) -> int:
    return node_main(V2XChannelNode, argv)


if __name__ == '__main__':
    sys.exit(main())
