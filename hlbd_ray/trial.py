"""What runs in each Tune trial's own process: one trial = one Ray Train run.

Kept apart from sweep.py, and free of torch, numpy and Tune's searchers at import, so
that the trial's actor loads only what it uses (tests/test_trial.py checks it in a fresh
interpreter). The Train worker is the only process of a trial that needs torch for our
code; Ray's TorchTrainer still imports it where the trainer is built (see
BENCHMARKS.md section 3, "Levers (issue 14)").
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from typing import Any

from ray import tune

from hlbd_ray.banner import actor_banner, name_actor_in_logs
from hlbd_ray.config import Config, check_heads, from_dict
from hlbd_ray.params import ARCH_KEY, LR_KEY, REPEAT_KEY, decode_arch
from hlbd_ray.placement import trial_tag
from hlbd_ray.trainer import build_trainer, controller_running_here, user_error_in


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


def relay_drained(queue: Any, timeout_s: float = RELAY_DRAIN_S) -> bool:
    """Wait until Tune's thread has taken every Train report off `queue` (the
    TuneReportCallback's queue actor); False if it has not within `timeout_s`.

    Why: in Ray 2.60 this trial's own reports (the re-report below, and Tune's end-of-
    function report) and Tune's thread moving a relayed report on both put into the
    session's one-slot result queue, which only that thread empties. When a relayed
    report is still queued as the trial function reports, each waits on the other
    forever (seen: a smoke sweep's trial actor, both threads in Queue.put, py-spy)."""
    deadline = time.monotonic() + timeout_s
    while not queue.empty():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    time.sleep(RELAY_SETTLE_S)
    return True


# How long a stopped trial's cleanup waits for an in-process Train controller's thread to
# end: one poll of its workers (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default) and more.
STOP_JOIN_S = 15.0


def stoppable_trial(trial_function: Any) -> type:
    """The Tune trainable of `trial_function` (what Tune builds from a function itself),
    whose cleanup waits for a Train controller that runs in the trial's thread.

    Tune's own cleanup does not wait for the trial's thread (`session.finish(timeout=0)`),
    and then ends the actor: with the controller in that thread, mid `ray.wait`, the
    actor aborted (BENCHMARKS.md section 3). The thread ends itself once it sees Tune's
    stop request (trainer.run_controller_here); this waits up to STOP_JOIN_S for it."""
    from ray.train._internal.session import get_session, shutdown_session
    from ray.tune.trainable.function_trainable import wrap_function

    class StoppableTrial(wrap_function(trial_function)):  # type: ignore[misc]
        def cleanup(self) -> None:
            # FunctionTrainable.cleanup, but for the wait: finish() sets the stop event,
            # lets a thread waiting on a report go on, and joins it.
            session = get_session()
            assert session is not None    # set up with the trainable, ended only here
            wait_s = STOP_JOIN_S if controller_running_here() else 0
            try:
                session.finish(timeout=wait_s)
            finally:
                session._report_thread_runner_error()
                shutdown_session()

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
    trainer = build_trainer(cfg, data[0], train_storage, trial_id, [relay],
                            worker_cpu=worker_cpu, label_selector=mark,
                            controller_in_process=cfg.sweep.controller_in_trial, lean=cfg.sweep.lean_train_actors)
    try:
        result = trainer.fit()
    except TrainingFailedError as err:
        cause = user_error_in(err)
        if cause is None:
            raise      # Tune records the Train error, whose last line names the cause
        # A user error inside a worker (e.g. a refused checkpoint): its one line is enough.
        raise RuntimeError(str(cause)) from None
    if not relay_drained(relay._training_actor_item_queue):
        print(f"trial {trial_id}: Tune did not take Train's last report within {RELAY_DRAIN_S:.0f} s; "
              "no final re-report", file=sys.stderr, flush=True)
        return
    if result.metrics:
        # Train's own record of the last epoch end, once more, through Tune's session: the
        # callback's last report can miss Tune when the run ends right after it (seen: a
        # confirmation trial's final epoch never reached Tune). Same shape as the train
        # loop's repeat after a resume: no batch losses, so no curve counts it twice.
        final = {**result.metrics, "batch_losses": [], "batch_start": result.metrics.get("batches", 0)}
        if result.checkpoint is not None:
            final["checkpoint_path"] = result.checkpoint.path
        tune.report(final)
