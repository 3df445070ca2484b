"""The package's layering: imports flow one way, from base modules up to the command line, and only
``ros/`` (and ``cli.py``, inside its commands) imports rclpy.

Both checks walk the source tree, so a new module is covered without touching this file; a new
subpackage has to be given its place in LAYERS.
"""
import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = 'coop_perception'
SRC = Path(__file__).resolve().parents[1] / 'src' / PACKAGE

# Lowest first. A module may import from its own layer or a lower one. 'base' holds every
# top-level module of the package (geometry, errors, helpers) except cli.py.
LAYERS = ('base', 'data', 'detection', 'fusion', 'eval', 'ros', 'cli')
ROS_LAYERS = ('ros', 'cli')  # the only ones that may import rclpy; cli.py only inside functions


def _modules() -> list[tuple[str, Path]]:
    """(dotted name, path) of every module of the package, packages as their ``__init__``."""
    out = []
    for path in sorted(SRC.rglob('*.py')):
        parts = path.relative_to(SRC.parent).with_suffix('').parts
        if parts[-1] == '__init__':
            parts = parts[:-1]
        out.append(('.'.join(parts), path))
    return out


def _layer(module: str) -> str:
    """The layer of a module of the package, or of a name inside one."""
    parts = module.split('.')[1:]
    if not parts:
        return 'base'
    if (SRC / parts[0]).is_dir():
        if parts[0] not in LAYERS:
            raise AssertionError(f'{PACKAGE}.{parts[0]} is a new subpackage: give it its place in LAYERS')
        return parts[0]
    return 'cli' if parts[0] == 'cli' else 'base'


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == 'TYPE_CHECKING') or (
        isinstance(test, ast.Attribute) and test.attr == 'TYPE_CHECKING')


class _Imports(ast.NodeVisitor):
    """Every import statement of a module, at any depth, as (imported module or name, line, inside
    a function). Relative imports are resolved. ``if TYPE_CHECKING:`` bodies are left out: they
    name a type for annotations and load nothing at run time."""

    def __init__(self, module: str, is_package: bool):
        self.package = module.split('.') if is_package else module.split('.')[:-1]
        self.found: list[tuple[str, int, bool]] = []
        self._depth = 0

    def _function(self, node):
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_If(self, node: ast.If):
        if _is_type_checking(node.test):
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import):
        self.found += [(alias.name, node.lineno, self._depth > 0) for alias in node.names]

    def visit_ImportFrom(self, node: ast.ImportFrom):
        if node.level:
            base = self.package[:len(self.package) - node.level + 1]
            source = '.'.join(base + ([node.module] if node.module else []))
        else:
            source = node.module
        # 'from pkg import name' may import a submodule: judge 'pkg.name'.
        self.found += [(source if alias.name == '*' else f'{source}.{alias.name}', node.lineno, self._depth > 0)
                       for alias in node.names]


def _is_within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + '.')


def _imports(module: str, path: Path, modules) -> list[tuple[str, int, bool]]:
    """The imports of one module, names of the package reduced to the module of ``modules``
    they are in (one entry for 'from m import a, b')."""
    visitor = _Imports(module, path.name == '__init__.py')
    visitor.visit(ast.parse(path.read_text(), str(path)))
    out = []
    for name, line, in_function in visitor.found:
        while _is_within(name, PACKAGE) and name not in modules and '.' in name:
            name = name.rsplit('.', 1)[0]
        out.append((name, line, in_function))
    return list(dict.fromkeys(out))


def test_module_discovery_sees_the_layers():
    modules = dict(_modules())
    assert {_layer(m) for m in modules} == set(LAYERS)
    assert f'{PACKAGE}.data.bag' in modules and f'{PACKAGE}.cli' in modules


def test_imports_point_down_the_layers():
    modules = dict(_modules())
    upward, ros_outside = [], []
    for module, path in modules.items():
        layer = _layer(module)
        for name, line, in_function in _imports(module, path, modules):
            where = f'{path.relative_to(SRC.parent)}:{line}'
            if _is_within(name, PACKAGE):
                target = _layer(name)
                if LAYERS.index(target) > LAYERS.index(layer):
                    upward.append(f'{where}: {module} ({layer}) -> {name} ({target})')
                if target == 'ros' and layer not in ROS_LAYERS:
                    ros_outside.append(f'{where}: {module} imports {name}')
            if _is_within(name, 'rclpy') and not (layer == 'ros' or (layer == 'cli' and in_function)):
                ros_outside.append(f'{where}: {module} imports {name}'
                                   + (' at module level' if layer == 'cli' else ''))
    report = []
    if upward:
        report.append('imports against the layering ' + ' -> '.join(LAYERS) + ':\n' + '\n'.join(upward))
    if ros_outside:
        report.append('ROS imports outside ros/ (cli.py: only inside functions):\n' + '\n'.join(ros_outside))
    assert not report, '\n\n'.join(report)


# Runs in a fresh interpreter: rclpy unimportable (as without a ROS install), then every module
# given on the command line is imported; prints {module: error} of those that fail.
_WITHOUT_RCLPY = '''
import contextlib, importlib, io, json, sys, traceback

class NoRclpy:
    def find_spec(self, name, path=None, target=None):
        if name == 'rclpy' or name.startswith('rclpy.'):
            raise ImportError(f'no rclpy in this test ({name})')
        return None

sys.meta_path.insert(0, NoRclpy())
failures = {}
for module in sys.argv[1:]:
    try:
        importlib.import_module(module)
    except Exception:
        failures[module] = traceback.format_exc(limit=-4)
# The parser imports the bag, play and launch subcommands: --help has to work without ROS too.
try:
    with contextlib.redirect_stdout(io.StringIO()):
        importlib.import_module('coop_perception.cli').main(['--help'])
except SystemExit as done:
    if done.code:
        failures['coop_perception.cli --help'] = f'exit code {done.code}'
except Exception:
    failures['coop_perception.cli --help'] = traceback.format_exc(limit=-4)
print(json.dumps(failures))
'''


def test_modules_outside_ros_import_without_rclpy():
    modules = [m for m, _ in _modules() if _layer(m) not in ROS_LAYERS]
    out = subprocess.run([sys.executable, '-c', _WITHOUT_RCLPY, *modules], capture_output=True, text=True,
                         cwd=SRC.parent, timeout=300)
    assert out.returncode == 0, out.stderr
    failures = json.loads(out.stdout.strip().splitlines()[-1])
    assert not failures, 'fail to import without rclpy:\n' + '\n'.join(
        f'--- {module}\n{error}' for module, error in failures.items())


def test_registering_every_command_loads_neither_torch_nor_rclpy():
    """Each package's add_cli imports only what registering needs: `--help` and light commands
    such as `info` or `play` start without torch (and without rclpy until a node starts)."""
    code = ('import sys; from coop_perception import cli; cli.build_parser(); '
            'print(sorted(m for m in ("torch", "rclpy", "spconv", "open3d") if m in sys.modules))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=SRC.parent, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == '[]', f'building the parser imported {out.stdout.strip()}'
