"""Rendering: PNGs and a static index.html from the report files, and the job's exits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hlbd_ray.errors import UserError
from hlbd_ray.render import find_report_dir, render_report, sort_trials
from hlbd_ray.report import ReportAggregator

from .conftest import FakeTrial

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"




def make_sweep(root: Path) -> ReportAggregator:
    """Three trials: two with curves and validation, one errored before any batch."""
    agg = ReportAggregator(root, points_per_epoch=10, every_s=1e9,
                           dataset_stats={"train_pairs": 90})
    good = [FakeTrial("trial_good", {"lr": 1e-3, "model": {"num_heads": 4}}),
            FakeTrial("trial_worse", {"lr": 3e-2, "model": {"num_heads": 8}})]
    for k, trial in enumerate(good):
        for epoch in range(2):
            for start in range(epoch * 40, (epoch + 1) * 40, 20):
                end = (start + 20) % 40 == 0
                losses = [3.0 - epoch + k + 0.01 * i for i in range(20)]
                losses[5] = None
                agg.on_trial_result(0, good, trial, {
                    "epoch": epoch, "batch_start": start, "batches": start + 20,
                    "batch_losses": losses, "epoch_batches": 40, "epoch_end": end,
                    "epoch_loss": 3.0 - epoch + k, "val_loss": (2.5 - epoch + k) if end else None,
                    "lr": 1e-3 / (epoch + 1), "epochs_done": epoch + int(end),
                    "val_modules": {"zodiac": {"loss": 1.25 + epoch + k, "exact": 0.5}} if end else {},
                    "d_model": 32, "num_heads": 4 + 4 * k, "head_dim": 8 // (k + 1)})
        agg.on_trial_complete(0, good, trial)
    err = root / "error.txt"
    err.write_text("Failure # 1\nRuntimeError: worker <died> & gone\n")
    broken = FakeTrial("trial_broken", {"lr": 1.0}, status="ERROR", error_file=str(err))
    agg.on_trial_error(0, good + [broken], broken)
    assert agg.flush()
    return agg


def test_render_writes_pngs_and_an_index_naming_every_trial(tmp_path: Path) -> None:
    make_sweep(tmp_path)
    index = render_report(tmp_path)
    assert index == tmp_path / "report" / "index.html"
    plots = tmp_path / "report" / "plots"
    names = {p.name for p in plots.glob("*.png")}
    assert {"loss_all.png", "val_loss.png", "lr.png", "loss_trial_good.png",
            "loss_trial_worse.png"} <= names
    for p in plots.glob("*.png"):
        assert p.read_bytes()[:8] == PNG and p.stat().st_size > 1000
    html = index.read_text()
    for tid in ("trial_good", "trial_worse", "trial_broken"):
        assert tid in html
    # Each trial's validation per module at its last epoch (epoch 2: loss 1.25 + 1 + k).
    assert "<td>zodiac</td><td>2.2500</td><td>0.500</td>" in html
    assert "<td>zodiac</td><td>3.2500</td><td>0.500</td>" in html
    # Best validation loss first; the errored trial (no val loss) last, its error escaped.
    assert html.index("trial_good") < html.index("trial_worse") < html.index("trial_broken")
    assert "RuntimeError: worker &lt;died&gt; &amp; gone" in html
    assert 'src="plots/loss_trial_good.png"' in html and "num_heads" in html
    assert "No batch losses yet" in html


def test_render_accepts_the_report_folder_itself(tmp_path: Path) -> None:
    make_sweep(tmp_path)
    assert find_report_dir(tmp_path / "report") == tmp_path / "report"
    assert render_report(tmp_path / "report").is_file()


def test_render_while_the_sweep_keeps_writing(tmp_path: Path) -> None:
    agg = make_sweep(tmp_path)
    render_report(tmp_path)
    late = FakeTrial("trial_late", {"lr": 5e-4})
    agg.on_trial_result(0, [late], late, {"epoch": 0, "batch_start": 0, "batches": 3,
                                          "batch_losses": [1.0, 2.0, 3.0], "epoch_batches": 10,
                                          "epoch_end": False})
    assert agg.flush()
    assert "trial_late" in render_report(tmp_path).read_text()


def test_missing_report_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no report in"):
        render_report(tmp_path)


def test_sort_trials_puts_missing_val_loss_last() -> None:
    rows = [{"trial_id": "c", "best_val_loss": None}, {"trial_id": "b", "best_val_loss": 2.0},
            {"trial_id": "a", "best_val_loss": 1.0}]
    assert [r["trial_id"] for r in sort_trials(rows)] == ["a", "b", "c"]


def run_job(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "report.py"), *args],
                          capture_output=True, text=True, timeout=120)


def test_job_exits_2_with_one_line_without_a_report(tmp_path: Path) -> None:
    proc = run_job(str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no report in" in proc.stderr


def test_job_renders_a_sweep(tmp_path: Path) -> None:
    make_sweep(tmp_path)
    proc = run_job(str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "index.html" in proc.stdout
    assert (tmp_path / "report" / "index.html").is_file()


def test_the_live_page_renders_in_the_background_and_stops_reloading_at_the_end(tmp_path):
    from hlbd_ray.render import PageRenderer

    make_sweep(tmp_path)
    page = PageRenderer(tmp_path, every_s=3600)
    assert page.poke()                      # starts a render and returns
    assert not page.poke()                  # not due again for an hour: nothing started
    page._thread.join(60)
    html = (tmp_path / "report" / "index.html").read_text()
    assert '<meta http-equiv="refresh" content="3600">' in html
    assert 'id="answer_lr"' in html and 'id="answer_grid"' in html
    assert '<span id="trial-count">3</span>' in html and 'id="trials"' in html
    assert 'id="best-config"' in html and "trial_good" in html[html.index('id="best-config"'):]
    page.finish()
    html = (tmp_path / "report" / "index.html").read_text()
    assert "http-equiv" not in html and page.renders == 2 and page.failures == 0
    # The budget: the next start waits for every_s or 5x the render's own duration.
    assert 0 < page.last_s <= page.max_s


def test_a_render_draws_again_only_the_plots_whose_inputs_changed(tmp_path):
    make_sweep(tmp_path)
    report = tmp_path / "report"

    def written() -> dict[str, tuple[int, int]]:
        # An atomic write renames a new file into place: a new inode.
        return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
                for p in [*(report / "plots").glob("*.png"), report / "index.html"]}

    drawn: dict[str, str] = {}
    render_report(tmp_path, refresh_s=10, drawn=drawn)
    first = written()
    render_report(tmp_path, refresh_s=10, drawn=drawn)
    again = written()
    assert again["index.html"] != first["index.html"]            # the page itself always
    assert {k: v for k, v in again.items() if k != "index.html"} == \
        {k: v for k, v in first.items() if k != "index.html"}    # nothing changed: no plot drawn

    # A new trial with a few batches and no validation score yet.
    live = ReportAggregator(tmp_path, points_per_epoch=10, every_s=1e9, resume=True)
    late = FakeTrial("trial_late", {"lr": 5e-4})
    live.on_trial_result(0, [late], late, {"epoch": 0, "batch_start": 0, "batches": 3,
                                           "batch_losses": [1.0, 2.0, 3.0], "epoch_batches": 3,
                                           "epoch_end": False})
    assert live.flush()
    render_report(tmp_path, refresh_s=10, drawn=drawn)
    third = written()
    redrawn = {name for name in third if third[name] != again.get(name)}
    assert redrawn == {"index.html", "loss_all.png", "val_loss.png", "lr.png", "loss_trial_late.png"}

    (report / "plots" / "loss_trial_good.png").unlink()          # gone from disk: drawn again
    render_report(tmp_path, refresh_s=10, drawn=drawn)
    assert (report / "plots" / "loss_trial_good.png").read_bytes()[:8] == PNG
    # Without a record of what was drawn (jobs/report.py, a resumed sweep): every plot.
    render_report(tmp_path)
    last = written()
    assert all(last[name] != third[name] for name in third if name != "loss_trial_good.png")


def test_a_render_still_running_is_skipped_not_queued(tmp_path):
    import pickle
    import threading

    from hlbd_ray.render import PageRenderer

    make_sweep(tmp_path)
    page = PageRenderer(tmp_path, every_s=0)
    gate = threading.Event()
    page._thread = threading.Thread(target=gate.wait)   # a render that has not ended
    page._thread.start()
    assert not page.poke() and page.skipped == 1
    gate.set()
    page._thread.join()
    # Tune pickles its callbacks, the aggregator's page renderer with them.
    page.drawn["answer_lr.png"] = "digest"
    restored = pickle.loads(pickle.dumps(page))
    assert restored._thread is None and restored.drawn == {}      # a resumed sweep draws every plot once
    assert page.poke()
    page.finish()
    assert page.failures == 0


def test_the_aggregator_keeps_the_page_fresh_while_it_writes(tmp_path):
    agg = make_sweep(tmp_path)
    live = ReportAggregator(tmp_path, points_per_epoch=10, every_s=1e9, resume=True,
                            live_page=True)
    late = FakeTrial("trial_late", {"lr": 5e-4})
    live.on_trial_result(0, [late], late, {"epoch": 0, "batch_start": 0, "batches": 3,
                                           "batch_losses": [1.0, 2.0, 3.0], "epoch_batches": 3, "epoch_end": False})
    # The first result is written at once, and the write started a render beside it.
    assert live.page._thread is not None
    live.on_experiment_end([late])
    html = (tmp_path / "report" / "index.html").read_text()
    assert '<span id="trial-count">4</span>' in html and "http-equiv" not in html
    assert agg.trials.keys() < live.trials.keys()
