"""The sweep: resources that cannot deadlock, refusals before Ray, and real sweeps end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray

from hlbd_ray.config import load_config
from hlbd_ray.errors import EXIT_USER_ERROR, UserError, run_cli
from hlbd_ray.console import SweepStatus, status_line
from hlbd_ray.sweep import DRIVER_CPU, main, plan_resources, trial_config

from .conftest import REPO, RAY_TEST_ENV, run_job

SMOKE = str(REPO / "conf" / "smoke.yaml")


def smoke(*overrides: str):
    return load_config(SMOKE, list(overrides))


# --- resources: the driver's sliver comes out of the trial's CPUs ---------------------


def test_two_one_cpu_trials_fit_two_cpus_with_their_drivers():
    plan = plan_resources(smoke(), {"CPU": 2.0})
    assert plan.max_concurrent == 2
    assert plan.worker_cpu == pytest.approx(1 - DRIVER_CPU)
    assert 2 * (plan.worker_cpu + DRIVER_CPU) <= 2.0


def test_fractional_gpus_let_four_trials_share_one_gpu():
    cfg = smoke("train.gpus_per_worker=0.25", "sweep.max_concurrent_trials=0")
    assert plan_resources(cfg, {"CPU": 16.0, "GPU": 1.0}).max_concurrent == 4


def test_concurrency_is_capped_by_the_cluster(capsys):
    plan = plan_resources(smoke("sweep.max_concurrent_trials=8"), {"CPU": 2.0})
    assert plan.max_concurrent == 2 and "lowered to 2" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, cluster", [
    (["train.cpus_per_worker=4"], {"CPU": 2.0}),
    (["train.gpus_per_worker=1"], {"CPU": 8.0}),
    (["train.num_workers=3"], {"CPU": 2.0}),
])
def test_a_trial_that_cannot_fit_is_refused(overrides, cluster):
    with pytest.raises(UserError, match="one trial needs"):
        plan_resources(smoke(*overrides), cluster)


def test_a_trial_config_decodes_its_architecture_and_lr():
    cfg = trial_config(smoke(), {"arch": "32x2", "lr": 0.01})
    assert (cfg.model.d_model, cfg.model.num_heads, cfg.train.lr) == (32, 2, 0.01)


def test_status_line_counts_trials_and_names_the_best_so_far():
    class T:
        def __init__(self, tid, status):
            self.trial_id, self.status = tid, status
            self.config = {"arch": "32x4", "lr": 1e-3}

    trials = [T("a", "TERMINATED"), T("b", "RUNNING"), T("c", "PENDING"), T("d", "ERROR")]
    status = SweepStatus("val_loss", "min")
    for tid, value in [("a", 2.0), ("b", 1.5), ("b", 1.9), ("c", None)]:
        status.on_trial_result(0, trials, next(t for t in trials if t.trial_id == tid),
                               {"val_loss": value})
    line = status_line(trials, status.best, "val_loss", "min", 75)
    assert "[sweep 01:15] 1 done, 1 errored, 1 running, 1 pending" in line
    # b's later, worse value does not hide its best one.
    assert "best val_loss 1.5000 (b: 32x4" in line


# --- refusals: exit 2, one line, before Ray starts --------------------------------------


@pytest.mark.parametrize("overrides, fragment", [
    (["sweep.space.d_model=[256]", "sweep.space.num_heads=[3,7]"], "no valid pair"),
    (["sweep.search=bayes"], "sweep.search"),
    (["sweep.space.lr_min=0"], "lr_min"),
    (["sweep.space.lr_min=1e-6"], "below train.min_lr"),
])
def test_invalid_spaces_exit_2_without_starting_ray(tmp_path, capsys, overrides, fragment):
    code = run_cli(main, ["--config", SMOKE, f"output_dir={tmp_path}", *overrides])
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR and fragment in err and len(err.strip().splitlines()) == 1
    assert not ray.is_initialized() and not any(tmp_path.iterdir())


# --- end to end on a real local Ray ------------------------------------------------------


def trial_table(report_dir: Path):
    return pq.read_table(report_dir / "report" / "trials.parquet").to_pylist()


@pytest.mark.slow
def test_smoke_sweep_end_to_end(tmp_path):
    result = run_job("sweep.py", "--config", SMOKE, f"output_dir={tmp_path}",
                     "cluster.num_cpus=2", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    exp = tmp_path / "smoke"
    trials = trial_table(exp)
    assert len(trials) == 4
    assert all(t["d_model"] % t["num_heads"] == 0 and t["head_dim"] == t["d_model"] // t["num_heads"]
               for t in trials)
    # ASHA (grace 1 epoch, factor 2) stopped at least one trial before its last epoch.
    assert any(t["epochs_done"] < 3 for t in trials) and any(t["epochs_done"] == 3 for t in trials)
    best = json.loads((exp / "best.json").read_text())
    assert best["best_val_loss"] == min(t["best_val_loss"] for t in trials)
    best_cfg = load_config(exp / "best_config.yaml")          # a loadable training config
    assert best_cfg.model.d_model % best_cfg.model.num_heads == 0
    report = json.loads((exp / "dataset_report.json").read_text())   # written before training
    assert best_cfg.train.max_len == report["max_len"] and report["split"]["val_with_train_twin"] == 0
    assert Path(best["checkpoint"]).is_dir()
    for name in ("curves.parquet", "epochs.parquet", "experiment_report.json"):
        assert (exp / "report" / name).is_file()
    # Validation per module: in Tune's results as nested keys, and in modules.parquet.
    modules = {m for m, r in report["modules"].items() if r["val_pairs"]}
    (log, *_) = sorted(exp.glob("*/progress.csv"))
    header = log.read_text().splitlines()[0].split(",")
    assert {f"val_modules/{m}/{k}" for m in modules for k in ("loss", "exact")} <= set(header)
    last = json.loads((log.parent / "result.json").read_text().splitlines()[-1])
    assert set(last["val_modules"]) == modules and last["val_modules"]["geometry"]["loss"] is not None
    rows = pq.read_table(exp / "report" / "modules.parquet").to_pylist()
    assert {r["module"] for r in rows} == modules and {r["metric"] for r in rows} == {"loss", "exact"}
    assert "best trial" in result.stdout and "[sweep" in result.stdout
    # A console a new user can read: a line per trial start and end, the outcome counts,
    # and none of the Ray tracebacks or cleaner chatter of trials being stopped.
    out = result.stdout + result.stderr
    assert result.stdout.count(" started: ") == 4 and "trials: 4 = " in result.stdout
    assert "stopped early by ASHA" in result.stdout
    assert "Traceback" not in out and "PlacementGroupCleaner" not in out, out[-3000:]


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def _finished_trials(exp: Path) -> dict[str, int]:
    """Trials whose Tune result log holds their final result -> its line count."""
    done = {}
    for folder in exp.glob("*_0000*"):
        lines = (folder / "result.json").read_text().splitlines() if (folder / "result.json").exists() else []
        if lines and json.loads(lines[-1]).get("done"):
            done[folder.name] = len(lines)
    return done


@pytest.mark.slow
def test_a_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    args = [sys.executable, str(REPO / "jobs/sweep.py"), "--config", SMOKE,
            f"output_dir={tmp_path}", "cluster.num_cpus=2"]
    env = {**os.environ, **RAY_TEST_ENV}
    first = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    exp = tmp_path / "smoke"
    try:
        _wait_for(lambda: len(_finished_trials(exp)) >= 1, 240, "a finished trial")
    finally:
        os.killpg(first.pid, signal.SIGKILL)     # the driver and everything it started
        first.wait()
    finished = _finished_trials(exp)
    assert len(finished) < 4, "the sweep finished before it could be interrupted"

    result = run_job("sweep.py", "--config", SMOKE, f"output_dir={tmp_path}", "cluster.num_cpus=2",
                     timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming the sweep" in result.stdout
    after = _finished_trials(exp)
    assert len(after) == 4
    for trial_id, lines in finished.items():            # not re-run: no new results
        assert after[trial_id] == lines, trial_id
    assert {t["trial_id"] for t in trial_table(exp)} == set(after)
