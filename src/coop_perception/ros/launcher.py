"""``coop-perception launch``: the nodes of ``launch/coop_perception.launch.py`` (with ``--bag``,
of ``launch/v2x_replay.launch.py`` without RViz) as separate processes, with the same parameter
file, parameters and names, for machines without the ROS 2 CLI (``ros2 launch`` needs launch_ros).

Every node runs as ``python -m coop_perception.ros.<executable> --ros-args -r __node:=NAME
-r __ns:=/NAMESPACE --params-file CONFIG -p KEY:=VALUE ...``, what ``ros2 launch`` runs for a
launch_ros ``Node``. The bag player starts with the nodes and waits until every agent's lidar and
both readers of its odometry subscribe, i.e. every node has loaded its models.

Locally (the default) the nodes discover each other on loopback only; ``--network`` leaves
discovery, domain, RMW and Fast DDS profile to the environment and ``--only`` picks the agents
whose nodes run on this computer, for a deployment across several. SIGTERM stops the nodes like
Ctrl-C; a node failing during start-up stops the others.

This module does not import rclpy; ``node_specs`` is what tests compare the launch files with.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from coop_perception.commands import Commands
from coop_perception.data.bag import lidar_topic, odom_topic
from coop_perception.errors import UserError
from coop_perception.paths import package_path
from coop_perception.ros.env import use_local_discovery

# What the launch files default to.
DEFAULT_AGENTS = 5
DEFAULT_EGO = 1
# Long enough for every node to import torch and load its models on a busy 2-core machine.
PLAYER_WAIT_S = 120.0
STOP_TIMEOUT_S = 10.0
# A node that fails this soon after the launch failed at start-up (models, parameters) and ends
# the launch; one that fails later is reported and the others go on, as fusion does without it.
STARTUP_S = PLAYER_WAIT_S
# Odometry is best effort and not kept for late joiners, so the player waits for both readers of
# each agent's: its detector, and the ego's trust_fusion (the ego's) or v2x_channel (the others').
# Waiting for one would let a reader that discovers the player late miss the first poses.
ODOM_READERS = 2


@dataclass(frozen=True)
class NodeSpec:
    """One node as launch_ros describes it. ``executable`` is a console script of setup.py,
    which runs ``coop_perception.ros.<executable>:main``."""
    executable: str
    name: str
    namespace: str = ''
    parameters: dict = field(default_factory=dict)     # on top of the parameter file
    arguments: tuple[str, ...] = ()                    # before --ros-args
    uses_config: bool = True                           # gets the parameter file

    @property
    def label(self) -> str:
        return f'{self.namespace}/{self.name}' if self.namespace else self.name

    def command(self, config: Path | None) -> list[str]:
        cmd = [sys.executable, '-m', f'coop_perception.ros.{self.executable}', *self.arguments,
               '--ros-args', '-r', f'__node:={self.name}']
        if self.namespace:
            cmd += ['-r', f'__ns:=/{self.namespace}']
        if self.uses_config and config is not None:
            cmd += ['--params-file', str(config)]
        for key, value in self.parameters.items():
            cmd += ['-p', f'{key}:={_yaml_value(value)}']
        return cmd


def _yaml_value(value) -> str:
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, (list, tuple)):
        return '[' + ','.join(str(v) for v in value) + ']'
    return str(value)


def node_specs(num_agents: int = DEFAULT_AGENTS, ego: int = DEFAULT_EGO, use_sim_time: bool = True) -> list[NodeSpec]:
    """A detector per agent (the ego's also publishes its full map), the ego's V2X channel and
    fusion. An empty collaborator list is left out: it is the default and ``[]`` has no type."""
    if num_agents < 1 or not 0 <= ego < num_agents:
        raise UserError(f'--ego {ego}', f'must be one of the agents 0..{num_agents - 1}')
    others = [k for k in range(num_agents) if k != ego]
    collaborators = {'agents': others} if others else {}
    specs = [NodeSpec('lidar_detector', 'lidar_detector', f'agent{k}',
                      {'use_sim_time': use_sim_time, 'publish_bev': k == ego}) for k in range(num_agents)]
    for name in ('v2x_channel', 'trust_fusion'):
        specs.append(NodeSpec(name, name, f'agent{ego}', {'use_sim_time': use_sim_time, **collaborators}))
    return specs


def ego_node_specs(num_agents: int = DEFAULT_AGENTS, ego: int = DEFAULT_EGO, use_sim_time: bool = True
                   ) -> list[NodeSpec]:
    """The ego computer's own pipeline as ``node_specs`` starts it: its lidar_detector and
    trust_fusion, without the V2X channel (what the fusion would get from it comes from elsewhere,
    e.g. a bag of delivered messages)."""
    return [s for s in node_specs(num_agents, ego, use_sim_time)
            if s.namespace == f'agent{ego}' and s.executable != 'v2x_channel']


def player_spec(bag, num_agents: int = DEFAULT_AGENTS, rate: float = 1.0, loop: bool = False,
                wait_s: float = PLAYER_WAIT_S, wait_topics: list[str] | None = None) -> NodeSpec:
    """bag_player, waiting until the nodes subscribe every agent's lidar and both readers of its
    odometry, or the ``TOPIC[:N]`` of ``wait_topics`` where given."""
    topics = wait_topics or [t for k in range(num_agents)
                             for t in (lidar_topic(k), f'{odom_topic(k)}:{ODOM_READERS}')]
    arguments = (str(bag), '--rate', str(rate), *(('--loop',) if loop else ()),
                 '--wait-for-subscribers', str(wait_s), '--wait-topics', *topics)
    return NodeSpec('bag_player', 'bag_player', arguments=arguments, uses_config=False)


class Launch:
    """Runs ``specs`` as child processes (stdout and stderr to ``log_dir/<label>.log`` if given,
    else inherited); a context manager that stops them all on exit. ``local_discovery`` keeps
    their DDS discovery on loopback; without it they get ``env`` as it is."""

    def __init__(self, specs: list[NodeSpec], config: Path | None, *, env: dict | None = None,
                 log_dir: Path | None = None, local_discovery: bool = True):
        self.specs = {s.label: s for s in specs}
        self.config = config
        self.env = dict(os.environ if env is None else env)
        if local_discovery:
            use_local_discovery(self.env)
        self.log_dir = Path(log_dir) if log_dir else None
        self.processes: dict[str, subprocess.Popen] = {}

    def log_path(self, label: str) -> Path | None:
        return self.log_dir / (label.replace('/', '_') + '.log') if self.log_dir else None

    def start(self) -> 'Launch':
        if self.log_dir:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        for label, spec in self.specs.items():
            out = open(self.log_path(label), 'w') if self.log_dir else None
            self.processes[label] = subprocess.Popen(spec.command(self.config), env=self.env, stdout=out,
                                                     stderr=subprocess.STDOUT if out else None)
            if out:
                out.close()  # the child holds its own descriptor
        return self

    def last_line(self, label: str) -> str:
        """The last line a node wrote to its log ('' without a log)."""
        path = self.log_path(label)
        if path is None or not path.exists():
            return ''
        lines = [line.strip() for line in path.read_text(errors='replace').splitlines() if line.strip()]
        return lines[-1] if lines else ''

    def poll(self) -> dict[str, int | None]:
        """label -> exit code (None while running)."""
        return {label: p.poll() for label, p in self.processes.items()}

    def signal(self, label: str, sig: int = signal.SIGINT) -> None:
        p = self.processes[label]
        if p.poll() is None:
            p.send_signal(sig)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> dict[str, int]:
        """SIGINT (what Ctrl-C sends) to every running node, then SIGTERM and SIGKILL for those
        still running after ``timeout_s``; returns the exit codes."""
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            running = [p for p in self.processes.values() if p.poll() is None]
            if not running:
                break
            for p in running:
                p.send_signal(sig)
            deadline = time.monotonic() + timeout_s
            for p in running:
                try:
                    p.wait(max(deadline - time.monotonic(), 0.01))
                except subprocess.TimeoutExpired:
                    pass
        return {label: p.wait() for label, p in self.processes.items()}

    def __enter__(self) -> 'Launch':
        return self.start()

    def __exit__(self, *_):
        self.stop()


# --------------------------------------------------------------------------- CLI
def add_cli(commands: Commands) -> None:
    p = commands.add('launch', run, 'start the ROS nodes as processes (ros2 launch without the ROS CLI)',
                     description=__doc__.split('\n\n')[0])
    p.add_argument('config', nargs='?', type=Path, default=None,
                   help="parameter file (default: the package's config/coop_perception.yaml)")
    p.add_argument('--agents', type=int, default=DEFAULT_AGENTS, help=f'agents 0..N-1 (default {DEFAULT_AGENTS})')
    p.add_argument('--ego', type=int, default=DEFAULT_EGO, help=f'ego agent (default {DEFAULT_EGO})')
    where = p.add_mutually_exclusive_group()
    where.add_argument('--local', dest='network', action='store_false', default=False,
                       help='every node on this computer, DDS discovery on loopback only (the default)')
    where.add_argument('--network', dest='network', action='store_true',
                       help='nodes take ROS_DOMAIN_ID, ROS_AUTOMATIC_DISCOVERY_RANGE, ROS_STATIC_PEERS, '
                            'RMW_IMPLEMENTATION and any Fast DDS profile from the environment, to reach '
                            'nodes on other computers')
    p.add_argument('--only', type=int, nargs='+', metavar='AGENT',
                   help="start only these agents' nodes (the ego's: its detector, v2x_channel and "
                        'trust_fusion): the share of one computer in a deployment across several')
    p.add_argument('--wall-time', action='store_true', help='nodes use wall-clock time instead of /clock')
    p.add_argument('--bag', type=Path, help='also replay this bag (v2x_replay.launch.py); stop when it ends')
    p.add_argument('--rate', type=float, default=1.0, help='replay speed factor (default 1)')
    p.add_argument('--loop', action='store_true', help='replay the bag until interrupted')
    p.add_argument('--linger', type=float, default=3.0, metavar='SECONDS',
                   help='after the bag ends, keep the nodes running this long for messages in flight')
    p.add_argument('--log-dir', type=Path, help="write each node's output to DIR/<namespace>_<node>.log")
    p.add_argument('--print', action='store_true', help='print the commands and exit')


def check_parameter_file(path: Path) -> None:
    """UserError unless ``path`` holds what rcl reads with ``--params-file``: YAML mapping node
    names (or namespaces of them) to ``ros__parameters`` mappings. Checked once here, instead of
    every node printing its own traceback."""
    if not path.is_file():
        raise UserError(path, 'no such parameter file')
    try:
        tree = yaml.safe_load(path.read_text(encoding='utf-8'))
    except UnicodeDecodeError:
        raise UserError(path, 'not a parameter file: not UTF-8 text') from None
    except yaml.YAMLError as e:
        mark = getattr(e, 'problem_mark', None)
        where = f' at line {mark.line + 1}, column {mark.column + 1}' if mark else ''
        raise UserError(path, f'not valid YAML{where}: {getattr(e, "problem", None) or e}') from None
    if not _parameter_tree(tree):
        raise UserError(path, 'not a ROS parameter file: expected node names mapping to ros__parameters mappings')


def _parameter_tree(tree, top: bool = True) -> bool:
    if not isinstance(tree, dict) or not tree:
        return False
    return all(isinstance(v, dict) if k == 'ros__parameters' and not top else _parameter_tree(v, False)
               for k, v in tree.items())


def _select(specs: list[NodeSpec], only: list[int] | None, num_agents: int) -> list[NodeSpec]:
    if not only:
        return specs
    bad = [k for k in only if not 0 <= k < num_agents]
    if bad:
        raise UserError(f'--only {" ".join(map(str, bad))}', f'must be among the agents 0..{num_agents - 1}')
    return [s for s in specs if s.namespace in {f'agent{k}' for k in only}]


def run(args) -> int:
    config = args.config or package_path('config', 'coop_perception.yaml')
    check_parameter_file(config)
    specs = _select(node_specs(args.agents, args.ego, use_sim_time=not args.wall_time), args.only, args.agents)
    if args.bag:
        if not args.bag.exists():
            raise UserError(args.bag, 'no such bag')
        specs.append(player_spec(args.bag, args.agents, args.rate, args.loop))
    if args.print:
        for spec in specs:
            print(' '.join(spec.command(config)))
        return 0
    return _supervise(Launch(specs, config, log_dir=args.log_dir, local_discovery=not args.network), args)


def _supervise(launch: Launch, args) -> int:
    """Run ``launch`` until the bag ends, every node has exited, a node fails at start-up or the
    launcher gets SIGINT or SIGTERM (kill, systemd and docker send it); then stop the nodes."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    if main_thread:
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        launch.start()
        print(f'started {len(launch.processes)} processes: {", ".join(launch.processes)} (Ctrl-C stops them)',
              flush=True)
        return _watch(launch, args)
    except KeyboardInterrupt:
        return 0
    finally:
        # A second signal must not cut the stop short and leave nodes behind.
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        launch.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _watch(launch: Launch, args) -> int:
    started = time.monotonic()
    failed = {}
    while True:
        time.sleep(0.2)
        codes = launch.poll()
        for label, code in codes.items():
            if code in (None, 0) or label in failed:
                continue
            failed[label] = code
            if time.monotonic() - started < STARTUP_S:
                said = launch.last_line(label).removeprefix('error: ')
                print(f'error: {label} failed at start-up (exit code {code}){": " + said if said else ""}; '
                      'stopping the other nodes', file=sys.stderr, flush=True)
                return code if code > 0 else 1
            print(f'{label} exited with code {code}', file=sys.stderr, flush=True)
        if args.bag and codes['bag_player'] is not None:
            time.sleep(args.linger)
            break
        if all(code is not None for code in codes.values()):
            break
    return 1 if failed else 0
