"""The sweep's live report: a driver-side Tune callback that folds every trial result into
bounded curves (`hlbd_ray.curves`) and writes them under `<experiment_dir>/report/`:

- `curves.parquet`  one row per (trial, epoch, bucket) of batch losses;
- `epochs.parquet`  one row per (trial, epoch): epoch mean loss, validation, lr, tokens/s;
- `modules.parquet` one row per (trial, epoch, module, metric): validation per HLBD module;
- `trials.parquet`  one row per trial: config, status, error, last and best metrics;
- `experiment_report.json` the whole sweep in one document, and
  `trials/<trial_id>/experiment_report.json` per trial, keeping the keys of the HLBD
  playground's `experiment_report.json` (`control_losses`, `batch_losses`, ...), so the
  tools users already point at that file keep working.

Writes happen at most every `every_s` seconds (checked when a result arrives, a trial
ends and at each step of Tune's loop) and at the experiment end; that throttle is what keeps the driver cheap
(BENCHMARKS.md): each write serialises the files afresh from the bounded curves. Each file
is replaced atomically, and a failed write is logged with its path and retried at the next
interval (its target stays pending). The JSON documents are built from the same rows as
the parquet tables.

A restarted driver (Tuner.restore) gets its curves back from Tune's callback state
(`get_state/set_state`) and from the parquet files, whichever holds more of a trial;
replays of the resumed runs are then deduplicated by the curve store.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
from ray.tune import Callback, Stopper

from hlbd_ray.curves import MODULES_KEY, CurveStore, TrialCurves
from hlbd_ray.render import PageRenderer
from hlbd_ray.tables import (
    CURVES_FILE,
    CURVES_SCHEMA,
    EPOCHS_FILE,
    EPOCHS_SCHEMA,
    JSON_FILE,
    MODULES_FILE,
    MODULES_SCHEMA,
    REPORT_DIR,
    SCHEMA_VERSION,
    STRING,
    TRIALS_FILE,
    TRIALS_SCHEMA,
    TrialInfo,
    best_metrics,
    column_type,
    curve_columns,
    curves_table,
    epoch_rows,
    flatten_config,
    info_from_row,
    jsonable,
    module_rows,
    modules_by_epoch,
    read_rows,
    safe_name,
    trials_table_row,
    write_json,
    write_parquet,
)

logger = logging.getLogger(__name__)

_TARGETS = ("curves", "epochs", "modules", "trials", "sweep")


class ReportAggregator(Callback):
    """Tune callback: every result's `batch_losses` into per-trial curves, then files."""

    # None: no live page (also what an aggregator pickled before it existed resumes with).
    page: PageRenderer | None = None

    def __init__(self, experiment_dir: str | Path, points_per_epoch: int = 100,
                 every_s: float = 10.0, dataset_stats: Mapping[str, Any] | None = None,
                 *, resume: bool = False, clock: Callable[[], float] = time.monotonic,
                 live_page: bool = False) -> None:
        self.report_dir = Path(experiment_dir) / REPORT_DIR
        # index.html and its plots, re-rendered in the background after writes.
        self.page = PageRenderer(experiment_dir, every_s) if live_page else None
        self.every_s = float(every_s)
        self.dataset_stats = jsonable(dict(dataset_stats or {}))
        self.store = CurveStore(points_per_epoch)
        self.trials: dict[str, TrialInfo] = {}
        self.failed_writes = 0
        self._clock = clock
        self._pending: set[str] = set()
        self._last_write = -float("inf")   # the first result is written at once
        self._restored = False
        self._replayed: set[str] = set()   # trials rebuilt from Tune's log after a restore
        self._latest: dict[str, Mapping[str, Any]] = {}   # each trial's newest result
        if resume:
            self.load_files()

    # ---- Tune callback hooks (all run on the driver's one thread) ----
    def setup(self, stop: Stopper | None = None, num_samples: int | None = None,
              total_num_samples: int | None = None, **info: Any) -> None:
        if self._restored:
            # Tune's saved state and our files are written at different moments: take
            # whichever holds more of each trial.
            self.load_files()

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self._restored and trial.trial_id not in self._replayed:
            self._replay_tune_log(trial)
        record = self._info(trial)
        # A (re)started trial: an error from an earlier attempt no longer describes it.
        record.status, record.error = "RUNNING", None
        self._touch(trial.trial_id)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        self.add_result(trial, result)
        self.flush_if_due()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        # Tune calls this before it marks the trial, so a RUNNING status means "finished".
        status = str(getattr(trial, "status", "") or "")
        self._set_status(trial, status if status in ("ERROR", "TERMINATED") else "TERMINATED")
        self.flush_if_due()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._set_status(trial, "ERROR", error_message(trial))
        self.flush_if_due()

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        # Tune's loop runs this often: a trial end with no result after it is written
        # within `every_s` too.
        self.flush_if_due()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        for trial in trials or []:
            # Final statuses only: a trial we already saw finish never goes back.
            status = str(getattr(trial, "status", "") or "")
            if status in ("TERMINATED", "ERROR") and self._info(trial).status != status:
                self._set_status(trial, status, error_message(trial) if status == "ERROR" else None)
        # Every file exists at the end, empty tables included (a sweep whose trials all
        # failed early still has a complete, readable report).
        self._mark_all()
        self.flush()
        if self.page is not None:
            self.page.finish()

    def _replay_tune_log(self, trial: Any) -> None:
        """After a driver restart, rebuild a resumed trial from Tune's own result log.

        Tune appends each result to the trial's result.json as it arrives, so the log can
        hold results that neither Tune's saved state nor our last write had yet; the
        trial's Train run will not send them again (it resumes after its checkpoint).
        The log is replayed through the same ingest into a trial of its own, adopted only
        if it holds more than the state and files did: a restored driver reads the copy
        Tune synced to storage with its experiment state, which can be older than our
        files (seen: a resumed sweep on S3 whose trial lost its first two epochs).
        """
        tid = trial.trial_id
        self._replayed.add(tid)
        path = Path(getattr(trial, "local_path", None) or "", "result.json")
        if not path.is_file():
            return
        replayed, last = TrialCurves(tid, self.store.points), None
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                result = json.loads(line)
            except json.JSONDecodeError:
                # The driver died while writing this line: the rest of the log is whole.
                logger.warning("report: skipping unreadable line %d of %s", number, path)
                continue
            if "batch_losses" in result:
                replayed.ingest(result)
                last = result
        current = self.store.trials.get(tid)
        if last is None or (current is not None and _progress(replayed) <= _progress(current)):
            return
        self.store.adopt(replayed)
        self._info(trial).status = "RUNNING"
        self._latest[tid] = last
        self._pending.update(("curves", "epochs", "modules"))
        self._touch(tid)

    def _settle(self) -> None:
        for tid, result in self._latest.items():
            if tid in self.trials:
                self.trials[tid].update(result)
        self._latest.clear()

    def get_state(self) -> dict[str, Any]:
        self._settle()
        return {"schema_version": SCHEMA_VERSION, "store": self.store.state(),
                "trials": {tid: asdict(info) for tid, info in self.trials.items()}}

    def set_state(self, state: dict[str, Any]) -> None:
        self._restored = True
        if state.get("schema_version") != SCHEMA_VERSION:
            # Another layout: fall back on the files alone (read in `setup`).
            logger.error("report: ignoring saved callback state of schema %r (expected %d); "
                         "rebuilding from %s", state.get("schema_version"), SCHEMA_VERSION,
                         self.report_dir)
            return
        self.store = CurveStore.from_state(state["store"])
        self.trials = {tid: TrialInfo(**d) for tid, d in state["trials"].items()}
        self._mark_all()

    # ---- ingest ----
    def add_result(self, trial: Any, result: Mapping[str, Any]) -> None:
        info = self._info(trial)
        info.status = "RUNNING"
        # Its last values are taken when next needed (a write, Tune's state): cleaning
        # them per result would cost as much as folding the batches.
        self._latest[info.trial_id] = result
        curves_changed, epochs_changed = self.store.ingest(info.trial_id, result)
        self._touch(info.trial_id)
        if curves_changed:
            self._pending.add("curves")
        if epochs_changed:
            self._pending.update(("epochs", "modules"))

    def _info(self, trial: Any) -> TrialInfo:
        info = self.trials.get(trial.trial_id)
        if info is None:
            info = self.trials[trial.trial_id] = TrialInfo(trial.trial_id)
        if not info.config:
            info.config = flatten_config(getattr(trial, "config", None) or {})
        return info

    def _set_status(self, trial: Any, status: str, error: str | None = None) -> None:
        info = self._info(trial)
        info.status = status
        if error is not None:
            info.error = error
        self._touch(info.trial_id)

    def _touch(self, tid: str) -> None:
        """A trial changed: its own document, the trials table and the sweep document."""
        self._pending.update(("trials", "sweep", f"trial:{tid}"))

    def _mark_all(self) -> None:
        self._pending.update(_TARGETS)
        self._pending.update(f"trial:{tid}" for tid in self.trials)

    # ---- writing ----
    def flush_if_due(self) -> None:
        """The throttle: write what is pending once `every_s` passed since the last write.
        Trial ends wait for it too, as they come in bursts (every trial of a rung at once)
        and each write serialises the whole sweep."""
        if self._pending and self._clock() - self._last_write >= self.every_s:
            self.flush()

    def flush(self) -> bool:
        """Write every pending file now; False if any write failed (it stays pending)."""
        self._last_write = self._clock()
        if not self._pending:
            return True
        try:
            jobs = self._jobs()
        except Exception:  # a bug in serialising must not end the sweep; say so loudly
            self.failed_writes += 1
            logger.exception("report: could not prepare the report under %s (retrying in "
                             "%.0f s)", self.report_dir, self.every_s)
            return False
        ok = True
        for target, path, write in jobs:
            if target not in self._pending:
                continue
            try:
                write(path)
            except Exception as exc:  # any failure: report it loudly, keep it pending
                ok = False
                self.failed_writes += 1
                logger.error("report: could not write %s: %s: %s (retrying in %.0f s)",
                             path, type(exc).__name__, exc, self.every_s,
                             exc_info=not isinstance(exc, OSError))
                continue
            self._pending.discard(target)
        if self.page is not None and "trials" not in self._pending:
            self.page.poke()
        return ok

    def _jobs(self) -> list[tuple[str, Path, Callable[[Path], Any]]]:
        """(target, path, writer) for every file, in write order; writers are lazy so a
        target that is not pending costs nothing but the rows."""
        self._settle()
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        curves, epochs, modules = curve_columns(self.store), epoch_rows(self.store), module_rows(self.store)
        trials = {tid: trials_table_row(self.trials[tid], self._best(tid)) for tid in sorted(self.trials)}
        jobs: list[tuple[str, Path, Callable[[Path], Any]]] = [
            ("curves", self.report_dir / CURVES_FILE,
             lambda p: write_parquet(p, curves_table(curves))),
            ("epochs", self.report_dir / EPOCHS_FILE,
             lambda p: write_parquet(p, pa.Table.from_pylist(epochs, schema=EPOCHS_SCHEMA))),
            ("modules", self.report_dir / MODULES_FILE,
             lambda p: write_parquet(p, pa.Table.from_pylist(modules, schema=MODULES_SCHEMA))),
            ("trials", self.report_dir / TRIALS_FILE,
             lambda p: write_parquet(p, self.trials_table(trials))),
        ]

        def trial_writer(tid: str) -> Callable[[Path], None]:  # binds this trial's id, not the loop's last
            return lambda p: write_json(p, self._trial_json(tid, trials[tid], stamp))

        for tid in trials:
            jobs.append((f"trial:{tid}", self.report_dir / "trials" / safe_name(tid) / JSON_FILE, trial_writer(tid)))
        jobs.append(("sweep", self.report_dir / JSON_FILE,
                     lambda p: write_json(p, self._sweep_json(trials, epochs, modules, curves, stamp))))
        return jobs

    def _best(self, tid: str) -> dict[str, Any]:
        curves = self.store.trials.get(tid)
        return best_metrics(curves.summaries) if curves else {}

    def trials_table(self, rows: Mapping[str, dict[str, Any]] | None = None) -> pa.Table:
        if rows is None:
            self._settle()
            rows = {tid: trials_table_row(self.trials[tid], self._best(tid)) for tid in sorted(self.trials)}
        out = [dict(r) for r in rows.values()]
        schema = TRIALS_SCHEMA
        for key in sorted({k for tid in rows for k in self.trials[tid].config}):
            values = [self.trials[tid].config.get(key) for tid in rows]
            kind = column_type(values)
            schema = schema.append(pa.field(f"config.{key}", kind))
            for row, value in zip(out, values):
                row[f"config.{key}"] = value if kind != STRING or value is None else str(value)
        return pa.Table.from_pylist(out, schema=schema)

    def _trial_json(self, tid: str, row: Mapping[str, Any], stamp: str) -> dict[str, Any]:
        """One trial's JSON with the HLBD playground report's keys (`control_losses`,
        `batch_losses`, ...), plus bucket bounds and validation."""
        info, curves = self.trials[tid], self.store.trials.get(tid)
        summaries = curves.summaries if curves else {}
        buckets = [(c.epoch, b) for c in (curves.sorted_epochs() if curves else []) for b in c.buckets]
        last = info.last
        return {
            "schema_version": SCHEMA_VERSION, "trial_id": tid, "timestamp": stamp,
            "status": info.status, "error": info.error, "config": info.config,
            "current_epoch": last.get("epoch", 0),
            "total_batches": last["batches"] if "batches" in last else
            (curves.accepted() if curves else 0),
            "dataset_stats": self.dataset_stats,
            # Position = epoch; None where an epoch has no summary (yet).
            "control_losses": per_epoch(summaries, "epoch_loss"),
            # The playground monitor's gradient and learning-rate panels: the epoch-end
            # report's values (grad_norm: its mean over that report's optimizer steps).
            "grad_norms": per_epoch(summaries, "grad_norm"),
            "learning_rates": per_epoch(summaries, "lr"),
            "best": {k[5:]: v for k, v in row.items() if k.startswith("best_")},
            "last": last, "points_per_epoch": self.store.points,
            "epochs": [{"epoch": e, **s} for e, s in sorted(summaries.items())],
            # One entry per bucket: its mean, min and max loss, the global index of its
            # last micro-batch (not an optimizer step) and its epoch.
            "batch_losses": [b.mean for _, b in buckets],
            "batch_losses_min": [b.min for _, b in buckets],
            "batch_losses_max": [b.max for _, b in buckets],
            "micro_batches": [b.micro_batch_last for _, b in buckets],
            "batch_epochs": [e for e, _ in buckets],
        }

    def _sweep_json(self, trials: Mapping[str, dict[str, Any]], epochs: list[dict[str, Any]],
                    modules: list[dict[str, Any]], curves: Mapping[str, Mapping[str, list]],
                    stamp: str) -> dict[str, Any]:
        """The whole sweep: per trial its trials.parquet row, its epochs.parquet and
        modules.parquet rows, and its curves.parquet rows as columns (all without the trial id)."""
        def by_trial(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
            grouped: dict[str, list[dict[str, Any]]] = {}
            for r in rows:
                grouped.setdefault(r["trial_id"], []).append({k: v for k, v in r.items() if k != "trial_id"})
            return grouped

        epochs_of, modules_of = by_trial(epochs), by_trial(modules)
        no_curves: dict[str, list] = {n: [] for n in CURVES_SCHEMA.names[1:]}
        docs = [{"trial_id": tid, "status": row["status"], "error": row["error"],
                 "config": self.trials[tid].config,
                 "summary": {k: v for k, v in row.items()
                             if k not in ("trial_id", "status", "error", "config_json")},
                 "epochs": epochs_of.get(tid, []), "modules": modules_of.get(tid, []),
                 "curves": {k: v for k, v in curves.get(tid, no_curves).items() if k != "trial_id"}}
                for tid, row in trials.items()]
        return {"schema_version": SCHEMA_VERSION, "timestamp": stamp,
                "points_per_epoch": self.store.points, "dataset_stats": self.dataset_stats,
                "trials": docs}

    # ---- restore from files ----
    def load_files(self) -> int:
        """Adopt each trial from the parquet files where they hold more of it than memory
        does; returns how many trials were adopted. Unreadable files are logged, skipped."""
        curves, epochs, trials, modules = (read_rows(self.report_dir / name)
                                           for name in (CURVES_FILE, EPOCHS_FILE, TRIALS_FILE, MODULES_FILE))
        per_module = modules_by_epoch(modules)
        for r in epochs:
            r[MODULES_KEY] = per_module.get((r["trial_id"], int(r["epoch"])), {})
        by_trial: dict[str, tuple[list, list]] = {}
        for index, rows in enumerate((curves, epochs)):
            for r in rows:
                by_trial.setdefault(r["trial_id"], ([], []))[index].append(r)
        adopted = 0
        for tid, (bucket_rows, summary_rows) in sorted(by_trial.items()):
            candidate = self.store.trial_from_rows(tid, bucket_rows, summary_rows)
            current = self.store.trials.get(tid)
            if current is None or _progress(candidate) > _progress(current):
                self.store.adopt(candidate)
                adopted += 1
        for row in trials:
            if row["trial_id"] not in self.trials:
                self.trials[row["trial_id"]] = info_from_row(row)
        for tid in self.store.trials:
            self.trials.setdefault(tid, TrialInfo(tid))
        self._mark_all()
        return adopted


def per_epoch(summaries: Mapping[int, Mapping[str, Any]], key: str) -> list[Any]:
    """One value per epoch, position = epoch; None where an epoch has no summary (yet)."""
    return [summaries.get(e, {}).get(key) for e in range(max(summaries, default=-1) + 1)]


def _progress(trial: TrialCurves) -> tuple[int, int]:
    return trial.accepted(), len(trial.summaries)


def error_message(trial: Any) -> str:
    """The last line of the trial's error file (the exception itself), else a marker."""
    path = getattr(trial, "error_file", None)
    if path:
        try:
            lines = [ln.strip() for ln in Path(path).read_text(errors="replace").splitlines()]
        except OSError as exc:
            return f"error file unreadable: {path}: {exc}"
        lines = [ln for ln in lines if ln]
        if lines:
            return lines[-1][:2000]
    return "trial errored (no error message recorded)"
