"""`ray job submit` against a head on 127.0.0.1 that the test starts, and stops, itself.

The head runs with token authentication, as Ray's default cluster does. The job trains on
the shipped HLBD Full file by its short name, resolved inside the job. Once it ended, a
real browser (headless Chromium) logs into the dashboard with the cluster's token and
finds the job on the Jobs page, then opens the sweep's report page; screenshots are kept
under the job's output_dir (`screenshots/`) for a person to look at.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from bench.bench_cluster import free_port

from .browser import RAY_AUTH_COOKIE, check_report_page, chromium, wait_for
from .conftest import RAY_TEST_ENV, REPO

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))
EXCLUDES = '{"excludes": [".venv", ".git", "runs", ".pytest_cache"]}'



def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1.0)


def test_the_smoke_sweep_on_hlbd_full_runs_as_a_submitted_job(tmp_path):
    gcs_port, dashboard_port = free_port(), free_port()
    env = {**os.environ, **RAY_TEST_ENV, "HOME": str(tmp_path / "home"), "RAY_AUTH_MODE": "token",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    # The command the job prints for the token; --generate makes this private cluster's.
    token = subprocess.run([RAY, "get-auth-token", "--generate"], env=env, capture_output=True,
                           text=True, timeout=60, check=True).stdout.strip()
    assert len(token) >= 32
    # --block keeps `ray start` in the foreground: killing its process group stops exactly
    # this head (`ray stop` would stop every Ray of the user). Its own temp dir keeps its
    # session and its `ray_current_cluster` record out of the shared one: a record left
    # there by a killed head sends later clusters' state-API lookups (Ray Train's
    # placement-group cleaner among them) to a dead address. Short: socket paths are limited.
    temp_dir = Path(tempfile.mkdtemp(prefix="rjs-"))
    head = subprocess.Popen(
        [RAY, "start", "--head", f"--port={gcs_port}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard_port}", "--num-cpus=2", f"--temp-dir={temp_dir}", "--block"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        client = wait_until(lambda: _client(address, token), 90, "the job server")
        submit = subprocess.run(
            [RAY, "job", "submit", "--address", address, "--no-wait", "--working-dir", str(REPO),
             "--runtime-env-json", EXCLUDES, "--", "python", "jobs/sweep.py",
             "--config", "conf/smoke.yaml", f"output_dir={tmp_path / 'out'}",
             # The shipped HLBD Full file by its short name; 256 cuts none of its answers.
             "data.paths=[hlbd:full]", "train.max_len=256", "train.max_steps=6"],
            env=env, capture_output=True, text=True, timeout=120)
        assert submit.returncode == 0, submit.stderr
        job_id = re.search(r"raysubmit_[A-Za-z0-9]+", submit.stdout).group(0)
        index = tmp_path / "out/smoke/report/index.html"
        pages: set[bool] = set()     # seen reloading (True) or final (False)

        def finished():
            if index.is_file():
                pages.add('http-equiv="refresh"' in index.read_text())
            return _finished(client, job_id)

        status = wait_until(finished, 400, "the job to finish")
        logs = client.get_job_logs(job_id)
        assert status == "SUCCEEDED", logs[-3000:]
        assert "best trial" in logs and "[sweep" in logs
        # What the dashboard shows under Jobs -> Log: a line per trial event.
        assert logs.count(" started: ") == 4 and "trials: 4 = " in logs
        # How to get in: the token's command, next to the dashboard's URL.
        assert f"`{RAY} get-auth-token`" in logs
        trials = pq.read_table(tmp_path / "out/smoke/report/trials.parquet").to_pylist()
        assert len(trials) == 4 and all(t["d_model"] % t["num_heads"] == 0 for t in trials)
        ids = {t["trial_id"] for t in trials}
        # Every trial actor's and Train worker's log file opens with its trial and config,
        # as Ray's actor-name line: the dashboard shows it, the job's log does not.
        actor_logs = "".join(f.read_text(errors="replace")
                             for f in (temp_dir / "session_latest" / "logs").glob("worker-*.out"))
        for role in ("Tune trial actor", "Train worker rank 0 of 1"):
            banner = rf":actor_name:\[hlbd\] trial (\S+): d_model 32, num_heads \d, lr [^;]+; {role}"
            named = set(re.findall(banner, actor_logs))
            assert named == ids, (role, named)
        assert "[hlbd] trial" not in logs
        # TensorBoard: our line names the experiment folder; Tune's hint (a temp folder) is gone.
        assert f"tensorboard --logdir {tmp_path / 'out/smoke'}" in logs
        assert "To visualize your results with TensorBoard" not in logs
        assert_event_files_hold_the_loss(tmp_path / "out/smoke", ids)
        # The live page reloaded itself while the sweep ran, and stopped at its end.
        assert True in pages and 'http-equiv="refresh"' not in index.read_text()
        shots = tmp_path / "out/screenshots"
        with chromium() as browser:
            check_dashboard_lists_the_job(browser, address, token, job_id, shots)
            check_report_page(browser, index, len(trials), shots)
        assert (tmp_path / "out/smoke/best_config.yaml").is_file()
        report = json.loads((tmp_path / "out/smoke/report/experiment_report.json").read_text())
        stats = report["dataset_stats"]
        (source,) = stats["files"]
        assert source["name"] == "hlbd:full" and source["read"] == 5000
        # Resolved in the job's own copy of the package (the uploaded working directory).
        assert source["path"].endswith("/hlbd_ray/hlbd_data/HLBD_Full_V2.json")
        assert not source["path"].startswith(str(REPO))
        assert stats["truncated_train"] == stats["truncated_val"] == 0
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
    # Only what this test started is gone: the head's GCS port is free again.
    wait_until(lambda: _port_free(gcs_port), 30, "the head to stop")
    assert (temp_dir / "ray_current_cluster").read_text().strip().endswith(f":{gcs_port}")
    shutil.rmtree(temp_dir)


def check_dashboard_lists_the_job(browser, address: str, token: str, job_id: str,
                                  shots: Path) -> None:
    """Into the dashboard with the cluster's token as Ray's auth cookie; the Jobs page
    lists the job (read from the DOM)."""
    from selenium.webdriver.common.by import By

    # A cookie needs a page of its site: a public endpoint, not the app, whose first API
    # call without the token would open its token dialog.
    browser.get(f"{address}/api/authentication_mode")
    browser.add_cookie({"name": RAY_AUTH_COOKIE, "value": token, "path": "/"})
    browser.get(f"{address}/#/jobs")
    wait_for(browser, lambda b: job_id in b.find_element(By.TAG_NAME, "body").text, 90,
             f"the Jobs page to list {job_id}")
    shots.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(shots / "dashboard_jobs.png"))
    assert "Authentication Token Required" not in browser.find_element(By.TAG_NAME, "body").text


def assert_event_files_hold_the_loss(experiment: Path, trial_ids: set[str]) -> None:
    """Tune's TensorBoard event files, one set per trial folder, carry the loss."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for tid in trial_ids:
        events = EventAccumulator(str(experiment / tid))
        events.Reload()
        losses = [e.value for e in events.Scalars("ray/tune/loss")]
        assert losses and all(0 < v < 20 for v in losses), (tid, losses)


def _client(address: str, token: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
    except Exception:  # the job server is still starting; wait_until retries
        return None


def _finished(client, job_id: str):
    status = str(client.get_job_status(job_id)).split(".")[-1]
    return status if status in ("SUCCEEDED", "FAILED", "STOPPED") else None


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0
