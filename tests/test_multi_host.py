"""Two computers: the road-side unit (agent 0) and the ego (agent 1) in two network namespaces
linked by a veth pair, each running its share of the nodes with `coop-perception launch --network
--only K`. Discovery crosses the link by multicast (ROS_AUTOMATIC_DISCOVERY_RANGE=SUBNET); the
namespaces have no other interface, so nothing reaches beyond them.

Every ROS process of the test runs inside a namespace: the RSU's detector in one; the ego's
detector, V2X channel and fusion, the bag player (for both agents: one /clock for the whole
deployment, as a real one has one synchronised wall clock) and a listener in the other. The RSU's
scans and the ego's clock cross the link one way, the RSU's features the other way.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

rclpy = pytest.importorskip('rclpy')

from ros_fixtures import write_replay_inputs  # noqa: E402

pytestmark = pytest.mark.slow

DOMAIN_ID = 78
AGENTS, RSU, EGO = 2, 0, 1
ADDRESSES = {RSU: '10.231.0.1/24', EGO: '10.231.0.2/24'}
START_TIMEOUT_S = 120


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return 'creating network namespaces needs root'
    if shutil.which('ip') is None:
        return 'no `ip` command (iproute2)'
    if subprocess.run(['ip', 'netns', 'list'], capture_output=True).returncode != 0:
        return '`ip netns` is not available here'
    return None


def _ip(*args: str) -> None:
    subprocess.run(['ip', *args], check=True, capture_output=True, text=True)


@pytest.fixture()
def hosts():
    """agent -> (namespace, veth) of two namespaces linked by a veth pair; deleted afterwards with
    every process still running in them."""
    reason = _netns_unavailable()
    if reason:
        pytest.skip(reason)
    tag = f'{os.getpid() % 100000}'
    names = {k: (f'coop_mh{tag}_{k}', f'cpmh{tag}v{k}') for k in (RSU, EGO)}
    try:
        for ns, _ in names.values():
            try:
                _ip('netns', 'add', ns)
            except subprocess.CalledProcessError as e:   # e.g. a container without CAP_SYS_ADMIN
                pytest.skip(f'cannot create a network namespace: {e.stderr.strip()}')
        (rsu_ns, rsu_if), (ego_ns, ego_if) = names[RSU], names[EGO]
        _ip('link', 'add', rsu_if, 'netns', rsu_ns, 'type', 'veth', 'peer', 'name', ego_if, 'netns', ego_ns)
        for k, (ns, veth) in names.items():
            _ip('-n', ns, 'addr', 'add', ADDRESSES[k], 'dev', veth)
            _ip('-n', ns, 'link', 'set', 'lo', 'up')
            _ip('-n', ns, 'link', 'set', veth, 'up')
        yield names
    finally:
        for ns, _ in names.values():
            pids = subprocess.run(['ip', 'netns', 'pids', ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                os.kill(int(pid), signal.SIGKILL)
            subprocess.run(['ip', 'netns', 'del', ns], capture_output=True)


def _namespace_env(tmp: Path) -> dict:
    """The user's environment of a multi-host deployment: subnet discovery, our own domain, Fast
    DDS with the package's own profile (nothing of the user's, nothing forcing loopback)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ('ROS_LOCALHOST_ONLY', 'ROS_STATIC_PEERS', 'FASTDDS_DEFAULT_PROFILES_FILE',
                        'FASTDDS_BUILTIN_TRANSPORTS')}
    return {**env, 'ROS_AUTOMATIC_DISCOVERY_RANGE': 'SUBNET', 'ROS_DOMAIN_ID': str(DOMAIN_ID),
            'RMW_IMPLEMENTATION': 'rmw_fastrtps_cpp', 'TMPDIR': str(tmp), 'PYTHONUNBUFFERED': '1'}


def _in_namespace(ns: str, cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, 'w') as out:
        return subprocess.Popen(['ip', 'netns', 'exec', ns, *cmd], env=env, stdout=out, stderr=subprocess.STDOUT)


def _launch(ns: str, k: int, params: Path, env: dict, tmp: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, '-m', 'coop_perception.cli', 'launch', str(params), '--network', '--agents', str(AGENTS),
           '--ego', str(EGO), '--only', str(k), '--log-dir', str(tmp / f'logs{k}'), *extra]
    return _in_namespace(ns, cmd, env, tmp / f'launch{k}.log')


def _rx_bytes(ns: str, veth: str) -> int:
    out = subprocess.run(['ip', 'netns', 'exec', ns, 'cat', f'/sys/class/net/{veth}/statistics/rx_bytes'],
                         capture_output=True, text=True, check=True).stdout
    return int(out)


def _logs(tmp: Path) -> str:
    files = sorted(tmp.glob('launch*.log')) + sorted(tmp.glob('logs*/*.log')) + [tmp / 'listener.log']
    return '\n'.join(f'--- {p.relative_to(tmp)}\n' + p.read_text()[-2000:] for p in files if p.exists())


def _last_report(path: Path) -> dict:
    lines = [line for line in path.read_text().splitlines() if line.startswith('{')] if path.exists() else []
    return json.loads(lines[-1]) if lines else {}


def test_rsu_features_cross_the_link_and_are_fused_on_the_ego(hosts, tmp_path):
    started = time.monotonic()
    params = write_replay_inputs(tmp_path, AGENTS, {'status_period_s': 0.5, 'max_future_s': 0.3})
    env = _namespace_env(tmp_path)
    (rsu_ns, _), (ego_ns, ego_if) = hosts[RSU], hosts[EGO]
    rx_before = _rx_bytes(ego_ns, ego_if)
    processes = [
        _launch(rsu_ns, RSU, params, env, tmp_path),
        _launch(ego_ns, EGO, params, env, tmp_path, '--bag', str(tmp_path / 'bag'), '--loop', '--rate', '0.5'),
        _in_namespace(ego_ns, [sys.executable, __file__, 'listen'], env, tmp_path / 'listener.log')]
    try:
        deadline = started + START_TIMEOUT_S + 30
        report = {}
        while not (report.get('features', 0) >= 3 and report.get('fused_inputs', 0) >= 3
                   and report.get('used')):
            assert time.monotonic() < deadline, f'{report}\n{_logs(tmp_path)}'
            assert all(p.poll() is None for p in processes), _logs(tmp_path)
            time.sleep(1.0)
            report = _last_report(tmp_path / 'listener.log')
        # The features came over the veth (not through shared memory, which Fast DDS uses only
        # between participants of one host): the ego's side received at least their bytes.
        assert _rx_bytes(ego_ns, ego_if) - rx_before >= report['feature_bytes']
        assert report['frame_ids'] == [f'agent{RSU}/lidar']
        status = report['fusion']
        assert status['agents'][str(RSU)]['inputs'] >= 3
        assert not [r for r in status['rejected'] if r.startswith(('error:', 'bad_', 'unknown_agent'))], status
        for p in processes[:2]:
            p.send_signal(signal.SIGTERM)
        assert [p.wait(60) for p in processes[:2]] == [0, 0], _logs(tmp_path)
        assert 'Traceback' not in _logs(tmp_path), _logs(tmp_path)
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert time.monotonic() - started < 180


# --------------------------------------------------------------------------- the listener, run in the ego's namespace
def listen() -> None:
    """Count the RSU's features, keep the fusion's newest status and whether the RSU's input was
    ever fused into an ego frame; print a JSON report every second."""
    from rclpy.executors import SingleThreadedExecutor

    from coop_perception.ros import convert as cv
    from coop_perception.ros.node import RELIABLE_QOS

    msgs = cv.RclpyMessages()
    rclpy.init()
    node = rclpy.create_node('multi_host_listener')
    report = {'features': 0, 'feature_bytes': 0, 'frame_ids': [], 'fused_inputs': 0, 'used': False, 'fusion': None}
    lock = threading.Lock()

    def on_features(m):
        with lock:
            report['features'] += 1
            report['feature_bytes'] += len(m.data)
            report['frame_ids'] = sorted(set(report['frame_ids']) | {m.header.frame_id})

    def on_status(m):
        with lock:
            report['fusion'] = json.loads(m.data)
            rsu = report['fusion']['agents'].get(str(RSU), {})
            report['fused_inputs'] = rsu.get('inputs', 0)
            report['used'] |= rsu.get('used_age_s') is not None   # fused into an ego frame

    node.create_subscription(msgs.get_class('sensor_msgs/msg/PointCloud2'), f'/agent{RSU}/coop/features',
                             on_features, RELIABLE_QOS)
    node.create_subscription(msgs.get_class('std_msgs/msg/String'), '/coop/status', on_status, RELIABLE_QOS)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    threading.Thread(target=executor.spin, daemon=True).start()
    while True:
        time.sleep(1.0)
        with lock:
            print(json.dumps(report), flush=True)


if __name__ == '__main__' and sys.argv[1:] == ['listen']:
    listen()
