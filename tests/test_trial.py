"""What a sweep trial's own process loads, and which Ray processes a trial starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hlbd_ray.params import REPEAT_KEY

from .conftest import REPO, micro_config, run_job

# Modules the Tune trial's actor must not import for our code: the Train worker is the
# only process of a trial that trains (torch; numpy comes with Ray Tune itself), and the
# trial never searches (optuna).
HEAVY = ("torch", "optuna", "matplotlib")


def test_the_trial_module_path_imports_neither_torch_nor_searchers():
    # A fresh interpreter, as a Ray worker process is: what unpickling `run_trial` and
    # building the trainer's inputs import (Ray's own TorchTrainer is built later, in the call).
    probe = ("import sys, json; import hlbd_ray.trial; from hlbd_ray.trial import run_trial, trial_config; "
             f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_the_sweep_pickles_the_trial_by_its_light_module():
    from hlbd_ray.sweep import run_trial

    assert run_trial.__module__ == "hlbd_ray.trial"


def test_the_copy_key_is_tunes_repeater_key():
    from ray.tune.search.repeater import TRIAL_INDEX

    assert REPEAT_KEY == TRIAL_INDEX


@pytest.mark.slow
def test_a_lean_trial_starts_no_controller_dataset_or_cleaner_actor(tmp_path: Path):
    """With the controller in the trial and lean Train actors, a sweep's trials run their
    Train runs to the end and start no TrainController, DatasetManager or
    PlacementGroupCleaner actor; their worker placement groups are still freed."""
    from ray import tune

    from hlbd_ray.lifecycle import Interrupt
    from hlbd_ray.sweep import SweepHooks, run_sweep
    from hlbd_ray.trainer import preflight

    seen: dict[str, Any] = {}

    class ActorClasses(tune.Callback):
        def on_experiment_end(self, trials: list, **info: Any) -> None:
            import ray
            from ray.util.state import list_actors

            address = ray.get_runtime_context().gcs_address
            seen["classes"] = {a.class_name for a in list_actors(address=address, limit=10_000)}
            seen["status"] = [t.status for t in trials]

    cfg = micro_config("sweep.num_samples=2", "sweep.scheduler=fifo", "train.epochs=1", "cluster.num_cpus=2",
                       "sweep.confirm.top_k=0", "sweep.name=lean", "sweep.controller_in_trial=true",
                       "sweep.lean_train_actors=true", output_dir=tmp_path)
    cfg, data = preflight(cfg, cfg.sweep.name)
    code = run_sweep(cfg, data, tmp_path / "lean", Interrupt(), SweepHooks(callbacks=[ActorClasses()]))
    assert code == 0 and seen["status"] == ["TERMINATED", "TERMINATED"]
    classes = {c.split(".")[-1] for c in seen["classes"]}
    assert {"StoppableTrial", "RayTrainWorker"} <= classes, classes
    assert not classes & {"TrainController", "DatasetManager", "PlacementGroupCleaner"}, classes
    end = json.loads((tmp_path / "lean" / "sweep_end.json").read_text())
    assert end["placement_groups"]["left"] == 0, end


@pytest.mark.slow
def test_a_finished_trial_waits_until_tune_has_taken_trains_last_report():
    # The relay is TuneReportCallback's queue actor; here Tune's thread is a timer that
    # takes the one queued report after 0.5 s.
    import threading
    import time

    import ray
    from ray.util.queue import Queue

    from hlbd_ray.trial import RELAY_SETTLE_S, relay_drained

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        relay, stop = Queue(1, actor_options={"num_cpus": 0}), threading.Event()
        relay.put({"epoch": 3})
        taker = threading.Timer(0.5, relay.get)
        start = time.monotonic()
        taker.start()
        assert relay_drained(relay, stop, timeout_s=30)
        assert time.monotonic() - start >= 0.5 + RELAY_SETTLE_S and relay.empty()
        taker.join()
        relay.put({"epoch": 4})           # nobody takes this one: bounded, and says so
        start = time.monotonic()
        assert not relay_drained(relay, stop, timeout_s=0.5)
        assert 0.5 <= time.monotonic() - start < 5
        threading.Timer(0.3, stop.set).start()      # Tune stops the trial: no wait for the timeout
        start = time.monotonic()
        assert not relay_drained(relay, stop, timeout_s=30)
        assert time.monotonic() - start < 5
    finally:
        ray.shutdown()


class FakeRelay:
    """TuneReportCallback's queue, already drained by Tune's thread."""

    def empty(self) -> bool:
        return True


class FakeResult:
    metrics = {"epoch": 2, "epochs_done": 3, "batches": 90, "batch_losses": [2.0], "val_loss": 1.5}
    checkpoint = None


def test_a_finished_trial_reports_trains_last_record_once_more(monkeypatch):
    import threading

    from hlbd_ray import trial

    sent: list[dict] = []
    monkeypatch.setattr(trial.tune, "report", sent.append)
    trial.report_final(FakeResult(), FakeRelay(), threading.Event(), "t1")
    assert sent == [{"epoch": 2, "epochs_done": 3, "batches": 90, "batch_losses": [], "batch_start": 90,
                     "val_loss": 1.5}]


def test_a_stopped_trial_reports_nothing_more_and_ends_quietly(monkeypatch):
    """ASHA stops every trial at its last epoch, as its Train run ends: the trial thread
    must not report into the session Tune is shutting down (Ray warned on the console that
    `report` was called outside a Tune session)."""
    import threading

    from hlbd_ray import trial

    sent: list[dict] = []
    monkeypatch.setattr(trial.tune, "report", sent.append)
    stop = threading.Event()
    stop.set()
    with pytest.raises(SystemExit) as ended:
        trial.report_final(FakeResult(), FakeRelay(), stop, "t1")
    assert ended.value.code == 0 and sent == []


# --- the Train controller in the trial's thread, stopped by Tune -------------------------


class LoopingController:
    """A stand-in for Train's controller: an asyncio loop that polls until it is told it
    is done, blocking between awaits the way `ray.wait` does."""

    def __init__(self, rounds: int | None) -> None:
        self.rounds, self.polls = rounds, 0

    async def run(self) -> None:
        import asyncio
        import time

        while self.rounds is None or self.polls < self.rounds:
            time.sleep(0.01)          # the blocking poll
            self.polls += 1
            await asyncio.sleep(0)

    def get_result(self) -> str:
        return f"result after {self.polls} polls"


class FakeSession:
    def __init__(self) -> None:
        import threading

        self.stop_event = threading.Event()


def test_an_in_process_controller_runs_to_its_result_while_not_stopped(monkeypatch):
    import ray.train._internal.session as tune_session

    from hlbd_ray.trainer import run_controller_here

    monkeypatch.setattr(tune_session, "get_session", FakeSession)
    assert run_controller_here(LoopingController(rounds=5)) == "result after 5 polls"


def test_tunes_stop_request_ends_an_in_process_controller_quietly(monkeypatch):
    import threading

    import ray.train._internal.session as tune_session

    from hlbd_ray.trainer import run_controller_here
    from hlbd_ray.trial import joined_on_stop, trial_thread_to_join

    session = FakeSession()
    monkeypatch.setattr(tune_session, "get_session", lambda: session)
    controller = LoopingController(rounds=None)
    ended: list[BaseException] = []

    def trial_thread() -> None:
        try:
            with joined_on_stop(True):
                run_controller_here(controller)
        except BaseException as err:   # what Tune's runner thread would see
            ended.append(err)

    thread = threading.Thread(target=trial_thread, daemon=True)
    thread.start()
    while controller.polls < 3:
        thread.join(0.01)
    assert trial_thread_to_join()             # so the trial's cleanup will wait for it
    session.stop_event.set()                  # what Tune's cleanup does first
    thread.join(10)
    # The loop never ends by itself: only the stop request ended it, as SystemExit(0),
    # which Tune's runner thread takes as a clean end, not an error.
    assert not thread.is_alive()
    assert len(ended) == 1 and isinstance(ended[0], SystemExit) and ended[0].code == 0
    assert not trial_thread_to_join()


@pytest.mark.slow
def test_trials_asha_stops_with_their_controller_in_the_trial_end_without_an_abort(tmp_path: Path):
    """Two trials at a time on a grid: lr 3e-3 and 2e-3 go on at ASHA's rung, and lr 2e-5,
    1.5e-5, 1.2e-5 and 1e-5 are stopped behind them, most while their Train controllers
    poll their workers from the trials' threads. Before a trial's cleanup waited for that
    thread, such stops often aborted the trial actor ("free(): double free", SIGABRT; 6
    of 8 smoke sweeps here). The actors' own log files are read too: the console gets an
    actor's last lines only if the driver is still there to take them."""
    import shutil
    import tempfile

    import pyarrow.parquet as pq

    # Ray's sockets live under its temp folder, whose path must stay short.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    try:
        sweep = run_job("sweep.py", "--config", str(REPO / "conf" / "smoke.yaml"), f"output_dir={tmp_path}",
                        "sweep.search=grid", "sweep.num_samples=null", "sweep.space.d_model=[32]",
                        "sweep.space.num_heads=[4]", "sweep.space.lr_min=1e-5",
                        "sweep.space.lr_values=[3e-3,2e-3,2e-5,1.5e-5,1.2e-5,1e-5]",
                        "sweep.controller_in_trial=true", "sweep.confirm.top_k=0",
                        "data.generated_per_module=20", "train.epochs=2",
                        env={"RAY_TMPDIR": str(ray_tmp)}, timeout=300)
        logs = "".join(p.read_text(errors="replace") for p in ray_tmp.rglob("logs/*") if p.is_file())
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    console = sweep.stdout + sweep.stderr
    assert sweep.returncode == 0, console[-3000:]
    trials = {t["lr"]: t for t in pq.read_table(tmp_path / "smoke" / "report" / "trials.parquet").to_pylist()}
    assert trials[1e-5]["epochs_done"] == 1 and max(t["epochs_done"] for t in trials.values()) == 2
    assert json.loads((tmp_path / "smoke" / "sweep_end.json").read_text())["outcomes"]["STOPPED"] >= 3
    assert "Tune trial actor" in logs     # the trial actors' logs were read (their banner)
    # The last: a trial's thread reporting after Tune shut its session down (at max_t).
    for sign in ("double free", "SIGABRT", "Fatal Python error", "is meant to only be called inside"):
        assert sign not in console and sign not in logs, sign
    assert "Traceback" not in console, console[-3000:]
