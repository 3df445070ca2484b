"""`colcon build` of the package and the installed ament layout."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
    for node in ('bag_player', 'lidar_detector', 'v2x_channel', 'trust_fusion'):
        assert os.access(lib / node, os.X_OK), node
    r = subprocess.run([str(lib / 'v2x_channel'), '--help'], capture_output=True, text=True, env=run_env)
    assert r.returncode == 0 and 'V2X' in r.stdout, r.stderr
    for name in ('coop_perception.launch.py', 'v2x_replay.launch.py'):
        assert (share / 'launch' / name).exists(), name
    assert (share / 'config' / 'coop_perception.yaml').exists() and (share / 'config' / 'coop_perception.rviz').exists()
