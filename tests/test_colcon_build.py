"""`colcon build` of the package and the installed ament layout."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOMAIN_ID = 64


def test_colcon_build_installs_ament_layout(tmp_path):
    colcon = Path(sys.executable).with_name('colcon')
    assert colcon.exists(), 'colcon is installed with the test requirements'
    src = tmp_path / 'ws' / 'src' / 'coop_perception'
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns('.venv', '.git', 'build', 'install', 'log',
                                                             'out', '__pycache__', '*.egg-info'))
    env = dict(os.environ, COLCON_HOME=str(tmp_path / 'colcon_home'))
    r = subprocess.run([str(colcon), 'build', '--base-paths', 'src'], cwd=tmp_path / 'ws', env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    prefix = tmp_path / 'ws' / 'install' / 'coop_perception'
    lib = prefix / 'lib' / 'coop_perception'
    assert (lib / 'coop-perception').exists() and os.access(lib / 'coop-perception', os.X_OK)
    share = prefix / 'share' / 'coop_perception'
    assert (share / 'package.xml').exists()
    for folder in ('launch', 'config', 'models'):
        assert (share / folder).is_dir(), folder
    assert (prefix / 'share' / 'ament_index' / 'resource_index' / 'packages' / 'coop_perception').exists()
    # the installed executables run
    run_env = dict(env, PYTHONPATH=str(next((prefix / 'lib').glob('python3*/site-packages'))))
    r = subprocess.run([str(lib / 'coop-perception'), '--help'], capture_output=True, text=True, env=run_env)
    assert r.returncode == 0 and 'synth' in r.stdout, r.stderr
    where = subprocess.run([sys.executable, '-c', 'import coop_perception; print(coop_perception.__file__)'],
                           capture_output=True, text=True, env=run_env).stdout
    assert where.startswith(str(prefix)), f'the installed package is not the one imported: {where}'
    _installed_cli_uses_the_shipped_models(lib, tmp_path, run_env)
    _installed_node_starts_with_the_shipped_models(lib, run_env)
    for node in ('bag_player', 'lidar_detector', 'v2x_channel', 'trust_fusion'):
        assert os.access(lib / node, os.X_OK), node
    r = subprocess.run([str(lib / 'v2x_channel'), '--help'], capture_output=True, text=True, env=run_env)
    assert r.returncode == 0 and 'V2X' in r.stdout, r.stderr
    for name in ('coop_perception.launch.py', 'v2x_replay.launch.py'):
        assert (share / 'launch' / name).exists(), name
    assert (share / 'config' / 'coop_perception.yaml').exists() and (share / 'config' / 'coop_perception.rviz').exists()


def _installed_cli_uses_the_shipped_models(lib: Path, tmp_path: Path, env: dict) -> None:
    """`eval detector` with its default --config/--weights: the files under share/, not the tree."""
    cli = str(lib / 'coop-perception')
    data = tmp_path / 'tiny'
    r = subprocess.run([cli, 'synth', '--out', str(data), '--scenes', '1', '--frames', '2', '--agents', '2',
                        '--quiet'], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([cli, 'eval', 'detector', '--data', str(data), '--agents', '1'], capture_output=True,
                       text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0 and 'car' in r.stdout, r.stdout + r.stderr


def _installed_node_starts_with_the_shipped_models(lib: Path, env: dict) -> None:
    """trust_fusion with default parameters loads the detector and fusion models from share/."""
    from coop_perception.ros.env import use_local_discovery

    env = use_local_discovery(dict(env, ROS_DOMAIN_ID=str(DOMAIN_ID)))
    node = subprocess.Popen([str(lib / 'trust_fusion'), '--ros-args', '-r', '__ns:=/agent1'], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, out = time.monotonic() + 120, []
        while time.monotonic() < deadline and node.poll() is None:
            line = node.stdout.readline()
            out.append(line)
            if 'trust fusion ready' in line:
                break
        assert 'trust fusion ready' in ''.join(out), ''.join(out)
        node.send_signal(signal.SIGINT)
        assert node.wait(timeout=30) == 0, ''.join(out) + node.stdout.read()
    finally:
        if node.poll() is None:
            node.kill()
