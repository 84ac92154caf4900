"""The report contract: every writer and reader of report keys agrees with hlbd_ray.contract."""

from __future__ import annotations

import sys
from dataclasses import fields

import pytest

from hlbd_ray.contract import (
    BEST,
    EPOCH_FLOATS,
    EPOCH_INTS,
    LAST_FLOATS,
    LAST_INTS,
    REPORT_KEYS,
    Report,
    TuneKeys,
    best_index,
    better,
    last_column,
)
from hlbd_ray.curves import summary_of
from hlbd_ray.render import TABLE
from hlbd_ray.run import SUMMARY_KEYS
from hlbd_ray.search import build_scheduler
from hlbd_ray.tables import CURVES_SCHEMA, EPOCHS_SCHEMA, TRIALS_SCHEMA, TrialInfo, trials_table_row

from .conftest import REPO, micro_config

ALL_KEYS = set(REPORT_KEYS) | {f.name for f in fields(TuneKeys)}


def a_report(**overrides) -> dict:
    values = {"int": 3, "float": 0.5, "str": "", "bool": True, "list": [1.0], "dict": {}}
    base = {f.name: values[f.metadata["kind"].__name__] for f in fields(Report)}
    return {**base, **overrides}


def test_one_name_per_quantity() -> None:
    assert len(set(REPORT_KEYS)) == len(REPORT_KEYS)
    assert set(REPORT_KEYS).isdisjoint(f.name for f in fields(TuneKeys))
    for name in ("epochs_done", "batches", "training_iteration", "time_total_s", "val_loss"):
        assert name in ALL_KEYS


def test_the_tables_take_their_columns_from_the_contract() -> None:
    assert EPOCHS_SCHEMA.names == ["trial_id", "epoch", *EPOCH_FLOATS, *EPOCH_INTS, "checkpoint"]
    kept = summary_of(a_report(training_iteration=1, time_total_s=2.0, checkpoint_path="b/ckpt_1"))
    assert set(kept) == set(EPOCH_FLOATS + EPOCH_INTS) | {"val_modules", "checkpoint"}
    assert kept["checkpoint"] == "b/ckpt_1"
    for name in LAST_FLOATS + LAST_INTS:
        assert last_column(name) in TRIALS_SCHEMA.names
    for name, mode in BEST:
        assert name in ALL_KEYS and mode in ("min", "max") and f"best_{name}" in TRIALS_SCHEMA.names
    # A trial's row carries every last value under its column, read back from a report.
    info = TrialInfo("t")
    info.update(a_report(training_iteration=7, time_total_s=2.5))
    row = trials_table_row(info, {})
    assert set(row) <= set(TRIALS_SCHEMA.names)
    assert (row["training_iteration"], row["last_time_total_s"], row["batches"]) == (7, 2.5, 3)
    assert "micro_batch_first" in CURVES_SCHEMA.names and "step_first" not in CURVES_SCHEMA.names


def test_readers_ask_only_for_declared_keys() -> None:
    assert set(SUMMARY_KEYS) <= set(REPORT_KEYS)
    assert {key for key, _, _ in TABLE} <= set(TRIALS_SCHEMA.names)
    asha = build_scheduler(micro_config().sweep, 3)
    assert asha._time_attr in ALL_KEYS   # noqa: SLF001 - Tune keeps it only there


def test_the_aggregator_benchmark_streams_contract_reports() -> None:
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from aggregator import make_losses, reports
    finally:
        sys.path.remove(str(REPO / "bench"))
    _, report = next(reports(make_losses(1, 1, 10), 1, 10, 5))
    assert set(report) == ALL_KEYS


@pytest.mark.parametrize(("values", "mode", "index"), [
    ([3.0, None, 1.0, 1.0], "min", 2), ([3.0, float("nan"), 5.0], "max", 2),
    ([None, None], "min", None), ([], "max", None), ([2.0, 2.0], "max", 0)])
def test_best_index_picks_the_first_best_and_skips_missing(values, mode, index) -> None:
    assert best_index(values, mode) == index


def test_better() -> None:
    assert better(1.0, None, "min") and better(1.0, 2.0, "min") and not better(1.0, 2.0, "max")
