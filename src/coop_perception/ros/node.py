"""What every node of the package shares: parameter schemas, QoS, input rejection, the entry point.

Importing this module (or a node module) imports rclpy; the ``coop-perception`` CLI never does:
it starts nodes as processes, so it stays usable without ROS.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import time
import traceback
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rclpy
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType
from rclpy.clock import Clock, ClockType
from rclpy.exceptions import ParameterException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions

from coop_perception.data.bag import STRING, agent_from_frame
from coop_perception.errors import UserError, exit_code
from coop_perception.paths import package_path
from coop_perception.ros.env import FASTDDS_PROFILES_ENV, use_large_shm_segment

# Sensor inputs: best effort matches both kinds of publisher. A scan queue of one means a node
# that falls behind skips to the newest scan instead of working through a growing backlog. The
# executor takes one message per subscription between two callbacks of a slow node, so a deep
# odometry queue would fall further behind every frame; five messages bound that lag.
SCAN_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.BEST_EFFORT,
                      durability=DurabilityPolicy.VOLATILE)
ODOM_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=5, reliability=ReliabilityPolicy.BEST_EFFORT,
                      durability=DurabilityPolicy.VOLATILE)
# Between our own nodes and to displays: reliable (RViz subscribes reliable by default).
RELIABLE_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=50, reliability=ReliabilityPolicy.RELIABLE,
                          durability=DurabilityPolicy.VOLATILE)
# A per-frame input where only the newest matters (a fusion behind schedule skips frames).
LATEST_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                        durability=DurabilityPolicy.VOLATILE)


# --------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class Param:
    """One ROS parameter: its default (which config/coop_perception.yaml repeats, checked by the
    tests), what it means, and for numbers the inclusive range the node accepts."""
    name: str
    default: bool | int | float | str | list
    description: str
    range: tuple[float, float] | None = None
    choices: tuple[str, ...] | None = None


def _descriptor(p: Param) -> ParameterDescriptor:
    # Parameters are read once at start-up: say so instead of accepting changes that do nothing.
    d = ParameterDescriptor(description=p.description, read_only=True)
    if isinstance(p.default, list):
        d.type = ParameterType.PARAMETER_DOUBLE_ARRAY if _floats(p) else ParameterType.PARAMETER_INTEGER_ARRAY
    if p.range is not None and (isinstance(p.default, float) or _floats(p)):
        d.floating_point_range = [FloatingPointRange(from_value=float(p.range[0]), to_value=float(p.range[1]),
                                                     step=0.0)]
    elif p.range is not None:
        d.integer_range = [IntegerRange(from_value=int(p.range[0]), to_value=int(p.range[1]), step=1)]
    if p.choices:
        d.additional_constraints = f'one of: {", ".join(p.choices)}'
    return d


def _floats(p: Param) -> bool:
    """A list parameter of floats (its default holds one); other lists hold integers."""
    return isinstance(p.default, list) and any(isinstance(v, float) for v in p.default)


def declare_parameters(node, params: tuple[Param, ...]) -> dict:
    """Declare ``params`` on ``node``; returns name -> value. Values outside a range or choice
    (e.g. from a parameter file) raise UserError, so the node stops with one line of reason."""
    values = {}
    for p in params:
        where = f'{node.get_fully_qualified_name()}:{p.name}'
        # rclpy types an empty list default as a byte array; declaring the type instead leaves the
        # value unset (None) when nothing overrides it.
        default = p.default
        if isinstance(p.default, list):
            default = Parameter.Type.DOUBLE_ARRAY if _floats(p) else Parameter.Type.INTEGER_ARRAY
        try:
            value = node.declare_parameter(p.name, default, _descriptor(p)).value
        except ParameterException as e:
            raise UserError(where, str(e)) from None
        if isinstance(p.default, list):
            value = list(p.default) if value is None else list(value)
            if p.range is not None and any(not p.range[0] <= v <= p.range[1] for v in value):
                raise UserError(where, f'{value} has values outside [{p.range[0]}, {p.range[1]}]')
        if p.choices and value not in p.choices:
            raise UserError(where, f'{value!r} is not one of {", ".join(p.choices)}')
        values[p.name] = value
    return values


def agent_id(node, configured: int) -> int:
    """``configured`` if >= 0, else the k of the node's namespace ``/agent{k}``."""
    if configured >= 0:
        return configured
    agent = agent_from_frame(node.get_namespace().lstrip('/') + '/')
    if agent is None:
        raise UserError(f'{node.get_fully_qualified_name()}:agent_id',
                        f'-1 takes the agent from a namespace /agent<k>, but the namespace is '
                        f'{node.get_namespace()!r}')
    return agent


def model_file(value: str, default_name: str, parameter: str) -> Path:
    """A model file parameter: ``''`` means the package's ``models/default_name``."""
    path = Path(value) if value else package_path('models', default_name)
    if not path.exists():
        raise UserError(path, f'not found (parameter {parameter})')
    return path


def load_detector(config: str, weights: str, *, mc_passes: int = -1, score_threshold: float = -1.0,
                  threads: int = -1, device: str = 'cpu'):
    """The detector from parameters, on ``device`` (torch_device); negative overrides keep the
    config file's value."""
    # imported here: v2x_channel shares this module and needs no torch
    from coop_perception.detection.checkpoint import load_detector as load
    from coop_perception.detection.config import load_config, with_overrides
    from coop_perception.detection.model import apply_threads
    from coop_perception.torch_device import resolve_device

    config_path = model_file(config, 'detector.yaml', 'detector_config')
    weights_path = model_file(weights, 'detector.pt', 'detector_weights')
    decode = {k: v for k, v in (('mc_passes', mc_passes), ('score_threshold', score_threshold)) if v >= 0}
    runtime = {'threads': threads} if threads >= 0 else {}
    cfg = with_overrides(load_config(config_path), decode=decode, runtime=runtime)
    target = resolve_device(device, 'device')
    detector = load(weights_path, cfg)
    apply_threads(detector.cfg)
    return detector.to(target)


# --------------------------------------------------------------------------- inputs
class InputGuard:
    """Counts rejected (or repaired) inputs by reason and warns at most once per ``period_s`` per
    reason, so a stream of bad messages neither floods the log nor goes unnoticed."""

    def __init__(self, logger, period_s: float):
        self.logger = logger
        self.period_s = period_s
        self.counts: Counter = Counter()
        self._last_warning: dict[str, float] = {}

    def reject(self, reason: str, detail: str) -> None:
        self.counts[reason] += 1
        now = time.monotonic()
        if now - self._last_warning.get(reason, -math.inf) >= self.period_s:
            self._last_warning[reason] = now
            self.logger.warning(f'{reason}: {detail} ({self.counts[reason]} so far; this warning '
                                f'repeats at most every {self.period_s:g} s)')

    def guarded(self, callback):
        """``callback`` that counts and logs anything it raises instead of ending the node: no
        single message may stop a node, whatever is wrong with it."""
        def run(msg):
            try:
                callback(msg)
            except Exception as e:  # noqa: BLE001 - the point is to survive any input
                self.reject(f'error:{type(e).__name__}',
                            f'{e}\n{"".join(traceback.format_exception(e)[-3:])}')
        return run


class Window:
    """The last ``size`` values of a quantity, summarised for status messages."""

    def __init__(self, size: int = 500):
        self.values: deque = deque(maxlen=size)

    def add(self, value: float) -> None:
        self.values.append(float(value))

    def summary(self, digits: int = 1) -> dict | None:
        if not self.values:
            return None
        v = np.asarray(self.values)
        return {'p50': round(float(np.percentile(v, 50)), digits), 'p95': round(float(np.percentile(v, 95)), digits),
                'max': round(float(v.max()), digits), 'n': len(v)}


def status_publisher(node, msgs, topic: str, period_s: float, build):
    """Publish ``build()`` as JSON (std_msgs/String) every ``period_s`` of wall time: status keeps
    coming while a replay is paused and sim time stands still."""
    pub = node.create_publisher(msgs.get_class(STRING), topic, RELIABLE_QOS)

    def tick():
        pub.publish(msgs(STRING, data=json.dumps(build(), sort_keys=True)))

    return node.create_timer(period_s, tick, clock=Clock(clock_type=ClockType.STEADY_TIME))


def ros_now_ns(node) -> int:
    return node.get_clock().now().nanoseconds


def ahead_of_clock_ns(node, stamp_ns: int) -> int:
    """How far ``stamp_ns`` lies ahead of the node's ROS time; 0 while sim time has not started
    (the clock reads 0 until the first /clock message)."""
    now = ros_now_ns(node)
    return stamp_ns - now if now > 0 else 0


# --------------------------------------------------------------------------- entry point
def main(node_class, argv: list[str] | None = None, *, large_messages: bool = False) -> int:
    """Console script of ``node_class`` (``NODE_NAME``, ``__init__(**node_kwargs)``); ROS
    arguments follow ``--ros-args``. Start-up problems print one line and exit with code 2."""
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index('--ros-args') if '--ros-args' in argv else len(argv)
    module_doc = sys.modules[node_class.__module__].__doc__ or ''
    parser = argparse.ArgumentParser(prog=node_class.NODE_NAME, description=module_doc.split('\n\n')[0])
    if large_messages:
        parser.add_argument('--shm-segment-mb', type=float, default=64.0, metavar='MB',
                            help='shared-memory segment for sending with Fast DDS (default 64; 0 '
                                 "keeps the RMW's 512 KiB, which drops large messages under load)")
    args = parser.parse_args(argv[:split])
    # Discovery, domain and RMW stay as the user set them: the agents of a deployment are different
    # computers. Tests and local launches pass loopback-only settings in the environment.
    profile = use_large_shm_segment(args.shm_segment_mb) if large_messages else None
    try:
        return exit_code(lambda: _spin(node_class, [node_class.NODE_NAME] + argv[split:]), interrupted=0)
    finally:
        if profile:
            os.environ.pop(FASTDDS_PROFILES_ENV, None)
            Path(profile).unlink(missing_ok=True)


def _spin(node_class, ros_args: list[str]) -> int:
    # rclpy's own SIGINT handler ends in a KeyboardInterrupt raised wherever Python happens to be;
    # inside the pybind11 conversion of a message being taken that surfaces as a RuntimeError and a
    # non-zero exit. A flag checked between callbacks stops the node at a clean point instead.
    rclpy.init(args=ros_args, signal_handler_options=SignalHandlerOptions.NO)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    node = None
    executor = SingleThreadedExecutor()
    try:
        node = node_class()
        executor.add_node(node)
        while not stop.is_set() and rclpy.ok():
            executor.spin_once(timeout_sec=0.1)
    except ExternalShutdownException:
        pass
    finally:
        executor.shutdown()
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0
