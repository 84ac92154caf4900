"""How a sweep stops early on a real local Ray: Ctrl-C, SIGTERM and the stall watchdog
each save the sweep's state, exit with their own code, say how to resume, and show the
trials they cut short as INTERRUPTED; rerunning the same command resumes the sweep."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray import tune

from hlbd_ray.errors import EXIT_SIGINT, EXIT_SIGTERM, EXIT_STALLED

from .conftest import RAY_TEST_ENV, REPO, run_job

pytestmark = [pytest.mark.slow, pytest.mark.extended]
SMOKE = str(REPO / "conf" / "smoke.yaml")
# Two trials at once, every epoch run (no early stop), long enough to be interrupted.
TWO_TRIALS = ["cluster.num_cpus=2", "sweep.num_samples=null", "sweep.scheduler=fifo",
              "sweep.space.num_heads=[2,4]", "sweep.search=grid", "sweep.space.lr_grid_points=1"]


def sweep_args(tmp_path: Path, *overrides: str) -> list[str]:
    return ["--config", SMOKE, f"output_dir={tmp_path}", *TWO_TRIALS, *overrides]


def sweep_end(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "smoke" / "sweep_end.json").read_text())


def reported(tmp_path: Path) -> bool:
    """A trial has sent a result: the driver writes its first report file at once."""
    return (tmp_path / "smoke" / "report" / "curves.parquet").exists()


def interrupt_running_sweep(tmp_path: Path, sig: int, *overrides: str) -> tuple[int, str]:
    """Start the sweep, send `sig` to the driver once a trial reported, return (code, output)."""
    log = tmp_path / "driver.log"
    with log.open("w") as out:
        driver = subprocess.Popen([sys.executable, str(REPO / "jobs/sweep.py"),
                                   *sweep_args(tmp_path, *overrides)], cwd=REPO,
                                  env={**os.environ, **RAY_TEST_ENV}, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while not reported(tmp_path):
                assert time.monotonic() < deadline and driver.poll() is None, log.read_text()[-3000:]
                time.sleep(0.5)
            driver.send_signal(sig)
            code = driver.wait(timeout=120)
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait()
    return code, log.read_text()


def test_ctrl_c_saves_the_state_exits_130_and_the_same_command_resumes(tmp_path):
    code, out = interrupt_running_sweep(tmp_path, signal.SIGINT, "train.epochs=20")
    assert code == EXIT_SIGINT, out[-3000:]
    assert "run the same command again" in out and "INTERRUPTED" in out
    assert " DONE " not in out and "Traceback" not in out
    end = sweep_end(tmp_path)
    assert end["stopped_by"] == "SIGINT" and end["outcomes"]["INTERRUPTED"] >= 1
    assert end["outcomes"]["COMPLETED"] + end["outcomes"]["INTERRUPTED"] == 2

    again = run_job("sweep.py", *sweep_args(tmp_path, "train.epochs=20"), timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming the sweep" in again.stdout
    end = sweep_end(tmp_path)
    assert end["stopped_by"] is None and end["outcomes"]["COMPLETED"] == 2, end


def test_sigterm_saves_the_state_exits_143_and_names_the_cut_trials(tmp_path):
    code, out = interrupt_running_sweep(tmp_path, signal.SIGTERM, "train.epochs=20")
    assert code == EXIT_SIGTERM, out[-3000:]
    assert "sweep stopped early (SIGTERM)" in out and "run the same command again" in out
    end = sweep_end(tmp_path)
    assert end["stopped_by"] == "SIGTERM" and end["outcomes"]["INTERRUPTED"] >= 1
    assert tune.Tuner.can_restore(str(tmp_path / "smoke"))


def test_a_stalled_sweep_is_diagnosed_exits_3_and_the_same_command_resumes(tmp_path):
    # Every trial's worker sleeps at step 5 (once per trial: the resumed run goes on).
    stalled = sweep_args(tmp_path, "fault.sleep_at_step=5", "sweep.stall_timeout_s=40", "train.epochs=2")
    result = run_job("sweep.py", *stalled, timeout=300)
    assert result.returncode == EXIT_STALLED, result.stderr[-3000:]
    err = result.stderr
    assert "sweep stalled: no trial reported for" in err
    for part in ("placement groups reserved:", "placement groups pending: 0", "trials waiting:",
                 "RUNNING, last report", "run the same command again"):
        assert part in err, err[-3000:]
    # Each stalled trial's worker group holds its CPU (next to Tune's 0.01 for its driver).
    assert err.count("{'CPU': 0.99} x1 of trial") == 2, err[-3000:]
    assert sweep_end(tmp_path)["outcomes"]["INTERRUPTED"] == 2
    assert len(list((tmp_path / ".faults").glob("*/sleep"))) == 2

    again = run_job("sweep.py", *stalled, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert sweep_end(tmp_path)["outcomes"]["COMPLETED"] == 2
