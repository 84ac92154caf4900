"""storage_path on object storage through a real S3 API: a moto server on 127.0.0.1,
addressed the way pyarrow reads it (`?endpoint_override=...&scheme=http`), with the
credentials in the environment, as on a real cluster."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from fnmatch import fnmatch

import pytest

from bench.bench_cluster import free_port
from hlbd_ray.search_restore import FINISHED, STATE_GLOB, trials_in_state
from hlbd_ray.storage import storage_join, storage_uri
from hlbd_ray.trainer import retained_checkpoints

from .conftest import RAY_TEST_ENV, REPO, run_job

SMOKE = str(REPO / "conf" / "smoke.yaml")
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture
def s3_storage(monkeypatch):
    """An empty bucket on a local S3 server; yields (storage_path URI, its filesystem)."""
    import pyarrow.fs
    from moto.server import ThreadedMotoServer

    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)      # a line per S3 request
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        fs = pyarrow.fs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http",
                                     allow_bucket_creation=True)
        fs.create_dir("hlbd")
        yield f"s3://hlbd/runs?endpoint_override=127.0.0.1:{port}&scheme=http", fs
    finally:
        server.stop()


def finished_trials(report_dir) -> dict[str, int]:
    """Trials the driver's report marks finished -> their reported epochs."""
    from hlbd_ray.tables import read_parquet

    path = report_dir / "trials.parquet"
    if not path.is_file():
        return {}
    return {t["trial_id"]: t["epochs_done"] for t in read_parquet(path).to_pylist()
            if t["status"] == "TERMINATED"}


def saved_finished_trials(fs, experiment: str) -> set[str]:
    """The trials the newest experiment state in storage records as finished."""
    import pyarrow.fs

    states = [f.path for f in fs.get_file_info(pyarrow.fs.FileSelector(experiment, allow_not_found=True))
              if fnmatch(f.base_name, STATE_GLOB)]
    if not states:
        return set()
    with fs.open_input_stream(max(states)) as handle:
        text = handle.read()
    try:
        trials = trials_in_state(text)
    except json.JSONDecodeError:
        return set()      # caught mid-upload (seen under load): the next poll reads it whole
    return {tid for tid, trial in trials.items() if trial.status == FINISHED}


@pytest.mark.slow
def test_a_sweep_on_s3_resumes_from_the_bucket_and_its_best_checkpoint_loads(tmp_path, s3_storage):
    import pyarrow.fs

    from hlbd_ray.tables import read_parquet

    storage, fs = s3_storage
    args = ["--config", SMOKE, f"output_dir={tmp_path}", f"storage_path={storage}", "cluster.num_cpus=2"]
    env = {**os.environ, **RAY_TEST_ENV}
    first = subprocess.Popen([sys.executable, str(REPO / "jobs" / "sweep.py"), *args], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    report = tmp_path / "smoke" / "report"
    try:
        deadline = time.monotonic() + 240
        # Killed once the bucket's experiment state records a finished trial (Tune saves
        # it there every 10 s or more: a trial that ended since is still running in it).
        while not set(finished_trials(report)) & saved_finished_trials(fs, "hlbd/runs/smoke"):
            assert first.poll() is None, f"the sweep exited with {first.returncode} before a trial finished"
            assert time.monotonic() < deadline, "timed out waiting for a finished trial"
            time.sleep(1.0)
    finally:
        os.killpg(first.pid, signal.SIGKILL)       # the driver and the cluster it started
        first.wait()
    assert len(finished_trials(report)) < 4, "the sweep finished before it could be interrupted"
    saved = saved_finished_trials(fs, "hlbd/runs/smoke")
    before = {tid: epochs for tid, epochs in finished_trials(report).items() if tid in saved}
    assert before

    # Tune's experiment state and the checkpoints are in the bucket, not on local disk.
    files = [f.path for f in fs.get_file_info(pyarrow.fs.FileSelector("hlbd/runs/smoke", recursive=True))]
    assert any(p.rsplit("/", 1)[-1].startswith("experiment_state") for p in files), files[:20]
    assert any(p.endswith("/state.pt") and "/train/" in p for p in files)
    assert not (tmp_path / "smoke" / "train").exists()

    again = run_job("sweep.py", *args, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming the sweep" in again.stdout
    after = finished_trials(report)
    assert len(after) == 4, read_parquet(report / "trials.parquet").to_pylist()
    assert all(after[tid] == epochs for tid, epochs in before.items()), (before, after)  # not re-run
    # Nothing counted twice: one row per (trial, epoch), epochs 0..n-1 of each trial.
    epochs = read_parquet(report / "epochs.parquet").to_pylist()
    per_trial: dict[str, list[int]] = {}
    for row in epochs:
        per_trial.setdefault(row["trial_id"], []).append(row["epoch"])
    assert all(sorted(e) == list(range(len(e))) for e in per_trial.values()), per_trial

    best = json.loads((tmp_path / "smoke" / "best.json").read_text())
    assert best["checkpoint"].startswith("s3://hlbd/runs/smoke/train/") and "endpoint_override" in best["checkpoint"]
    # It is among the checkpoints Ray Train's record in the bucket says it kept (the record
    # best.json falls back on when the driver never saw the best epoch's report).
    kept = retained_checkpoints(storage_join(storage, "smoke", "train"))
    assert best["checkpoint"] == storage_uri(storage, kept[(best["trial_id"], best["best_epoch"])])
    generated = run_job("generate.py", "--sweep", str(tmp_path / "smoke"), "3+4=?", timeout=120)
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert "answer: " in generated.stdout and f"checkpoint {best['checkpoint']}" in generated.stderr
