"""Plots and a static index.html from a sweep's report files (see `hlbd_ray.report`).

Reads only the files the aggregator writes, each of which is replaced atomically, so it
works on a sweep that is still running: every run renders what is there at that moment.
Outputs go next to the data: `report/index.html` and `report/plots/*.png`, opened
straight from disk with no server. Matplotlib is used through `Figure` objects only (no
pyplot), which needs no display and keeps no global state between calls.
"""

from __future__ import annotations

import html
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from hlbd_ray.errors import UserError
from hlbd_ray.files import atomic_write, atomic_write_text
from hlbd_ray.tables import (CURVES_FILE, EPOCHS_FILE, MODULES_FILE, REPORT_DIR, TRIALS_FILE,
                             read_parquet, safe_name)

PLOTS_DIR = "plots"
INDEX_FILE = "index.html"
# Columns of the best-trials table: (trial row key, header, format).
TABLE = (("status", "status", "{}"), ("best_val_loss", "best val loss", "{:.4f}"),
         ("best_val_ppl", "best val ppl", "{:.2f}"), ("best_val_acc", "best val acc", "{:.4f}"),
         ("best_val_exact", "best val exact", "{:.3f}"), ("best_epoch", "best epoch", "{}"),
         ("epochs_done", "epochs", "{}"), ("num_heads", "heads", "{}"), ("d_model", "d_model", "{}"),
         ("lr", "lr", "{:.2e}"), ("last_loss", "last loss", "{:.4f}"),
         ("last_time_total_s", "time s", "{:.0f}"))


def find_report_dir(folder: str | Path) -> Path:
    """The report folder of an experiment folder (or the report folder itself)."""
    folder = Path(folder)
    for candidate in (folder / REPORT_DIR, folder):
        if (candidate / TRIALS_FILE).is_file():
            return candidate
    raise UserError(f"no report in {folder}: expected {folder / REPORT_DIR / TRIALS_FILE} "
                    "(written by a running or finished sweep)")


def load_report(report_dir: Path) -> dict[str, Any]:
    """Trials, epochs and curve buckets as lists of plain dicts."""
    def rows(name: str) -> list[dict[str, Any]]:
        path = report_dir / name
        return read_parquet(path).to_pylist() if path.is_file() else []

    trials = rows(TRIALS_FILE)
    for t in trials:
        t["config"] = json.loads(t.get("config_json") or "{}")
    return {"trials": trials, "epochs": rows(EPOCHS_FILE), "curves": rows(CURVES_FILE),
            "modules": rows(MODULES_FILE)}


def render_report(folder: str | Path) -> Path:
    """Render every plot and index.html; returns the path of index.html."""
    report_dir = find_report_dir(folder)
    data = load_report(report_dir)
    plots = report_dir / PLOTS_DIR
    trials = sort_trials(data["trials"])
    by_trial = _group(data["curves"])
    epochs = _group(data["epochs"])
    overview = [
        _save(plots / "loss_all.png", _overview_loss(trials, by_trial)),
        _save(plots / "val_loss.png", _per_epoch(trials, epochs, "val_loss", "validation loss")),
        _save(plots / "lr.png", _per_epoch(trials, epochs, "lr", "learning rate (epoch end)")),
    ]
    per_trial = {}
    for t in trials:
        tid = t["trial_id"]
        if by_trial.get(tid):
            per_trial[tid] = _save(plots / f"loss_{safe_name(tid)}.png",
                                   _trial_loss(tid, by_trial[tid]))
    index = report_dir / INDEX_FILE
    modules = {tid: _module_table(rows) for tid, rows in _group(data["modules"]).items()}
    atomic_write_text(index, _html(trials, overview, per_trial, report_dir, modules))
    return index


def sort_trials(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best validation loss first; trials without one last, in id order."""
    def key(t: dict[str, Any]) -> tuple:
        v = t.get("best_val_loss")
        return (v is None, v if v is not None else 0.0, t["trial_id"])
    return sorted(trials, key=key)


def _group(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["trial_id"], []).append(r)
    for group in out.values():
        group.sort(key=lambda r: (r["epoch"], r.get("bucket", 0)))
    return out


# ---- figures ----
def _xy(buckets: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """Bucket midpoints (global batch index) against a field; empty buckets leave a gap."""
    xs = [(b["micro_batch_first"] + b["micro_batch_last"]) / 2 for b in buckets]
    ys = [b[key] if b[key] is not None else math.nan for b in buckets]
    return xs, ys


def _trial_loss(tid: str, buckets: list[dict[str, Any]]) -> Figure:
    fig = Figure(figsize=(8, 3.6), layout="constrained")
    ax = fig.add_subplot()
    xs, mean = _xy(buckets, "mean")
    _, low = _xy(buckets, "min")
    _, high = _xy(buckets, "max")
    ax.fill_between(xs, low, high, alpha=0.25, linewidth=0, label="min-max per bucket")
    ax.plot(xs, mean, linewidth=1.2, label="mean per bucket")
    for b in buckets:
        if b["bucket"] == 0 and b["epoch"] > 0:
            ax.axvline(b["micro_batch_first"], color="0.8", linewidth=0.6, zorder=0)
    skipped = sum(b["nonfinite"] for b in buckets)
    title = f"{tid}: train loss per micro-batch bucket"
    ax.set_title(title + (f" ({skipped} non-finite skipped)" if skipped else ""), fontsize=10)
    ax.set_xlabel("micro-batch (global index)")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    return fig


def _overview_loss(trials: list[dict[str, Any]], by_trial: dict[str, list]) -> Figure:
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.add_subplot()
    for t in trials:
        buckets = by_trial.get(t["trial_id"])
        if buckets:
            ax.plot(*_xy(buckets, "mean"), linewidth=1, label=t["trial_id"])
    _finish(ax, "train loss (bucket means), all trials", "micro-batch (global index)", "loss")
    return fig


def _per_epoch(trials: list[dict[str, Any]], epochs: dict[str, list], key: str,
               label: str) -> Figure:
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.add_subplot()
    for t in trials:
        rows = [r for r in epochs.get(t["trial_id"], []) if r.get(key) is not None]
        if rows:
            ax.plot([r["epoch"] for r in rows], [r[key] for r in rows], marker="o",
                    markersize=3, linewidth=1, label=t["trial_id"])
    _finish(ax, f"{label} per epoch", "epoch", label)
    return fig


def _finish(ax: Any, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ax.lines:
        ax.legend(fontsize=7, ncol=2)
    else:
        ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes)


def _save(path: Path, fig: Figure) -> Path:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    return path


# ---- html ----
def _fmt(value: Any, pattern: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "&ndash;"
    try:
        return html.escape(pattern.format(value))
    except (ValueError, TypeError):
        return html.escape(str(value))


def _module_table(rows: list[dict[str, Any]]) -> str:
    """The trial's validation per HLBD module at its last closed epoch, as an HTML table."""
    last = max(r["epoch"] for r in rows)
    values: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["epoch"] == last:
            values.setdefault(r["module"], {})[r["metric"]] = r["value"]
    body = "".join(f"<tr><td>{html.escape(m)}</td><td>{_fmt(v.get('loss'), '{:.4f}')}</td>"
                   f"<td>{_fmt(v.get('exact'), '{:.3f}')}</td></tr>" for m, v in sorted(values.items()))
    return (f'<table class="mod"><tr><th>module (epoch {last + 1})</th><th>val loss</th>'
            f"<th>val exact</th></tr>{body}</table>")


def _html(trials: list[dict[str, Any]], overview: list[Path], per_trial: dict[str, Path],
          report_dir: Path, modules: dict[str, str] | None = None) -> str:
    def rel(p: Path) -> str:
        return html.escape(p.relative_to(report_dir).as_posix(), quote=True)

    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in TABLE)
    rows = []
    for rank, t in enumerate(trials, 1):
        tid = html.escape(t["trial_id"])
        note = t.get("error") or t.get("stop_reason") or ""
        cells = "".join(f"<td>{_fmt(t.get(k), f)}</td>" for k, _, f in TABLE)
        rows.append(f'<tr><td>{rank}</td><td><a href="#t-{tid}">{tid}</a></td>{cells}'
                    f"<td>{html.escape(note)}</td></tr>")
    sections = []
    for t in trials:
        tid = t["trial_id"]
        config = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                         for k, v in sorted(t["config"].items()))
        plot = (f'<img src="{rel(per_trial[tid])}" alt="loss of {html.escape(tid)}">'
                if tid in per_trial else "<p>No batch losses yet.</p>")
        error = f'<p class="err">{html.escape(t["error"])}</p>' if t.get("error") else ""
        sections.append(f'<section id="t-{html.escape(tid)}"><h3>{html.escape(tid)} '
                        f'({html.escape(str(t.get("status")))})</h3>{error}{plot}'
                        f'{(modules or {}).get(tid, "")}<table class="cfg">{config}</table></section>')
    images = "".join(f'<img src="{rel(p)}" alt="{html.escape(p.stem)}">' for p in overview)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Sweep report</title>
<style>
body{{font-family:sans-serif;margin:1.5em;max-width:1400px}}
table{{border-collapse:collapse;font-size:13px}} td,th{{border:1px solid #ccc;padding:2px 6px}}
img{{max-width:100%;display:block;margin:.5em 0}} .err{{color:#a00}}
table.cfg th{{text-align:left;font-weight:normal;color:#555}}
</style></head><body>
<h1>Sweep report</h1>
<p>{len(trials)} trials; rendered {stamp} from <code>{html.escape(str(report_dir))}</code>.
Re-run the report command to refresh while the sweep runs.</p>
<h2>Trials by best validation loss</h2>
<table><tr><th>#</th><th>trial</th>{head}<th>error / stop reason</th></tr>
{"".join(rows)}</table>
<h2>All trials</h2>{images}
<h2>Each trial</h2>{"".join(sections)}
</body></html>
"""
