"""User errors and the command-line wrapper that turns them into exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem with the user's input (config, data, paths): shown as one line, exit 2."""


EXIT_OK, EXIT_FAILURE, EXIT_USER_ERROR = 0, 1, 2
# A sweep that stopped early with its state saved: rerunning the same command resumes it.
# 3: the stall watchdog fired; 128 + signal number for SIGINT (Ctrl-C) and SIGTERM, as shells do.
EXIT_STALLED, EXIT_SIGINT, EXIT_SIGTERM = 3, 130, 143


def run_cli(main: Callable[[list[str]], int], argv: list[str] | None = None) -> int:
    """Run `main(argv)`; a UserError becomes one line on stderr and exit code 2.

    Anything else propagates with its traceback: that is a bug or a run-time failure,
    and hiding it would lose the information needed to fix it.
    """
    try:
        return main(sys.argv[1:] if argv is None else argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
