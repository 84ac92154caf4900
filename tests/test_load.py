"""Load: many short trials, two at a time, all finish and all reach the reports."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from .conftest import REPO, run_job


@pytest.mark.slow
@pytest.mark.extended
def test_thirty_two_short_trials_complete_and_every_one_is_reported(tmp_path):
    result = run_job("sweep.py", "--config", str(REPO / "conf/smoke.yaml"), f"output_dir={tmp_path}",
                     "cluster.num_cpus=2", "sweep.num_samples=32", "sweep.scheduler=fifo",
                     "train.epochs=2", "report.every_s=5", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = tmp_path / "smoke" / "report"
    trials = pq.read_table(report / "trials.parquet").to_pylist()
    assert len(trials) == 32
    assert all(t["status"] == "TERMINATED" and t["epochs_done"] == 2 for t in trials)
    epochs = pq.read_table(report / "epochs.parquet").to_pylist()
    assert len(epochs) == 64
    curves = pq.read_table(report / "curves.parquet")
    assert set(curves.column("trial_id").to_pylist()) == {t["trial_id"] for t in trials}
