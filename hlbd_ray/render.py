"""Plots and a static index.html from a sweep's report files (see `hlbd_ray.report`).

Reads only the files the aggregator writes, each of which is replaced atomically, so it
works on a sweep that is still running: every run renders what is there at that moment.
Outputs go next to the data: `report/index.html` and `report/plots/*.png`, opened
straight from disk with no server. Matplotlib is used through `Figure` objects only (no
pyplot), which needs no display and keeps no global state between calls.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from hlbd_ray.errors import UserError
from hlbd_ray.files import atomic_write, atomic_write_text
from hlbd_ray.tables import CURVES_FILE, EPOCHS_FILE, MODULES_FILE, REPORT_DIR, TRIALS_FILE, read_parquet, safe_name

log = logging.getLogger(__name__)
# A font cache written by another matplotlib install (a deleted venv) makes the first
# render warn once per math font family it cannot open, ~20 lines on the sweep's console;
# matplotlib falls back to its own fonts either way, so only errors should print.
logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)

PLOTS_DIR = "plots"
# The trial fields the answer plots draw from.
ANSWER_KEYS = ("trial_id", "num_heads", "d_model", "lr", "best_val_loss")
INDEX_FILE = "index.html"
# Columns of the best-trials table: (trial row key, header, format).
TABLE = (("status", "status", "{}"), ("best_val_loss", "best val loss", "{:.4f}"),
         ("best_val_ppl", "best val ppl", "{:.2f}"), ("best_val_acc", "best val acc", "{:.4f}"),
         ("best_val_exact", "best val exact", "{:.3f}"), ("best_epoch", "best epoch", "{}"),
         ("epochs_done", "epochs", "{}"), ("num_heads", "heads", "{}"), ("d_model", "d_model", "{}"),
         ("lr", "lr", "{:.2e}"), ("last_loss", "last loss", "{:.4f}"),
         ("last_time_total_s", "time s", "{:.0f}"))


class PageRenderer:
    """Keeps a running sweep's index.html and PNGs fresh without slowing the sweep.

    `poke()` (from the aggregator, on Tune's callback thread) starts a render in a daemon
    thread and returns at once. A plot whose inputs did not change since this renderer
    drew it is not drawn again (an ended trial's loss plot: most of a long sweep's page).
    It skips when a render is still running, and waits between starts for `every_s` or
    `1 / max_share` times the last render's duration, whichever is longer: rendering
    takes at most `max_share` of one core however slow it gets. The render reads only
    the report files, which the aggregator replaces atomically, so the two share no
    memory. `finish()` waits for a running render and writes the final page, which no
    longer reloads.
    """

    def __init__(self, folder: str | Path, every_s: float, max_share: float = 0.2) -> None:
        self.folder, self.every_s, self.max_share = Path(folder), float(every_s), max_share
        self.renders = self.skipped = self.failures = 0
        self.last_s = self.max_s = 0.0
        self._next = 0.0
        self._thread: threading.Thread | None = None
        self.drawn: dict[str, str] = {}    # plot file name -> digest of what it was drawn from

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks (tuner.pkl): a thread does not pickle, nor matter
        # there; a resumed sweep draws every plot once more from the files it finds.
        return {**self.__dict__, "_thread": None, "drawn": {}}

    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def poke(self) -> bool:
        """Start a render in the background if one is due; True if it started."""
        now = time.monotonic()
        if now < self._next:
            return False
        if self.busy():
            self.skipped += 1
            return False
        self._thread = threading.Thread(target=self._render, args=(self.every_s,),
                                        name="hlbd-report-render", daemon=True)
        self._next = now + self.every_s
        self._thread.start()
        return True

    def finish(self, timeout_s: float = 120.0) -> None:
        """The final page (no reload), after any render still running (bounded wait)."""
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.error("report: the page render did not end within %.0f s; the final "
                          "page is rendered beside it", timeout_s)
                self.drawn = {}    # the render still running may record its digests late
                self._render(None, reuse=False)
                return
        self._render(None)

    def _render(self, refresh_s: float | None, reuse: bool = True) -> None:
        started = time.monotonic()
        try:
            render_report(self.folder, refresh_s=refresh_s, drawn=self.drawn if reuse else None)
        except Exception:  # the sweep goes on; the next render retries
            self.failures += 1
            log.exception("report: could not render the page in %s", self.folder)
        took = time.monotonic() - started
        self.renders += 1
        self.last_s, self.max_s = took, max(self.max_s, took)
        self._next = max(self._next, started + took / self.max_share)


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


def render_report(folder: str | Path, refresh_s: float | None = None,
                  drawn: dict[str, str] | None = None) -> Path:
    """Render every plot and index.html; returns the path of index.html.

    `refresh_s`: the page reloads itself every so many seconds (a sweep still running);
    None: a page that stays as it is (the sweep ended, or a snapshot). `drawn`: the
    digests of the plots an earlier render drew (updated here); a plot on disk that was
    drawn from the same inputs is kept as it is. None: draw every plot."""
    report_dir = find_report_dir(folder)
    data = load_report(report_dir)
    plots = Plots(report_dir / PLOTS_DIR, drawn)
    trials = sort_trials(data["trials"])
    by_trial = _group(data["curves"])
    epochs = _group(data["epochs"])
    # Each plot gets only the fields it draws, so that its digest changes exactly when it would.
    scores = [{key: t.get(key) for key in ANSWER_KEYS} for t in _scored(trials)]
    ids = [t["trial_id"] for t in trials]
    answer = [plots.draw("answer_lr.png", scores, partial(_answer_lr, scores)),
              plots.draw("answer_grid.png", scores, partial(_answer_grid, scores))]
    overview = [
        plots.draw("loss_all.png", (ids, by_trial), partial(_overview_loss, ids, by_trial)),
        plots.draw("val_loss.png", (ids, epochs), partial(_per_epoch, ids, epochs, "val_loss", "validation loss")),
        plots.draw("lr.png", (ids, epochs), partial(_per_epoch, ids, epochs, "lr", "learning rate (epoch end)")),
    ]
    per_trial = {}
    for t in trials:
        tid = t["trial_id"]
        if by_trial.get(tid):
            per_trial[tid] = plots.draw(f"loss_{safe_name(tid)}.png", (tid, by_trial[tid]),
                                        partial(_trial_loss, tid, by_trial[tid]))
    index = report_dir / INDEX_FILE
    modules = {tid: _module_table(rows) for tid, rows in _group(data["modules"]).items()}
    atomic_write_text(index, _html(trials, answer, overview, per_trial, report_dir, refresh_s, modules))
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


def _arch(t: dict[str, Any]) -> tuple[Any, Any]:
    return t.get("num_heads"), t.get("d_model")


def _scored(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Trials with a best validation loss and the swept values it answers for."""
    return [t for t in trials if t.get("best_val_loss") is not None and t.get("lr")
            and t.get("num_heads") is not None]


def _answer_lr(trials: list[dict[str, Any]]) -> Figure:
    """Best val_loss against lr (log x): one series per (num_heads, d_model)."""
    fig = Figure(figsize=(8, 4.2), layout="constrained")
    ax = fig.add_subplot()
    series: dict[tuple, list[dict[str, Any]]] = {}
    for t in _scored(trials):
        series.setdefault(_arch(t), []).append(t)
    markers = "osD^v<>p*"
    widths = sorted({d for _, d in series}, key=lambda d: (d is None, d or 0))
    for heads, d_model in sorted(series, key=lambda k: (k[0], k[1] or 0)):
        points = sorted(series[(heads, d_model)], key=lambda t: t["lr"])
        ax.plot([t["lr"] for t in points], [t["best_val_loss"] for t in points],
                marker=markers[widths.index(d_model) % len(markers)], linewidth=1,
                label=f"{heads} heads, d_model {d_model}")
    best = _scored(trials)[:1]
    if best:
        ax.plot([best[0]["lr"]], [best[0]["best_val_loss"]], marker="*", markersize=16,
                color="gold", markeredgecolor="k", linestyle="none", label="best")
    ax.set_xscale("log")
    _finish(ax, "best validation loss against learning rate", "learning rate (log)",
            "best val_loss")
    return fig


def _answer_grid(trials: list[dict[str, Any]], bins: int = 6) -> Figure:
    """num_heads x lr grid (lr in log-spaced bins) of the best val_loss in each cell."""
    fig = Figure(figsize=(8, 3.6), layout="constrained")
    ax = fig.add_subplot()
    scored = _scored(trials)
    if not scored:
        ax.text(0.5, 0.5, "no validation loss yet", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    heads = sorted({t["num_heads"] for t in scored})
    low, high = (math.log10(f(t["lr"] for t in scored)) for f in (min, max))
    n = max(1, min(bins, len({t["lr"] for t in scored})))
    width = (high - low) / n or 1.0
    grid = [[math.nan] * n for _ in heads]
    for t in scored:
        col = min(n - 1, int((math.log10(t["lr"]) - low) / width))
        row = heads.index(t["num_heads"])
        if not grid[row][col] <= t["best_val_loss"]:   # NaN compares False: first value
            grid[row][col] = t["best_val_loss"]
    image = ax.imshow(grid, aspect="auto", cmap="viridis_r", origin="lower")
    for row, values in enumerate(grid):
        for col, value in enumerate(values):
            if not math.isnan(value):
                ax.text(col, row, f"{value:.3f}", ha="center", va="center", fontsize=8,
                        bbox={"facecolor": "white", "alpha": 0.7, "linewidth": 0})
    ax.set_yticks(range(len(heads)), [str(h) for h in heads])
    ax.set_xticks(range(n), [f"{10 ** (low + (c + 0.5) * width):.1e}" for c in range(n)],
                  fontsize=8)
    ax.set_xlabel("learning rate (bin centre, log-spaced bins)")
    ax.set_ylabel("num_heads")
    ax.set_title("best validation loss per num_heads x lr cell (empty: no trial there)",
                 fontsize=10)
    fig.colorbar(image, ax=ax, label="best val_loss")
    return fig


def _overview_loss(ids: list[str], by_trial: dict[str, list]) -> Figure:
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.add_subplot()
    for tid in ids:
        buckets = by_trial.get(tid)
        if buckets:
            ax.plot(*_xy(buckets, "mean"), linewidth=1, label=tid)
    _finish(ax, "train loss (bucket means), all trials", "micro-batch (global index)", "loss")
    return fig


def _per_epoch(ids: list[str], epochs: dict[str, list], key: str, label: str) -> Figure:
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.add_subplot()
    for tid in ids:
        rows = [r for r in epochs.get(tid, []) if r.get(key) is not None]
        if rows:
            ax.plot([r["epoch"] for r in rows], [r[key] for r in rows], marker="o",
                    markersize=3, linewidth=1, label=tid)
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


class Plots:
    """The PNGs of one render, each drawn only when its inputs changed since `drawn` saw it."""

    def __init__(self, folder: Path, drawn: dict[str, str] | None) -> None:
        self.folder, self.drawn = folder, drawn

    def draw(self, name: str, inputs: Any, figure: Callable[[], Figure]) -> Path:
        path = self.folder / name
        # Drawing a plot costs ~0.1 CPU-s, its digest well under 1% of that.
        digest = hashlib.blake2b(json.dumps(inputs, sort_keys=True, default=str).encode(),
                                 digest_size=16).hexdigest()
        if self.drawn is not None and self.drawn.get(name) == digest and path.is_file():
            return path
        _save(path, figure())
        if self.drawn is not None:
            self.drawn[name] = digest
        return path


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


def _best_config(trials: list[dict[str, Any]]) -> str:
    """The current leader: its id, architecture, lr and scores, then its full config."""
    best = next((t for t in trials if t.get("best_val_loss") is not None), None)
    if best is None:
        return '<p id="best-config">No validation loss yet.</p>'
    fields = (("trial", best["trial_id"], "{}"), ("status", best.get("status"), "{}"),
              ("num_heads", best.get("num_heads"), "{}"), ("d_model", best.get("d_model"), "{}"),
              ("lr", best.get("lr"), "{:.3e}"), ("best val_loss", best["best_val_loss"], "{:.4f}"),
              ("best val_acc", best.get("best_val_acc"), "{:.4f}"),
              ("at epoch", best.get("best_epoch"), "{}"))
    rows = "".join(f"<tr><th>{k}</th><td>{_fmt(v, f)}</td></tr>" for k, v, f in fields)
    return f'<table id="best-config" class="cfg">{rows}</table>'


def _html(trials: list[dict[str, Any]], answer: list[Path], overview: list[Path],
          per_trial: dict[str, Path], report_dir: Path, refresh_s: float | None = None,
          modules: dict[str, str] | None = None) -> str:
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
    answer_images = "".join(f'<img id="{html.escape(p.stem)}" src="{rel(p)}" '
                            f'alt="{html.escape(p.stem)}">' for p in answer)
    if refresh_s:
        refresh = f'<meta http-equiv="refresh" content="{max(1, round(refresh_s))}">'
        state = (f"The sweep is running: this page is rewritten every {refresh_s:g} s "
                 "and reloads itself.")
    else:
        refresh, state = "", "This page no longer changes (the sweep ended, or a snapshot)."
    return f"""<!doctype html>
<html><head><meta charset="utf-8">{refresh}<title>Sweep report</title>
<style>
body{{font-family:sans-serif;margin:1.5em;max-width:1400px}}
table{{border-collapse:collapse;font-size:13px}} td,th{{border:1px solid #ccc;padding:2px 6px}}
img{{max-width:100%;display:block;margin:.5em 0}} .err{{color:#a00}}
table.cfg th{{text-align:left;font-weight:normal;color:#555}}
</style></head><body>
<h1>Sweep report</h1>
<p><span id="trial-count">{len(trials)}</span> trials; rendered {stamp} from
<code>{html.escape(str(report_dir))}</code>. {state}</p>
<h2>Which heads and learning rate win</h2>{answer_images}
<h2>Current best</h2>{_best_config(trials)}
<h2>Trials by best validation loss</h2>
<table id="trials"><tr><th>#</th><th>trial</th>{head}<th>error / stop reason</th></tr>
{"".join(rows)}</table>
<h2>All trials</h2>{images}
<h2>Each trial</h2>{"".join(sections)}
</body></html>
"""
