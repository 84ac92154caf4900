"""What the sweep's console shows: a status line, one line per trial start, stop and
error, and real errors; the expected noise of trials being stopped stays in log files.

These lines are also what the dashboard shows under Jobs -> Log for a submitted sweep.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hlbd_ray.contract import better
from hlbd_ray.live import LiveCallback
from hlbd_ray.search import ARCH_KEY, LR_KEY

if TYPE_CHECKING:
    from ray.tune import Stopper

# Outcomes of a trial, as the final table and summary name them.
COMPLETED, STOPPED, ERRORED = "COMPLETED", "STOPPED", "ERROR"
BUDGET, INTERRUPTED, NOT_RUN = "BUDGET", "INTERRUPTED", "NOT RUN"


class SweepStatus(LiveCallback):
    """One live line on the driver instead of Tune's full table every few seconds, a line
    per trial event, and each trial's outcome (kept in Tune's experiment state)."""

    live_name = "status"

    def __init__(self, metric: str, mode: str, every_s: float = 10.0, max_epochs: int = 0,
                 scheduler: str = "asha"):
        self.metric, self.mode, self.every_s = metric, mode, every_s
        self.max_epochs, self.scheduler = max_epochs, scheduler.upper()
        self.best: dict[str, float] = {}       # each trial's best metric so far
        self.outcomes: dict[str, str] = {}     # trial id -> COMPLETED / STOPPED / ERROR
        self.started: set[str] = set()
        self.stop_seen: set[str] = set()       # trials a scheduler decided to stop
        self.paused: set[str] = set()          # trials paused at the last step (promotion.py)
        self.last_print = self.started_at = time.monotonic()

    def setup(self, stop: Stopper | None = None, num_samples: int | None = None,
              total_num_samples: int | None = None, **info: Any) -> None:
        self.last_print = self.started_at = time.monotonic()

    def get_state(self) -> dict[str, Any]:
        return {"best": self.best, "outcomes": self.outcomes, "started": sorted(self.started)}

    def set_state(self, state: dict[str, Any]) -> None:
        self.best.update(state.get("best", {}))
        self.outcomes.update(state.get("outcomes", {}))
        self.started.update(state.get("started", []))

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        verb = "resumed" if trial.trial_id in self.started else "started"
        self.started.add(trial.trial_id)
        # A restarted trial (a resumed sweep, a retry) has no outcome yet.
        self.outcomes.pop(trial.trial_id, None)
        cfg = trial.config
        print(f"trial {trial.trial_id} {verb}: {cfg[ARCH_KEY]}, lr {cfg[LR_KEY]:.2e}", flush=True)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        value = result.get(self.metric)
        if value is not None and better(value, self.best.get(trial.trial_id), self.mode):
            self.best[trial.trial_id] = value
        # Tune marks the result `done` before the callbacks see it when its scheduler (or
        # a stop criterion) stops the trial; a trial that returns by itself never has one.
        if result.get("done"):
            self.stop_seen.add(trial.trial_id)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        # A paused trial that ends was stopped by its scheduler without a result saying so.
        self.paused = {t.trial_id for t in trials if t.status == "PAUSED"}
        if time.monotonic() - self.last_print >= self.every_s:
            self.print_line(trials)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        epochs = result.get("epochs_done", 0)
        # ASHA also "stops" a trial that reached its last epoch (max_t): that one completed.
        last_epoch = bool(self.max_epochs) and epochs >= self.max_epochs
        stopped = trial.trial_id in self.stop_seen or trial.trial_id in self.paused
        if stopped and not last_epoch:
            self.outcomes[trial.trial_id] = STOPPED
            what = f"stopped early by {self.scheduler} after {plural(epochs, 'epoch')}"
        else:
            self.outcomes[trial.trial_id] = COMPLETED
            what = f"completed {plural(epochs, 'epoch')}"
            if result.get("stop_reason"):
                what += f" (it stopped itself: {result['stop_reason']})"
        best = self.best.get(trial.trial_id)
        score = f"; best {self.metric} {best:.4f}" if best is not None else ""
        print(f"trial {trial.trial_id} {what}{score}", flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        from hlbd_ray.report import error_message

        self.outcomes[trial.trial_id] = ERRORED
        where = f" (traceback: {trial.error_file})" if getattr(trial, "error_file", None) else ""
        print(f"trial {trial.trial_id} errored: {error_message(trial)}{where}", flush=True)

    def outcome(self, trial_id: str, errored: bool, cut_short: str) -> str:
        """The trial's end: its recorded outcome, else `cut_short` if it ever started."""
        if errored:
            return ERRORED
        if trial_id in self.outcomes:
            return self.outcomes[trial_id]
        return cut_short if trial_id in self.started else NOT_RUN

    def print_line(self, trials: list) -> None:
        self.last_print = time.monotonic()
        print(status_line(trials, self.best, self.metric, self.mode,
                          time.monotonic() - self.started_at), flush=True)


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def status_line(trials: list, best: dict[str, float], metric: str, mode: str,
                elapsed: float) -> str:
    counts = {"TERMINATED": 0, "RUNNING": 0, "PENDING": 0, "ERROR": 0, "PAUSED": 0}
    for trial in trials:
        counts[trial.status] = counts.get(trial.status, 0) + 1
    leader = None
    for trial in trials:
        value = best.get(trial.trial_id)
        if value is not None and (leader is None or better(value, best[leader.trial_id], mode)):
            leader = trial
    summary = "no result yet"
    if leader is not None:
        cfg = leader.config
        summary = (f"best {metric} {best[leader.trial_id]:.4f} "
                   f"({leader.trial_id}: {cfg[ARCH_KEY]}, lr {cfg[LR_KEY]:.2e})")
    minutes, seconds = divmod(int(elapsed), 60)
    paused = f", {counts['PAUSED']} paused" if counts["PAUSED"] else ""
    return (f"[sweep {minutes:02d}:{seconds:02d}] {counts['TERMINATED']} done, {counts['ERROR']} errored, "
            f"{counts['RUNNING']} running, {counts['PENDING']} pending{paused} | {summary}")


@contextmanager
def driver_log(path: Path) -> Iterator[None]:
    """The driver's own log: our modules at INFO into `path` (placement groups freed,
    reports written), warnings and errors on the console too; Tune's per-trial error
    tracebacks go only to each trial's error file (its one-line cause is printed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    to_console = logging.StreamHandler(sys.stderr)
    to_console.setLevel(logging.WARNING)
    ours = logging.getLogger("hlbd_ray")
    saved = ours.level, {name: os.environ.get(name) for name in TUNE_CONSOLE_ENV}
    ours.setLevel(logging.INFO)
    ours.addHandler(to_file)
    ours.addHandler(to_console)
    os.environ.update(TUNE_CONSOLE_ENV)
    # Tune warns that it found no results for trials it created but never started: the
    # trials table shows them as NOT RUN.
    # And, after an interrupt, it suggests resuming with Tuner.restore: ours says to run
    # the same command again, which does that.
    quieted = [(logging.getLogger("ray.tune.analysis.experiment_analysis"),
                ToFileOnly(to_file, "Failed to fetch metrics")),
               (logging.getLogger("ray.tune.tune"),
                ToFileOnly(to_file, "Experiment has been interrupted"))]
    for logger, quiet in quieted:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        for logger, quiet in quieted:
            logger.removeFilter(quiet)
        ours.removeHandler(to_file)
        ours.removeHandler(to_console)
        to_file.close()
        ours.setLevel(saved[0])
        for name, value in saved[1].items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# Read by Tune in the driver. Its per-trial error tracebacks stay in the error files.
# And its console output gives way to ours: even at verbose=0, Tune's output engine
# prints its config table, its trials table at the end and a TensorBoard hint naming the
# driver's temporary staging folder, not the experiment folder (sweep.py prints the real
# one). RAY_AIR_NEW_OUTPUT=0 is Ray's switch to its older engine, silent at verbose=0.
TUNE_CONSOLE_ENV = {"TUNE_PRINT_ALL_TRIAL_ERRORS": "0", "RAY_AIR_NEW_OUTPUT": "0"}


class ToFileOnly(logging.Filter):
    """Sends the records whose message starts with `prefix` to `handler` only."""

    def __init__(self, handler: logging.Handler, prefix: str):
        super().__init__()
        self.handler, self.prefix = handler, prefix

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith(self.prefix):
            self.handler.handle(record)
            return False
        return True


# --- expected events, in every Ray process of the job --------------------------------------

# Ray Train loggers that report a stopped trial's teardown as errors: the controller and
# workers of an early-stopped trial each report the others' deaths (ActorDiedError), and
# the backend's shutdown "fails", as its own message says is expected. Their records stay
# in Train's log files (logs/train/ray-train-sys-*.log of the Ray session); only the
# console copy goes. Train's placement group cleaner announces every group it frees
# (dropped: the GCS log, logs/gcs_server.out, records each removal) and each state API
# query that failed (dropped: the sweep's own keeper, which frees the same groups,
# reports persistent state API failures).
EXPECTED_EVENT_LOGGERS = (
    "ray.train.v2._internal.execution.controller.controller",
    "ray.train.v2._internal.util",
    "ray.train.v2._internal.callbacks.backend_setup",
    "ray.train.v2._internal.execution.worker_group.placement_group_handle",
    "ray.train.v2._internal.execution.controller.placement_group_cleaner",
)
# The backend's failed graceful shutdown, and a group removed while its (dying)
# controller waited for it: only ended trials' groups are removed.
ALWAYS_EXPECTED = ("backend_setup", "placement_group_handle")
CLEANER = "placement_group_cleaner"
CLEANER_CHATTER = ("Detected that the Ray Train controller actor",
                   "Failed to query Ray Train Controller actor state")
# Actors of a stopped trial dying, and a worker-group start that timed out, which Train
# retries by itself (the sweep's stall watchdog reports a start that never comes).
EXPECTED_MARKERS = ("ActorDiedError", "RayActorError", "ActorUnavailableError",
                    "WorkerGroupStartupTimeoutError")


class ExpectedEventFilter(logging.Filter):
    """Lowers a record of an expected event to DEBUG: Train's console handler drops it
    (it passes WARNING and up) while its system log file, which takes every level, keeps it.
    A real error, such as an exception in the training function, passes unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.endswith(CLEANER):
            # The cleaner runs outside Train's logging setup: lowering would not hide it.
            return not record.getMessage().startswith(CLEANER_CHATTER)
        if is_expected_event(record):
            record.levelno = logging.DEBUG
        return True


def is_expected_event(record: logging.LogRecord) -> bool:
    if record.name.endswith(ALWAYS_EXPECTED):
        return True
    error = record.exc_info[1] if record.exc_info else None
    text = f"{type(error).__name__ if error else ''} {record.getMessage()}"
    return any(marker in text for marker in EXPECTED_MARKERS)


def quiet_expected_events() -> None:
    """`worker_process_setup_hook` of the sweep's Ray job (runs in every worker process).

    The filters sit on Train's own module loggers, which Train's logging setup (it
    configures their parent `ray.train`) leaves in place."""
    for name in EXPECTED_EVENT_LOGGERS:
        logging.getLogger(name).addFilter(ExpectedEventFilter())
    sys.unraisablehook = quiet_termination_in_callbacks(sys.unraisablehook)


def quiet_termination_in_callbacks(default: Any) -> Any:
    """An unraisable-exception hook that drops Ray's SIGTERM exit raised inside a callback.

    When Ray terminates a finished trial's actor, its SIGTERM handler raises SystemExit
    in whatever runs at that moment. If that is a garbage-collector callback (a weakref's
    `_remove`), Python cannot raise it and prints "Exception ignored in ..." with a
    Traceback, which Ray forwards to the sweep's console (seen once in the end-to-end smoke
    sweep, a confirmation trial's actor at its end). The exit was already lost to Python
    by then; only the print goes. Everything else reaches `default`."""
    def hook(unraisable: Any) -> None:
        if not (isinstance(unraisable.exc_value, SystemExit) and _raised_by_sigterm_handler(unraisable.exc_traceback)):
            default(unraisable)
    return hook


def _raised_by_sigterm_handler(tb: Any) -> bool:
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "sigterm_handler":   # ray/_private/worker.py
            return True
        tb = tb.tb_next
    return False
