"""``coop-perception bench fuzz``: the fuzz harness of ``ros.fuzz`` over many messages per input topic.

Runs the real ``lidar_detector`` and ``trust_fusion`` nodes in this process (loopback discovery,
the caller's ROS domain) and prints, per input topic, ``messages``, ``crashes``, ``unhandled``,
``rejected`` (by 'node:reason') and ``bad_outputs`` (published boxes with NaN or beyond the sensor
range), plus ``valid_output_unchanged``: whether a valid sequence after the fuzzing gives what it
gives on fresh nodes. Exit code 1 when any of those shows a failure.
"""
from __future__ import annotations

import json

from coop_perception.commands import Commands, add_json, positive, write_json
from coop_perception.ros.env import use_local_discovery

# The shipped detector takes ~0.15 s a scan on 2 cores; N messages on each of the six topics run a
# detection or a fusion each, so long runs take hours: a small detector (--detector-config,
# --detector-weights, --fusion-model, e.g. tests/ros_fixtures.write_tiny_models) runs ~50 a second.
FAR_AWAY_S = 10**6   # the valid sequence runs this long after the fuzzing began (s)


def add_cli(commands: Commands) -> None:
    p = commands.add('fuzz', run, 'seeded malformed messages into the nodes: crashes, rejections, bad boxes',
                     group='bench')
    p.add_argument('--messages', type=positive(int), default=10_000, help='fuzzed messages per input topic')
    p.add_argument('--seed', type=int, default=0, help='seed of the first topic (the next ones count up)')
    p.add_argument('--detector-config', default='', help="detector config YAML; '': the package's")
    p.add_argument('--detector-weights', default='', help="detector checkpoint; '': the package's")
    p.add_argument('--fusion-model', default='', help="fusion checkpoint; '': the package's")
    add_json(p)


def run(args) -> int:
    use_local_discovery()
    import rclpy
    from rclpy.parameter import Parameter

    from coop_perception.ros import fuzz

    models = {'detector_config': args.detector_config, 'detector_weights': args.detector_weights}
    quiet = Parameter('warn_period_s', value=1e6)
    detector = [Parameter(k, value=v) for k, v in models.items()] + [quiet]
    fusion = detector + [Parameter('fusion_model', value=args.fusion_model)]
    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        harness = fuzz.FuzzHarness(context, detector, fusion)
        reports = {topic: fuzz.run_fuzz(harness, topic, args.messages, args.seed + i)
                   for i, topic in enumerate(fuzz.FUZZ_TOPICS)}
        far = harness.t + FAR_AWAY_S * fuzz.NS_PER_S
        fuzzed = harness.valid_output(far)
        expected = fuzz.FuzzHarness(context, detector, fusion).valid_output(far)
    finally:
        rclpy.try_shutdown(context=context)
    unchanged = len(fuzzed) == len(expected) and all(
        a == b and (x.tobytes() == y.tobytes()) for (a, x), (b, y) in zip(fuzzed, expected))
    result = {'topics': {topic: r.to_dict() for topic, r in reports.items()}, 'valid_output_unchanged': unchanged}
    print(json.dumps(result, indent=2, sort_keys=True))
    write_json(args, result)
    failed = any(r.crashes or r.unhandled or r.bad_outputs for r in reports.values()) or not unchanged
    return 1 if failed else 0
