"""The end of a sweep: the trials table, what became of each trial, the best config,
`sweep_end.json`, and the exit code."""

from __future__ import annotations

import resource
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from hlbd_ray.config import Config, to_yaml
from hlbd_ray.confirm import CONFIRM_STAGE, config_key, config_stats, format_report, verdict
from hlbd_ray.console import BUDGET, COMPLETED, ERRORED, INTERRUPTED, NOT_RUN, STOPPED
from hlbd_ray.contract import best_index
from hlbd_ray.curves import path_or_none
from hlbd_ray.errors import EXIT_FAILURE, EXIT_OK
from hlbd_ray.files import atomic_write_json, atomic_write_text
from hlbd_ray.metrics import finite_or_none
from hlbd_ray.search import ARCH_KEY, LR_KEY, REPEAT_KEY, STAGE_KEY
from hlbd_ray.storage import storage_uri

END_FILE = "sweep_end.json"
OUTCOME_WORDS = {COMPLETED: "completed", STOPPED: "stopped early by {scheduler}",
                 ERRORED: "errored", BUDGET: "cut by the time budget",
                 INTERRUPTED: "interrupted", NOT_RUN: "never started"}


def final_table_rows(results: Any, metric: str, mode: str,
                     outcome: Callable[[str, bool], str] | None = None,
                     checkpoints: Mapping[tuple[str, int], str] | None = None) -> list[dict[str, Any]]:
    """The final console table's rows, one per trial, from Tune's own results
    (independent of our report files).

    `outcome(trial_id, errored)` names how the trial ended (see `console.SweepStatus`).
    The best values, `best_epoch` and `checkpoint` come from the trial's best epoch end
    (the reports that carry a checkpoint); the `final_` ones from its last result.
    `checkpoints` ((trial id, epoch) -> path, the report aggregator's record) names the
    best epoch's checkpoint first: Tune's result files can lack it (see curves.CHECKPOINT_KEY)."""
    rows = []
    for result in results:
        history = result.metrics_dataframe
        last = result.metrics or {}
        config = result.config or {}        # None for a trial created but never started
        trial_id = last.get("trial_id") or Path(result.path).name
        errored = bool(result.error)
        row: dict[str, Any] = {
            "trial_id": trial_id, "arch": config.get(ARCH_KEY), "lr": config.get(LR_KEY),
            "stage": config.get(STAGE_KEY) or "search", "repeat": config.get(REPEAT_KEY) or 0,
            "seed": last.get("seed"),
            "status": outcome(trial_id, errored) if outcome else (ERRORED if errored else COMPLETED),
            "epochs": last.get("epochs_done", 0), "time_s": last.get("time_total_s"),
            "best_metric": None, "best_val_loss": None, "best_val_ppl": None, "best_val_acc": None,
            "best_val_exact": None, "best_epoch": None, "checkpoint": None,
            "final_metric": finite_or_none(last.get(metric)),
            "final_val_loss": finite_or_none(last.get("val_loss")),
            "final_val_exact": finite_or_none(last.get("val_exact")),
            "note": last.get("stop_reason") or "",
        }
        if result.error:
            row["note"] = str(result.error).strip().splitlines()[-1][:200]
        ends = history[history["epoch_end"] == True] if history is not None and "epoch_end" in history else None  # noqa: E712
        best_at = best_index(ends[metric].tolist(), mode) if ends is not None and metric in ends else None
        if ends is not None and best_at is not None:  # (a best_at implies ends; spelled out for the type checker)
            best = ends.iloc[best_at]
            row.update(best_metric=finite_or_none(best[metric]),
                       best_val_loss=finite_or_none(best.get("val_loss")),
                       best_val_ppl=finite_or_none(best.get("val_ppl")),
                       best_val_acc=finite_or_none(best.get("val_acc")),
                       best_val_exact=finite_or_none(best.get("val_exact")),
                       best_epoch=int(best["epoch"]),
                       checkpoint=(checkpoints or {}).get((trial_id, int(best["epoch"])))
                       or path_or_none(best.get("checkpoint_path")))
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    header = f"{'trial':<12} {'stage':<7} {'arch':<8} {'lr':>9} {'seed':>4} {'status':<11} " \
             f"{'epochs':>6} {'val_loss':>9} {'val_ppl':>9} {'val_acc':>8} {'time_s':>7}  note"
    print("\n" + header)
    for r in rows:
        def num(key: str, spec: str, r: dict[str, Any] = r) -> str:
            value = r.get(key)
            return "-" if value is None or value != value else format(value, spec)
        print(f"{r['trial_id']:<12} {r['stage']:<7} {r['arch'] or '-':<8} {num('lr', '.2e'):>9} "
              f"{num('seed', 'd'):>4} {r['status']:<11} "
              f"{r['epochs']:>6} {num('best_val_loss', '.4f'):>9} {num('best_val_ppl', '.3f'):>9} "
              f"{num('best_val_acc', '.4f'):>8} {num('time_s', '.0f'):>7}  {r['note']}")


def outcome_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    counted = Counter(r["status"] for r in rows)
    return {status: counted.get(status, 0) for status in OUTCOME_WORDS}


def outcome_line(counts: dict[str, int], scheduler: str) -> str:
    always = (COMPLETED, ERRORED) + ((STOPPED,) if scheduler != "fifo" else ())
    parts = [f"{n} {OUTCOME_WORDS[status].format(scheduler=scheduler.upper())}"
             for status, n in counts.items() if n or status in always]
    return f"trials: {sum(counts.values())} = " + ", ".join(parts)


def driver_usage(started: float) -> dict[str, float]:
    """The driver's own cost: seconds since `started` (time.time()) and this process's
    peak resident memory. Ray's processes and the trials are other processes, so they are
    not in it."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_bytes = peak if sys.platform == "darwin" else peak * 1024     # Linux counts KiB
    return {"wall_s": round(time.time() - started, 1),
            "peak_rss_mib": round(peak_bytes / 2**20, 1)}


def usage_line(usage: dict[str, float]) -> str:
    minutes, seconds = divmod(round(usage["wall_s"]), 60)
    return f"driver: {minutes} min {seconds:02d} s since the job started, peak RSS {usage['peak_rss_mib']:.0f} MiB"


def finish(cfg: Config, results: Any, exp_dir: Path, outcome: Callable[[str, bool], str] | None = None,
           stopped_by: str | None = None, stop_code: int = EXIT_OK,
           placement: dict[str, Any] | None = None, started: float = 0.0,
           checkpoints: Mapping[tuple[str, int], str] | None = None) -> int:
    """Print the table, the outcome counts and the driver's wall time and peak memory; save
    the best config and `sweep_end.json`.

    Exit code: `stop_code` for a sweep stopped early (signal, stall), else 1 when every
    trial failed, else 0."""
    s = cfg.sweep
    rows = final_table_rows(results, s.metric, s.mode, outcome, checkpoints)
    print_table(rows)
    counts = outcome_counts(rows)
    print("\n" + outcome_line(counts, s.scheduler))
    # A confirmation cut short names no winner: its unfinished trials' last values are
    # not final ones (the search's best stands, "so far").
    confirmed = [r for r in rows if r["stage"] == CONFIRM_STAGE and r["status"] == COMPLETED]
    confirmation = None
    if confirmed and not stopped_by:
        stats = config_stats(confirmed, s.metric, str(s.mode))
        confirmation = {"stats": stats, **verdict(stats)}
        print(format_report(stats, confirmation, s.metric))
    best = save_best(cfg, rows, exp_dir, "so far" if stopped_by else "", confirmation)
    errored = [r for r in rows if r["status"] == ERRORED]
    code = EXIT_OK
    if stopped_by:
        code = stop_code
    elif rows and len(errored) == len(rows):
        print(f"\nevery trial failed ({len(rows)}); first error: {errored[0]['note']}", file=sys.stderr)
        code = EXIT_FAILURE
    usage = driver_usage(started or time.time())
    print(usage_line(usage))
    atomic_write_json(exp_dir / END_FILE, {
        "exit_code": code, "stopped_by": stopped_by, "outcomes": counts,
        "best_trial": best["trial_id"] if best else None, "placement_groups": placement or {},
        "driver": usage})
    return code


BEST_KEYS = ("trial_id", "arch", "lr", "seed", "best_epoch", "checkpoint", "best_metric",
             "best_val_loss", "best_val_ppl", "best_val_acc", "best_val_exact", "epochs")


def save_best(cfg: Config, rows: list[dict[str, Any]], exp_dir: Path, qualifier: str,
              confirmation: dict[str, Any] | None = None) -> dict | None:
    """best_config.yaml and best.json: the confirmed winner when the confirmation stage
    named one, else the search's best trial. The trial, epoch and checkpoint are those of
    the best validation score (over every epoch) among that config's trials."""
    from hlbd_ray.sweep import trial_config

    s = cfg.sweep
    pick = min if s.mode == "min" else max
    search = [r for r in rows if r["stage"] != CONFIRM_STAGE and r["best_metric"] is not None]
    pool, stage = search, "search"
    winner = confirmation["stats"][0] if confirmation and confirmation.get("winner") else None
    if winner is not None:
        pool = [r for r in rows if r["stage"] == CONFIRM_STAGE and r["best_metric"] is not None
                and config_key(r) == (winner["arch"], winner["lr"])]
        stage = CONFIRM_STAGE
    if not pool:
        return None
    best = pick(pool, key=lambda r: r["best_metric"])
    best_cfg = trial_config(cfg, {ARCH_KEY: best["arch"], LR_KEY: best["lr"], REPEAT_KEY: best["repeat"]})
    atomic_write_text(exp_dir / "best_config.yaml", to_yaml(best_cfg))
    best = {**best, "checkpoint": storage_uri(cfg.resolved_storage_path(), best["checkpoint"])}
    record: dict[str, Any] = {"stage": stage, "metric": s.metric, "mode": str(s.mode),
                              **{k: best[k] for k in BEST_KEYS}}
    if search:
        top = pick(search, key=lambda r: r["best_metric"])
        record["search_best"] = {k: top[k] for k in ("trial_id", "arch", "lr", "seed", "best_metric")}
    if confirmation:
        record["confirmation"] = confirmation
    atomic_write_json(exp_dir / "best.json", record)
    label = f"best trial {qualifier}".strip()
    chosen = "the confirmation's winner" if stage == CONFIRM_STAGE else "the search's best"
    print(f"\n{label} ({chosen}) {best['trial_id']}: {best['arch']} lr {best['lr']:.3e} seed {best['seed']} "
          f"epoch {best['best_epoch']} {s.metric} {best['best_metric']:.4f}\n"
          f"  config     {exp_dir / 'best_config.yaml'}\n  checkpoint {best['checkpoint']}")
    return best
