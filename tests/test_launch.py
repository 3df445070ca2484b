"""Launch files, parameter file, RViz config and `coop-perception launch`, checked against each other
and setup.py without launch_ros: the launch files run against stand-ins of the launch API."""
import ast
import importlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import yaml

from coop_perception import cli
from coop_perception.ros.env import use_large_shm_segment
from coop_perception.ros.launcher import DEFAULT_AGENTS, DEFAULT_EGO, Launch, NodeSpec, node_specs, player_spec

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / 'config' / 'coop_perception.yaml'
NODES = ('lidar_detector', 'v2x_channel', 'trust_fusion')
DOMAIN_ID = 74


# --------------------------------------------------------------------------- stand-ins of launch / launch_ros
class _Action:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


class _LaunchConfiguration:
    def __init__(self, name):
        self.name = name

    def perform(self, context):
        return context.launch_configurations[self.name]


class _OpaqueFunction:
    def __init__(self, function):
        self.function = function


class _LaunchDescription:
    def __init__(self, entities):
        self.entities = list(entities)


def _launch_api():
    names = {'launch': {'LaunchDescription': _LaunchDescription},
             'launch.actions': {'DeclareLaunchArgument': type('DeclareLaunchArgument', (_Action,), {}),
                                'OpaqueFunction': _OpaqueFunction,
                                'IncludeLaunchDescription': type('IncludeLaunchDescription', (_Action,), {})},
             'launch.conditions': {'IfCondition': type('IfCondition', (_Action,), {})},
             'launch.launch_description_sources': {
                 'PythonLaunchDescriptionSource': type('PythonLaunchDescriptionSource', (_Action,), {})},
             'launch.substitutions': {'LaunchConfiguration': _LaunchConfiguration,
                                      'PathJoinSubstitution': type('PathJoinSubstitution', (_Action,), {})},
             'launch_ros': {},
             'launch_ros.actions': {'Node': type('Node', (_Action,), {})},
             'launch_ros.substitutions': {'FindPackageShare': type('FindPackageShare', (_Action,), {})}}
    modules = {}
    for name, attrs in names.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        modules[name] = module
    return modules


@pytest.fixture()
def launch_file(monkeypatch):
    for name, module in _launch_api().items():
        monkeypatch.setitem(sys.modules, name, module)

    def load(name):
        spec = importlib.util.spec_from_file_location(name.replace('.', '_'), ROOT / 'launch' / name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.generate_launch_description()
    return load


def _arguments(description) -> dict:
    return {a.args[0]: a.kwargs.get('default_value') for a in description.entities
            if type(a).__name__ == 'DeclareLaunchArgument'}


def _expand(description, **given):
    """The Node actions of the description's OpaqueFunctions for the given launch arguments."""
    context = types.SimpleNamespace(launch_configurations={**_arguments(description), **given})
    nodes = [e for e in description.entities if type(e).__name__ == 'Node']
    for e in description.entities:
        if isinstance(e, _OpaqueFunction):
            nodes += e.function(context)
    return nodes


def _spec(node) -> NodeSpec:
    kw = node.kwargs
    params = kw.get('parameters', [])
    overrides = {k: v for p in params if isinstance(p, dict) for k, v in p.items()}
    return NodeSpec(kw['executable'], kw['name'], kw.get('namespace', ''), overrides,
                    tuple(kw.get('arguments', ())), any(not isinstance(p, dict) for p in params))


def _console_scripts() -> dict:
    tree = ast.parse((ROOT / 'setup.py').read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, 'id', '') == 'setup')
    entry = ast.literal_eval(next(k.value for k in call.keywords if k.arg == 'entry_points'))
    return dict(line.replace(' ', '').split('=') for line in entry['console_scripts'])


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize('num_agents, ego, sim_time', [('5', '1', 'true'), ('3', '0', 'false'), ('1', '0', 'true')])
def test_coop_perception_launch_starts_what_the_launcher_starts(launch_file, num_agents, ego, sim_time):
    description = launch_file('coop_perception.launch.py')
    defaults = _arguments(description)
    assert (defaults['num_agents'], defaults['ego_id']) == (str(DEFAULT_AGENTS), str(DEFAULT_EGO))
    nodes = _expand(description, num_agents=num_agents, ego_id=ego, use_sim_time=sim_time, config=str(CONFIG))
    assert [_spec(n) for n in nodes] == node_specs(int(num_agents), int(ego), sim_time == 'true')
    assert all(n.kwargs['parameters'][0] == str(CONFIG) for n in nodes)


def test_v2x_replay_launch_adds_the_player_and_rviz(launch_file):
    description = launch_file('v2x_replay.launch.py')
    args = _arguments(description)
    assert args['bag'] is None and (args['num_agents'], args['ego_id']) == (str(DEFAULT_AGENTS), str(DEFAULT_EGO))
    include = next(e for e in description.entities if type(e).__name__ == 'IncludeLaunchDescription')
    source = include.args[0].args[0].args[0]
    assert source[-2:] == ['launch', 'coop_perception.launch.py']
    forwarded = dict(include.kwargs['launch_arguments'])
    assert forwarded['use_sim_time'] == 'true'
    assert {k: v.name for k, v in forwarded.items() if k != 'use_sim_time'} == {
        'num_agents': 'num_agents', 'ego_id': 'ego_id', 'config': 'config'}
    for loop in ('false', 'true'):
        nodes = _expand(description, bag='/data/scene0', rate='0.5', loop=loop, num_agents='3')
        player = [_spec(n) for n in nodes if n.kwargs.get('package') == 'coop_perception']
        assert player == [player_spec('/data/scene0', 3, 0.5, loop == 'true')]
    rviz = next(n for n in _expand(description, bag='b', rate='1.0', loop='false', num_agents='5')
                if n.kwargs['package'] == 'rviz2')
    assert rviz.kwargs['arguments'][1].args[0][1:] == ['config', 'coop_perception.rviz']
    assert rviz.kwargs['condition'].args[0].name == 'rviz'


def test_launch_files_run_installed_executables(launch_file):
    scripts = _console_scripts()
    for exe in NODES + ('bag_player',):
        assert scripts[exe] == f'coop_perception.ros.{exe}:main'   # what `coop-perception launch` runs with -m
        module = importlib.import_module(f'coop_perception.ros.{exe}')
        assert callable(module.main)
    nodes = _expand(launch_file('coop_perception.launch.py'), config='c') + _expand(
        launch_file('v2x_replay.launch.py'), bag='b')
    ours = {n.kwargs['executable'] for n in nodes if n.kwargs['package'] == 'coop_perception'}
    assert ours == set(NODES) | {'bag_player'} and ours <= set(scripts)


def _flatten(tree: dict, prefix='') -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f'{prefix}{k}.'))
        else:
            out[f'{prefix}{k}'] = v
    return out


def test_parameter_file_holds_every_default_and_nothing_else():
    pytest.importorskip('rclpy')
    config = yaml.safe_load(CONFIG.read_text())
    shared = _flatten(config['/**']['ros__parameters'])
    set_by_launch = {k for spec in node_specs() for k in spec.parameters}
    declared_somewhere = set()
    for name in NODES:
        module = importlib.import_module(f'coop_perception.ros.{name}')
        params = {p.name: p for p in module.PARAMS}
        declared_somewhere |= set(params)
        own = _flatten(config[f'/**/{name}']['ros__parameters'])
        assert not set(own) & set(shared)
        assert set(own) <= set(params), f'{name}: {set(own) - set(params)} are not parameters'
        values = {**{k: v for k, v in shared.items() if k in params}, **own}
        assert set(values) == set(params) - set_by_launch, name
        for key, value in values.items():
            p = params[key]
            assert value == p.default and type(value) is type(p.default), f'{name}.{key}: {value!r} vs {p.default!r}'
            if p.range is not None:
                assert all(p.range[0] <= v <= p.range[1] for v in (value if isinstance(value, list) else [value]))
            assert p.description
    assert set(shared) <= declared_somewhere
    assert config.keys() == {'/**'} | {f'/**/{n}' for n in NODES}


def test_rviz_config_shows_the_fused_and_true_boxes():
    rviz = yaml.safe_load((ROOT / 'config' / 'coop_perception.rviz').read_text())
    topics = {d['Topic']['Value'] for d in rviz['Visualization Manager']['Displays'] if 'Topic' in d}
    assert {'/coop/detections', '/ground_truth/markers', '/agent1/lidar', '/agent1/coop/detections'} <= topics
    assert rviz['Visualization Manager']['Global Options']['Fixed Frame'] == 'map'


def test_cli_prints_the_commands_and_rejects_bad_arguments(capsys, tmp_path):
    assert cli.main(['launch', str(CONFIG), '--agents', '3', '--ego', '2', '--print']) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [' '.join(s.command(CONFIG)) for s in node_specs(3, 2)]
    assert '-r __ns:=/agent2 --params-file' in lines[-1] and lines[-1].endswith('-p agents:=[0,1]')
    assert cli.main(['launch', '--agents', '3', '--ego', '3', '--print']) == 2
    assert capsys.readouterr().err.count('\n') == 1
    assert cli.main(['launch', str(tmp_path / 'none.yaml'), '--print']) == 2
    assert 'no such parameter file' in capsys.readouterr().err


# --------------------------------------------------------------------------- network mode and faults
def test_local_mode_sets_loopback_and_network_mode_keeps_the_environment():
    user = {'ROS_DOMAIN_ID': '7', 'ROS_AUTOMATIC_DISCOVERY_RANGE': 'SUBNET', 'ROS_STATIC_PEERS': '10.0.0.2',
            'RMW_IMPLEMENTATION': 'rmw_fastrtps_cpp', 'FASTDDS_DEFAULT_PROFILES_FILE': '/etc/fastdds.xml'}
    local = Launch(node_specs(), CONFIG, env=user).env
    assert local == {**user, 'ROS_AUTOMATIC_DISCOVERY_RANGE': 'LOCALHOST', 'ROS_LOCALHOST_ONLY': '1'}
    assert Launch(node_specs(), CONFIG, env=user, local_discovery=False).env == user
    assert user['ROS_AUTOMATIC_DISCOVERY_RANGE'] == 'SUBNET'   # the caller's dict is left alone


def test_only_starts_the_nodes_of_the_given_agents(capsys):
    assert cli.main(['launch', str(CONFIG), '--agents', '3', '--ego', '1', '--only', '0', '--network', '--print']) == 0
    assert capsys.readouterr().out.splitlines() == [' '.join(node_specs(3, 1)[0].command(CONFIG))]
    assert cli.main(['launch', str(CONFIG), '--agents', '3', '--ego', '1', '--only', '1', '--print']) == 0
    assert [line.split()[2] for line in capsys.readouterr().out.splitlines()] == [
        'coop_perception.ros.lidar_detector', 'coop_perception.ros.v2x_channel', 'coop_perception.ros.trust_fusion']
    assert cli.main(['launch', '--agents', '3', '--only', '3', '--print']) == 2
    assert capsys.readouterr().err.count('\n') == 1
    with pytest.raises(SystemExit):
        cli.main(['launch', '--local', '--network', '--print'])
    assert 'not allowed with argument' in capsys.readouterr().err


@pytest.mark.parametrize('discovery, udp', [
    ({'ROS_AUTOMATIC_DISCOVERY_RANGE': 'LOCALHOST'}, False), ({'ROS_LOCALHOST_ONLY': '1'}, False),
    ({'ROS_AUTOMATIC_DISCOVERY_RANGE': 'SUBNET', 'ROS_LOCALHOST_ONLY': '0'}, True),
    ({'ROS_AUTOMATIC_DISCOVERY_RANGE': 'SYSTEM_DEFAULT'}, True), ({}, True)])
def test_large_shm_profile_keeps_udp_unless_discovery_is_local(discovery, udp):
    # rmw_fastrtps adds its loopback UDP transport only for LOCALHOST discovery: without UDPv4 in
    # the profile a detector could reach no other computer.
    environ = dict(discovery)
    path = use_large_shm_segment(8, environ)
    try:
        profile = Path(path).read_text()
        assert environ['FASTDDS_DEFAULT_PROFILES_FILE'] == path and '<segment_size>8388608<' in profile
        assert ('<transport_id>coop_perception_udp</transport_id></userTransports>' in profile) == udp
    finally:
        Path(path).unlink()
    for own in ({'FASTDDS_DEFAULT_PROFILES_FILE': 'mine.xml'}, {'FASTDDS_BUILTIN_TRANSPORTS': 'LARGE_DATA'},
                {'RMW_IMPLEMENTATION': 'rmw_cyclonedds_cpp'}):
        environ = {**discovery, **own}
        assert use_large_shm_segment(8, environ) is None and environ == {**discovery, **own}


@pytest.mark.parametrize('text, problem', [(b'/**:\n  ros__parameters: {a: [1, 2\n', 'not valid YAML at line'),
                                           (b'- 1\n- 2\n', 'not a ROS parameter file'),
                                           (b'/**:\n  ros__parameters: 3\n', 'not a ROS parameter file'),
                                           (b'\xff\xfe\x00garbage', 'not UTF-8')])
def test_unparsable_parameter_file_is_one_line_and_exit_2(capsys, tmp_path, text, problem):
    config = tmp_path / 'params.yaml'
    config.write_bytes(text)
    started = time.monotonic()
    assert cli.main(['launch', str(config), '--agents', '1', '--ego', '0', '--log-dir', str(tmp_path / 'logs')]) == 2
    assert time.monotonic() - started < 5                 # refused before any node starts
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and problem in err and str(config) in err, err
    assert not (tmp_path / 'logs').exists()


def _launch_env() -> dict:
    # Loopback and a domain of our own, whatever the launcher's local mode does.
    return {**os.environ, 'ROS_DOMAIN_ID': str(DOMAIN_ID), 'ROS_AUTOMATIC_DISCOVERY_RANGE': 'LOCALHOST',
            'ROS_LOCALHOST_ONLY': '1', 'PYTHONUNBUFFERED': '1'}


def _processes_using(path: Path) -> list[int]:
    """Pids of the processes whose command line names ``path`` (a file of this test only)."""
    pids = []
    for cmdline in Path('/proc').glob('[0-9]*/cmdline'):
        try:
            if str(path).encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue   # ended meanwhile
    return pids


def _start_launch(tmp_path: Path, config: dict) -> tuple[subprocess.Popen, Path]:
    params = tmp_path / 'params.yaml'
    params.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, '-m', 'coop_perception.cli', 'launch', str(params), '--agents', '1', '--ego', '0',
           '--wall-time', '--log-dir', str(tmp_path / 'logs')]
    env = {**_launch_env(), 'TMPDIR': str(tmp_path)}   # Fast DDS profiles of killed nodes stay in the test's folder
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), params


def _wait_until(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _kill_leftovers(launch: subprocess.Popen, params: Path) -> list[int]:
    """Kill what this test started and is still running; returns the nodes that were left."""
    if launch.poll() is None:
        launch.kill()
        launch.wait()
    left = [pid for pid in _processes_using(params) if pid != launch.pid]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return left


@pytest.mark.slow
def test_sigterm_stops_every_node(tmp_path):
    launch, params = _start_launch(tmp_path, yaml.safe_load(CONFIG.read_text()))
    logs = tmp_path / 'logs'
    ready = {'agent0_lidar_detector.log': 'detector ready', 'agent0_v2x_channel.log': 'relaying agents',
             'agent0_trust_fusion.log': 'fusion ready'}
    try:
        assert _wait_until(lambda: all((logs / f).exists() and word in (logs / f).read_text()
                                       for f, word in ready.items()), 150), launch.poll()
        nodes = [pid for pid in _processes_using(params) if pid != launch.pid]
        assert len(nodes) == 3
        launch.send_signal(signal.SIGTERM)
        assert launch.wait(60) == 0, launch.stderr.read()
        assert not _processes_using(params)
        for f in ready:
            assert 'Traceback' not in (logs / f).read_text(), (logs / f).read_text()
    finally:
        assert not _kill_leftovers(launch, params)


@pytest.mark.slow
def test_node_failing_at_start_up_stops_the_others(tmp_path):
    config = yaml.safe_load(CONFIG.read_text())
    config['/**/v2x_channel']['ros__parameters']['status_period_s'] = 0.0   # out of its range
    launch, params = _start_launch(tmp_path, config)
    try:
        assert launch.wait(90) == 2
        err = launch.stderr.read().strip().splitlines()
        assert len(err) == 1, err
        assert err[0].startswith('error: agent0/v2x_channel failed at start-up (exit code 2): ')
        assert 'status_period_s' in err[0] and err[0].endswith('stopping the other nodes')
        assert not _processes_using(params)
    finally:
        assert not _kill_leftovers(launch, params)
