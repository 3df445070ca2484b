"""Replay benchmark: how late and how complete a bag replay arrives at an independent subscriber.

    python -m coop_perception.ros.replay_bench BAG [--rate 1] [--json OUT]

Starts ``bag_player`` as its own process and subscribes in this one to every topic it plays (raw
CDR, best effort, deep queues), with the player's QoS. Each received message is identified by its
bytes against the bag, so drops, duplicates and reordering are exact. Lateness of a message is its
arrival time minus the time the player scheduled it for (the player reports its wall-clock start):
publication lateness plus transport. Also reports the PointCloud2 encode/decode cost of the bag's
first scan with rclpy messages.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from coop_perception.commands import Commands, add_json, positive, write_json
from coop_perception.data.bag import POINTCLOUD2, BagReader
from coop_perception.errors import UserError, exit_code
from coop_perception.ros.env import use_local_discovery

DOMAIN_ID = '77'


def _digest(raw) -> bytes:
    # Transports may pad the CDR payload to 4 bytes; identify messages without that padding.
    return hashlib.blake2b(bytes(raw[4:]).rstrip(b'\0'), digest_size=16).digest()


def codec_cost(bag_path, repeats: int = 20) -> dict:
    """Median ms to build an rclpy PointCloud2 from an (N, C) scan and to decode it back."""
    from rclpy.serialization import deserialize_message

    from coop_perception.data import ros_msgs
    from coop_perception.data.bag import LIDAR_DTYPE
    from coop_perception.ros import convert as cv

    msgs = cv.RclpyMessages()
    with BagReader(bag_path) as bag:
        topic = next(t for t, i in bag.topics.items() if i.msgtype == POINTCLOUD2 and t.endswith('/lidar'))
        raw = next(bag.raw_messages([topic]))[3]
    cloud = deserialize_message(bytes(raw), msgs.get_class(POINTCLOUD2))
    names = [f.name for f in cloud.fields]
    points = ros_msgs.cloud_to_points(cloud, names)
    dtype = np.dtype([(n, LIDAR_DTYPE[n]) for n in names])
    enc, dec = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        msg = ros_msgs.points_to_cloud(points, dtype, cloud.header, msgs)
        t1 = time.perf_counter()
        ros_msgs.cloud_to_points(msg, names)
        dec.append(time.perf_counter() - t1)
        enc.append(t1 - t0)
    return {'points': int(len(points)), 'fields': names,
            'encode_ms': float(np.median(enc) * 1e3), 'decode_ms': float(np.median(dec) * 1e3)}


def replay(bag_path, rate: float = 1.0, reliable: bool = False, settle_s: float = 1.0,
           timeout_s: float = 600.0) -> dict:
    """Play the bag once through a bag_player process and measure it at a subscriber here."""
    env = use_local_discovery(dict(os.environ, ROS_DOMAIN_ID=os.environ.get('ROS_DOMAIN_ID', DOMAIN_ID)))
    os.environ.update(env)
    import rclpy
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    from coop_perception.ros.convert import RclpyMessages

    factory = RclpyMessages()
    expected = {}  # digest -> (topic, log time)
    with BagReader(bag_path) as bag:
        topics = {t: i.msgtype for t, i in bag.topics.items() if factory.has(i.msgtype)}
        order = {t: [] for t in topics}
        for topic, _, t_ns, raw in bag.raw_messages(list(topics)):
            expected[_digest(raw)] = (topic, t_ns)
            order[topic].append(t_ns)
        start_ns = bag.start_ns

    arrivals = {t: [] for t in topics}  # topic -> [(wall time, log time or None)]
    rclpy.init()
    node = rclpy.create_node('replay_bench')
    for topic, msgtype in topics.items():
        def on_message(raw, topic=topic):
            now = time.time()
            hit = expected.get(_digest(raw))
            arrivals[topic].append((now, hit[1] if hit and hit[0] == topic else None))
        node.create_subscription(factory.get_class(msgtype), topic, on_message,
                                 QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE if reliable
                                            else ReliabilityPolicy.BEST_EFFORT),
                                 raw=True)
    with tempfile.TemporaryDirectory() as tmp:
        stats_path = Path(tmp) / 'stats.json'
        cmd = [sys.executable, '-m', 'coop_perception.ros.bag_player', str(bag_path),
               '--rate', str(rate), '--topics', *topics, '--wait-for-subscribers', '20',
               '--delay', str(settle_s), '--stats-json', str(stats_path)] + (['--reliable'] if reliable else [])
        player = subprocess.Popen(cmd, env=env)
        deadline = time.monotonic() + timeout_s
        try:
            while player.poll() is None and time.monotonic() < deadline:
                rclpy.spin_once(node, timeout_sec=0.01)
            drain_until = time.monotonic() + 1.0
            while time.monotonic() < drain_until:
                rclpy.spin_once(node, timeout_sec=0.01)
        finally:
            if player.poll() is None:
                player.terminate()
            player.wait()
        if player.returncode != 0:
            raise UserError(bag_path, f'bag_player exited with {player.returncode}')
        played = json.loads(stats_path.read_text())
    node.destroy_node()
    rclpy.try_shutdown()

    wall0 = played['start_wall_time']
    late, per_topic = [], {}
    for topic, got in arrivals.items():
        stamps = [t for _, t in got if t is not None]
        late += [now - (wall0 + (t - start_ns) * 1e-9 / rate) for now, t in got if t is not None]
        per_topic[topic] = {'expected': len(order[topic]), 'received': len(got),
                            'unknown': sum(t is None for _, t in got),
                            'in_order': stamps == sorted(stamps),
                            'missing': len(set(order[topic]) - set(stamps))}
    late_ms = np.asarray(late) * 1e3
    return {
        'bag': str(bag_path), 'rate': rate, 'reliable': reliable,
        'messages_expected': sum(v['expected'] for v in per_topic.values()),
        'messages_received': sum(v['received'] for v in per_topic.values()),
        'dropped': sum(v['missing'] for v in per_topic.values()),
        'all_in_order': all(v['in_order'] for v in per_topic.values()),
        'arrival_lateness_ms': {f'p{q}': float(np.percentile(late_ms, q)) for q in (50, 95, 99)}
        | {'max': float(late_ms.max()) if late_ms.size else 0.0},
        'player': played, 'topics': per_topic,
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('bag')
    p.add_argument('--rate', type=positive(float), default=1.0)
    p.add_argument('--reliable', action='store_true',
                   help='player offers and subscriber requests reliable delivery (default: recorded QoS, '
                        'best-effort subscriber)')
    add_json(p)


def add_cli(commands: Commands) -> None:
    add_arguments(commands.add('replay', run, 'replay a bag at 1x into a subscriber: lateness, drops, codec cost',
                               group='bench'))


def run(args) -> int:
    use_local_discovery()
    result = {'codec': codec_cost(args.bag), 'replay': replay(args.bag, args.rate, args.reliable)}
    print(json.dumps(result, indent=2))
    write_json(args, result)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog='python -m coop_perception.ros.replay_bench',
                                description=__doc__.split('\n\n')[0])
    add_arguments(p)
    args = p.parse_args(argv)
    return exit_code(lambda: run(args))


if __name__ == '__main__':
    sys.exit(main())
