"""What a sweep trial's own process loads, and which Ray processes a trial starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hlbd_ray.params import REPEAT_KEY

from .conftest import REPO, micro_config

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
    assert {"ImplicitFunc", "RayTrainWorker"} <= classes, classes
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
        relay = Queue(1, actor_options={"num_cpus": 0})
        relay.put({"epoch": 3})
        taker = threading.Timer(0.5, relay.get)
        start = time.monotonic()
        taker.start()
        assert relay_drained(relay, timeout_s=30)
        assert time.monotonic() - start >= 0.5 + RELAY_SETTLE_S and relay.empty()
        taker.join()
        relay.put({"epoch": 4})           # nobody takes this one: bounded, and says so
        start = time.monotonic()
        assert not relay_drained(relay, timeout_s=0.5)
        assert 0.5 <= time.monotonic() - start < 5
    finally:
        ray.shutdown()
