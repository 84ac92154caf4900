"""HLBD data: both file shapes, refused files, dedup, split, sequences, batches, sharding."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hlbd_ray.config import DataConfig
from hlbd_ray.data import (
    IGNORE_INDEX,
    EncodedSplit,
    Pair,
    encode_pairs,
    iter_batches,
    load_pairs,
    make_batch,
    num_batches,
    prepare_data,
    read_file,
)
from hlbd_ray.errors import UserError
from hlbd_ray.facts import split_pairs
from hlbd_ray.tokenizer import CharTokenizer

from .conftest import HLBD_DIR, HLBD_FILES

# The real files ship in the package folder of this checkout: a missing file fails these
# tests through the fixture instead of skipping them.
needs_data = pytest.mark.usefixtures("hlbd_dir")
FULL, HARDCORE_V2, HARDCORE_V1 = (str(HLBD_DIR / name) for name in HLBD_FILES)


def full_sample(concept: str = "猫", korean_key: str = "韩文") -> dict:
    return {"concept": concept, "level_1": {"字卡": concept, "emoji": "🐱"}, "level_2": {"短语": f"{concept}咪"},
            "level_3": {"数学": f"S = NP (NP: {concept})"}, "level_4": {"拼音": "māo"}, "level_5": {"英文": "Cat"},
            "level_6": {"中文": f"这是{concept}。"}, "level_7": {"日文": "猫"}, "level_8": {korean_key: "고양이"}}


def write_json(path: Path, doc: object) -> str:
    path.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    return str(path)


# --- reading the published files -------------------------------------------------------

@needs_data
def test_full_file_becomes_tagged_multiline_pairs():
    fmt, pairs = read_file(FULL)
    assert fmt == "full" and len(pairs) == 5000
    first = pairs[0]
    assert first.prompt == "视频聊天\n[EMOJI] 📹 视频聊天\n[PHRASE] 视频聊天吧\nS = VP (VP: 视频聊天)"
    assert first.answer == "[PY] shì pín liáo tiān\n[EN] Video chat\n记得视频聊天。\n[JP] ビデオ通話\n[KR] 영상통화"
    assert (first.source, first.module) == ("HLBD_Full_V2.json", "full")
    assert all(p.answer.count("\n") == 4 and p.prompt.count("\n") == 3 for p in pairs)


@needs_data
def test_hardcore_file_counts_per_module():
    fmt, pairs = read_file(HARDCORE_V2)
    assert fmt == "hardcore" and len(pairs) == 5042
    counts = {m: sum(p.module == m for p in pairs) for m in
              ("geometry", "arithmetic", "zodiac", "physics", "reverse_english")}
    assert counts == {"geometry": 860, "arithmetic": 1899, "zodiac": 528, "physics": 825, "reverse_english": 930}
    assert pairs[0] == Pair("一个三角形有一个39度的角，另一个107度的角，第三个角是多少度？", "34度",
                            "HLBD_Hardcore_Full_V2.json", "geometry", "34度|107,39")


@needs_data
def test_mixing_files_keeps_order_and_counts_duplicates():
    pairs, stats = load_pairs([FULL, HARDCORE_V2, HARDCORE_V1], generated_per_module=0, seed=0)
    files = stats["files"]
    assert [f["format"] for f in files] == ["full", "hardcore", "hardcore"]
    assert [f["read"] for f in files] == [5000, 5042, 575]
    # The older Hardcore file repeats itself and much of V2.
    assert [f["duplicates_dropped"] for f in files] == [0, 0, 191]
    assert stats["total"]["pairs"] == len(pairs) == 5000 + 5042 + 575 - 191
    assert stats["total"]["modules"]["full"] == 5000
    assert sum(stats["total"]["modules"].values()) == len(pairs)
    assert len({(p.prompt, p.answer) for p in pairs}) == len(pairs)


# --- small files written by the tests --------------------------------------------------

def test_misspelt_korean_key_beside_or_instead(tmp_path):
    both = full_sample("狗")
    both["level_8"]["韩문"] = "개"
    path = write_json(tmp_path / "full.json", {"samples": [full_sample(korean_key="韩문"), both]})
    _, pairs = read_file(path)
    assert pairs[0].answer.endswith("\n[KR] 고양이") and pairs[1].answer.endswith("\n[KR] 고양이")


def test_duplicates_within_and_across_files_keep_the_first(tmp_path):
    a = write_json(tmp_path / "a.json", {"data": {"m": [{"input": "q", "output": "x"}, {"input": "q", "output": "x"},
                                                        {"input": "q", "output": "y"}]}})
    b = write_json(tmp_path / "b.json", {"data": {"n": [{"input": "q", "output": "x"}, {"input": "r", "output": "x"}]}})
    pairs, stats = load_pairs([a, b], generated_per_module=0, seed=0)
    assert [(p.prompt, p.answer, p.source, p.module) for p in pairs] == [
        ("q", "x", "a.json", "m"), ("q", "y", "a.json", "m"), ("r", "x", "b.json", "n")]
    assert [(f["pairs"], f["duplicates_dropped"], f["modules"]) for f in stats["files"]] == [
        (2, 1, {"m": 2}), (1, 1, {"n": 1})]
    assert stats["total"] == {"files": 2, "pairs": 3, "duplicates_dropped": 2, "modules": {"m": 2, "n": 1}}


def test_no_paths_means_the_builtin_generator():
    pairs, stats = load_pairs([], generated_per_module=6, seed=3)
    assert len(pairs) == 30 and {p.source for p in pairs} == {"generated"}
    assert stats["files"][0]["format"] == "hardcore" and stats["files"][0]["seed"] == 3
    assert stats["total"]["modules"] == {m: 6 for m in ("geometry", "arithmetic", "zodiac", "physics",
                                                        "reverse_english")}


def _missing_emoji() -> dict:
    sample = full_sample()
    del sample["level_1"]["emoji"]
    return {"samples": [full_sample(), sample]}


def _number_answer() -> dict:
    return {"data": {"arithmetic": [{"input": "1 + 1 = ?", "output": 2}]}}


# (file content as bytes, fragment the message must contain)
BAD_FILES = {
    "truncated-json": (b'{"samples": [{"concept": "a"', "invalid JSON at line 1 column"),
    "neither-shape": (b'{"metadata": {}, "items": []}', "not an HLBD file"),
    "top-level-array": (b"[1, 2]", "found an array"),
    "both-shapes": (b'{"samples": [], "data": {}}', "both 'samples'"),
    "empty-samples": (b'{"samples": []}', "'samples' must be a non-empty array"),
    "empty-data": (b'{"data": {}}', "'data' must be a non-empty object"),
    "empty-modules": (b'{"data": {"m": []}}', "every module in 'data' is empty"),
    "sample-missing-field": (json.dumps(_missing_emoji()).encode(), "sample 1: missing key 'level_1.emoji'"),
    "level-not-object": (json.dumps({"samples": [{**full_sample(), "level_2": "x"}]}).encode(),
                         "'level_2' must be an object, got a string"),
    "answer-not-string": (json.dumps(_number_answer()).encode(), "data.arithmetic[0]: 'output' must be a string"),
    "module-not-list": (b'{"data": {"m": {"input": "a"}}}', "'data.m' must be an array"),
    "pair-missing-input": (b'{"data": {"m": [{"output": "a"}]}}', "data.m[0]: missing key 'input'"),
    "non-utf8": ('{"data": {"m": [{"input": "é", "output": "a"}]}}'.encode("latin-1"), "not UTF-8"),
}


@pytest.mark.parametrize("content,fragment", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_malformed_files_are_user_errors_naming_the_file(tmp_path, content, fragment):
    path = tmp_path / "broken_file.json"
    path.write_bytes(content)
    with pytest.raises(UserError) as caught:
        load_pairs([str(path)], generated_per_module=0, seed=0)
    message = str(caught.value)
    assert "broken_file.json" in message and fragment in message
    assert "\n" not in message


def test_directory_and_missing_path_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="is not a file"):
        read_file(str(tmp_path))
    with pytest.raises(UserError, match="not found: .*nowhere.json"):
        read_file(str(tmp_path / "nowhere.json"))


def test_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"samples": [full_sample()]}).encode())
    assert read_file(str(path))[0] == "full"


def test_a_huge_single_line_file_reads(tmp_path):
    items = [{"input": f"{i} + {i} = ?", "output": str(2 * i)} for i in range(160_000)]
    path = tmp_path / "one_line.json"
    path.write_text(json.dumps({"data": {"arithmetic": items}}), encoding="utf-8")
    assert path.stat().st_size > 5_000_000 and b"\n" not in path.read_bytes()
    fmt, pairs = read_file(str(path))
    assert fmt == "hardcore" and len(pairs) == 160_000 and pairs[-1].answer == str(2 * 159_999)


# --- split -----------------------------------------------------------------------------

_CHILD = """
import numpy as np
from hlbd_ray.data import EncodedSplit, Pair, iter_batches
from hlbd_ray.facts import split_pairs
pairs = [Pair(f"q{i}", "a", "s", "m", f"q{i}") for i in range(50)]
seqs = np.array([[2, 100 + i, 4, 200 + i, 3] for i in range(50)], dtype=np.int32)
split = EncodedSplit(seqs.ravel(), np.arange(0, 251, 5, dtype=np.int64), np.full(50, 3, dtype=np.int32))
batches = iter_batches(split, 4, seed=9, epoch=2, shuffle=True, rank=1, world_size=3)
print([p.prompt for p in split_pairs(pairs, 0.2, seed=9)[1]], [int(x) - 100 for b in batches for x in b.inputs[:, 1]])
"""


def test_split_and_epoch_order_are_the_same_in_another_process():
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=True)
    val = split_pairs([Pair(f"q{i}", "a", "s", "m", f"q{i}") for i in range(50)], 0.2, seed=9)[1]
    rows = rows_of(iter_batches(fixed_split(50), 4, seed=9, epoch=2, shuffle=True, rank=1, world_size=3))
    assert len(rows) == 17
    assert out.stdout.strip() == f"{[p.prompt for p in val]} {rows}"


# --- sequences -------------------------------------------------------------------------

def test_sequences_are_bos_prompt_sep_answer_eos():
    pairs = [Pair("ab", "xyz", "s", "m", "1"), Pair("b", "", "s", "n", "2")]
    tok = CharTokenizer.build(["abxyz"], 100)
    split = encode_pairs(pairs, tok, max_len=16)
    assert not split.truncated.any() and len(split) == 2
    assert split.module_names == ("m", "n") and split.modules.tolist() == [0, 1]
    assert split.tokens.dtype == np.int32 and split.offsets.dtype == np.int64
    assert split.sequence(0).tolist() == [tok.bos_id, *tok.encode("ab"), tok.sep_id, *tok.encode("xyz"), tok.eos_id]
    assert split.answer_starts.tolist() == [4, 3]
    assert split.sequence(1).tolist() == [tok.bos_id, *tok.encode("b"), tok.sep_id, tok.eos_id]


def test_long_answers_are_cut_and_counted_long_prompts_refused():
    pairs = [Pair("ab", "xyzxyz", "s", "m", "1"), Pair("a", "x", "s", "m", "2")]
    tok = CharTokenizer.build(["abxyz"], 100)
    split = encode_pairs(pairs, tok, max_len=6)
    assert split.truncated.tolist() == [True, False] and split.lengths.tolist() == [6, 5]
    assert split.sequence(0)[-1] != tok.eos_id and split.sequence(1)[-1] == tok.eos_id
    with pytest.raises(UserError, match=r"max_len=4 .* longest prompt has 2 tokens"):
        encode_pairs(pairs, tok, max_len=4)


def fixed_split(n: int) -> EncodedSplit:
    """Sequence i = [BOS, 100 + i, SEP, 200 + i, ..., EOS] with i % 3 + 1 answer tokens."""
    seqs = [[2, 100 + i, 4] + [200 + i] * (i % 3 + 1) + [3] for i in range(n)]
    offsets = np.cumsum([0] + [len(s) for s in seqs])
    return EncodedSplit(np.concatenate(seqs).astype(np.int32), offsets.astype(np.int64),
                        np.full(n, 3, dtype=np.int32))


def test_batch_shifts_pads_and_masks_the_prompt():
    split = fixed_split(3)  # lengths 5, 6, 7
    batch = make_batch(split, np.array([0, 2]), loss_on="all")
    inputs, labels = batch.inputs, batch.labels
    assert inputs.dtype == labels.dtype == torch.long and inputs.shape == (2, 6)
    assert inputs[0].tolist() == [2, 100, 4, 200, 0, 0]
    assert labels[0].tolist() == [100, 4, 200, 3, IGNORE_INDEX, IGNORE_INDEX]
    assert labels[1].tolist() == [102, 4, 202, 202, 202, 3]
    answer_batch = make_batch(split, np.array([0, 2]), loss_on="answer")
    answer_only = answer_batch.labels
    # Only answer tokens and [EOS] are predicted; the prompt and [SEP] are not.
    assert answer_only[0].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 200, 3, IGNORE_INDEX, IGNORE_INDEX]
    assert answer_only[1].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 202, 202, 202, 3]
    # The batch carries its answer mask whatever the loss covers: exact match needs it.
    assert batch.answer.dtype == torch.bool and torch.equal(batch.answer, answer_batch.answer)
    assert batch.answer.tolist() == [[False, False, True, True, False, False],
                                     [False, False, True, True, True, True]]
    assert torch.equal(answer_only != IGNORE_INDEX, batch.answer)


# --- batches and sharding --------------------------------------------------------------

def rows_of(batches) -> list[int]:
    return [int(x) - 100 for batch in batches for x in batch.inputs[:, 1]]


@pytest.mark.parametrize("n,world_size,batch_size", [(10, 3, 2), (12, 4, 5), (7, 2, 16), (2, 3, 1)])
def test_every_rank_gets_the_same_number_of_batches_and_all_rows(n, world_size, batch_size):
    split = fixed_split(n)
    per_rank = [list(iter_batches(split, batch_size, seed=1, epoch=0, shuffle=True, rank=r,
                                  world_size=world_size)) for r in range(world_size)]
    assert {len(b) for b in per_rank} == {num_batches(split, batch_size, world_size)}
    assert len({tuple(len(x.inputs) for x in b) for b in per_rank}) == 1  # same batch sizes too
    seen = [rows_of(b) for b in per_rank]
    assert set().union(*seen) == set(range(n))
    assert sum(map(len, seen)) == -(-n // world_size) * world_size  # only the wrap repeats


def test_ranks_are_disjoint_when_the_data_divides():
    split = fixed_split(12)
    seen = [set(rows_of(iter_batches(split, 2, seed=4, epoch=1, shuffle=True, rank=r, world_size=3)))
            for r in range(3)]
    assert all(len(s) == 4 for s in seen) and set().union(*seen) == set(range(12))


def test_epoch_order_is_seeded_and_resume_skips_batches():
    split = fixed_split(40)
    epoch0 = rows_of(iter_batches(split, 8, seed=3, epoch=0, shuffle=True))
    assert epoch0 == rows_of(iter_batches(split, 8, seed=3, epoch=0, shuffle=True))
    assert epoch0 != rows_of(iter_batches(split, 8, seed=3, epoch=1, shuffle=True))
    assert sorted(epoch0) == list(range(40)) != epoch0
    assert rows_of(iter_batches(split, 8, seed=3, epoch=0, shuffle=False)) == list(range(40))
    resumed = rows_of(iter_batches(split, 8, seed=3, epoch=0, shuffle=True, start_batch=3))
    assert resumed == epoch0[24:]
    assert num_batches(split, 8) == 5 and num_batches(split, 6) == 7  # partial last batch kept


# --- prepare_data ----------------------------------------------------------------------

def test_prepare_data_is_deterministic_picklable_and_counts():
    cfg = DataConfig(generated_per_module=20, val_fraction=0.2, seed=11)
    prepared = prepare_data(cfg, max_len=64)
    again = pickle.loads(pickle.dumps(prepare_data(cfg, max_len=64)))
    assert again.tokenizer == prepared.tokenizer
    assert np.array_equal(again.train.tokens, prepared.train.tokens)
    assert np.array_equal(again.val.offsets, prepared.val.offsets)
    stats = prepared.dataset_stats
    assert (stats["train_pairs"], stats["val_pairs"]) == (80, 20) == (len(prepared.train), len(prepared.val))
    assert stats["vocab_size"] == len(prepared.build_tokenizer()) and stats["max_len"] == 64
    assert stats["truncated_train"] == stats["truncated_val"] == 0


def test_vocabulary_comes_from_training_pairs_only(tmp_path):
    items = [{"input": f"q{i}", "output": "x"} for i in range(9)] + [{"input": "q1", "output": "甲"}]
    path = write_json(tmp_path / "d.json", {"data": {"m": items}})
    pairs, _ = load_pairs([path], generated_per_module=0, seed=0)
    # A seed that holds out the one pair containing 甲.
    seed = next(s for s in range(1000) if any("甲" in p.answer for p in split_pairs(pairs, 0.1, s)[1]))
    prepared = prepare_data(DataConfig(paths=[path], val_fraction=0.1, seed=seed), max_len=16)
    tok = prepared.build_tokenizer()
    assert "甲" not in tok.to_dict()["tokens"]
    assert prepared.dataset_stats["val_unk_tokens"] == 1
    assert tok.unk_id in prepared.val.tokens.tolist()


# --- Full samples missing levels (read like the reference's reader) --------------------

def _real_full_with_edits(tmp_path: Path, edit) -> str:
    doc = json.loads(Path(FULL).read_text(encoding="utf-8"))
    edit(doc["samples"])
    return write_json(tmp_path / "full_edited.json", doc)


@needs_data
def test_full_samples_missing_levels_are_read_without_them_and_counted(tmp_path):
    def edit(samples: list[dict]) -> None:
        for i in (0, 5):
            del samples[i]["level_7"]
        del samples[3]["level_2"]
        del samples[8]["concept"]
        samples[1]["level_9"] = {"x": "y"}
        samples[2]["level_9"] = {"x": "z"}
        samples[4]["notes"] = "unknown keys are ignored"

    path = _real_full_with_edits(tmp_path, edit)
    _, original = read_file(FULL)
    pairs, stats = load_pairs([path], generated_per_module=0, seed=0)
    assert len(pairs) == 5000
    assert pairs[0].answer == "[PY] shì pín liáo tiān\n[EN] Video chat\n记得视频聊天。\n[KR] 영상통화"
    assert "[JP]" not in pairs[5].answer and pairs[5].answer.count("\n") == 3
    assert "[PHRASE]" not in pairs[3].prompt and pairs[3].prompt.count("\n") == 2
    assert pairs[8].prompt == original[8].prompt.split("\n", 1)[1]       # the concept line is gone
    assert pairs[8].fact.startswith("prompt:") and pairs[7].fact == original[7].fact
    # Unknown keys change nothing in the text.
    assert [(p.prompt, p.answer) for p in pairs[1:3] + pairs[4:5]] == \
        [(p.prompt, p.answer) for p in original[1:3] + original[4:5]]
    levels = {"missing": {"concept": 1, "level_2": 1, "level_7": 2}, "unknown_keys": {"level_9": 2, "notes": 1}}
    assert stats["files"][0]["levels"] == stats["total"]["levels"] == levels
    prepared = prepare_data(DataConfig(paths=[path]))
    assert prepared.dataset_stats["total"]["levels"] == levels


@needs_data
@pytest.mark.parametrize("drop, part", [(("level_4", "level_5", "level_6", "level_7", "level_8"), "answer"),
                                        (("concept", "level_1", "level_2", "level_3"), "prompt")])
def test_only_a_full_sample_with_no_prompt_or_no_answer_is_refused(tmp_path, drop, part):
    def edit(samples: list[dict]) -> None:
        del samples[2]["level_7"]    # accepted
        for key in drop:
            del samples[7][key]

    path = _real_full_with_edits(tmp_path, edit)
    with pytest.raises(UserError) as caught:
        load_pairs([path], generated_per_module=0, seed=0)
    assert str(caught.value).startswith(f"{path}: sample 7: no {part}: the sample has none of ")


# --- max_len: auto, capped, and no silent truncation -------------------------------------

@needs_data
def test_auto_max_len_is_the_longest_sequence_rounded_up_to_8():
    full = prepare_data(DataConfig(paths=[FULL]))
    stats = full.dataset_stats
    assert (stats["max_len"], stats["lengths"], stats["max_len_requested"]) == \
        (232, {"p50": 140, "p99": 180, "max": 232}, "auto")
    assert stats["truncated_train"] == stats["truncated_val"] == 0 and not full.train.truncated.any()
    generated = prepare_data(DataConfig(generated_per_module=100)).dataset_stats
    assert generated["lengths"]["max"] == 51 and generated["max_len"] == 56


@needs_data
def test_a_cap_or_an_explicit_max_len_that_cuts_over_1_percent_is_refused():
    with pytest.raises(UserError) as caught:
        prepare_data(DataConfig(paths=[FULL]), 128)
    assert str(caught.value) == (
        "train.max_len=128 cuts 68.7% of the answers (3436 of 5000, losing their [EOS]); max_len 232 would "
        "cut none (train.max_len=auto picks it); set train.allow_truncation=true to train on cut answers anyway")
    with pytest.raises(UserError, match=r"^train.max_len=auto, capped at train.max_len_cap=176, cuts 1.7% .*"
                                        r"\(train.max_len_cap=232\)"):
        prepare_data(DataConfig(paths=[FULL]), "auto", max_len_cap=176)
    # 180 cuts 46 of 5000 answers (0.9%): allowed, and each cut sequence is marked.
    data = prepare_data(DataConfig(paths=[FULL]), 180)
    assert data.dataset_stats["truncated_train"] + data.dataset_stats["truncated_val"] == 46
    allowed = prepare_data(DataConfig(paths=[FULL]), 128, allow_truncation=True)
    cut = allowed.train.truncated
    assert cut.sum() == allowed.dataset_stats["truncated_train"] and allowed.train.lengths.max() == 128
    assert (allowed.train.lengths[cut] == 128).all() and (allowed.train.lengths[~cut] <= 128).all()


@needs_data
def test_the_readme_example_cuts_nothing(tmp_path):
    from hlbd_ray.config import CONF_DIR, load_config

    cfg = load_config(CONF_DIR / "sweep.yaml", [f"data.paths=[{FULL}]"])
    stats = prepare_data(cfg.data, cfg.train.max_len, max_len_cap=cfg.train.max_len_cap).dataset_stats
    assert stats["max_len"] == 232 and stats["truncated_train"] + stats["truncated_val"] == 0


@needs_data
def test_both_splits_share_one_module_index():
    data = prepare_data(DataConfig(paths=[FULL, HARDCORE_V2]))
    names = ("full", "geometry", "arithmetic", "zodiac", "physics", "reverse_english")
    assert data.train.module_names == data.val.module_names == names
    modules = data.dataset_stats["modules"]
    for split, side in ((data.train, "train_pairs"), (data.val, "val_pairs")):
        counts = np.bincount(split.modules, minlength=len(names))
        assert dict(zip(names, counts.tolist())) == {m: modules[m][side] for m in names}
    # Full sequences are the long ones: the index points at the right rows.
    assert data.val.lengths[data.val.modules == 0].min() > data.val.lengths[data.val.modules != 0].max()
