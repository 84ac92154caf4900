"""Bad input: one clear line, exit code 2, no traceback, nothing written, Ray never started.

Table-driven: a new case is one line in CASES (files are written by small builders).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray

from hlbd_ray import run, sweep
from hlbd_ray.config import load_config
from hlbd_ray.errors import EXIT_USER_ERROR, run_cli

from .conftest import HLBD_DIR, REPO, run_job

SMOKE = str(REPO / "conf" / "smoke.yaml")
FULL_SAMPLE = {"concept": "猫", "level_1": {"字卡": "猫", "emoji": "🐱"}, "level_2": {"短语": "猫咪"},
               "level_3": {"数学": "S = NP"}, "level_4": {"拼音": "māo"}, "level_5": {"英文": "Cat"},
               "level_6": {"中文": "这是猫。"}, "level_7": {"日文": "猫"}, "level_8": {"韩文": "고양이"}}


def text(content: str):
    return lambda folder: _write(folder / "data.json", content.encode("utf-8"))


def raw(content: bytes):
    return lambda folder: _write(folder / "data.json", content)


def doc(obj: object):
    return text(json.dumps(obj, ensure_ascii=False))


def _write(path: Path, content: bytes) -> str:
    path.write_bytes(content)
    return str(path)


def full_without(*levels: str):
    sample = {k: v for k, v in FULL_SAMPLE.items() if k not in levels}
    return doc({"samples": [FULL_SAMPLE, sample]})


def full_with_field_missing():
    sample = {**FULL_SAMPLE, "level_1": {"字卡": "猫"}}
    return doc({"samples": [FULL_SAMPLE, sample]})


def directory(folder: Path) -> str:
    (folder / "a_dir").mkdir()
    return str(folder / "a_dir")


# (case id, data file builder or None, overrides, a fragment the one-line message must hold)
CASES = [
    ("truncated-json", text('{"samples": [{"concept": "猫"'), [], "line 1"),
    ("neither-shape", doc({"rows": [1, 2]}), [], "not an HLBD file"),
    ("empty-samples", doc({"samples": []}), [], "empty"),
    ("empty-data", doc({"data": {}}), [], "empty"),
    ("no-answer", full_without(*(f"level_{n}" for n in range(4, 9))), [], "sample 1: no answer"),
    ("level-missing-its-field", full_with_field_missing(), [], "sample 1: missing key 'level_1.emoji'"),
    ("wrong-type", doc({"data": {"arithmetic": [{"input": "1 + 1 = ?", "output": 2}]}}), [], "output"),
    ("not-utf8", raw('{"data": {"m": [{"input": "é", "output": "x"}]}}'.encode("latin-1")), [], "UTF-8"),
    ("huge-line", text('{"data": {"m": [' + '{"input": "1", "output": "2"},' * 200_000), [], "data.json"),
    ("directory", directory, [], "is not a file"),
    ("missing-file", lambda folder: str(folder / "absent.json"), [], "absent.json"),
    ("unknown-name", None, ["data.paths=[hlbd:fulll]"], "'hlbd:fulll': the shipped files are hlbd:full, "),
    ("unknown-key", None, ["model.nmu_heads=8"], "nmu_heads"),
    ("override-syntax", None, ["train.lr"], "key=value"),
    ("zero-lr", None, ["train.lr=0"], "train.lr must be > 0"),
    ("negative-batch", None, ["train.batch_size=-1"], "train.batch_size must be > 0"),
    ("zero-epochs", None, ["train.epochs=0"], "train.epochs must be > 0"),
    ("heads", None, ["model.d_model=32", "model.num_heads=3"], "valid head counts for d_model=32"),
    ("max-len", None, ["train.max_len=8"], "max_len"),
    ("max-len-word", None, ["train.max_len=abc"], "train.max_len must be 'auto' or an integer > 0, got 'abc'"),
    # The README's old example: HLBD Full with max_len 128 cuts 68.7% of the answers.
    ("truncation", lambda folder: str(HLBD_DIR / "HLBD_Full_V2.json"), ["train.max_len=128"],
     "train.max_len=128 cuts 68.7% of the answers (3436 of 5000, losing their [EOS]); max_len 232 would cut none"),
    ("factory", None, ["model.factory=no_such_package.models:build"], "no_such_package"),
    # smoke.yaml: 3 epochs x 12 optimizer steps
    ("warmup-fills-run", None, ["train.warmup_steps=36"], "train.warmup_steps=36 must be shorter than the run: 36 "),
    ("warmup-past-max-steps", None, ["train.max_steps=2"], "2 optimizer steps (3 epochs x 12 steps, cut to max_steps=2)"),
    ("schedule", None, ["train.schedule=linear"], "cosine"),
]


@pytest.mark.parametrize("job", [run.main, sweep.main], ids=["train", "sweep"])
@pytest.mark.parametrize("case, build, overrides, fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, job, case, build,
                                                         overrides, fragment):
    inputs, out = tmp_path / "inputs", tmp_path / "out"
    inputs.mkdir()
    data = [f"data.paths=[{build(inputs)}]"] if build else []
    code = run_cli(job, ["--config", SMOKE, f"output_dir={out}", *data, *overrides])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == EXIT_USER_ERROR, captured.err
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines
    assert len(lines[0]) < 600                     # a huge input is named, never echoed
    assert "Traceback" not in captured.err + captured.out
    assert not out.exists()                        # no partial output
    assert not ray.is_initialized()


def test_an_unwritable_output_folder_is_refused_naming_it(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code = run_cli(run.main, ["--config", SMOKE, f"output_dir={blocker}/runs"])
    assert code == EXIT_USER_ERROR
    assert f"output folder {blocker}/runs" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_a_bom_file_passes_the_checks(tmp_path):
    path = tmp_path / "bom.json"
    samples = [{**FULL_SAMPLE, "concept": concept} for concept in "猫狗鸟鱼"]
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"samples": samples}).encode())
    cfg, data = run.preflight(load_config(SMOKE, [f"output_dir={tmp_path / 'o'}", f"data.paths=[{path}]"]))
    assert data.dataset_stats["train_pairs"] + data.dataset_stats["val_pairs"] == 4


@pytest.mark.parametrize("script, overrides, message", [
    ("train.py", ["model.num_heads=3"], "error: model.d_model=32 is not divisible by model.num_heads=3"),
    ("sweep.py", ["model.num_heads=3"], "error: model.d_model=32 is not divisible by model.num_heads=3"),
    ("train.py", [f"data.paths=[{HLBD_DIR / 'HLBD_Full_V2.json'}]", "train.max_len=128"],
     "error: train.max_len=128 cuts 68.7% of the answers"),
])
def test_the_real_scripts_exit_2_without_a_traceback(tmp_path, script, overrides, message):
    out = tmp_path / "out"
    result = run_job(script, "--config", SMOKE, f"output_dir={out}", *overrides, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(message)
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()
