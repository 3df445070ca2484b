"""``bag_player`` node: replay a rosbag2 bag with rclpy in recorded time.

Messages are published as the recorded CDR bytes (no deserialisation), each at
``start + (log_time - first_log_time) / rate`` on the wall clock, with the QoS recorded in the bag
(data.bag: LiDAR best effort, ``/tf_static`` transient local). ``/clock`` carries the bag time so
that nodes with ``use_sim_time`` run on recorded time: it is published just before every message
(never behind that message's stamp) and at ``--clock-hz`` in between.

Topics whose message type this ROS install cannot import (e.g. tf2_msgs with the PyPI wheels) are
skipped with a warning; asking for one with ``--topics`` is an error.

rclpy is imported when playback starts, so the ``coop-perception`` CLI stays usable without ROS.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from coop_perception.commands import Commands, non_negative, positive
from coop_perception.data.bag import BagReader
from coop_perception.errors import UserError, exit_code
from coop_perception.ros.env import FASTDDS_PROFILES_ENV, use_large_shm_segment

NODE_NAME = 'bag_player'
# How long to let reliable subscribers acknowledge the last messages before exiting.
ACK_TIMEOUT_S = 2.0
CLOCK_HZ = 100.0        # /clock between messages, Hz of wall time


def _wait_topic(text: str) -> tuple[str, int]:
    """``TOPIC`` or ``TOPIC:N`` (a colon cannot occur in a ROS topic name) -> (topic, N >= 1)."""
    topic, _, count = text.partition(':')
    try:
        n = int(count) if count else 1
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected TOPIC or TOPIC:N, got {text}') from None
    if n < 1:
        raise argparse.ArgumentTypeError(f'the subscriber count must be >= 1, got {text}')
    return topic, n


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('bag', help='rosbag2 bag directory (or a single .mcap / .db3 file)')
    p.add_argument('--rate', type=positive(float), default=1.0, help='playback speed factor (default 1)')
    p.add_argument('--start-offset', type=non_negative(float), default=0.0, metavar='SECONDS',
                   help='start this far into the bag; latched topics still get their last earlier message')
    p.add_argument('--loop', action='store_true', help='start over at the end, until interrupted')
    p.add_argument('--topics', nargs='+', metavar='TOPIC', help='play only these topics')
    p.add_argument('--clock-hz', type=non_negative(float), default=CLOCK_HZ,
                   help=f'/clock rate between messages; 0 disables /clock (default {CLOCK_HZ:g})')
    p.add_argument('--delay', type=non_negative(float), default=0.0, metavar='SECONDS',
                   help='wait before the first message, after discovery')
    p.add_argument('--wait-for-subscribers', type=non_negative(float), default=0.0, metavar='SECONDS',
                   help='first wait up to SECONDS until every played topic has a subscriber')
    p.add_argument('--wait-topics', nargs='+', metavar='TOPIC[:N]', type=_wait_topic,
                   help='with --wait-for-subscribers: wait for subscribers of these topics only, '
                        'for at least N of them where given (default 1)')
    p.add_argument('--reliable', action='store_true',
                   help='offer reliable delivery on every topic instead of the recorded reliability, '
                        'so that subscribers asking for reliable (e.g. RViz by default) match the '
                        'best-effort sensor topics too; best-effort subscribers still match')
    p.add_argument('--shm-segment-mb', type=non_negative(float), default=64.0, metavar='MB',
                   help='shared-memory segment for sending with Fast DDS (default 64; 0 keeps the '
                        "RMW's 512 KiB, which drops best-effort scans over 512 KiB under load)")
    p.add_argument('--stats-json', metavar='PATH',
                   help='write message counts and publication lateness (ms) here at the end')


def add_cli(commands: Commands) -> None:
    add_arguments(commands.add('play', run, 'replay a rosbag2 bag into ROS 2 in recorded time'))


@dataclass
class PlayStats:
    counts: dict[str, int] = field(default_factory=dict)
    lateness_s: list[float] = field(default_factory=list)
    loops: int = 0
    wall_s: float = 0.0
    start_wall_time: float | None = None   # time.time() at which the first loop's schedule starts

    def summary(self) -> dict:
        late = np.asarray(self.lateness_s) * 1e3
        pct = {f'p{q}': float(np.percentile(late, q)) if late.size else 0.0 for q in (50, 95, 99)}
        return {'messages': int(sum(self.counts.values())), 'topics': dict(self.counts),
                'loops': self.loops, 'wall_s': self.wall_s, 'start_wall_time': self.start_wall_time,
                'lateness_ms': {**pct, 'max': float(late.max()) if late.size else 0.0}}


class BagPlayer:
    """Publishes the messages of one open bag on an rclpy node; see the module doc."""

    def __init__(self, node, bag: BagReader, topics: list[str], *, rate: float = 1.0,
                 start_offset_s: float = 0.0, clock_hz: float = CLOCK_HZ, reliable: bool = False):
        from rclpy.qos import DurabilityPolicy, ReliabilityPolicy

        from coop_perception.ros import convert as cv
        from coop_perception.ros.qos import CLOCK_QOS, playback_qos

        self.node, self.bag, self.topics, self.rate = node, bag, topics, rate
        self.start_ns = bag.start_ns + int(round(start_offset_s * 1e9))
        self.factory = cv.RclpyMessages()
        self._make_clock = cv.make_clock
        self.publishers = {}
        self.latched = set()
        for t in topics:
            profile = playback_qos(bag.topics[t].qos)
            if reliable:
                profile.reliability = ReliabilityPolicy.RELIABLE
            self.publishers[t] = node.create_publisher(
                self.factory.get_class(bag.topics[t].msgtype), t, profile)
            if profile.durability == DurabilityPolicy.TRANSIENT_LOCAL:
                self.latched.add(t)
        self.clock_pub = None
        if clock_hz > 0:
            self.clock_pub = node.create_publisher(
                self.factory.get_class('rosgraph_msgs/msg/Clock'), '/clock', CLOCK_QOS)
        self.clock_period = 1.0 / clock_hz if clock_hz > 0 else None
        self.stats = PlayStats(counts={t: 0 for t in topics})

    def wait_for_subscribers(self, timeout_s: float, topics: dict[str, int] | None = None) -> list[str]:
        """Block until every topic of ``topics`` (topic -> subscribers wanted; default: every
        played topic, one each) has that many subscribers or the timeout passes; returns those
        short of it."""
        deadline = time.monotonic() + timeout_s
        wanted = topics or dict.fromkeys(self.publishers, 1)
        while True:
            lonely = [t for t, n in wanted.items() if self.publishers[t].get_subscription_count() < n]
            if not lonely or time.monotonic() >= deadline:
                return lonely
            time.sleep(0.02)

    def _clock(self, t_ns: int) -> None:
        if self.clock_pub is not None:
            self.clock_pub.publish(self._make_clock(self.factory, t_ns))

    def _wait_until(self, target: float, wall0: float, target_ns: int) -> None:
        """Sleep until monotonic time ``target`` (recorded time ``target_ns``), ticking /clock on
        the way; a tick never passes ``target_ns``, so /clock stays monotonic when a sleep
        overruns."""
        while True:
            now = time.monotonic()
            if now >= target:
                return
            if self.clock_period is None or target - now <= self.clock_period:
                time.sleep(target - now)
                continue
            time.sleep(self.clock_period)
            self._clock(min(target_ns, self.start_ns + int((time.monotonic() - wall0) * self.rate * 1e9)))

    def play_once(self) -> None:
        wall0 = time.monotonic()
        if self.stats.start_wall_time is None:
            self.stats.start_wall_time = time.time()
        held = {}  # latched topic -> its last message before the start offset
        started = False
        for topic, _, t_ns, raw in self.bag.raw_messages(self.topics):
            if t_ns < self.start_ns:
                if topic in self.latched:
                    held[topic] = raw
                continue
            if not started:
                started = True
                self._clock(self.start_ns)
                for t, r in held.items():
                    self._publish(t, r)
            target = wall0 + (t_ns - self.start_ns) * 1e-9 / self.rate
            self._wait_until(target, wall0, t_ns)
            self.stats.lateness_s.append(time.monotonic() - target)
            self._clock(t_ns)
            self._publish(topic, raw)
        self.stats.loops += 1
        self.stats.wall_s += time.monotonic() - wall0

    def _publish(self, topic: str, raw) -> None:
        self.publishers[topic].publish(raw if isinstance(raw, bytes) else bytes(raw))
        self.stats.counts[topic] += 1

    def flush(self, timeout_s: float = ACK_TIMEOUT_S) -> None:
        """Give reliable subscribers time to acknowledge before the publishers go away."""
        from rclpy.duration import Duration

        for p in self.publishers.values():
            p.wait_for_all_acked(Duration(nanoseconds=int(timeout_s * 1e9)))


def select_topics(bag: BagReader, requested: list[str] | None, available) -> tuple[list[str], list[str]]:
    """(playable topics, skipped 'topic (type)' strings) given which types rclpy can import."""
    if requested:
        missing = [t for t in requested if t not in bag.topics]
        if missing:
            raise UserError(bag.path, f'no topic(s) {", ".join(missing)} in bag '
                                      f'(has: {", ".join(sorted(bag.topics))})')
        unknown = [f'{t} ({bag.topics[t].msgtype})' for t in requested
                   if not available(bag.topics[t].msgtype)]
        if unknown:
            raise UserError(bag.path, f'unknown message type for {", ".join(unknown)}: '
                                      'not importable in this ROS installation')
        return list(requested), []
    playable = [t for t, info in bag.topics.items() if available(info.msgtype)]
    skipped = [f'{t} ({info.msgtype})' for t, info in bag.topics.items() if t not in playable]
    if not playable:
        raise UserError(bag.path, f'unknown message types: none of {", ".join(skipped) or "no topics"} '
                                  'can be published by this ROS installation')
    return playable, skipped


def run(args, ros_args: list[str] | None = None) -> int:
    """Play ``args.bag`` (argparse namespace from add_arguments). Raises UserError for bad input.
    Discovery is the user's, like the nodes' (a replay may feed nodes on other computers)."""
    profile = use_large_shm_segment(args.shm_segment_mb)
    try:
        return _run(args, ros_args)
    finally:
        if profile:
            os.environ.pop(FASTDDS_PROFILES_ENV, None)
            Path(profile).unlink(missing_ok=True)


def _run(args, ros_args: list[str] | None) -> int:
    try:
        import rclpy
        from rclpy.executors import ExternalShutdownException
        from rclpy.signals import SignalHandlerOptions
    except ImportError as err:
        raise UserError('rclpy', f'cannot import ROS 2 Python ({err}); source a ROS 2 install '
                                 'or install the ros-rclpy wheels') from None
    from coop_perception.ros.convert import RclpyMessages

    factory = RclpyMessages()
    with BagReader(args.bag) as bag:
        topics, skipped = select_topics(bag, args.topics, factory.has)
        wait_topics = dict(args.wait_topics or ())
        unplayed = sorted(set(wait_topics) - set(topics))
        if unplayed:
            raise UserError(bag.path, f'--wait-topics {", ".join(unplayed)} not played '
                                      f'(playing: {", ".join(topics)})')
        # rclpy's own SIGINT handler shuts the context down at once, so the publication in flight
        # fails (RCLError, exit 1) instead of ending the replay. Python's KeyboardInterrupt comes
        # between two publications and ends it cleanly; SIGTERM (kill, launchers) does the same.
        # Both are set explicitly: a shell starts background jobs with SIGINT ignored.
        rclpy.init(args=ros_args, signal_handler_options=SignalHandlerOptions.NO)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.default_int_handler)
        try:
            node = rclpy.create_node(NODE_NAME)
            log = node.get_logger()
            if skipped:
                log.warning(f'skipping topics whose message type is not installed: {", ".join(skipped)}')
            player = BagPlayer(node, bag, topics, rate=args.rate, start_offset_s=args.start_offset,
                               clock_hz=args.clock_hz, reliable=args.reliable)
            if args.wait_for_subscribers > 0:
                lonely = player.wait_for_subscribers(args.wait_for_subscribers, wait_topics)
                if lonely:
                    log.warning(f'too few subscribers after {args.wait_for_subscribers:g} s on: {", ".join(lonely)}')
            time.sleep(args.delay)
            try:
                player.play_once()
                while args.loop:
                    player.play_once()
            except (KeyboardInterrupt, ExternalShutdownException):
                pass
            else:
                player.flush()
            summary = player.stats.summary()
            late = summary['lateness_ms']
            log.info(f'published {summary["messages"]} messages on {len(topics)} topics in '
                     f'{summary["wall_s"]:.2f} s; lateness p50 {late["p50"]:.2f} ms, '
                     f'p95 {late["p95"]:.2f} ms, max {late["max"]:.2f} ms')
            if args.stats_json:
                Path(args.stats_json).write_text(json.dumps(summary, indent=2))
            node.destroy_node()
        finally:
            rclpy.try_shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console script ``bag_player``; accepts ROS arguments after ``--ros-args``."""
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index('--ros-args') if '--ros-args' in argv else len(argv)
    parser = argparse.ArgumentParser(prog=NODE_NAME, description=__doc__.split('\n\n')[0])
    add_arguments(parser)
    args = parser.parse_args(argv[:split])
    return exit_code(lambda: run(args, ros_args=[NODE_NAME] + argv[split:]), interrupted=0)


if __name__ == '__main__':
    sys.exit(main())
