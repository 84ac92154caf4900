"""Greedy decoding from a checkpoint: it reproduces the reported val_exact, and the
generate job answers prompts and refuses bad input with one line."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from hlbd_ray.data import encode_pairs, iter_batches, load_pairs, prepare_data
from hlbd_ray.errors import EXIT_USER_ERROR, run_cli
from hlbd_ray.generate import Decoder, best_checkpoint
from hlbd_ray.train import train_locally

from .conftest import REPO, micro_config, run_job

# Big enough to learn part of the answers in 4 epochs (val_exact well above 0 and below 1
# would be nicer, but the per-token check below does not need it), with 200 validation
# answers so that bf16's "at most 1 in 200" is a real bound.
LEARNER = ["model.d_model=64", "model.dropout=0.0", "data.generated_per_module=200",
           "data.val_fraction=0.2", "train.epochs=4", "train.batch_size=32", "train.grad_accum=1",
           "train.lr=5e-3", "train.warmup_steps=10"]


def trained(tmp_path, precision: str):
    cfg = micro_config(*LEARNER, f"train.precision={precision}", output_dir=tmp_path)
    data = prepare_data(cfg.data, cfg.train.max_len)
    assert len(data.val) == data.dataset_stats["val_pairs"] >= 200 and data.dataset_stats["truncated_val"] == 0
    session = train_locally(cfg, data, tmp_path / "run")
    return session.reports[-1], session.checkpoints[-1], data


def teacher_forced(decoder: Decoder, data) -> list[tuple[bool, int, int]]:
    """Per validation answer, from one batched pass as evaluate() makes it: (every answer
    token is the argmax, first answer position where it is not (-1: none), argmax there)."""
    out = []
    for batch in iter_batches(data.val, 64, seed=0, epoch=0, shuffle=False):
        with torch.no_grad(), decoder_autocast(decoder):
            predicted = decoder.model(batch.inputs).argmax(-1)
        for row in range(len(batch.inputs)):
            positions = batch.answer[row].nonzero().squeeze(1)
            wrong = positions[predicted[row, positions] != batch.labels[row, positions]]
            first = int(wrong[0] - positions[0]) if len(wrong) else -1
            out.append((first < 0, first, int(predicted[row, wrong[0]]) if len(wrong) else -1))
    return out


def decoder_autocast(decoder: Decoder):
    from hlbd_ray.session import autocast

    return autocast(decoder.precision, decoder.device)


def greedy(decoder: Decoder, data) -> list[tuple[bool, int, int]]:
    """The same triples from real greedy decoding, token by token."""
    out = []
    starts = [int(s) for s in data.val.answer_starts]
    seqs = [data.val.sequence(i).tolist() for i in range(len(data.val))]
    for got, seq, start in zip(decoder.decode([s[:b] for s, b in zip(seqs, starts)]), seqs, starts):
        want = seq[start:]
        first = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), -1)
        out.append((got == want, first, got[first] if first >= 0 else -1))
    return out


@pytest.mark.slow
def test_greedy_decoding_reproduces_the_reported_val_exact_in_fp32(tmp_path):
    report, checkpoint, data = trained(tmp_path, "fp32")
    decoder = Decoder.load(checkpoint)
    assert decoder.precision == "fp32"
    exact = decoder.exact_by_decoding(data.val)
    # Exactly the number the run reported: same count over the same 200 answers.
    assert exact.mean() == report["val_exact"] and 0 < exact.sum() < len(exact)
    # And answer by answer, token by token: greedy decoding diverges from the true answer
    # exactly where the teacher-forced argmax first misses, with the same token there.
    assert greedy(decoder, data) == teacher_forced(decoder, data)


@pytest.mark.slow
def test_greedy_decoding_matches_val_exact_in_bf16_up_to_1_answer_in_200(tmp_path):
    # bf16 autocast rounds logits to ~3 significant digits. Evaluation runs one batched
    # teacher-forced pass over [64, T] while decoding runs [rows still going, prefix], so
    # the matmuls see other shapes, block and accumulate differently, and two near-equal
    # logits can tie or swap their order: the argmax flips and one answer's verdict can
    # differ. fp32 leaves ~7 digits, and the test above demands exact agreement there.
    report, checkpoint, data = trained(tmp_path, "bf16")
    decoder = Decoder.load(checkpoint)
    assert decoder.precision == "bf16"
    exact = decoder.exact_by_decoding(data.val)
    forced = np.array([e for e, _, _ in teacher_forced(decoder, data)])
    assert forced.mean() == report["val_exact"]                     # the metric, recomputed
    assert int((exact != forced).sum()) <= len(exact) // 200
    assert abs(exact.sum() - round(report["val_exact"] * len(exact))) <= len(exact) // 200


def test_the_decoding_prefix_is_the_training_layout(micro_data):
    decoder = Decoder(torch.nn.Identity(), micro_data.build_tokenizer(), 96, "fp32", torch.device("cpu"))
    pairs, _ = load_pairs([], 24, 0)
    split = encode_pairs(pairs, decoder.tokenizer, 96)
    for i, pair in enumerate(pairs):
        assert decoder.prefix(pair.prompt) == split.sequence(i)[:split.answer_starts[i]].tolist()


# --- the job --------------------------------------------------------------------------------


def generate_main():
    spec = importlib.util.spec_from_file_location("generate_job", REPO / "jobs" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def micro_checkpoint(tmp_path_factory, micro_data):
    folder = tmp_path_factory.mktemp("gen")
    session = train_locally(micro_config("train.epochs=1", output_dir=folder), micro_data, folder / "run")
    return session.checkpoints[-1]


def test_the_job_answers_prompts_from_arguments_and_a_file(tmp_path, micro_checkpoint, micro_data):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "best.json").write_text(json.dumps({"checkpoint": str(micro_checkpoint)}))
    assert best_checkpoint(sweep) == micro_checkpoint
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("十二生肖第5位是什么？\n秋天用英语怎么说？\\n(two lines)\n", encoding="utf-8")
    result = run_job("generate.py", "--sweep", str(sweep), "--file", str(prompts), "72 - 32 = ?", timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    asked = [line for line in lines if line.startswith("prompt: ")]
    assert asked == ["prompt: 72 - 32 = ?", "prompt: 十二生肖第5位是什么？", "prompt: 秋天用英语怎么说？"]
    assert "        (two lines)" in lines                       # \n became a newline
    # The answers are the package's own greedy decoding of the same prompts.
    decoder = Decoder.load(micro_checkpoint)
    answers = decoder.answer(["72 - 32 = ?", "十二生肖第5位是什么？", "秋天用英语怎么说？\n(two lines)"])
    shown = "\n".join(lines)
    for text, _complete in answers:
        assert ("answer: " + text).replace("\n", "\n        ") in shown
    assert shown.count("[cut: no [EOS]") == sum(not complete for _, complete in answers)
    assert f"checkpoint {micro_checkpoint}" in result.stderr


@pytest.mark.parametrize("case, args, fragment", [
    ("missing-checkpoint", ["--checkpoint", "{tmp}/nowhere", "hi"], "checkpoint folder missing"),
    ("no-best-json", ["--sweep", "{tmp}", "hi"], "no best.json in"),
    ("empty-prompt", ["--checkpoint", "{ckpt}", "hi", "  "], "prompt argument 2: empty prompt"),
    ("empty-line", ["--checkpoint", "{ckpt}", "--file", "{tmp}/p.txt"], "p.txt line 2: empty prompt"),
    ("too-long", ["--checkpoint", "{ckpt}", "x" * 94], "the prompt is 94 tokens; the model's context of 96 "
                                                       "holds prompts of at most 93"),
    ("no-prompt", ["--checkpoint", "{ckpt}"], "no prompts"),
    ("bad-flag", ["--precision", "fp8", "hi"], "invalid choice"),
])
def test_the_job_refuses_bad_input_with_one_line(tmp_path, capsys, micro_checkpoint, case, args, fragment):
    (tmp_path / "p.txt").write_text("fine\n\nalso fine\n")
    argv = [a.format(tmp=tmp_path, ckpt=micro_checkpoint) for a in args]
    assert run_cli(generate_main(), argv) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err


def test_the_real_script_exits_2_without_a_traceback(tmp_path):
    result = run_job("generate.py", "--checkpoint", str(tmp_path / "nowhere"), "hi", timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: checkpoint folder missing: {tmp_path / 'nowhere'}"
