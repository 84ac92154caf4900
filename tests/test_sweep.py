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
from hlbd_ray.console import SweepStatus, status_line
from hlbd_ray.data import prepare_data
from hlbd_ray.errors import EXIT_STALLED, EXIT_USER_ERROR, UserError, run_cli
from hlbd_ray.generate import Decoder
from hlbd_ray.lifecycle import STALL_FLOOR_S, Interrupt, StallWatchdog, SweepInterrupted
from hlbd_ray.search import REPEAT_KEY
from hlbd_ray.sweep import (
    DRIVER_CPU,
    STATE_SYNC_TIMEOUT_S,
    best_checkpoint_record,
    main,
    plan_resources,
    run_config,
    start_timeout_s,
    trial_config,
)
from hlbd_ray.tables import epoch_checkpoints
from hlbd_ray.trainer import SNAPSHOT_FILE, retained_checkpoints

from .conftest import RAY_TEST_ENV, REPO, run_job

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


def test_uploads_of_the_experiment_state_are_bounded_well_inside_the_stall_timeout():
    # Tune's final save waits for the upload before it frees the trials: unbounded, a
    # stuck upload hung a sweep on S3 storage (Ray's default bound is 30 minutes).
    cfg = load_config(str(REPO / "conf" / "smoke.yaml"), [])
    config = run_config(cfg.sweep, "s3://bucket/runs", "smoke", [])
    assert config.sync_config.sync_timeout == STATE_SYNC_TIMEOUT_S <= STALL_FLOOR_S / 4
    assert config.failure_config.max_failures == cfg.sweep.trial_max_failures


def test_trains_worker_start_timeout_follows_the_sweeps_stall_timeout():
    # A worker group waiting for CPUs another trial is about to free is not failing:
    # Train's 60 s default gives way to the stall timeout (its floor when left at 0).
    cfg = load_config(str(REPO / "conf" / "smoke.yaml"), [])
    assert cfg.sweep.stall_timeout_s == 0 and start_timeout_s(cfg.sweep) == STALL_FLOOR_S > 60
    waits = load_config(str(REPO / "conf" / "smoke.yaml"), ["sweep.stall_timeout_s=900"])
    assert start_timeout_s(waits.sweep) == 900


def test_the_watchdog_stops_a_sweep_whose_search_creates_no_trial_and_never_finishes(capsys):
    # Tune waits for the search's next trial 600 s at a time, in a loop (seen when a
    # resumed search's state lagged its trials): no trial waits, so no report is missed.
    class Trial:
        def __init__(self, status: str):
            self.trial_id, self.status = "t", status

    watchdog = StallWatchdog(Interrupt(), stall_timeout_s=30)
    done = [Trial("TERMINATED"), Trial("ERROR")]
    watchdog.on_step_end(1, done)                     # just finished: not quiet yet
    watchdog.last_progress -= 31
    with pytest.raises(SweepInterrupted) as stopped:
        watchdog.on_step_end(2, done)
    assert stopped.value.code == EXIT_STALLED
    assert ("no trial running or pending for 31 s (stall timeout 30 s), and the search algorithm "
            "neither created one nor finished; 2 trials created so far") in capsys.readouterr().err


def test_trains_checkpoint_record_maps_epochs_and_names_an_unreadable_one(tmp_path, capsys):
    # The real format is checked against Ray Train's own files in test_smoke_sweep_end_to_end.
    train = tmp_path / "train"
    for run, text in {"t1": '{"checkpoint_results": [', "t3": json.dumps({"checkpoint_results": [
            {"checkpoint_dir_name": "checkpoint_a", "metrics": {"epoch": 2}},
            {"checkpoint_dir_name": "checkpoint_b", "metrics": {"epoch": 3}}]})}.items():
        (train / run).mkdir(parents=True)
        (train / run / SNAPSHOT_FILE).write_text(text)
    (train / "t2").mkdir()          # a run with no checkpoint yet
    assert retained_checkpoints(str(train)) == {("t3", 2): f"{train}/t3/checkpoint_a",
                                                ("t3", 3): f"{train}/t3/checkpoint_b"}
    assert f"{train}/t1/{SNAPSHOT_FILE} is unreadable" in capsys.readouterr().err
    assert retained_checkpoints(str(tmp_path / "none")) == {}


def test_a_trial_config_decodes_its_architecture_and_lr():
    cfg = trial_config(smoke(), {"arch": "32x2", "lr": 0.01})
    assert (cfg.model.d_model, cfg.model.num_heads, cfg.train.lr) == (32, 2, 0.01)


def test_copy_n_of_a_config_trains_with_seed_plus_n():
    base = smoke("train.seed=10")
    seeds = [trial_config(base, {"arch": "32x2", "lr": 0.01, REPEAT_KEY: n}).train.seed for n in range(3)]
    assert seeds == [10, 11, 12] and trial_config(base, {"arch": "32x2", "lr": 0.01}).train.seed == 10


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
    (["sweep.search=grid"], "does not apply to grid search"),   # smoke.yaml sets num_samples
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
    # With the confirmation stage (2 configs x 2 seeds) and one checkpoint kept by score:
    # retention must still keep each trial's best epoch, beside the newest.
    result = run_job("sweep.py", "--config", SMOKE, f"output_dir={tmp_path}", "cluster.num_cpus=2",
                     "sweep.confirm.top_k=2", "sweep.confirm.seeds=2", "train.checkpoints_to_keep=1",
                     timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    exp = tmp_path / "smoke"
    trials = trial_table(exp)
    search = [t for t in trials if t["config.stage"] is None]
    confirm = [t for t in trials if t["config.stage"] == "confirm"]
    assert len(search) == 4 and len(confirm) == 4
    assert all(t["d_model"] % t["num_heads"] == 0 and t["head_dim"] == t["d_model"] // t["num_heads"]
               for t in trials)
    # ASHA (grace 1 epoch, factor 2) stopped at least one trial before its last epoch.
    assert any(t["epochs_done"] < 3 for t in search) and any(t["epochs_done"] == 3 for t in search)
    # The confirmation: 2 distinct configs, each on 2 seeds the search never used, all epochs.
    configs = {(t["d_model"], t["num_heads"], t["lr"]) for t in confirm}
    assert len(configs) == 2 and all(t["epochs_done"] == 3 for t in confirm)
    assert {t["seed"] for t in confirm} == {1, 2} and {t["seed"] for t in search} == {0}
    best = json.loads((exp / "best.json").read_text())
    stats = best["confirmation"]["stats"]
    assert best["stage"] == "confirm" and (best["arch"], best["lr"]) == (stats[0]["arch"], stats[0]["lr"])
    assert best["search_best"]["best_metric"] == min(t["best_val_loss"] for t in search)
    mine = [t for t in confirm if f"{t['d_model']}x{t['num_heads']}" == best["arch"] and t["lr"] == best["lr"]]
    assert best["best_val_loss"] == min(t["best_val_loss"] for t in mine)
    assert "lead_beyond_noise" in best["confirmation"] and "Welch" in best["confirmation"]["rule"]
    best_cfg = load_config(exp / "best_config.yaml")          # a loadable training config
    assert (f"{best_cfg.model.d_model}x{best_cfg.model.num_heads}", best_cfg.train.lr) == (best["arch"], best["lr"])
    report = json.loads((exp / "dataset_report.json").read_text())   # written before training
    assert best_cfg.train.max_len == report["max_len"] and report["split"]["val_with_train_twin"] == 0
    # The named checkpoint is the one of the best epoch: re-scored on the validation
    # split it gives the val_loss best.json reports.
    data = prepare_data(best_cfg.data, best_cfg.train.max_len)
    decoder = Decoder.load(best["checkpoint"])
    assert abs(decoder.validation_loss(data.val, str(best_cfg.train.loss_on)) - best["best_val_loss"]) < 1e-4
    # Retention: the best by score plus the newest, never more.
    saved = {p for p in (exp / "train").glob("*/checkpoint_*") if p.is_dir()}   # not Train's snapshot file
    for folder in (exp / "train").iterdir():
        assert 1 <= len([p for p in saved if p.parent == folder]) <= 2, folder
    # Ray Train's record of what it kept (best.json's fallback after a resume) names exactly
    # the checkpoints on disk, at the epochs the driver recorded for them.
    kept = retained_checkpoints(str(exp / "train"))
    assert {Path(p) for p in kept.values()} == saved
    recorded = epoch_checkpoints(exp / "report")
    assert kept and all(recorded[key] == path for key, path in kept.items())
    # Without the driver's record (a best epoch the driver never saw before a resume),
    # Train's alone still names best.json's checkpoint.
    alone = best_checkpoint_record(str(exp), tmp_path / "no-report")
    assert alone[(best["trial_id"], best["best_epoch"])] == best["checkpoint"]
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
    usage = json.loads((exp / "sweep_end.json").read_text())["driver"]
    assert usage["peak_rss_mib"] > 100 and 0 < usage["wall_s"] < 400 and "driver: " in result.stdout
    assert "confirmation:" in result.stdout and "seed noise" in result.stdout
    # A console a new user can read: a line per trial start and end, the outcome counts,
    # and none of the Ray tracebacks or cleaner chatter of trials being stopped.
    out = result.stdout + result.stderr
    assert result.stdout.count(" started: ") == 8 and "trials: 8 = " in result.stdout
    assert "stopped early by ASHA" in result.stdout
    assert "Traceback" not in out and "PlacementGroupCleaner" not in out, out[-3000:]
    # Nor the actors' name lines (they stay in the actors' logs), Optuna's study line or
    # matplotlib's font fallbacks.
    assert "[hlbd] trial" not in out and "A new study created" not in out and "findfont" not in out, out[-3000:]


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


def _confirmed_configs(exp: Path, trial_ids) -> set[tuple[str, float]]:
    params = [json.loads((exp / "confirm" / tid / "params.json").read_text()) for tid in trial_ids]
    return {(p["arch"], p["lr"]) for p in params}


def _confirm_checkpointed(exp: Path) -> list[str]:
    """Confirmation trials whose Train run saved a checkpoint (Tune buffers result.json)."""
    trials = [folder.name for folder in (exp / "confirm").glob("*_0000*")]
    return [tid for tid in trials if any((exp / "train" / tid).glob("checkpoint_*"))]


@pytest.mark.slow
@pytest.mark.extended      # ~2 min; the default set keeps tests/test_faults.py's driver-kill resume
def test_a_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    # Killed inside the confirmation stage: the finished search is restored as it is,
    # and the confirmation resumes its own experiment with the same candidates.
    confirm = ["sweep.confirm.top_k=2", "sweep.confirm.seeds=2"]
    args = [sys.executable, str(REPO / "jobs/sweep.py"), "--config", SMOKE,
            f"output_dir={tmp_path}", "cluster.num_cpus=2", *confirm]
    env = {**os.environ, **RAY_TEST_ENV}
    first = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    exp = tmp_path / "smoke"
    try:
        _wait_for(lambda: (exp / "confirm").is_dir() and _confirm_checkpointed(exp), 400,
                  "a confirmation trial's first checkpoint")
    finally:
        os.killpg(first.pid, signal.SIGKILL)     # the driver and everything it started
        first.wait()
    assert not (exp / "sweep_end.json").exists(), "the sweep finished before it could be interrupted"
    finished = _finished_trials(exp)
    started = {folder.name for folder in (exp / "confirm").glob("*_0000*")}
    assert len(finished) == 4 and started

    result = run_job("sweep.py", "--config", SMOKE, f"output_dir={tmp_path}", "cluster.num_cpus=2",
                     *confirm, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming the sweep" in result.stdout and "resuming the confirmation" in result.stdout
    assert _finished_trials(exp) == finished           # the search: not re-run, no new results
    confirmed = {folder.name for folder in (exp / "confirm").glob("*_0000*")}
    # The same experiment continued (its trials kept), with the same candidates, to the end.
    assert started <= confirmed and len(confirmed) == 4
    assert _confirmed_configs(exp, started) <= _confirmed_configs(exp, confirmed)
    assert len(_confirmed_configs(exp, confirmed)) == 2
    table = trial_table(exp)
    assert {t["trial_id"] for t in table} == set(finished) | confirmed
    assert all(t["epochs_done"] == 3 for t in table if t["trial_id"] in confirmed)
    assert json.loads((exp / "best.json").read_text())["stage"] == "confirm"
