"""A Train worker's training loop, stopped before its process finalizes.

Ray Train runs the training function in a daemon thread. When a trial ends, Ray usually
force-kills its Train worker (a quick exit: the interpreter is not finalized). A worker
that exits gracefully instead (its task loop ends and Ray calls `sys.exit`, as for
`__ray_terminate__`; seen once when ASHA stopped a trial in `make sweep`, BENCHMARKS.md
section 11, run 16) finalizes the interpreter under the training thread. That thread,
coming back from a torch op that released the GIL, is then ended by CPython with
`pthread_exit`, whose unwinding passes through pybind11's `gil_scoped_release`
destructor, which must not throw: `std::terminate`, SIGABRT, and a crash dump of about a
hundred lines from the worker on the sweep's console (pytorch/pytorch#38228).

Atexit handlers run before the interpreter starts finalizing. The one registered here
asks every guarded loop to stop at its next batch (the loop raises WorkerExiting, which
Train's thread runner takes as the function's end) and waits, boundedly, for its thread.
"""

from __future__ import annotations

import atexit
import contextlib
import threading
import time
from collections.abc import Iterator

# The longest the exiting process waits for a loop to reach its next batch (one batch
# takes well under a second here); past it, the process finalizes as it would have.
EXIT_JOIN_S = 5.0

_lock = threading.Lock()
_loops: dict[threading.Thread, threading.Event] = {}   # the guarded loops now running


class WorkerExiting(Exception):
    """Raised in a guarded loop's thread when its process is exiting."""


@contextlib.contextmanager
def stopped_before_exit() -> Iterator[threading.Event]:
    """Guards the calling thread's loop: yields the event that is set when the process
    starts to exit. The loop checks it between batches and then raises WorkerExiting."""
    exiting, thread = threading.Event(), threading.current_thread()
    with _lock:
        _loops[thread] = exiting
    try:
        yield exiting
    finally:
        with _lock:
            _loops.pop(thread, None)


def check(exiting: threading.Event) -> None:
    """Raises WorkerExiting once the process has started to exit."""
    if exiting.is_set():
        raise WorkerExiting("the worker process is exiting")


def _stop_loops_and_wait(join_s: float = EXIT_JOIN_S) -> None:
    with _lock:
        loops = list(_loops.items())
    for _, exiting in loops:
        exiting.set()
    deadline = time.monotonic() + join_s
    for thread, _ in loops:
        if thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))


# Once per process, at import: with no guarded loop running, the handler returns at once.
atexit.register(_stop_loops_and_wait)
