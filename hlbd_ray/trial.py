"""What runs in each Tune trial's own process: one trial = one Ray Train run.

Kept apart from sweep.py, and free of torch, numpy and Tune's searchers at import, so
that the trial's actor loads only what it uses (tests/test_trial.py checks it in a fresh
interpreter). The Train worker is the only process of a trial that needs torch for our
code; Ray's TorchTrainer still imports it where the trainer is built (see
BENCHMARKS.md section 3, "Levers (issue 14)").
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from ray import tune

from hlbd_ray.banner import actor_banner, name_actor_in_logs
from hlbd_ray.config import Config, check_heads, from_dict
from hlbd_ray.params import ARCH_KEY, LR_KEY, REPEAT_KEY, decode_arch
from hlbd_ray.placement import trial_tag
from hlbd_ray.trainer import build_trainer, user_error_in


def trial_config(base: Config, params: dict[str, Any]) -> Config:
    """The run config of one trial: the base config with its sampled architecture and lr,
    and copy number n of a config trains with train.seed + n."""
    d_model, num_heads = decode_arch(params[ARCH_KEY])
    check_heads(d_model, num_heads)
    model = replace(base.model, d_model=d_model, num_heads=num_heads)
    seed = base.train.seed + int(params.get(REPEAT_KEY) or 0)
    return replace(base, model=model, train=replace(base.train, lr=float(params[LR_KEY]), seed=seed))


# How long a finished trial waits for Tune to take Train's last report off the relay
# queue, and the pause after, in which Tune's thread hands the taken report on.
RELAY_DRAIN_S = 30.0
RELAY_SETTLE_S = 0.5


def relay_drained(queue: Any, stop: threading.Event, timeout_s: float = RELAY_DRAIN_S) -> bool:
    """Wait until Tune's thread has taken every Train report off `queue` (the
    TuneReportCallback's queue actor); False if it has not within `timeout_s`, or if Tune
    stopped the trial meanwhile (its thread takes nothing more then).

    Why: in Ray 2.60 this trial's own reports (the re-report below, and Tune's end-of-
    function report) and Tune's thread moving a relayed report on both put into the
    session's one-slot result queue, which only that thread empties. When a relayed
    report is still queued as the trial function reports, each waits on the other
    forever (seen: a smoke sweep's trial actor, both threads in Queue.put, py-spy)."""
    deadline = time.monotonic() + timeout_s
    while not queue.empty():
        if time.monotonic() > deadline or stop.is_set():
            return False
        time.sleep(0.05)
    return not stop.wait(RELAY_SETTLE_S)


def report_final(result: Any, relay_queue: Any, stop: threading.Event, trial_id: str) -> None:
    """Train's record of the last epoch end, once more, through Tune's session: the
    callback's last report can miss Tune when the run ends right after it (seen: a
    confirmation trial's final epoch never reached Tune). Same shape as the train loop's
    repeat after a resume: no batch losses, so no curve counts it twice.

    Not when Tune stopped the trial: it did so on a result it has (ASHA stops every trial
    at its last epoch), and its session is being shut down; a report then warned on the
    console that it was made outside a Tune session. The thread ends as Tune's own
    report does on a stop, with SystemExit(0)."""
    drained = relay_drained(relay_queue, stop)
    if stop.is_set():
        raise SystemExit(0)
    if not drained:
        print(f"trial {trial_id}: Tune did not take Train's last report within {RELAY_DRAIN_S:.0f} s; "
              "no final re-report", file=sys.stderr, flush=True)
        return
    if result.metrics:
        final = {**result.metrics, "batch_losses": [], "batch_start": result.metrics.get("batches", 0)}
        if result.checkpoint is not None:
            final["checkpoint_path"] = result.checkpoint.path
        tune.report(final)


# How long a stopped trial's cleanup waits for a trial thread that runs its Train
# controller: one poll of its workers (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default)
# and more.
STOP_JOIN_S = 15.0

# Set while this process's Tune trial thread runs a trial with its Train controller in it.
_JOIN_ON_STOP = threading.Event()


def trial_thread_to_join() -> bool:
    # A function, not the Event itself: the trial's trainable class is pickled by value,
    # and an Event (a lock) cannot be; a module function travels by reference.
    return _JOIN_ON_STOP.is_set()


@contextmanager
def joined_on_stop(active: bool) -> Iterator[None]:
    """While the block runs (if `active`), a stopped trial's cleanup waits for this thread:
    from the controller's first poll to the final report, so the thread is never left
    running in a session Tune has shut down."""
    if active:
        _JOIN_ON_STOP.set()
    try:
        yield
    finally:
        _JOIN_ON_STOP.clear()


def stoppable_trial(trial_function: Any) -> type:
    """The Tune trainable of `trial_function` (what Tune builds from a function itself),
    whose cleanup waits for a Train controller that runs in the trial's thread.

    Tune's own cleanup does not wait for the trial's thread (`session.finish(timeout=0)`),
    and then ends the actor: with the controller in that thread, mid `ray.wait`, the
    actor aborted (BENCHMARKS.md section 3). The thread ends itself once it sees Tune's
    stop request (trainer.run_controller_here, report_final); this waits up to
    STOP_JOIN_S for it."""
    from ray.train._internal.session import _TrainingResult, get_session, shutdown_session
    from ray.tune import Checkpoint
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY
    from ray.tune.trainable.function_trainable import wrap_function

    class StoppableTrial(wrap_function(trial_function)):  # type: ignore[misc]
        def cleanup(self) -> None:
            # FunctionTrainable.cleanup, but for the wait: finish() sets the stop event,
            # lets a thread waiting on a report go on, and joins it.
            session = get_session()
            assert session is not None    # set up with the trainable, ended only here
            wait_s = STOP_JOIN_S if trial_thread_to_join() else 0
            try:
                session.finish(timeout=wait_s)
            finally:
                session._report_thread_runner_error()
                shutdown_session()

        def save_checkpoint(self, checkpoint_dir: str = "") -> Any:
            # Tune saves a trial it pauses (promotion.py) and, on resuming it, restores its
            # counters (training_iteration, time_total_s) only from a save with a
            # checkpoint. Our trial reports none to Tune: the Train run's own, which it
            # resumes from (Train V2 reads it from storage), stands in for it. Without it a
            # resumed trial's time_total_s started again at 0.
            saved = super().save_checkpoint(checkpoint_dir)
            path = saved.metrics.get(CHECKPOINT_PATH_KEY) if saved is not None else None
            if saved is None or saved.checkpoint is not None or not path:
                return saved
            return _TrainingResult(checkpoint=Checkpoint(path), metrics=saved.metrics)

    return StoppableTrial


def run_trial(params: dict[str, Any], base: dict[str, Any], data: list[Any], train_storage: str,
              worker_cpu: float) -> None:
    """Tune function trainable: one trial = one Ray Train run, reported through Tune."""
    import ray
    from ray.train import TrainingFailedError
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = trial_config(from_dict(base), params)
    trial_id = tune.get_context().get_trial_id()
    name_actor_in_logs(actor_banner(trial_id, "Tune trial actor (drives the Train run of the same name)",
                                    cfg.model.d_model, cfg.model.num_heads, cfg.train.lr))
    # The mark lets the sweep driver free this trial's placement groups (placement.py).
    owner = ray.get_runtime_context().get_actor_id()
    assert owner is not None  # None only outside an actor, and a Tune trial runs in one
    mark = trial_tag(trial_id, owner)
    relay = TuneReportCallback()
    stop = tune_stop_event()
    in_process = cfg.sweep.controller_in_trial
    trainer = build_trainer(cfg, data[0], train_storage, trial_id, [relay],
                            worker_cpu=worker_cpu, label_selector=mark,
                            controller_in_process=in_process, lean=cfg.sweep.lean_train_actors)
    with joined_on_stop(in_process):
        try:
            result = trainer.fit()
        except TrainingFailedError as err:
            cause = user_error_in(err)
            if cause is None:
                raise      # Tune records the Train error, whose last line names the cause
            # A user error inside a worker (e.g. a refused checkpoint): its one line is enough.
            raise RuntimeError(str(cause)) from None
        report_final(result, relay._training_actor_item_queue, stop, trial_id)


def tune_stop_event() -> threading.Event:
    """The event Tune sets when it stops this trial (its session's; kept, as the session
    is shut down once the trial's cleanup ends)."""
    from ray.train._internal.session import get_session

    session = get_session()
    assert session is not None     # a Tune trial's thread runs in its session
    return session.stop_event
