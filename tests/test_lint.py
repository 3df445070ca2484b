"""The linter (ruff, settings in ruff.toml) finds nothing in the package, its tests and launch files."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    ruff = Path(sys.executable).with_name('ruff')
    assert ruff.exists(), 'ruff is installed with the test requirements'
    r = subprocess.run([str(ruff), 'check', '--no-cache', 'src', 'tests', 'launch', 'setup.py'], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
