"""How a sweep stops early: Ctrl-C, SIGTERM, or the stall watchdog.

Every cause ends the same way: Tune's own graceful stop (what it does on Ctrl-C: stop
the trials, save the experiment state one last time), then a distinct exit code. The
trials cut short stay unfinished in the saved state, so rerunning the same command
resumes them from their checkpoints.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from hlbd_ray.errors import EXIT_SIGINT, EXIT_SIGTERM, EXIT_STALLED
from hlbd_ray.live import LiveCallback

if TYPE_CHECKING:
    from ray.tune import Stopper

# The floor of the default stall timeout (a trial's first epoch on a busy machine can
# take minutes); the sweep's Train worker-group start timeout follows the stall timeout.
STALL_FLOOR_S = 600.0
STALL_EPOCHS = 3.0
TUNE_SIGINT_ENV = "TUNE_DISABLE_SIGINT_HANDLER"


class SweepInterrupted(BaseException):
    """Raised when a stop is requested outside Tune's loop (before or after `fit`), or on
    a second signal. A BaseException, so that no `except Exception` on the way swallows it."""

    def __init__(self, reason: str, code: int):
        super().__init__(reason)
        self.reason, self.code = reason, code


class Interrupt:
    """Why the sweep stops early, and the route to Tune's graceful stop."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.code = 0
        self._in_fit = False

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Our SIGINT and SIGTERM handlers for the duration of the sweep."""
        # Tune would replace our SIGINT handler with its own during fit; ours forwards.
        saved_env = os.environ.get(TUNE_SIGINT_ENV)
        os.environ[TUNE_SIGINT_ENV] = "1"
        saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        self.take_signals()
        try:
            yield
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)
            if saved_env is None:
                os.environ.pop(TUNE_SIGINT_ENV, None)
            else:
                os.environ[TUNE_SIGINT_ENV] = saved_env

    def take_signals(self) -> None:
        """(Re)install our handlers: starting Ray replaces the driver's SIGTERM handler
        with Ray's crash reporter, which prints a stack and ends the process."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    @contextmanager
    def tune_fit(self) -> Iterator[None]:
        self._in_fit = True
        try:
            yield
        finally:
            self._in_fit = False

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        code = EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM
        if self.reason is not None:
            raise SweepInterrupted(f"{name} (again: not waiting for the trials to stop)", code)
        self.request(name, code)

    def request(self, reason: str, code: int) -> None:
        self.reason, self.code = reason, code
        # Tune registers the handler behind its Ctrl-C stop for SIGUSR1 as well (always,
        # see ray/tune/tune.py `_setup_signal_catching`): raising it asks Tune's loop to
        # stop after this step and save its state. Outside that loop there is nothing
        # to save yet (or any more): stop at once.
        if self._in_fit and callable(signal.getsignal(signal.SIGUSR1)):
            signal.raise_signal(signal.SIGUSR1)
        else:
            raise SweepInterrupted(reason, code)


def resume_hint(reason: str) -> str:
    command = shlex.join(["python", *sys.argv]) if sys.argv and sys.argv[0] else "the same command"
    return (f"sweep stopped early ({reason}); its state is saved. To resume it, run the same "
            f"command again:\n  {command}")


class StallWatchdog(LiveCallback):
    """Stops the sweep when no trial has reported for the stall timeout: while trials
    are pending or running, it prints what is waiting on what; with none, that the search
    created no trial. Then it asks for Tune's graceful stop with exit code EXIT_STALLED."""

    live_name = "watchdog"

    def __init__(self, interrupt: Interrupt, stall_timeout_s: float = 0.0):
        self.interrupt, self.configured_s = interrupt, stall_timeout_s
        self.setup()

    def setup(self, stop: Stopper | None = None, num_samples: int | None = None,
              total_num_samples: int | None = None, **info: Any) -> None:
        self.last_progress = time.monotonic()
        self.last_report: dict[str, float] = {}
        self.epoch_start: dict[str, float] = {}
        self.slowest_epoch_s = 0.0
        self.fired = False

    def timeout_s(self) -> float:
        if self.configured_s > 0:
            return self.configured_s
        return max(STALL_FLOOR_S, STALL_EPOCHS * self.slowest_epoch_s)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.epoch_start[trial.trial_id] = time.monotonic()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        now = self.last_progress = self.last_report[trial.trial_id] = time.monotonic()
        if result.get("epoch_end"):
            started = self.epoch_start.get(trial.trial_id, now)
            self.slowest_epoch_s = max(self.slowest_epoch_s, now - started)
            self.epoch_start[trial.trial_id] = now

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.last_progress = time.monotonic()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.last_progress = time.monotonic()

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        waiting = [t for t in trials if t.status in ("RUNNING", "PENDING", "PAUSED")]
        quiet_s = time.monotonic() - self.last_progress
        if self.fired or quiet_s <= self.timeout_s():
            return
        self.fired = True
        # Nothing waiting, yet Tune stepped on: the search algorithm neither created a
        # trial nor finished. Tune waits for one in 600 s blocks, so this shows after one.
        diagnosis = self.diagnosis(waiting, quiet_s) if waiting else self.no_trial_diagnosis(trials, quiet_s)
        print(diagnosis, file=sys.stderr, flush=True)
        self.interrupt.request("stalled", EXIT_STALLED)

    def no_trial_diagnosis(self, trials: list, quiet_s: float) -> str:
        return (f"sweep stalled: no trial running or pending for {quiet_s:.0f} s (stall timeout "
                f"{self.timeout_s():.0f} s), and the search algorithm neither created one nor "
                f"finished; {len(trials)} trials created so far")

    def diagnosis(self, waiting: list, quiet_s: float) -> str:
        lines = [f"sweep stalled: no trial reported for {quiet_s:.0f} s "
                 f"(stall timeout {self.timeout_s():.0f} s)"]
        lines += ["  " + line for line in cluster_picture()]
        now = time.monotonic()
        lines.append("  trials waiting:")
        for trial in waiting:
            last = self.last_report.get(trial.trial_id)
            seen = f"last report {now - last:.0f} s ago" if last else "no report yet"
            lines.append(f"    {trial.trial_id} {trial.status}, {seen}")
        return "\n".join(lines)


def cluster_picture() -> list[str]:
    """Free vs total resources and the job's placement groups, reserved and pending."""
    import ray

    from hlbd_ray.placement import describe, job_groups, occupied_groups

    try:
        total, free = ray.cluster_resources(), ray.available_resources()
        groups, occupied = job_groups(), occupied_groups()
    except Exception as err:  # the diagnosis must not hide the stall itself
        return [f"(cluster state unavailable: {type(err).__name__}: {err})"]
    lines = [f"CPU {free.get('CPU', 0.0):g} free of {total.get('CPU', 0.0):g}; "
             f"GPU {free.get('GPU', 0.0):g} free of {total.get('GPU', 0.0):g}"]
    for state in ("CREATED", "PENDING", "RESCHEDULING"):
        mine = [g for g in groups if g.state == state]
        label = "reserved" if state == "CREATED" else state.lower()
        lines.append(f"placement groups {label}: {len(mine)}")
        for group in mine:
            empty = "" if group.placement_group_id in occupied else " (no actor in it)"
            lines.append(f"  {describe(group)}{empty}")
    return lines
