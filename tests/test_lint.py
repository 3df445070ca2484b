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


def test_no_function_is_longer_than_80_lines():
    import ast

    long = []
    for path in sorted((ROOT / 'src').rglob('*.py')):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f'{path.relative_to(ROOT)}:{node.lineno} {node.name} '
                            f'({node.end_lineno - node.lineno + 1} lines)')
    assert not long, 'split these functions:\n' + '\n'.join(long)
