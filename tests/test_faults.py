"""Faults on a real local Ray: dying workers, exceptions, hopeless trials, a killed driver,
non-finite losses. Nothing may be lost or counted twice, and the sweep carries on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from hlbd_ray.tables import read_parquet

from .conftest import RAY_TEST_ENV, REPO, ray_temp_dir, run_job

pytestmark = pytest.mark.slow
SMOKE = str(REPO / "conf" / "smoke.yaml")
# Two trials that both run every epoch (no early stopping), so every fault shows.
TWO_TRIALS = ["cluster.num_cpus=2", "sweep.num_samples=null", "sweep.scheduler=fifo",
              "sweep.space.num_heads=[2,4]", "sweep.search=grid", "sweep.space.lr_grid_points=1"]


def sweep(tmp_path: Path, *overrides: str, timeout: float = 300):
    result = run_job("sweep.py", "--config", SMOKE, f"output_dir={tmp_path}", *TWO_TRIALS,
                     *overrides, timeout=timeout)
    exp = tmp_path / "smoke"
    assert (exp / "report/trials.parquet").is_file(), result.stderr[-3000:]
    trials = pq.read_table(exp / "report/trials.parquet").to_pylist()
    curves = pq.read_table(exp / "report/curves.parquet").to_pylist()
    return result, {t["trial_id"]: t for t in trials}, curves


def assert_curves_complete(curves: list[dict], trial_id: str, epochs: int, epoch_batches: int):
    """Every batch of every epoch counted exactly once, in order, no gap, no overlap."""
    rows = sorted((r for r in curves if r["trial_id"] == trial_id), key=lambda r: (r["epoch"], r["bucket"]))
    assert {r["epoch"] for r in rows} == set(range(epochs))
    for epoch in range(epochs):
        buckets = [r for r in rows if r["epoch"] == epoch]
        covered = [i for b in buckets for i in range(b["micro_batch_first"], b["micro_batch_last"] + 1)]
        assert covered == list(range(epoch * epoch_batches, (epoch + 1) * epoch_batches))
        assert sum(b["count"] for b in buckets) == epoch_batches


@pytest.mark.parametrize("fault", ["fault.kill_at_step=16", "fault.raise_at_step=16"],
                         ids=["worker-sigkill", "exception"])
def test_a_failed_worker_resumes_from_its_checkpoint_and_loses_nothing(tmp_path, fault):
    result, trials, curves = sweep(tmp_path, fault)
    assert result.returncode == 0, result.stderr[-3000:]
    for trial_id, trial in trials.items():
        assert trial["status"] == "TERMINATED" and trial["epochs_done"] == 3
        # Step numbering continues after the retry: 3 epochs of 12 batches, one step each.
        assert trial["step"] == 36 and trial["batches"] == 36
        assert_curves_complete(curves, trial_id, epochs=3, epoch_batches=12)
    # The fault really fired in every trial (once each: the retry then succeeded).
    markers = list((tmp_path / ".faults").glob("*/*"))
    assert len(markers) == 2


def test_a_trial_failing_every_retry_errors_alone_and_the_sweep_succeeds(tmp_path):
    result, trials, _ = sweep(tmp_path, "fault.raise_at_step=3", "fault.once=false",
                              "fault.only_num_heads=2", "train.max_failures=1")
    assert result.returncode == 0, result.stderr[-3000:]
    by_heads = {t["num_heads"]: t for t in trials.values()}
    assert by_heads[2]["status"] == "ERROR" and "injected fault" in by_heads[2]["error"]
    assert by_heads[4]["status"] == "TERMINATED" and by_heads[4]["epochs_done"] == 3
    assert "ERROR" in result.stdout and "injected fault" in result.stdout
    # The real error reaches the console as the trial's own line, with its traceback's file.
    assert any("errored: " in line and "injected fault" in line for line in result.stdout.splitlines())


def test_when_every_trial_fails_the_exit_code_says_so(tmp_path):
    result, trials, _ = sweep(tmp_path, "fault.raise_at_step=1", "fault.once=false",
                              "train.max_failures=0")
    assert result.returncode == 1
    assert "every trial failed (2)" in result.stderr and "injected fault" in result.stderr
    assert [t["status"] for t in trials.values()] == ["ERROR", "ERROR"]


def test_non_finite_losses_stop_the_trial_with_a_reason_not_a_nan(tmp_path):
    result, trials, curves = sweep(tmp_path, "fault.nan_from_step=14", "fault.only_num_heads=2",
                                   "train.max_consecutive_skips=3")
    assert result.returncode == 0, result.stderr[-3000:]
    by_heads = {t["num_heads"]: t for t in trials.values()}
    poisoned = by_heads[2]
    assert poisoned["status"] == "TERMINATED" and "non-finite" in poisoned["stop_reason"]
    assert poisoned["skipped_steps"] == 3 and poisoned["epochs_done"] == 2
    assert by_heads[4]["epochs_done"] == 3 and by_heads[4]["stop_reason"] is None
    nan_rows = [r for r in curves if r["trial_id"] == poisoned["trial_id"] and r["nonfinite"]]
    assert sum(r["nonfinite"] for r in nan_rows) == 3
    for row in nan_rows:                       # counted as missing, never averaged as NaN
        assert row["mean"] is None or row["mean"] == row["mean"]
    report = json.loads((tmp_path / "smoke/report/experiment_report.json").read_text())
    assert "NaN" not in json.dumps(report)


def poll_reports(folder: Path, stop: threading.Event, seen: Counter) -> None:
    """Parse every report file over and over; any partial file fails the parse."""
    while not stop.is_set():
        for path in list(folder.rglob("*")):
            if path.name.startswith("."):
                continue                           # temporary names being written
            if path.suffix == ".parquet":
                read_parquet(path)          # one open handle pins one version of the file
                seen["parquet"] += 1
            elif path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
                seen["json"] += 1


def test_a_killed_driver_resumes_and_report_files_are_whole_at_every_moment(tmp_path):
    report = tmp_path / "smoke" / "report"
    report.mkdir(parents=True)
    seen, stop, errors = Counter(), threading.Event(), []

    def reader():
        try:
            poll_reports(report, stop, seen)
        except Exception as err:  # recorded and asserted below: a partial file was read
            errors.append(repr(err))

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    args = [sys.executable, str(REPO / "jobs/sweep.py"), "--config", SMOKE, f"output_dir={tmp_path}",
            *TWO_TRIALS, "sweep.space.num_heads=[2,4,8]", "train.epochs=4"]
    driver = subprocess.Popen(args, cwd=REPO, env={**os.environ, **RAY_TEST_ENV},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        import time

        deadline = time.monotonic() + 240
        while not (report / "curves.parquet").exists() or seen["parquet"] < 20:
            assert time.monotonic() < deadline and driver.poll() is None, "no live reports"
            time.sleep(0.2)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    result = run_job("sweep.py", *args[2:], timeout=300)
    stop.set()
    thread.join()
    assert result.returncode == 0, result.stderr[-3000:]
    assert errors == [] and seen["parquet"] > 20 and seen["json"] > 20
    trials = pq.read_table(report / "trials.parquet").to_pylist()
    assert len(trials) == 3 and all(t["status"] == "TERMINATED" and t["epochs_done"] == 4 for t in trials)
    curves = pq.read_table(report / "curves.parquet").to_pylist()
    for trial in trials:
        assert_curves_complete(curves, trial["trial_id"], epochs=4, epoch_batches=12)


def train_worker_pids(root: int) -> list[int]:
    """This test's Train workers: processes Ray titled as Train workers (it rewrites their
    command line) that descend from `root`, our driver. The driver starts its private
    cluster's raylet as a child and the raylet its workers, so other users' Ray on the
    same machine is never touched."""
    parents: dict[int, int] = {}
    titled: list[int] = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            # Field 4 of stat is the parent pid; the command name before it may hold spaces.
            parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if b"RayTrainWorker" in (proc / "cmdline").read_bytes():
                titled.append(int(proc.name))
        except (OSError, IndexError, ValueError):
            continue       # the process ended while we looked

    def descends(pid: int) -> bool:
        for _ in range(64):
            if pid == root:
                return True
            if pid not in parents or pid <= 1:
                return False
            pid = parents[pid]
        return False

    return [pid for pid in titled if descends(pid)]


def test_a_worker_killed_from_outside_mid_epoch_is_replaced_and_nothing_is_lost(tmp_path):
    import time

    args = [sys.executable, str(REPO / "jobs/sweep.py"), "--config", SMOKE, f"output_dir={tmp_path}",
            *TWO_TRIALS, "sweep.space.num_heads=[4]", "train.epochs=4", "model.d_model=64",
            "data.generated_per_module=150", "train.batch_size=8"]
    started = time.time()
    log_file = (tmp_path / "driver.log").open("w")    # a pipe left unread could fill and block
    driver = subprocess.Popen(args, cwd=REPO, env={**os.environ, **RAY_TEST_ENV},
                              stdout=log_file, stderr=subprocess.STDOUT)
    exp = tmp_path / "smoke"

    # Tune's own result log (one flushed line per result) in the driver's staging folder,
    # which reaches output_dir only at Tune's periodic syncs.
    staging = ray_temp_dir() / "session_latest" / "artifacts"

    def mid_second_epoch() -> bool:
        """Past epoch 1's first report, so after the epoch-0 checkpoint."""
        for log in staging.glob("*/smoke/driver_artifacts/*/result.json"):
            if log.stat().st_mtime < started:
                continue                 # an earlier run's session
            lines = log.read_text().splitlines()
            if lines and json.loads(lines[-1]).get("epoch") == 1:
                return True
        return False

    deadline = time.monotonic() + 240
    while not mid_second_epoch():
        assert time.monotonic() < deadline and driver.poll() is None, "training never got going"
        time.sleep(0.1)
    victims = train_worker_pids(driver.pid)
    assert victims, "no Train worker process found"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    driver.wait(timeout=300)
    log_file.close()
    assert driver.returncode == 0, (tmp_path / "driver.log").read_text()[-3000:]
    assert not [pid for pid in victims if Path(f"/proc/{pid}").exists()]   # really killed
    (trial,) = pq.read_table(exp / "report/trials.parquet").to_pylist()
    assert trial["status"] == "TERMINATED" and trial["epochs_done"] == 4
    epoch_batches = trial["batches"] // 4
    assert trial["step"] == trial["batches"]            # numbering continued, no restart at 0
    curves = pq.read_table(exp / "report/curves.parquet").to_pylist()
    assert_curves_complete(curves, trial["trial_id"], epochs=4, epoch_batches=epoch_batches)
    # The kill really interrupted the run: Tune saw a result of epoch 1 twice (the replay).
    results = [json.loads(x) for x in next(exp.glob("*/result.json")).read_text().splitlines()]
    starts = [r["batch_start"] for r in results if r["epoch"] == 1]
    assert len(starts) != len(set(starts))
