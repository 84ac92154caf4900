"""Stress: many short trials, stopped and started constantly, two at a time on two CPUs.

ASHA (grace 1 epoch, reduction 2) stops most trials early, Train's worker-group start
timeout is cut to 3 s so that start-ups give up and retry while the other trial holds
the CPUs, and the time budget stops the sweep while trials are still starting. No Train
placement group may outlive its trial (RAY_NOTES, Trap 3), and the sweep must end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import RAY_TEST_ENV, REPO

SMOKE = str(REPO / "conf" / "smoke.yaml")
STRESS = ["cluster.num_cpus=2", "sweep.num_samples=30", "sweep.max_concurrent_trials=2",
          "sweep.scheduler=asha", "sweep.grace_period=1", "sweep.reduction_factor=2",
          "train.epochs=3", "sweep.time_budget_s=120"]
HANG_S = 330
# The start-up levers of issue 14, both on by default: no dataset manager or
# placement-group cleaner actors, and the Train controller inside the trial's own process.
STOCK = ["sweep.controller_in_trial=false", "sweep.lean_train_actors=false"]
CONTROLLER_ACTOR = ["sweep.controller_in_trial=false"]


def run_bounded(args: list[str], log: Path, timeout: float, env: dict[str, str]) -> int | None:
    """The driver's exit code, or None when it ran past `timeout` (then its whole
    process group, the local Ray cluster included, is killed)."""
    with log.open("w") as out:
        driver = subprocess.Popen([sys.executable, str(REPO / "jobs/sweep.py"), *args], cwd=REPO,
                                  env={**os.environ, **RAY_TEST_ENV, **env}, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return driver.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
            return None


@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.timeout(HANG_S + 60)
@pytest.mark.parametrize("levers", [STOCK, CONTROLLER_ACTOR, []], ids=["stock-ray", "controller-actor", "default"])
def test_a_stress_sweep_ends_and_leaks_no_placement_group(tmp_path, levers):
    log = tmp_path / "driver.log"
    code = run_bounded(["--config", SMOKE, f"output_dir={tmp_path}", *STRESS, *levers], log, HANG_S,
                       {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "3"})
    tail = log.read_text()[-3000:]
    assert code is not None, f"the sweep hung past {HANG_S} s:\n{tail}"
    assert code == 0, tail
    end = json.loads((tmp_path / "smoke" / "sweep_end.json").read_text())
    groups = end["placement_groups"]
    # Nothing outlived the sweep, and no stray held its CPUs for long after its trial.
    assert groups["left"] == 0, tail
    assert groups["longest_after_trial_end_s"] <= 15, groups
    outcomes = end["outcomes"]
    assert outcomes["STOPPED"] >= 1 and outcomes["COMPLETED"] >= 1, outcomes
    assert outcomes["ERROR"] == 0, tail
