"""How the ``coop-perception`` command line is put together: each package registers its own
commands with an ``add_cli(commands)`` function beside the code they run, on one `Commands` tree,
using the shared argument helpers below.

Registering imports nothing heavy (argparse and the package's paths only); a command imports what
it runs when it runs, so ``--help`` and the light commands never load torch or rclpy.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

from .paths import package_path

MODELS = package_path('models')
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


def add_json(p: argparse.ArgumentParser, what: str = 'the results') -> None:
    p.add_argument('--json', help=f'also write {what} as JSON here')


def write_json(args: argparse.Namespace, result) -> None:
    """Write ``result`` where ``--json`` (`add_json`) says, if it says anywhere."""
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


def add_detector_args(p: argparse.ArgumentParser, weights: bool = True) -> None:
    p.add_argument('--config', default=str(MODELS / 'detector.yaml'), help='detector config YAML')
    if weights:
        p.add_argument('--weights', default=str(MODELS / 'detector.pt'), help='detector checkpoint')


def add_fusion_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument('--fusion', default=str(MODELS / 'fusion.pt'), help='trust fusion checkpoint')
    p.add_argument('--gate', default=str(MODELS / 'trust_gate.yaml'),
                   help='calibrated gate, for methods that use one')


def add_cache_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument('--cache', help='feature cache folder (default: DATA/feature_cache), one subfolder per '
                                   'detector; built if missing')


def add_run_folder_args(p: argparse.ArgumentParser, iterations_help: str) -> None:
    """A resumable training run's options."""
    p.add_argument('--out', required=True, help='run folder: checkpoints, log, final weights')
    p.add_argument('--iterations', type=positive(int), help=iterations_help)
    p.add_argument('--restart', action='store_true', help='ignore an existing checkpoint in --out')


def print_stage_table(result: dict, stages) -> None:
    """A benchmark's per-stage 'median_ms' and 'p90_ms' (stages without a value are left out)."""
    print(f"{'stage':<16}{'median ms':>10}{'p90 ms':>10}")
    for stage in stages:
        if result['median_ms'][stage] is not None:
            print(f"{stage:<16}{result['median_ms'][stage]:>10.1f}{result['p90_ms'][stage]:>10.1f}")
