"""User-facing errors: the CLI prints them as one line and exits with code 2."""
import sys


class UserError(Exception):
    """A problem with something the user gave us (a file, a folder, an argument)."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f'{self.path}: {problem}')


def exit_code(run, *, interrupted: int = 130) -> int:
    """Call ``run()`` as an entry point and return its exit code: a UserError is printed as one
    ``error: <file>: <problem>`` line (code 2), Ctrl-C ends quietly with ``interrupted``."""
    try:
        return run()
    except UserError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return interrupted
