"""The end of a sweep: the trials table, what became of each trial, the best config,
`sweep_end.json`, and the exit code."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from hlbd_ray.config import Config, to_yaml
from hlbd_ray.console import BUDGET, COMPLETED, ERRORED, INTERRUPTED, NOT_RUN, STOPPED
from hlbd_ray.errors import EXIT_FAILURE, EXIT_OK
from hlbd_ray.files import atomic_write_json, atomic_write_text
from hlbd_ray.metrics import finite_or_none
from hlbd_ray.search import ARCH_KEY, LR_KEY
from hlbd_ray.storage import storage_uri

END_FILE = "sweep_end.json"
OUTCOME_WORDS = {COMPLETED: "completed", STOPPED: "stopped early by {scheduler}",
                 ERRORED: "errored", BUDGET: "cut by the time budget",
                 INTERRUPTED: "interrupted", NOT_RUN: "never started"}


def trial_rows(results: Any, metric: str, mode: str,
               outcome: Callable[[str, bool], str] | None = None) -> list[dict[str, Any]]:
    """One summary row per trial, from Tune's own results (independent of our reports).

    `outcome(trial_id, errored)` names how the trial ended (see `console.SweepStatus`)."""
    rows = []
    for result in results:
        history = result.metrics_dataframe
        last = result.metrics or {}
        config = result.config or {}        # None for a trial created but never started
        trial_id = last.get("trial_id") or Path(result.path).name
        errored = bool(result.error)
        row: dict[str, Any] = {
            "trial_id": trial_id, "arch": config.get(ARCH_KEY), "lr": config.get(LR_KEY),
            "status": outcome(trial_id, errored) if outcome else (ERRORED if errored else COMPLETED),
            "epochs": last.get("epochs_done", 0), "time_s": last.get("time_total_s"),
            "best_metric": None, "best_val_loss": None, "best_val_ppl": None, "best_val_acc": None,
            "checkpoint": last.get("checkpoint_path"), "note": last.get("stop_reason") or "",
        }
        if result.error:
            row["note"] = str(result.error).strip().splitlines()[-1][:200]
        if history is not None and metric in history and history[metric].notna().any():
            column = history[metric]
            best = history.loc[column.idxmin() if mode == "min" else column.idxmax()]
            row.update(best_metric=finite_or_none(best[metric]),
                       best_val_loss=finite_or_none(best.get("val_loss")),
                       best_val_ppl=finite_or_none(best.get("val_ppl")),
                       best_val_acc=finite_or_none(best.get("val_acc")))
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    header = f"{'trial':<12} {'arch':<8} {'lr':>9} {'status':<11} {'epochs':>6} {'val_loss':>9} " \
             f"{'val_ppl':>9} {'val_acc':>8} {'time_s':>7}  note"
    print("\n" + header)
    for r in rows:
        def num(key: str, spec: str) -> str:
            value = r.get(key)
            return "-" if value is None or value != value else format(value, spec)
        print(f"{r['trial_id']:<12} {r['arch'] or '-':<8} {num('lr', '.2e'):>9} {r['status']:<11} "
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


def finish(cfg: Config, results: Any, exp_dir: Path, outcome: Callable[[str, bool], str] | None = None,
           stopped_by: str | None = None, stop_code: int = EXIT_OK,
           placement: dict[str, Any] | None = None) -> int:
    """Print the table and the outcome counts, save the best config and `sweep_end.json`.

    Exit code: `stop_code` for a sweep stopped early (signal, stall), else 1 when every
    trial failed, else 0."""
    s = cfg.sweep
    rows = trial_rows(results, s.metric, s.mode, outcome)
    print_table(rows)
    counts = outcome_counts(rows)
    print("\n" + outcome_line(counts, s.scheduler))
    best = save_best(cfg, rows, exp_dir, "so far" if stopped_by else "")
    errored = [r for r in rows if r["status"] == ERRORED]
    code = EXIT_OK
    if stopped_by:
        code = stop_code
    elif rows and len(errored) == len(rows):
        print(f"\nevery trial failed ({len(rows)}); first error: {errored[0]['note']}", file=sys.stderr)
        code = EXIT_FAILURE
    atomic_write_json(exp_dir / END_FILE, {
        "exit_code": code, "stopped_by": stopped_by, "outcomes": counts,
        "best_trial": best["trial_id"] if best else None, "placement_groups": placement or {}})
    return code


def save_best(cfg: Config, rows: list[dict[str, Any]], exp_dir: Path, qualifier: str) -> dict | None:
    from hlbd_ray.sweep import trial_config

    s = cfg.sweep
    scored = [r for r in rows if r["best_metric"] is not None]
    if not scored:
        return None
    pick = min if s.mode == "min" else max
    best = pick(scored, key=lambda r: r["best_metric"])
    best_cfg = trial_config(cfg, {ARCH_KEY: best["arch"], LR_KEY: best["lr"]})
    atomic_write_text(exp_dir / "best_config.yaml", to_yaml(best_cfg))
    best = {**best, "checkpoint": storage_uri(cfg.storage_path, best["checkpoint"])}
    atomic_write_json(exp_dir / "best.json", {k: best[k] for k in (
        "trial_id", "arch", "lr", "best_metric", "best_val_loss", "best_val_ppl", "best_val_acc",
        "epochs", "checkpoint")})
    label = f"best trial {qualifier}".strip()
    print(f"\n{label} {best['trial_id']}: {best['arch']} lr {best['lr']:.3e} "
          f"{s.metric} {best['best_metric']:.4f}\n  config     {exp_dir / 'best_config.yaml'}\n"
          f"  checkpoint {best['checkpoint']}")
    return best
