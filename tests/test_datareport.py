"""The data report: dataset_report.json and the console table, written by the jobs' preflight."""

from __future__ import annotations

import json

import numpy as np

from hlbd_ray import datagen
from hlbd_ray.config import load_config
from hlbd_ray.datareport import format_table
from hlbd_ray.trainer import preflight

from .conftest import REPO

SMOKE = str(REPO / "conf" / "smoke.yaml")


def test_the_report_holds_per_module_sizes_lengths_and_unknown_characters(tmp_path, capsys):
    cfg, data = preflight(load_config(SMOKE, [f"output_dir={tmp_path}", "name=run1"]))
    report = json.loads((tmp_path / "run1" / "dataset_report.json").read_text(encoding="utf-8"))
    assert report == {"format": "hlbd_ray.dataset_report/1", **data.dataset_stats}
    assert list(report["modules"]) == list(datagen.MODULES) == list(data.val.module_names)
    for i, module in enumerate(datagen.MODULES):
        row = report["modules"][module]
        train_rows, val_rows = data.train.modules == i, data.val.modules == i
        assert (row["train_pairs"], row["val_pairs"]) == (train_rows.sum(), val_rows.sum())
        assert row["pairs"] == 40 and row["val_with_train_twin"] == 0
        assert 1 <= row["val_facts"] <= row["val_pairs"] and row["facts"] == row["train_facts"] + row["val_facts"]
        # Nothing is cut here, so the encoded lengths are the data's lengths.
        lengths = np.concatenate([data.train.lengths[train_rows], data.val.lengths[val_rows]])
        assert row["length"] == {"p50": int(np.percentile(lengths, 50, method="inverted_cdf")),
                                 "p99": int(np.percentile(lengths, 99, method="inverted_cdf")),
                                 "max": int(lengths.max())}
        assert row["truncated"] == 0
        unk = data.build_tokenizer().unk_id
        assert row["val_unk_tokens"] == sum(int((data.val.sequence(j) == unk).sum())
                                            for j in np.flatnonzero(val_rows))
    assert report["split"]["train"]["pairs"] == len(data.train) and report["split"]["val"]["pairs"] == len(data.val)
    assert report["max_len"] == cfg.train.max_len == 56 and report["max_len_requested"] == "auto"
    assert report["val_unk_tokens"] == sum(report["val_unk_chars"].values()) > 0
    out = capsys.readouterr().out
    table = format_table(data.dataset_stats)
    assert table in out and out.count("\n") > len(datagen.MODULES) + 2
    rows = {line.split()[0]: line.split() for line in table.splitlines()[1:len(datagen.MODULES) + 2]}
    assert list(rows) == [*datagen.MODULES, "all"]
    assert rows["all"][1:5] == [str(200), str(report["split"]["train"]["facts"] + report["split"]["val"]["facts"]),
                                str(len(data.train)), str(len(data.val))]


def test_a_sweep_writes_the_report_in_its_own_folder(tmp_path):
    cfg = load_config(SMOKE, [f"output_dir={tmp_path}"])
    preflight(cfg, cfg.sweep.name)
    assert (tmp_path / "smoke" / "dataset_report.json").is_file() and not (tmp_path / "train").exists()


def test_the_table_names_what_the_full_reader_left_out(tmp_path):
    stats = {"modules": {}, "split": {"train": {"pairs": 9, "facts": 9}, "val": {"pairs": 1, "facts": 1},
                                      "val_with_train_twin": 0},
             "lengths": {"p50": 5, "p99": 7, "max": 7}, "truncated_train": 0, "truncated_val": 0,
             "truncated_share": 0.0, "val_unk_tokens": 0, "val_unk_pairs": 0, "val_unk_chars": {},
             "max_len": 8, "max_len_requested": 8,
             "total": {"levels": {"missing": {"level_7": 2}, "unknown_keys": {"level_9": 1}}}}
    table = format_table(stats)
    assert "max_len 8 (explicit) cuts 0 (0.0%)" in table
    assert table.endswith("Full samples without a level (left out of their text): level_7 2; "
                          "unknown keys (ignored): level_9 1")
