"""A Train worker whose process exits while it trains ends quietly (worker_exit.py).

Ray Train runs the training loop in a daemon thread; a worker ended gracefully mid-epoch
(a trial stopped by ASHA) finalizes the interpreter under it. The loop here is the real
TrainRun on the micro config, in a daemon thread as Train runs it: in a process that
exits with sys.exit while it trains, and in a Ray actor ended by Ray's graceful exit."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from hlbd_ray.worker_exit import WorkerExiting, _stop_loops_and_wait, check, stopped_before_exit

from .conftest import MICRO, REPO

# Starts the real loop in a daemon thread, as Train does, and returns once it reported.
TRAINING = """
import tempfile, threading
from hlbd_ray.config import load_config
from hlbd_ray.data import prepare_data
from hlbd_ray.session import LocalSession
from hlbd_ray.train import TrainRun
from hlbd_ray.worker_exit import stopped_before_exit

def start_training(guarded):
    cfg = load_config(None, {overrides!r})
    data = prepare_data(cfg.data, cfg.train.max_len)
    started = threading.Event()

    class Session(LocalSession):
        def report(self, metrics, checkpoint_dir=None):
            started.set()
            super().report(metrics, checkpoint_dir)

    def train():
        session = Session(tempfile.mkdtemp(), run_name="exit")
        if guarded:
            with stopped_before_exit() as exiting:
                TrainRun(cfg, data, session, exiting).fit()
        else:
            TrainRun(cfg, data, session).fit()

    threading.Thread(target=train, daemon=True).start()
    return started.wait(60)
"""

PROCESS = TRAINING + """
import sys, time
assert start_training({guarded}), "no report"
time.sleep(0.3)
sys.exit(0)                       # as a worker process ends: the thread still trains
"""

# A Ray actor that trains, ended by Ray's graceful exit (what `__ray_terminate__` and an
# actor's normal exit do: the task loop ends, then sys.exit); prints its workers' logs.
RAY_ACTOR = TRAINING + """
import glob, time
import ray
ray.init(num_cpus=1, _temp_dir={ray_tmp!r}, include_dashboard=False)
methods = {{"start": lambda self, guarded: start_training(guarded), "ping": lambda self: None}}
worker = ray.remote(type("Worker", (), methods)).remote()
assert ray.get(worker.start.remote({guarded}), timeout=120), "no report"
time.sleep(0.3)
worker.__ray_terminate__.remote()
try:
    ray.get(worker.ping.remote(), timeout=60)     # runs after the exit: never
except ray.exceptions.RayActorError:
    pass                          # the actor is gone
time.sleep(1)                     # the dead worker's last lines reach its log file
ray.shutdown()
print("".join(open(p, errors="replace").read() for p in glob.glob({ray_tmp!r} + "/session_*/logs/worker-*")))
"""

OVERRIDES = [*MICRO, "train.epochs=50", "data.generated_per_module=200"]


def exit_while_training(tmp_path, guarded: bool) -> subprocess.CompletedProcess:
    code = PROCESS.format(overrides=OVERRIDES, guarded=guarded)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_a_worker_process_exiting_mid_training_ends_without_an_abort(tmp_path):
    bare = exit_while_training(tmp_path, guarded=False)
    # Without the guard the interpreter ends the thread inside a torch op: SIGABRT.
    assert bare.returncode != 0 and "terminate" in bare.stderr + bare.stdout, bare.stderr[-2000:]
    guarded = exit_while_training(tmp_path, guarded=True)
    assert guarded.returncode == 0, guarded.stderr[-3000:]
    assert "Fatal Python error" not in guarded.stderr and "terminate" not in guarded.stderr


@pytest.mark.slow
@pytest.mark.parametrize("guarded", [False, True])
def test_a_ray_worker_ended_gracefully_mid_training_aborts_only_without_the_guard(guarded):
    # Ray's sockets live under its temp folder, whose path must stay short.
    ray_tmp = tempfile.mkdtemp(prefix="rx", dir="/tmp")
    try:
        code = RAY_ACTOR.format(overrides=OVERRIDES, guarded=guarded, ray_tmp=ray_tmp)
        run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=240)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert run.returncode == 0, run.stderr[-3000:]
    aborted = "Fatal Python error" in run.stdout
    assert aborted is not guarded, run.stdout[-3000:]


def test_the_guard_stops_only_loops_that_still_run_and_waits_a_bounded_time():
    ended, timings = threading.Event(), {}

    def loop() -> None:
        with stopped_before_exit() as exiting:
            with pytest.raises(WorkerExiting):
                while True:
                    check(exiting)
                    exiting.wait(0.01)
        ended.set()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    _stop_loops_and_wait(join_s=5.0)
    assert ended.is_set() and not thread.is_alive()

    # A loop that never checks: the wait gives up at its bound.
    release = threading.Event()

    def stuck() -> None:
        with stopped_before_exit():
            release.wait(30)

    thread = threading.Thread(target=stuck, daemon=True)
    thread.start()
    start = time.monotonic()
    _stop_loops_and_wait(join_s=0.3)
    timings["waited"] = time.monotonic() - start
    release.set()
    thread.join(5)
    assert 0.25 <= timings["waited"] < 2.0 and not thread.is_alive()
    _stop_loops_and_wait(join_s=5.0)     # nothing left to wait for: returns at once
