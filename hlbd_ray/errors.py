"""User errors and the command-line wrapper that turns them into exit code 2."""

from __future__ import annotations

import faulthandler
import signal
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
    # `kill -QUIT <pid>` (Ctrl-\ in a terminal) prints every thread's stack to stderr and
    # the job goes on: what a job that seems stuck is waiting for, without a debugger.
    # (The process's own stderr: under a test's captured sys.stderr there is no file.)
    if sys.__stderr__ is not None:
        faulthandler.register(signal.SIGQUIT, file=sys.__stderr__, all_threads=True)
    try:
        code = main(sys.argv[1:] if argv is None else argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    if argv is None:      # a process of its own (a job script), not a caller's function call
        from hlbd_ray.storage import exit_past_stuck_storage_calls  # (storage imports this module)

        exit_past_stuck_storage_calls(code)
    return code
