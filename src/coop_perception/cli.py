"""`coop-perception` command line. User mistakes print one line and exit with code 2.

Each package registers its own commands (``add_cli`` beside the code they run, see
``coop_perception.commands``); this module only puts them together, in the data flow's order.
"""
from __future__ import annotations

import argparse
import sys

from .commands import Commands, describe
from .errors import UserError, exit_code


def build_parser() -> argparse.ArgumentParser:
    from .data import commands as data_commands
    from .detection import commands as detection_commands
    from .eval import commands as eval_commands
    from .eval import detect_file
    from .fusion import commands as fusion_commands
    from .ros import bag_player, demo, fuzz_bench, launcher, replay_bench, soak

    parser = argparse.ArgumentParser(prog='coop-perception', description=__doc__.split('\n\n')[0])
    commands = Commands(parser)
    for module in (data_commands, detection_commands, fusion_commands, eval_commands, detect_file, bag_player,
                   launcher, replay_bench, fuzz_bench, soak, demo):
        module.add_cli(commands)
    return parser


def main(argv=None) -> int:
    return exit_code(lambda: run(argv))


def run(argv=None) -> int:
    """Parse ``argv`` (the argument types check the paths given, raising UserError) and run the
    command. A file or folder that fails the command while it runs (a disk that fills, a path
    that a type cannot check, a message over several lines) is the user's to fix too, so it
    becomes one UserError line as well."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        raise UserError(err.path, ' '.join(err.problem.split())) from None
    except OSError as err:
        if err.filename is None:
            raise
        raise UserError(err.filename, describe(err)) from None


if __name__ == '__main__':
    sys.exit(main())
