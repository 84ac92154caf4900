"""The console: a line per trial event, honest outcomes, and expected Ray noise kept off it."""

from __future__ import annotations

import logging
import pickle
import sys
from dataclasses import dataclass, field
from typing import Any

import pytest

from hlbd_ray import live
from hlbd_ray.console import BUDGET, COMPLETED, ERRORED, INTERRUPTED, NOT_RUN, STOPPED, ExpectedEventFilter, SweepStatus
from hlbd_ray.summary import outcome_counts, outcome_line


@dataclass
class Trial:
    trial_id: str
    config: dict[str, Any] = field(default_factory=lambda: {"arch": "32x4", "lr": 1e-3})
    status: str = "RUNNING"
    last_result: dict[str, Any] = field(default_factory=dict)
    error_file: str | None = None


def finish(status: SweepStatus, trial: Trial, results: list[dict[str, Any]]) -> None:
    for result in results:
        status.on_trial_result(0, [trial], trial, result)
        trial.last_result = result
    status.on_trial_complete(0, [trial], trial)


def test_each_trial_event_prints_one_line_with_what_happened(capsys):
    status = SweepStatus("val_loss", "min", max_epochs=3)
    asha, whole, cut = Trial("t_asha"), Trial("t_whole"), Trial("t_cut")
    for trial in (asha, whole, cut):
        status.on_trial_start(0, [], trial)
    finish(status, asha, [{"val_loss": 4.0, "epochs_done": 1, "done": True}])
    # ASHA also "stops" a trial at its last epoch (max_t): that trial completed.
    finish(status, whole, [{"val_loss": 3.0, "epochs_done": 3, "done": True}])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "trial t_asha started: 32x4, lr 1.00e-03"
    assert "trial t_asha stopped early by ASHA after 1 epoch; best val_loss 4.0000" in out
    assert "trial t_whole completed 3 epochs; best val_loss 3.0000" in out
    assert status.outcome("t_asha", False, INTERRUPTED) == STOPPED
    assert status.outcome("t_whole", False, INTERRUPTED) == COMPLETED
    # Started but never ended: cut short, never "done"; never started: not run.
    assert status.outcome("t_cut", False, INTERRUPTED) == INTERRUPTED
    assert status.outcome("t_cut", False, BUDGET) == BUDGET
    assert status.outcome("t_never", False, INTERRUPTED) == NOT_RUN
    assert status.outcome("t_whole", True, INTERRUPTED) == ERRORED


def test_a_trial_that_stops_itself_completed_and_says_why(capsys):
    status = SweepStatus("val_loss", "min", max_epochs=3)
    trial = Trial("t")
    status.on_trial_start(0, [], trial)
    finish(status, trial, [{"val_loss": 5.0, "epochs_done": 2, "stop_reason": "non-finite gradients"}])
    assert "completed 2 epochs (it stopped itself: non-finite gradients)" in capsys.readouterr().out
    assert status.outcome("t", False, INTERRUPTED) == COMPLETED


def test_a_paused_trial_that_ends_was_stopped_by_the_promotion_scheduler(capsys):
    from hlbd_ray.console import status_line

    status = SweepStatus("val_loss", "min", max_epochs=4, scheduler="promotion")
    held, promoted = Trial("held"), Trial("promoted")
    for trial in (held, promoted):
        status.on_trial_start(0, [], trial)
        trial.last_result = {"val_loss": 3.0, "epochs_done": 1}
        status.on_trial_result(0, [held, promoted], trial, trial.last_result)
    held.status = promoted.status = "PAUSED"
    assert "0 running, 0 pending, 2 paused |" in status_line([held, promoted], status.best, "val_loss", "min", 5)
    status.on_step_end(0, [held, promoted])
    promoted.status = "RUNNING"                        # resumed: then it runs to its last epoch
    status.on_trial_start(0, [], promoted)
    status.on_step_end(0, [held, promoted])
    finish(status, promoted, [{"val_loss": 2.0, "epochs_done": 4}])
    held.status = "TERMINATED"                         # stopped while paused, at the search's end
    status.on_trial_complete(0, [held, promoted], held)
    out = capsys.readouterr().out
    assert "trial promoted resumed: 32x4" in out and "trial promoted completed 4 epochs" in out
    assert "trial held stopped early by PROMOTION after 1 epoch" in out
    assert status.outcome("held", False, INTERRUPTED) == STOPPED
    assert status.outcome("promoted", False, INTERRUPTED) == COMPLETED


def test_outcomes_survive_a_restart_through_tunes_callback_state(capsys):
    first = SweepStatus("val_loss", "min", max_epochs=3)
    trial = Trial("t")
    first.on_trial_start(0, [], trial)
    finish(first, trial, [{"val_loss": 4.0, "epochs_done": 1, "done": True}])
    second = SweepStatus("val_loss", "min", max_epochs=3)
    second.set_state(first.get_state())
    assert second.outcome("t", False, INTERRUPTED) == STOPPED
    second.on_trial_start(0, [], Trial("t"))                 # resumed: no outcome yet
    assert "trial t resumed" in capsys.readouterr().out
    assert second.outcome("t", False, INTERRUPTED) == INTERRUPTED


def test_a_resumed_sweep_runs_with_this_runs_callbacks():
    old = SweepStatus("val_loss", "min")
    frozen = pickle.dumps(old)                   # what Tune's tuner.pkl keeps
    now = live.register("status", SweepStatus("val_loss", "min", max_epochs=7))
    try:
        assert pickle.loads(frozen) is now
    finally:
        live.clear()
    with pytest.raises(RuntimeError, match="no live"):
        pickle.loads(frozen)


def test_the_outcome_line_counts_every_kind_of_end():
    rows = [{"status": s} for s in (COMPLETED, STOPPED, STOPPED, ERRORED, INTERRUPTED, NOT_RUN)]
    line = outcome_line(outcome_counts(rows), "asha")
    assert line == ("trials: 6 = 1 completed, 2 stopped early by ASHA, 1 errored, "
                    "1 interrupted, 1 never started")


def record(name: str, message: str, error: BaseException | None = None,
           level: int = logging.ERROR) -> logging.LogRecord:
    exc_info = (type(error), error, None) if error else None
    return logging.LogRecord(name, level, __file__, 1, message, (), exc_info)


CONTROLLER = "ray.train.v2._internal.execution.controller.controller"
WORKER_UTIL = "ray.train.v2._internal.util"
CLEANER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


@pytest.mark.parametrize("rec", [
    record(CONTROLLER, "Error in control loop iteration: %s",
           __import__("ray").exceptions.ActorDiedError()),
    record(WORKER_UTIL, "Error in training function:\n...\nray.exceptions.ActorDiedError: The actor died"),
    record("ray.train.v2._internal.callbacks.backend_setup", "Graceful shutdown of backend failed."),
], ids=["controller-sees-its-owner-die", "worker-sees-its-controller-die", "backend-shutdown"])
def test_a_stopped_trials_teardown_is_lowered_below_the_console(rec):
    assert ExpectedEventFilter().filter(rec) and rec.levelno == logging.DEBUG


def test_a_real_worker_error_stays_an_error():
    rec = record(WORKER_UTIL, "Error in training function:\n...\nRuntimeError: injected fault")
    assert ExpectedEventFilter().filter(rec) and rec.levelno == logging.ERROR


def test_the_cleaners_line_per_freed_group_is_dropped_but_its_failures_are_not():
    assert not ExpectedEventFilter().filter(
        record(CLEANER, "Detected that the Ray Train controller actor (x) is dead.", level=logging.WARNING))
    assert ExpectedEventFilter().filter(
        record(CLEANER, "Failed to clean up placement group: boom", level=logging.WARNING))


def test_tunes_console_output_is_off_only_while_the_driver_log_is_on(tmp_path, monkeypatch):
    import os

    from hlbd_ray.console import driver_log

    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", "1")
    monkeypatch.delenv("TUNE_PRINT_ALL_TRIAL_ERRORS", raising=False)
    with driver_log(tmp_path / "sweep.log"):
        # Tune's own console, with its TensorBoard hint naming a temporary folder, is off.
        assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0"
        assert os.environ["TUNE_PRINT_ALL_TRIAL_ERRORS"] == "0"
    assert os.environ["RAY_AIR_NEW_OUTPUT"] == "1"
    assert "TUNE_PRINT_ALL_TRIAL_ERRORS" not in os.environ


def test_an_actor_banner_names_trial_config_and_role():
    from hlbd_ray.session import actor_banner

    line = actor_banner("ab12_00003", "Train worker rank 1 of 2", 128, 4, 1.05e-3)
    assert line == ("[hlbd] trial ab12_00003: d_model 128, num_heads 4, lr 1.05e-03; "
                    "Train worker rank 1 of 2")


def test_driver_usage_counts_this_process_in_mib_and_the_time_since_start():
    import resource
    import time

    from hlbd_ray.summary import driver_usage, usage_line

    ballast = bytearray(64 * 2**20)           # 64 MiB touched: the peak must include it
    ballast[::4096] = b"x" * len(ballast[::4096])
    usage = driver_usage(time.time() - 65.0)
    rss_now_mib = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20
    assert usage["peak_rss_mib"] >= rss_now_mib - 1 >= 63    # getrusage counts KiB: scaled once, not twice
    assert usage["peak_rss_mib"] < 64 * 1024                 # not scaled twice
    assert 65.0 <= usage["wall_s"] < 75.0
    assert usage_line(usage).startswith("driver: 1 min 05 s since the job started, peak RSS ")
    del ballast


def test_rays_sigterm_exit_inside_a_gc_callback_is_not_printed_but_anything_else_is():
    import weakref

    from hlbd_ray.console import quiet_termination_in_callbacks

    def sigterm_handler() -> None:   # named as Ray's handler (ray/_private/worker.py)
        raise SystemExit(1)

    def other_exit() -> None:
        raise SystemExit(2)

    def real_error() -> None:
        raise ValueError("a real error in a callback")

    class Thing:
        pass

    seen: list = []
    saved, sys.unraisablehook = sys.unraisablehook, quiet_termination_in_callbacks(seen.append)
    try:
        for raiser in (sigterm_handler, real_error, other_exit):
            thing = Thing()
            ref = weakref.ref(thing, lambda _, raiser=raiser: raiser())
            del thing   # the callback runs now; Python hands its exception to the hook
            assert ref() is None
    finally:
        sys.unraisablehook = saved
    assert [type(u.exc_value) for u in seen] == [ValueError, SystemExit]
    assert seen[1].exc_value.code == 2
