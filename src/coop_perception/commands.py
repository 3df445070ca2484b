"""How the ``coop-perception`` command line is put together: each package registers its own
commands with an ``add_cli(commands)`` function beside the code they run, on one `Commands` tree,
using the shared argument helpers below.

Registering imports nothing heavy (argparse and the package's paths only); a command imports what
it runs when it runs, so ``--help`` and the light commands never load torch or rclpy.
"""
from __future__ import annotations

import argparse
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from .errors import UserError
from .paths import package_path

MODELS = package_path('models')
MAX_DESCRIPTION = 200  # characters of an exception's message that an error line quotes
# Second-level commands, `coop-perception <group> <target>`.
GROUPS = {
    'bench': 'speed benchmarks (print tables)',
    'train': 'train a model (resumable)',
    'eval': 'evaluate (prints tables)',
    'calibrate': 'calibrate on validation data',
}


class Commands:
    """The subcommands of one parser; `add` creates the group subparsers on first use."""

    def __init__(self, parser: argparse.ArgumentParser):
        self._top = parser.add_subparsers(dest='command', required=True)
        self._groups: dict[str, argparse._SubParsersAction] = {}

    def add(self, name: str, func: Callable[[argparse.Namespace], int], help: str, *, group: str | None = None,
            **kwargs) -> argparse.ArgumentParser:
        """Register ``coop-perception [group] name``, which runs ``func(args)`` -> exit code."""
        if group is None:
            where = self._top
        else:
            if group not in self._groups:
                self._groups[group] = self._top.add_parser(group, help=GROUPS[group]).add_subparsers(
                    dest='target', required=True)
            where = self._groups[group]
        p = where.add_parser(name, help=help, **kwargs)
        p.set_defaults(func=func)
        return p


def positive(kind):
    """argparse type: a number of ``kind`` > 0."""
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f'must be > 0, got {text}')
        return value
    return parse


def non_negative(kind):
    """argparse type: a number of ``kind`` >= 0."""
    def parse(text):
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f'must be >= 0, got {text}')
        return value
    return parse


def require_file(path, what: str, hint: str = '') -> Path:
    """``path`` if it is a readable file, else a UserError naming it; ``what``: the kind of file,
    ``hint``: how to get one, for the message."""
    path = Path(path)
    if not path.exists():
        raise UserError(path, f'{what} not found{hint}')
    if not path.is_file():
        raise UserError(path, f'{what} is not a file')
    if not os.access(path, os.R_OK):
        raise UserError(path, f'{what} is not readable')
    return path


def require_writable(path, *, folder: bool) -> Path:
    """``path`` if it can be written: as a folder (created with its parents if missing, filled if
    there) or as a file (created or replaced, in a folder that exists). Checked before any work,
    so that a long run does not fail at its end; a UserError names the path, or the ancestor that
    stands in the way."""
    path = Path(path)
    if path.exists():
        if folder != path.is_dir():
            raise UserError(path, 'exists and is not a folder' if folder else 'is a folder, expected a file name')
        if not os.access(path, os.W_OK | (os.X_OK if folder else 0)):
            raise UserError(path, 'is not writable')
        return path
    ancestor = next(p for p in path.parents if p.exists())
    if not folder and ancestor != path.parent and ancestor.is_dir():
        raise UserError(path.parent, f'folder does not exist, so {path} cannot be written')
    if not ancestor.is_dir():
        raise UserError(ancestor, f'is not a folder, so {path} cannot be created under it')
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(ancestor, f'is not writable, so {path} cannot be created')
    return path


def require_checkpoint(path, what: str, hint: str = '') -> Path:
    """``path`` if it is a readable file in the format ``torch.save`` writes (a zip archive), else
    a UserError naming it (`require_file`'s ``what`` and ``hint``)."""
    import zipfile

    path = require_file(path, what, hint)
    if not zipfile.is_zipfile(path):
        raise UserError(path, f'not a {what}: not the zip archive that torch.save writes')
    return path


def output_file(text: str) -> str:
    """argparse type: a file that can be written (`require_writable`)."""
    require_writable(text, folder=False)
    return text


def output_folder(text: str) -> str:
    """argparse type: a folder that can be created or written into (`require_writable`)."""
    require_writable(text, folder=True)
    return text


def yaml_file(what: str):
    """argparse type: a readable UTF-8 YAML file that parses (what it must hold is its reader's
    business)."""
    def check(text):
        import yaml

        with reading(require_file(text, what), what):
            yaml.safe_load(Path(text).read_text(encoding='utf-8'))
    return _checked(check)


def _checked(check):
    """An argparse type that runs ``check(text)`` (which raises UserError) and keeps ``text``."""
    def parse(text):
        check(text)
        return text
    return parse


@contextmanager
def reading(path, what: str):
    """Failures of parsing ``path`` (garbage, a wrong format, text that is not UTF-8) become a
    UserError naming it: what is in a user's file is theirs to fix, not a traceback."""
    import pickle
    import zipfile

    import yaml

    try:
        yield
    except UserError:
        raise
    except (OSError, ValueError, TypeError, KeyError, EOFError, RuntimeError, pickle.UnpicklingError,
            zipfile.BadZipFile, yaml.YAMLError) as err:
        raise UserError(path, f'not a valid {what}: {describe(err)}') from None


def describe(err: BaseException) -> str:
    """An exception as one line: where text is not UTF-8, the entry a mapping lacks, else its
    message with the line breaks folded."""
    if isinstance(err, UnicodeDecodeError):
        return f'not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start})'
    if isinstance(err, KeyError):
        return f'no entry {err.args[0]!r}' if err.args else 'an entry is missing'
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = ' '.join(str(err).split()) or type(err).__name__
    return text if len(text) <= MAX_DESCRIPTION else text[:MAX_DESCRIPTION - 3] + '...'


def add_json(p: argparse.ArgumentParser, what: str = 'the results') -> None:
    p.add_argument('--json', type=output_file, help=f'also write {what} as JSON here')


def write_json(args: argparse.Namespace, result) -> None:
    """Write ``result`` where ``--json`` (`add_json`) says, if it says anywhere."""
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


def add_detector_args(p: argparse.ArgumentParser, weights: bool = True) -> None:
    from .torch_device import DEVICE_HELP

    p.add_argument('--config', type=yaml_file('detector config'), default=str(MODELS / 'detector.yaml'),
                   help='detector config YAML')
    if weights:
        p.add_argument('--weights', default=str(MODELS / 'detector.pt'), help='detector checkpoint')
    p.add_argument('--device', default='cpu', help=DEVICE_HELP + '; default cpu')


def add_fusion_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument('--fusion', default=str(MODELS / 'fusion.pt'), help='trust fusion checkpoint')
    p.add_argument('--gate', type=yaml_file('trust gate'), default=str(MODELS / 'trust_gate.yaml'),
                   help='calibrated gate, for methods that use one')


def add_cache_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument('--cache', type=output_folder,
                   help='feature cache folder (default: DATA/feature_cache), one subfolder per detector; '
                        'built if missing')


def add_run_folder_args(p: argparse.ArgumentParser, iterations_help: str) -> None:
    """A resumable training run's options."""
    p.add_argument('--out', required=True, type=output_folder, help='run folder: checkpoints, log, final weights')
    p.add_argument('--iterations', type=positive(int), help=iterations_help)
    p.add_argument('--restart', action='store_true', help='ignore an existing checkpoint in --out')


def print_stage_table(result: dict, stages) -> None:
    """A benchmark's per-stage 'median_ms' and 'p90_ms' (stages without a value are left out)."""
    print(f"{'stage':<16}{'median ms':>10}{'p90 ms':>10}")
    for stage in stages:
        if result['median_ms'][stage] is not None:
            print(f"{stage:<16}{result['median_ms'][stage]:>10.1f}{result['p90_ms'][stage]:>10.1f}")
