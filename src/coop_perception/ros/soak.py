"""Soak test of the fusion node: does its memory stay bounded under agent churn?

    coop-perception bench soak --agents 8 --minutes 10 [--churn 4] [--every 30] [--json FILE]

A real ``trust_fusion`` node (the shipped models unless told otherwise) in this process, fed
through its own subscription callbacks in simulated time (sim time that never starts: no clock
checks, the stamps are the soak's, and it runs as fast as the fusion allows): every 100 ms an ego
odometry and map, and from each of ``--agents`` collaborators an odometry and a feature message;
plus ``--churn`` new short-lived agent ids a second, each of which speaks for one second and is
never heard again (ids cycle through 100..MAX_AGENT_ID, a long silence after their last use). A
table every ``--every`` simulated seconds gives the process RSS, the collaborators the pipeline
and the node's status track, and frames vs outputs; the last line gives the RSS growth after the
warm-up (the first fifth of the run, at most 60 s) and the ego frames that gave no output.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from coop_perception.commands import Commands, add_json, positive, write_json
from coop_perception.data.objects import MAX_AGENT_ID

NS_PER_S = 1_000_000_000
FRAME_NS = NS_PER_S // 10          # 10 Hz: ego frames and every agent's messages
EGO = 1
FIRST_CHURN_ID = 100
CHURN_LIFE_FRAMES = 10             # a churned id speaks for one second
START_NS = 1000 * NS_PER_S


def rss_mb() -> float:
    """Resident set size of this process (MB), from /proc."""
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20


def synthetic_scan(seed: int, n: int = 20000) -> np.ndarray:
    """(n + 1500, 4) float32 x, y, z, intensity: ground around a sensor 1.8 m up and two car-sized
    blocks, 8 and 15 m ahead."""
    rng = np.random.default_rng(seed)
    r, a = rng.uniform(3, 45, n), rng.uniform(-np.pi, np.pi, n)
    ground = np.stack([r * np.cos(a), r * np.sin(a), np.full(n, -1.8), np.zeros(n)], 1)
    cars = [np.concatenate([rng.uniform([x, y - 1, -1.6], [x + 4.5, y + 1, -0.2], (750, 3)), np.zeros((750, 1))], 1)
            for x, y in ((8, 0), (15, 4))]
    return np.concatenate([ground, *cars]).astype(np.float32)


class Soak:
    """The node and the traffic; ``frame()`` feeds 100 ms of it."""

    def __init__(self, context, agents: int, churn_per_s: int, fusion_params: list):
        # imported here: registering the command must load neither torch nor rclpy
        from rclpy.parameter import Parameter

        from coop_perception.fusion import codec
        from coop_perception.fusion.ego_map import encode_ego_map
        from coop_perception.fusion.pipeline import collaborator_message
        from coop_perception.ros import convert as cv
        from coop_perception.ros.trust_fusion import TrustFusionNode

        self.node = TrustFusionNode(context=context, namespace=f'agent{EGO}', parameter_overrides=[
            Parameter('use_sim_time', value=True), *fusion_params])
        self.callbacks = {sub.topic_name.split('/', 2)[-1]: sub.callback for sub in self.node.subscriptions}
        self.outputs = 0
        publish = self.node.pub_objects.publish

        def count(msg):
            self.outputs += 1
            publish(msg)
        self.node.pub_objects.publish = count
        self.msgs = cv.RclpyMessages()
        model = self.node.detector
        self.ego_map = encode_ego_map(model.detect(synthetic_scan(1)), EGO, 0)
        self.features = codec.encode(collaborator_message(model.detect(synthetic_scan(2)), 2, 0,
                                                          {'score_threshold': 0.0}))
        self.agents = list(range(2, 2 + agents))
        self.churn_per_s = churn_per_s
        self.churned = []            # (id, first frame) of the live churned agents
        self.churn_count = 0         # churned ids so far
        self.churn_due = 0.0         # churned ids owed (fractions of one accumulate)
        self.t = START_NS
        self.frames = 0

    def _odom(self, agent: int, x: float):
        from coop_perception.data import ros_msgs
        from coop_perception.geometry import make_pose

        header = ros_msgs.make_header(self.msgs, self.t, 'map')
        return ros_msgs.pose_to_odometry(make_pose([x, 0.0, 1.8]), header, f'agent{agent}/lidar', self.msgs)

    def _cloud(self, encoded, agent: int):
        # a fresh message each time, as from the middleware: nothing shares the template's buffer
        from coop_perception.data import ros_msgs
        from coop_perception.ros import convert as cv

        fields, data, step = encoded
        header = ros_msgs.make_header(self.msgs, self.t, f'agent{agent}/lidar')
        return cv.buffer_to_cloud(fields, bytes(data), step, header, self.msgs)

    def frame(self) -> None:
        """100 ms: the collaborators' messages (captured 50 ms before the ego's), then the ego's."""
        self.t += FRAME_NS
        ego_x = 10.0 * (self.t - START_NS) / NS_PER_S
        self.t -= FRAME_NS // 2
        self.churn_due += self.churn_per_s * FRAME_NS / NS_PER_S
        while self.churn_due >= 1:
            self.churned.append((FIRST_CHURN_ID + self.churn_count % (MAX_AGENT_ID + 1 - FIRST_CHURN_ID), self.frames))
            self.churn_count += 1
            self.churn_due -= 1
        self.churned = [(k, f) for k, f in self.churned if self.frames - f < CHURN_LIFE_FRAMES]
        for i, k in enumerate(self.agents + [k for k, _ in self.churned]):
            self.callbacks['v2x/odom'](self._odom(k, ego_x + 5.0 + (i % 4)))
            self.callbacks['v2x/features'](self._cloud(self.features, k))
        self.t += FRAME_NS // 2
        self.callbacks['odom'](self._odom(EGO, ego_x))
        self.callbacks['coop/bev'](self._cloud(self.ego_map, EGO))
        self.frames += 1

    def sample(self, wall_s: float) -> dict:
        return {'t_s': round(self.frames * FRAME_NS / NS_PER_S, 1), 'wall_s': round(wall_s, 1),
                'rss_mb': round(rss_mb(), 1), 'tracked_agents': len(self.node.coop.tracked_agents()),
                'status_agents': len(self.node.agents), 'frames': self.frames, 'outputs': self.outputs}


def soak(context, agents: int, minutes: float, churn_per_s: int, every_s: float, fusion_params: list,
         printer=print) -> dict:
    """Run the soak; ``printer`` gets the table's lines. Returns the JSON result."""
    s = Soak(context, agents, churn_per_s, fusion_params)
    total = max(1, round(minutes * 60 * NS_PER_S / FRAME_NS))
    warmup = min(total // 5, round(60 * NS_PER_S / FRAME_NS))
    every = max(1, round(every_s * NS_PER_S / FRAME_NS))
    printer(f"{'sim s':>7}{'wall s':>8}{'RSS MB':>9}{'tracked':>9}{'status':>8}{'frames':>8}{'outputs':>9}")
    samples, start = [], time.perf_counter()
    rss_warm = None
    for f in range(1, total + 1):
        s.frame()
        if f == warmup:
            rss_warm = rss_mb()
        if f % every == 0 or f == total:
            row = s.sample(time.perf_counter() - start)
            samples.append(row)
            printer(f"{row['t_s']:>7.1f}{row['wall_s']:>8.1f}{row['rss_mb']:>9.1f}{row['tracked_agents']:>9}"
                    f"{row['status_agents']:>8}{row['frames']:>8}{row['outputs']:>9}")
    rss_end = rss_mb()
    rss_warm = rss_end if rss_warm is None else rss_warm
    status = s.node.status()
    result = {'agents': agents, 'minutes': minutes, 'churn_per_s': churn_per_s, 'samples': samples,
              'warmup_s': warmup * FRAME_NS / NS_PER_S, 'rss_warm_mb': round(rss_warm, 1),
              'rss_end_mb': round(rss_end, 1), 'rss_growth_mb': round(rss_end - rss_warm, 1),
              'rss_max_mb': round(max([rss_end] + [r['rss_mb'] for r in samples]), 1),
              'frames': s.frames, 'frames_without_output': s.frames - s.outputs,
              'churned_ids': s.churn_count, 'forgotten_agents': status['forgotten_agents'],
              'pipeline_drops': status['pipeline_drops'], 'rejected': status['rejected'],
              'wall_s': round(time.perf_counter() - start, 1)}
    s.node.destroy_node()
    printer(f"RSS growth after warm-up ({result['warmup_s']:.0f} s): {result['rss_growth_mb']:+.1f} MB "
            f"({result['rss_warm_mb']:.1f} -> {result['rss_end_mb']:.1f}, max {result['rss_max_mb']:.1f}); "
            f"ego frames without output: {result['frames_without_output']} of {result['frames']}")
    return result


def add_cli(commands: Commands) -> None:
    p = commands.add('soak', run, 'fusion node under synthetic traffic and agent churn: RSS over time',
                     group='bench')
    p.add_argument('--agents', type=positive(int), default=8, help='regular collaborators (10 Hz each)')
    p.add_argument('--minutes', type=positive(float), default=10.0, help='simulated minutes (fractions allowed)')
    p.add_argument('--churn', type=int, choices=range(0, 101), default=4, metavar='N',
                   help='new short-lived agent ids per simulated second (0-100)')
    p.add_argument('--every', type=positive(float), default=30.0, help='simulated seconds between table rows')
    p.add_argument('--method', default='trust', help='fusion method of the node')
    p.add_argument('--detector-config', default='', help="'': the package's models/detector.yaml")
    p.add_argument('--detector-weights', default='', help="'': the package's models/detector.pt")
    p.add_argument('--fusion-model', default='', help="'': the package's models/fusion.pt")
    add_json(p)


def run(args: argparse.Namespace) -> int:
    import rclpy
    from rclpy.parameter import Parameter

    from coop_perception.ros.env import use_local_discovery

    use_local_discovery()
    context = rclpy.Context()
    rclpy.init(context=context)
    params = [Parameter('method', value=args.method), Parameter('detector_config', value=args.detector_config),
              Parameter('detector_weights', value=args.detector_weights),
              Parameter('fusion_model', value=args.fusion_model)]
    try:
        result = soak(context, args.agents, args.minutes, args.churn, args.every, params)
    finally:
        rclpy.try_shutdown(context=context)
    write_json(args, result)
    return 0
