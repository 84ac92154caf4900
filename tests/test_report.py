"""The report aggregator: golden files, atomic writes, restore, failures, Tune hooks."""

from __future__ import annotations

import json
import logging
import math
import pickle
import threading
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

import hlbd_ray.report as report_mod
import hlbd_ray.tables as tables_mod
from hlbd_ray.report import ReportAggregator
from hlbd_ray.tables import CURVES_SCHEMA, EPOCHS_SCHEMA, TRIALS_SCHEMA, flatten_config, read_parquet

from .conftest import FakeTrial

NAN, INF = float("nan"), float("inf")




class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def result(start: int, losses: list, epoch: int, eb: int, end: bool = False, **kw: Any) -> dict:
    base = {"epoch": epoch, "epochs_done": epoch + int(end), "batch_start": start,
            "batches": start + len(losses), "batch_losses": losses, "epoch_batches": eb,
            "epoch_end": end, "step": (start + len(losses)) // 2, "loss": 1.0, "ppl": 2.7,
            "acc": 0.5, "lr": 0.01, "grad_norm": 1.0, "fw_ms": 1.0, "bw_ms": 2.0,
            "tokens_per_s": 100.0, "skipped_steps": 0, "val_loss": None, "val_ppl": None,
            "val_acc": None, "val_exact": None, "val_step": 0, "d_model": 8, "num_heads": 2,
            "head_dim": 4, "stop_reason": "", "training_iteration": 1, "time_total_s": 1.0,
            "trial_id": "ignored", "done": False, "precision": "bf16"}
    base.update(kw)
    return base


def read(path: Path) -> list[dict[str, Any]]:
    return read_parquet(path).to_pylist()


# ---- golden tiny report ------------------------------------------------------------------

GOLDEN_STREAM = [
    result(0, [4.0, None, 2.0], 0, 4),
    result(3, [6.0], 0, 4, end=True, epoch_loss=4.0, val_loss=3.0, val_ppl=20.0, val_acc=0.25,
           val_exact=0.0, lr=0.01, tokens_per_s=100.0, step=2, val_step=2, time_total_s=1.0,
           grad_norm=1.5, val_modules={"zodiac": {"loss": 3.5, "exact": NAN}, "geometry": {"loss": 2.5, "exact": 0.0}},
           checkpoint_path="b/t1/checkpoint_0"),
    result(4, [3.0, 1.0], 1, 4, loss=INF),
    result(6, [NAN, 2.0], 1, 4, end=True, epoch_loss=2.0, val_loss=2.5, val_ppl=12.0,
           val_acc=0.5, val_exact=0.5, lr=0.005, tokens_per_s=120.0, step=4, val_step=4,
           time_total_s=2.0, loss=2.0, ppl=INF, training_iteration=4, grad_norm=0.75,
           checkpoint_path="b/t1/checkpoint_1"),
]
# Width ceil(4 / 2) = 2: epoch 0 = [4, None | 2, 6], epoch 1 = [3, 1 | nan, 2].
GOLDEN_CURVES = [
    # epoch, bucket, width, eb, first, last, count, nonfinite, mean, min, max, last, sum
    (0, 0, 2, 4, 0, 1, 1, 1, 4.0, 4.0, 4.0, 4.0, 4.0),
    (0, 1, 2, 4, 2, 3, 2, 0, 4.0, 2.0, 6.0, 6.0, 8.0),
    (1, 0, 2, 4, 4, 5, 2, 0, 2.0, 1.0, 3.0, 1.0, 4.0),
    (1, 1, 2, 4, 6, 7, 1, 1, 2.0, 2.0, 2.0, 2.0, 2.0),
]


def golden(tmp_path: Path) -> tuple[ReportAggregator, Path]:
    trial = FakeTrial("t1", {"lr": 0.01, "model": {"d_model": 8}, "tags": ["a", "b"]})
    agg = ReportAggregator(tmp_path, points_per_epoch=2, every_s=1e9,
                           dataset_stats={"train_pairs": 9, "val": {"pairs": 1}})
    for r in GOLDEN_STREAM:
        agg.on_trial_result(0, [trial], trial, r)
    agg.on_trial_complete(0, [trial], trial)
    assert not (tmp_path / "report" / "epochs.parquet").exists()   # a trial end waits for the throttle
    agg.on_experiment_end([trial])
    return agg, tmp_path / "report"


def test_golden_curves_epochs_trials(tmp_path: Path) -> None:
    _, out = golden(tmp_path)
    curves = pq.read_table(out / "curves.parquet")
    assert curves.schema == CURVES_SCHEMA
    assert [tuple(r.values())[1:] for r in curves.to_pylist()] == GOLDEN_CURVES
    assert {r["trial_id"] for r in curves.to_pylist()} == {"t1"}

    epochs = pq.read_table(out / "epochs.parquet")
    assert epochs.schema == EPOCHS_SCHEMA
    assert read(out / "epochs.parquet") == [
        {"trial_id": "t1", "epoch": 0, "epoch_loss": 4.0, "val_loss": 3.0, "val_ppl": 20.0,
         "val_acc": 0.25, "val_exact": 0.0, "lr": 0.01, "tokens_per_s": 100.0,
         "time_total_s": 1.0, "grad_norm": 1.5, "step": 2, "batches": 4, "val_step": 2,
         "checkpoint": "b/t1/checkpoint_0"},
        {"trial_id": "t1", "epoch": 1, "epoch_loss": 2.0, "val_loss": 2.5, "val_ppl": 12.0,
         "val_acc": 0.5, "val_exact": 0.5, "lr": 0.005, "tokens_per_s": 120.0,
         "time_total_s": 2.0, "grad_norm": 0.75, "step": 4, "batches": 8, "val_step": 4,
         "checkpoint": "b/t1/checkpoint_1"}]

    # Validation per module, long: one row per (trial, epoch, module, metric); NaN is null.
    assert read(out / "modules.parquet") == [
        {"trial_id": "t1", "epoch": 0, "module": "geometry", "metric": "loss", "value": 2.5},
        {"trial_id": "t1", "epoch": 0, "module": "geometry", "metric": "exact", "value": 0.0},
        {"trial_id": "t1", "epoch": 0, "module": "zodiac", "metric": "loss", "value": 3.5},
        {"trial_id": "t1", "epoch": 0, "module": "zodiac", "metric": "exact", "value": None}]

    trials = pq.read_table(out / "trials.parquet")
    assert trials.schema.names[:len(TRIALS_SCHEMA)] == TRIALS_SCHEMA.names
    assert trials.schema.names[len(TRIALS_SCHEMA):] == [
        "config.lr", "config.model.d_model", "config.tags"]
    (row,) = trials.to_pylist()
    expected = {"trial_id": "t1", "status": "TERMINATED", "error": None, "stop_reason": None,
                "num_heads": 2, "d_model": 8, "head_dim": 4, "lr": 0.01, "precision": "bf16", "epochs_done": 2,
                "step": 4, "batches": 8, "training_iteration": 4, "last_time_total_s": 2.0,
                "last_loss": 2.0, "last_ppl": None, "last_val_loss": 2.5, "best_epoch": 1,
                "best_val_loss": 2.5, "best_val_ppl": 12.0, "best_val_acc": 0.5,
                "best_val_exact": 0.5, "config.lr": 0.01, "config.model.d_model": 8,
                "config.tags": '["a","b"]'}
    assert {k: row[k] for k in expected} == expected
    assert json.loads(row["config_json"]) == {"lr": 0.01, "model.d_model": 8, "tags": '["a","b"]'}


def test_golden_json_documents(tmp_path: Path) -> None:
    _, out = golden(tmp_path)
    text = (out / "trials" / "t1" / "experiment_report.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    doc = json.loads(text)
    for key in ("control_losses", "batch_losses", "current_epoch", "total_batches",
                "dataset_stats", "timestamp", "schema_version", "config"):
        assert key in doc
    assert doc["control_losses"] == [4.0, 2.0]
    # The playground monitor's other panels: one value per epoch, position = epoch.
    assert doc["grad_norms"] == [1.5, 0.75] and doc["learning_rates"] == [0.01, 0.005]
    assert doc["batch_losses"] == [4.0, 4.0, 2.0, 2.0]
    assert doc["batch_losses_min"] == [4.0, 2.0, 1.0, 2.0]
    assert doc["batch_losses_max"] == [4.0, 6.0, 3.0, 2.0]
    assert doc["micro_batches"] == [1, 3, 5, 7] and doc["batch_epochs"] == [0, 0, 1, 1]
    assert (doc["current_epoch"], doc["total_batches"]) == (1, 8)
    assert doc["dataset_stats"] == {"train_pairs": 9, "val": {"pairs": 1}}
    assert doc["best"] == {"epoch": 1, "val_loss": 2.5, "val_ppl": 12.0, "val_acc": 0.5,
                           "val_exact": 0.5}
    assert doc["last"]["ppl"] is None and doc["status"] == "TERMINATED"
    assert [e["val_loss"] for e in doc["epochs"]] == [3.0, 2.5]

    sweep = json.loads((out / "experiment_report.json").read_text())
    assert sweep["schema_version"] == 2 and sweep["points_per_epoch"] == 2
    (trial,) = sweep["trials"]
    assert trial["trial_id"] == "t1" and trial["summary"]["best_val_loss"] == 2.5
    # The sweep document holds the same rows as the parquet tables.
    table = read_parquet(out / "curves.parquet")
    assert trial["curves"] == {k: table.column(k).to_pylist() for k in table.column_names if k != "trial_id"}
    assert trial["curves"]["mean"] == [4.0, 4.0, 2.0, 2.0]
    assert trial["curves"]["nonfinite"] == [1, 0, 0, 1]
    assert trial["curves"]["micro_batch_first"] == [0, 2, 4, 6] and trial["curves"]["width"] == [2] * 4
    assert trial["epochs"] == [{k: v for k, v in r.items() if k != "trial_id"}
                               for r in read(out / "epochs.parquet")]
    assert [e["epoch_loss"] for e in trial["epochs"]] == [4.0, 2.0]


# ---- atomic writes -----------------------------------------------------------------------

def test_readers_only_ever_see_complete_files(tmp_path: Path) -> None:
    trials = [FakeTrial(f"t{i}", {"lr": 0.1 * (i + 1)}) for i in range(3)]
    agg = ReportAggregator(tmp_path, points_per_epoch=50, every_s=0.0)
    out = tmp_path / "report"
    agg.on_trial_result(0, trials, trials[0], result(0, [1.0] * 10, 0, 500))
    paths = [out / n for n in ("curves.parquet", "epochs.parquet", "trials.parquet")]
    docs = [out / "experiment_report.json", out / "trials" / "t0" / "experiment_report.json"]
    stop, errors, reads = threading.Event(), [], [0]

    def reader() -> None:
        while not stop.is_set():
            try:
                for p in paths:
                    if p.exists():
                        read_parquet(p)   # one handle: see read_parquet's docstring
                for p in docs:
                    json.loads(p.read_text())
                reads[0] += 1
            except Exception as exc:  # any partial file shows up here
                errors.append(repr(exc))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        pos = 10
        for _ in range(150):
            for t in trials:
                losses = [float(j % 7) for j in range(40)]
                epoch = pos // 500
                agg.on_trial_result(0, trials, t, result(pos, losses, epoch, 500,
                                                          end=(pos + 40) % 500 == 0))
            pos += 40
    finally:
        stop.set()
        thread.join()
    assert errors == [], sorted(set(errors))[:5]
    assert reads[0] > 5


# ---- restore -----------------------------------------------------------------------------

def long_stream(epochs: int = 4, eb: int = 120, seed: int = 0) -> list[dict]:
    out, pos = [], 0
    for epoch in range(epochs):
        while pos < (epoch + 1) * eb:
            n = min(25, (epoch + 1) * eb - pos)
            losses = [((pos + i) * 7919 + seed) % 101 / 10.0 for i in range(n)]
            end = pos + n == (epoch + 1) * eb
            out.append(result(pos, losses, epoch, eb, end=end, epoch_loss=float(epoch),
                              val_loss=5.0 - epoch if end else None,
                              val_modules={"zodiac": {"loss": 4.0 - epoch, "exact": 0.25}} if end else {}))
            pos += n
    return out


def epoch_start(stream: list[dict], epoch: int, eb: int = 120) -> int:
    """Index of the first report of `epoch`: where a resume from the checkpoint of the
    epoch before it replays from."""
    return next(i for i, r in enumerate(stream) if r["batch_start"] == epoch * eb)


def batches_in(reports: list[dict]) -> int:
    return sum(len(r["batch_losses"]) for r in reports)


def run(agg: ReportAggregator, trial: FakeTrial, stream: list[dict]) -> None:
    for r in stream:
        agg.on_trial_result(0, [trial], trial, r)


def finish(agg: ReportAggregator, trial: FakeTrial) -> Path:
    agg.on_trial_complete(0, [trial], trial)
    agg.on_experiment_end([trial])
    return agg.report_dir


def same_report(a: Path, b: Path) -> None:
    for name in ("curves.parquet", "epochs.parquet", "modules.parquet"):
        assert read(a / name) == read(b / name), name
    assert read(a / "modules.parquet")                 # the restore kept the module rows
    strip = lambda d: {k: v for k, v in d.items() if k != "timestamp"}  # noqa: E731
    assert strip(json.loads((a / "trials/t/experiment_report.json").read_text())) == \
        strip(json.loads((b / "trials/t/experiment_report.json").read_text()))


def uninterrupted(tmp_path: Path, stream: list[dict]) -> Path:
    trial = FakeTrial("t", {"lr": 0.01})
    agg = ReportAggregator(tmp_path / "whole", 7, every_s=1e9)
    run(agg, trial, stream)
    return finish(agg, trial)


def test_restore_through_tune_state_with_a_replay(tmp_path: Path) -> None:
    stream = long_stream()
    trial = FakeTrial("t", {"lr": 0.01})
    agg = ReportAggregator(tmp_path / "restored", 7, every_s=0.0)
    pickled_at_start = pickle.dumps(agg)          # what Tuner keeps in tuner.pkl
    run(agg, trial, stream[:13])                  # dies 13 reports in (mid epoch 2)
    state = pickle.loads(pickle.dumps(agg.get_state()))
    # Tune's restore: the callback from tuner.pkl, then set_state, then setup.
    agg2 = pickle.loads(pickled_at_start)
    agg2.set_state(state)
    agg2.setup(stop=None, num_samples=1, total_num_samples=1)
    # The trial resumes from its epoch-1 checkpoint: epoch 2 is replayed from its start.
    replay_from = epoch_start(stream, 2)
    run(agg2, trial, stream[replay_from:])
    same_report(finish(agg2, trial), uninterrupted(tmp_path, stream))


def logged_trial(tmp_path: Path) -> tuple[FakeTrial, Path, ReportAggregator, bytes]:
    """A trial with a Tune log folder, its aggregator, and that aggregator as Tuner
    pickled it at the start."""
    log_dir = tmp_path / "tune_trial"
    log_dir.mkdir()
    trial = FakeTrial("t", {"lr": 0.01})
    trial.local_path = str(log_dir)  # type: ignore[attr-defined]
    agg = ReportAggregator(tmp_path / "restored", 7, every_s=1e9)
    return trial, log_dir / "result.json", agg, pickle.dumps(agg)


def restored(pickled_at_start: bytes, state: dict, trial: FakeTrial) -> ReportAggregator:
    """Tune's restore of the driver: the pickled callback, its saved state, the trial's restart."""
    agg = pickle.loads(pickled_at_start)
    agg.set_state(state)
    agg.setup()
    agg.on_trial_start(0, [trial], trial)
    return agg


def test_a_restored_trial_is_rebuilt_from_tunes_result_log(tmp_path: Path) -> None:
    """The driver died after results reached Tune's log but before any state or file of
    ours held them; the Train run resumes after its checkpoint and never resends them."""
    stream = long_stream()
    trial, log, agg, pickled_at_start = logged_trial(tmp_path)
    run(agg, trial, stream[:3])
    state = pickle.loads(pickle.dumps(agg.get_state()))      # saved early: 3 reports
    checkpoint_at = epoch_start(stream, 2)
    lines = [json.dumps(r) for r in stream[:checkpoint_at]]   # Tune logged up to there
    log.write_text("\n".join(lines) + '\n{"batch_losses": [1.0, ')
    agg2 = restored(pickled_at_start, state, trial)
    run(agg2, trial, stream[checkpoint_at:])                   # resumes after epoch 1
    same_report(finish(agg2, trial), uninterrupted(tmp_path, stream))


def test_a_tune_log_older_than_the_files_does_not_roll_the_trial_back(tmp_path: Path) -> None:
    """On remote storage the restored driver reads the result.json Tune synced with its
    experiment state, which can be older than our files. Replayed into the trial, its
    first line (batch 0) used to reset it to that older log: the epochs the files held
    were lost, and the Train run, resuming after its checkpoint, never sent them again."""
    stream = long_stream()
    trial, log, agg, pickled_at_start = logged_trial(tmp_path)
    run(agg, trial, stream[:3])
    state = pickle.loads(pickle.dumps(agg.get_state()))      # Tune's state and log: 3 reports
    log.write_text("\n".join(json.dumps(r) for r in stream[:3]) + "\n")
    checkpoint_at = epoch_start(stream, 2)
    run(agg, trial, stream[3:checkpoint_at])
    assert agg.flush()                                         # our files: epochs 0 and 1
    agg2 = restored(pickled_at_start, state, trial)
    assert sorted(agg2.store.trials["t"].summaries) == [0, 1]
    run(agg2, trial, stream[checkpoint_at:])                   # resumes after epoch 1
    same_report(finish(agg2, trial), uninterrupted(tmp_path, stream))


def test_rebuild_from_parquet_then_continue(tmp_path: Path) -> None:
    stream = long_stream()
    trial = FakeTrial("t", {"lr": 0.01})
    agg = ReportAggregator(tmp_path / "restored", 7, every_s=1e9)
    run(agg, trial, stream[:9])
    assert agg.flush()
    # A new driver process: nothing in memory, the files are all there is. It continues
    # exactly where the files end, mid-epoch, and the exact sums keep buckets identical.
    agg2 = ReportAggregator(tmp_path / "restored", 7, every_s=1e9, resume=True)
    assert agg2.store.trials["t"].accepted() == batches_in(stream[:9])
    assert agg2.trials["t"].config == {"lr": 0.01}
    run(agg2, trial, stream[7:])                  # overlaps two reports it already has
    same_report(finish(agg2, trial), uninterrupted(tmp_path, stream))


def test_files_ahead_of_tune_state_win(tmp_path: Path) -> None:
    stream = long_stream()
    trial = FakeTrial("t", {"lr": 0.01})
    agg = ReportAggregator(tmp_path / "restored", 7, every_s=1e9)
    run(agg, trial, stream[:4])
    old_state = pickle.loads(pickle.dumps(agg.get_state()))   # Tune saved this early ...
    run(agg, trial, stream[4:14])
    assert agg.flush()                                         # ... the files later
    agg2 = ReportAggregator(tmp_path / "restored", 7, every_s=1e9)
    agg2.set_state(old_state)
    agg2.setup()
    assert agg2.store.trials["t"].accepted() == batches_in(stream[:14])
    replay_from = epoch_start(stream, 2)
    run(agg2, trial, stream[replay_from:])
    same_report(finish(agg2, trial), uninterrupted(tmp_path, stream))


def test_state_is_never_empty_and_pickles(tmp_path: Path) -> None:
    agg = ReportAggregator(tmp_path, 10)
    # Tune skips saving a falsy state; an empty store must still restore as empty.
    assert agg.get_state()
    run(agg, FakeTrial("t"), long_stream(1))
    assert pickle.loads(pickle.dumps(agg)).store.trials["t"].accepted() == 120


# ---- failures, timing, hooks ------------------------------------------------------------

def test_write_failure_is_logged_and_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    real = tables_mod.atomic_write
    failures = {"left": 1}

    def flaky(path: Path, write: Any, mode: str = "wb") -> Path:
        if Path(path).name == "experiment_report.json" and failures["left"]:
            failures["left"] -= 1
            raise OSError(28, "No space left on device")
        return real(path, write, mode)

    monkeypatch.setattr(tables_mod, "atomic_write", flaky)
    clock = Clock()
    trial = FakeTrial("t")
    agg = ReportAggregator(tmp_path, 10, every_s=10.0, clock=clock)
    with caplog.at_level(logging.ERROR, logger="hlbd_ray.report"):
        agg.on_trial_result(0, [trial], trial, result(0, [1.0], 0, 10))
    target = tmp_path / "report" / "trials" / "t" / "experiment_report.json"
    assert agg.failed_writes == 1 and not target.exists()
    (record,) = caplog.records
    assert str(target) in record.getMessage() and "No space left" in record.getMessage()
    assert (tmp_path / "report" / "curves.parquet").exists()   # the others went through
    clock.now = 5.0
    agg.on_trial_result(0, [trial], trial, result(1, [2.0], 0, 10))
    assert not target.exists()                                  # not due yet
    clock.now = 10.0
    agg.on_trial_result(0, [trial], trial, result(2, [3.0], 0, 10))
    assert json.loads(target.read_text())["batch_losses"] == [1.0, 2.0, 3.0]
    assert agg.failed_writes == 1


def test_parquet_failure_keeps_the_target_pending(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    real = tables_mod.atomic_write
    calls = {"n": 0}

    def failing_once(path: Path, write: Any, mode: str = "wb") -> Path:
        calls["n"] += 1
        if calls["n"] == 1:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, write, mode)

    monkeypatch.setattr(tables_mod, "atomic_write", failing_once)
    agg = ReportAggregator(tmp_path, 10, every_s=1e9)
    run(agg, FakeTrial("t"), long_stream(1))
    assert not (tmp_path / "report" / "curves.parquet").exists()
    assert agg.flush()    # nothing new arrived, but the failed file is still owed
    assert len(read(tmp_path / "report" / "curves.parquet")) == 10


def test_writes_are_throttled_to_every_s(tmp_path: Path) -> None:
    clock = Clock()
    trial = FakeTrial("t")
    agg = ReportAggregator(tmp_path, 100, every_s=10.0, clock=clock)   # width 1
    curves = tmp_path / "report" / "curves.parquet"
    agg.on_trial_result(0, [trial], trial, result(0, [1.0], 0, 100))
    assert len(read(curves)) == 1                      # the first result is written at once
    for t in range(1, 10):
        clock.now = float(t)
        agg.on_trial_result(0, [trial], trial, result(t, [1.0], 0, 100))
    assert len(read(curves)) == 1
    clock.now = 10.0
    agg.on_trial_result(0, [trial], trial, result(10, [1.0], 0, 100))
    assert len(read(curves)) == 11
    # A trial end waits for the throttle too, and Tune's loop writes it once due.
    clock.now = 15.0
    agg.on_trial_complete(0, [trial], trial)
    assert read(tmp_path / "report" / "trials.parquet")[0]["status"] == "RUNNING"
    agg.on_step_end(0, [trial])
    clock.now = 20.0
    agg.on_step_end(0, [trial])
    assert read(tmp_path / "report" / "trials.parquet")[0]["status"] == "TERMINATED"


def test_trial_end_and_error_statuses(tmp_path: Path) -> None:
    error_file = tmp_path / "error.txt"
    error_file.write_text("Failure # 1 (occurred at 2025)\nTraceback ...\n  x\n"
                          "ValueError: loss exploded\n\n")
    ok = FakeTrial("ok", {"lr": 0.1})
    bad = FakeTrial("bad", {"lr": 1.0}, error_file=str(error_file))
    idle = FakeTrial("idle", {"lr": 0.5}, status="PENDING")
    agg = ReportAggregator(tmp_path / "exp", 10, every_s=1e9)
    agg.on_trial_start(0, [ok, bad, idle], idle)
    run(agg, ok, long_stream(1))
    agg.on_trial_result(0, [ok, bad], bad, result(0, [1.0, NAN], 0, 10,
                                                  stop_reason="non-finite loss"))
    agg.on_trial_complete(0, [ok, bad], ok)
    bad.status = "ERROR"
    agg.on_trial_error(0, [ok, bad], bad)
    assert agg.flush()
    rows = {r["trial_id"]: r for r in read(tmp_path / "exp" / "report" / "trials.parquet")}
    assert rows["ok"]["status"] == "TERMINATED" and rows["ok"]["error"] is None
    assert rows["bad"]["status"] == "ERROR" and rows["bad"]["error"] == "ValueError: loss exploded"
    assert rows["bad"]["stop_reason"] == "non-finite loss"
    assert rows["idle"]["status"] == "RUNNING" and rows["idle"]["epochs_done"] is None
    ok.status = "TERMINATED"
    agg.on_experiment_end([ok, bad, idle])   # a PENDING trial object does not downgrade
    sweep = json.loads((tmp_path / "exp" / "report" / "experiment_report.json").read_text())
    assert [t["trial_id"] for t in sweep["trials"]] == ["bad", "idle", "ok"]


def test_error_without_a_file_still_says_so(tmp_path: Path) -> None:
    agg = ReportAggregator(tmp_path, 10, every_s=1e9)
    trial = FakeTrial("t", status="ERROR")
    agg.on_trial_error(0, [trial], trial)
    (row,) = read(tmp_path / "report" / "trials.parquet")
    assert row["status"] == "ERROR" and "no error message" in row["error"]


def test_flatten_config_keeps_scalars_and_stringifies_the_rest() -> None:
    flat = flatten_config({"a": {"b": 1, "c": {"d": "x"}}, "lr": NAN, "f": 0.5, "t": True,
                           "n": None, "l": [1, 2], "o": object})
    assert flat["a.b"] == 1 and flat["a.c.d"] == "x" and flat["lr"] is None
    assert flat["f"] == 0.5 and flat["t"] is True and flat["n"] is None
    assert flat["l"] == "[1,2]" and isinstance(flat["o"], str)


def test_config_columns_with_mixed_types(tmp_path: Path) -> None:
    agg = ReportAggregator(tmp_path, 10, every_s=1e9)
    for tid, cfg in (("a", {"x": 1, "y": True, "z": "s"}), ("b", {"x": 0.5, "y": False, "z": 3})):
        trial = FakeTrial(tid, cfg)
        agg.on_trial_result(0, [trial], trial, result(0, [1.0], 0, 10))
    agg.flush()
    table = pq.read_table(tmp_path / "report" / "trials.parquet")
    assert str(table.schema.field("config.x").type) == "double"
    assert str(table.schema.field("config.y").type) == "bool"
    assert table.column("config.z").to_pylist() == ["s", "3"]


def test_non_finite_values_never_reach_the_files(tmp_path: Path) -> None:
    trial = FakeTrial("t", {"lr": INF})
    agg = ReportAggregator(tmp_path, 2, every_s=1e9, dataset_stats={"x": NAN})
    agg.on_trial_result(0, [trial], trial, result(0, [NAN, INF, -INF], 0, 4, end=True,
                                                  loss=NAN, epoch_loss=INF, val_loss=NAN,
                                                  lr=-INF, tokens_per_s=NAN))
    agg.flush()
    out = tmp_path / "report"
    for p in out.rglob("*.json"):
        assert "NaN" not in p.read_text() and "Infinity" not in p.read_text()
    for p in out.glob("*.parquet"):
        for col in pq.read_table(p).columns:
            assert not any(isinstance(v, float) and not math.isfinite(v)
                           for v in col.to_pylist())


def test_unknown_state_schema_falls_back_to_the_files(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    agg = ReportAggregator(tmp_path, 7, every_s=1e9)
    run(agg, FakeTrial("t"), long_stream(2))
    assert agg.flush()
    agg2 = ReportAggregator(tmp_path, 7, every_s=1e9)
    with caplog.at_level(logging.ERROR, logger="hlbd_ray.report"):
        agg2.set_state({"schema_version": 999, "store": None})
    agg2.setup()
    assert "schema 999" in caplog.text
    assert agg2.store.trials["t"].accepted() == 240


def test_a_failure_while_preparing_is_logged_not_raised(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    real = report_mod.trials_table_row
    calls = {"n": 0}

    def broken_once(*args: Any) -> dict:
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyError("surprise")
        return real(*args)

    monkeypatch.setattr(report_mod, "trials_table_row", broken_once)
    agg = ReportAggregator(tmp_path, 10, every_s=1e9)
    with caplog.at_level(logging.ERROR, logger="hlbd_ray.report"):
        run(agg, FakeTrial("t"), long_stream(1))     # the sweep goes on
    assert "could not prepare" in caplog.text and agg.failed_writes == 1
    assert agg.flush()
    assert len(read(tmp_path / "report" / "curves.parquet")) == 10


# ---- each epoch's checkpoint -------------------------------------------------------------

def test_each_epoch_keeps_its_checkpoint_and_a_repeat_without_one_does_not_erase_it(tmp_path: Path) -> None:
    from hlbd_ray.tables import epoch_checkpoints

    trial = FakeTrial("t1")
    agg = ReportAggregator(tmp_path, points_per_epoch=2, every_s=1e9)
    for r in GOLDEN_STREAM:
        agg.on_trial_result(0, [trial], trial, r)
    # A run resumed after its last checkpoint repeats the last epoch end, without a checkpoint.
    agg.on_trial_result(0, [trial], trial, {**GOLDEN_STREAM[-1], "batch_losses": [], "batch_start": 8,
                                            "checkpoint_path": None})
    agg.on_experiment_end([trial])
    assert epoch_checkpoints(tmp_path / "report") == {("t1", 0): "b/t1/checkpoint_0", ("t1", 1): "b/t1/checkpoint_1"}


class FakeResult:
    """The attributes of a Tune Result that the final table reads."""

    def __init__(self, trial_id: str, history: list[dict[str, Any]]) -> None:
        import pandas as pd

        self.metrics_dataframe = pd.DataFrame(history)
        self.metrics, self.config, self.error = {**history[-1], "trial_id": trial_id}, {}, None
        self.path = f"/runs/smoke/{trial_id}"


def test_the_best_epochs_checkpoint_comes_from_the_report_when_tunes_files_lack_it() -> None:
    from hlbd_ray.summary import final_table_rows

    # As read back from a progress.csv written before the first checkpoint: no such column.
    history = [{"epoch": 0, "epoch_end": True, "val_loss": 3.0}, {"epoch": 1, "epoch_end": True, "val_loss": 2.5},
               {"epoch": 2, "epoch_end": True, "val_loss": 2.8}]
    results = [FakeResult("t1", history)]
    recorded = {("t1", 1): "b/t1/checkpoint_1", ("t1", 2): "b/t1/checkpoint_2"}
    [row] = final_table_rows(results, "val_loss", "min", checkpoints=recorded)
    assert (row["best_epoch"], row["checkpoint"]) == (1, "b/t1/checkpoint_1")
    # Without the report's record, a missing value is None, never NaN.
    history[1]["checkpoint_path"] = float("nan")
    [row] = final_table_rows([FakeResult("t1", history)], "val_loss", "min")
    assert row["best_epoch"] == 1 and row["checkpoint"] is None
