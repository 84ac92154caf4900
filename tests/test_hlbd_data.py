"""The shipped HLBD files: short names, resolution from any directory, what stats record."""

from __future__ import annotations

from pathlib import Path

import pytest

from hlbd_ray import hlbd_data
from hlbd_ray.config import load_config
from hlbd_ray.data import load_pairs, prepare_data
from hlbd_ray.errors import UserError

from .conftest import HLBD_DIR, HLBD_FILES, REPO


def test_the_short_names_are_the_files_of_this_checkout(hlbd_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                    # the working directory plays no part
    assert hlbd_data.FOLDER == hlbd_dir            # tests read the repo's files, nothing outside
    resolved = [hlbd_data.resolve(f"hlbd:{name}") for name in ("full", "hardcore", "hardcore_v1")]
    assert resolved == [str(HLBD_DIR / name) for name in HLBD_FILES]
    assert (hlbd_dir / "LICENSE").read_text().startswith("MIT License")


def test_an_unknown_name_is_one_line_listing_the_known_ones():
    with pytest.raises(UserError) as err:
        load_pairs(["hlbd:full", "hlbd:hardcroe"], generated_per_module=0, seed=0)
    assert str(err.value) == ("unknown data name 'hlbd:hardcroe': the shipped files are "
                              "hlbd:full, hlbd:hardcore, hlbd:hardcore_v1")


def test_a_plain_path_becomes_absolute_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hlbd_data.resolve("data/x.json") == str(tmp_path / "data/x.json")
    assert hlbd_data.resolve(str(tmp_path / "y.json")) == str(tmp_path / "y.json")
    assert hlbd_data.resolve("~/z.json") == str(Path.home() / "z.json")


def test_dataset_stats_record_the_file_read_and_the_name_given(hlbd_dir):
    pairs, stats = load_pairs(["hlbd:hardcore_v1"], generated_per_module=0, seed=0)
    (info,) = stats["files"]
    assert info["path"] == str(hlbd_dir / "HLBD_Hardcore_Full.json") and Path(info["path"]).is_absolute()
    assert (info["name"], info["source"], info["format"], info["read"]) == (
        "hlbd:hardcore_v1", "HLBD_Hardcore_Full.json", "hardcore", 575)
    assert len(pairs) == info["pairs"] == 575 - info["duplicates_dropped"]


@pytest.mark.parametrize("conf, file", [("hlbd_full.yaml", "HLBD_Full_V2.json"),
                                        ("hlbd_hardcore.yaml", "HLBD_Hardcore_Full_V2.json")])
def test_the_real_data_sweeps_keep_every_answer_whole(conf, file, hlbd_dir):
    cfg = load_config(REPO / "conf" / conf, [])
    stats = prepare_data(cfg.data, cfg.train.max_len).dataset_stats
    assert [f["path"] for f in stats["files"]] == [str(hlbd_dir / file)]
    assert stats["truncated_train"] == stats["truncated_val"] == 0
