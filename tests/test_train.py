"""The training function in-process: true loss, accumulation, reports, resume, skips, faults."""

from __future__ import annotations

import math
from itertools import islice

import numpy as np
import pytest
import torch

from hlbd_ray.contract import REPORT_KEYS
from hlbd_ray.data import IGNORE_INDEX, Batch, EncodedSplit, PreparedData, iter_batches
from hlbd_ray.metrics import token_loss_sum
from hlbd_ray.optim import run_length
from hlbd_ray.session import LocalSession
from hlbd_ray.train import TrainRun, train_locally

from .conftest import micro_config


def new_run(tmp_path, data, *overrides):
    cfg = micro_config("model.dropout=0.0", *overrides, output_dir=tmp_path)
    return TrainRun(cfg, data, LocalSession(tmp_path / "run"))


def first_batches(run: TrainRun, n: int) -> list[Batch]:
    return list(islice(iter_batches(run.data.train, run.t.batch_size, seed=0, epoch=0, shuffle=True), n))


def test_recorded_loss_is_the_true_loss_and_the_gradient_that_of_the_whole_group(tmp_path, micro_data):
    run = new_run(tmp_path, micro_data, "train.grad_accum=2")
    group = first_batches(run, 2)
    with torch.no_grad():
        sums = [token_loss_sum(run.model(b.inputs), b.labels).item() for b in group]
    tokens = [int((b.labels != IGNORE_INDEX).sum()) for b in group]
    run.accumulate(group)
    # The recorded per-batch loss is each batch's own token mean, not divided by grad_accum.
    assert run.window.batch_losses() == pytest.approx([s / t for s, t in zip(sums, tokens)], rel=1e-5)
    accumulated = [p.grad.clone() for p in run.model.parameters()]

    # The same gradient from one pass over both batches as a single token-mean loss.
    run.optimizer.zero_grad(set_to_none=True)
    width = max(b.inputs.shape[1] for b in group)

    def pad(t, v):
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=v)

    inputs = torch.cat([pad(b.inputs, 0) for b in group])
    labels = torch.cat([pad(b.labels, IGNORE_INDEX) for b in group])
    (token_loss_sum(run.model(inputs), labels) / labels.ne(IGNORE_INDEX).sum()).backward()
    for acc, whole in zip(accumulated, (p.grad for p in run.model.parameters())):
        torch.testing.assert_close(acc, whole, rtol=1e-4, atol=1e-6)


def test_an_odd_number_of_micro_batches_still_applies_the_last_gradient(tmp_path, micro_data):
    run = new_run(tmp_path, micro_data, "train.grad_accum=4", "train.epochs=1")
    assert run.epoch_batches % 4 != 0, "the micro data must leave a partial last group"
    steps = []
    run.optimizer.register_step_post_hook(lambda *_: steps.append(1))
    before = [p.detach().clone() for p in run.model.parameters()]
    run.fit()
    assert len(steps) == math.ceil(run.epoch_batches / 4) == run.state.step
    assert run.state.batches == run.epoch_batches
    assert any(not torch.equal(a, b) for a, b in zip(before, run.model.parameters()))


def test_every_report_has_the_same_keys_and_plain_values(tmp_path, micro_data):
    cfg = micro_config("train.epochs=2", output_dir=tmp_path)
    reports = train_locally(cfg, micro_data, tmp_path / "run").reports
    assert len({tuple(r) for r in reports}) == 1
    assert tuple(reports[0]) == REPORT_KEYS      # the loop writes exactly the declared contract
    for report in reports:
        for key, value in report.items():
            # Exact types: a str subclass such as a config Choice must not reach Ray.
            assert value is None or type(value) in (int, float, str, bool, list, dict), key
    ends = [r for r in reports if r["epoch_end"]]
    assert [r["epochs_done"] for r in ends] == [1, 2]
    assert all(r["val_loss"] is not None and r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
               for r in ends)
    # batch_losses tile the batches without gaps or overlaps.
    covered = [i for r in reports for i in range(r["batch_start"], r["batch_start"] + len(r["batch_losses"]))]
    assert covered == list(range(reports[-1]["batches"]))


def test_resume_after_epoch_one_equals_the_run_that_went_through(tmp_path, micro_data):
    through = train_locally(micro_config("train.epochs=2", output_dir=tmp_path / "a"),
                            micro_data, tmp_path / "a")
    # The same run crashes at the first step of epoch 2, then resumes from its epoch-1 checkpoint.
    steps_per_epoch = run_length(micro_config().train, micro_data.train, 1)[0]
    cfg = micro_config("train.epochs=2", f"fault.raise_at_step={steps_per_epoch}", output_dir=tmp_path / "b")
    first = LocalSession(tmp_path / "b", run_name=cfg.name)
    with pytest.raises(RuntimeError, match="injected fault"):
        TrainRun(cfg, micro_data, first).fit()
    resumed = train_locally(cfg, micro_data, tmp_path / "c", resume_from=first.checkpoints[-1])
    stitched = first.reports + resumed.reports
    assert [r["step"] for r in stitched] == [r["step"] for r in through.reports]
    for a, b in zip(stitched, through.reports):
        assert a["batch_losses"] == b["batch_losses"] and a["val_loss"] == b["val_loss"]
        assert a["lr"] == b["lr"]
    end_a = torch.load(through.checkpoints[-1] / "state.pt", weights_only=True)["model"]
    end_b = torch.load(resumed.checkpoints[-1] / "state.pt", weights_only=True)["model"]
    assert all(torch.equal(end_a[k], end_b[k]) for k in end_a)


def test_non_finite_gradients_skip_the_step_are_counted_and_stop_the_run(tmp_path, micro_data):
    cfg = micro_config("train.epochs=3", "fault.nan_from_step=3", "train.max_consecutive_skips=4",
                       output_dir=tmp_path)
    run = TrainRun(cfg, micro_data, LocalSession(tmp_path / "run"))
    progress = run.fit()
    last = run.session.reports[-1]
    assert progress.skipped_steps == 4 and progress.step == 7
    assert "non-finite" in last["stop_reason"] and last["skipped_steps"] == 4
    assert last["loss"] is None and last["ppl"] is None      # missing, not NaN
    assert all(torch.isfinite(p).all() for p in run.model.parameters())
    assert last["val_loss"] is not None                       # weights were never poisoned


def test_injected_exception_fires_once_per_run_folder(tmp_path, micro_data):
    cfg = micro_config("fault.raise_at_step=2", output_dir=tmp_path)
    with pytest.raises(RuntimeError, match="injected fault"):
        train_locally(cfg, micro_data, tmp_path / "run")
    # The marker makes the retry succeed, as a Train retry from the checkpoint would.
    assert train_locally(cfg, micro_data, tmp_path / "run2").reports[-1]["epochs_done"] == cfg.train.epochs


class Successor(torch.nn.Module):
    """Predicts id + 1 everywhere: exact on sequences of consecutive ids."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot((ids + 1) % self.vocab, self.vocab).float() * 10 + self.unused


def test_validation_never_counts_a_cut_answer_as_exact(tmp_path, micro_data):
    # Four validation sequences of consecutive ids; max_len cut rows 1 and 3.
    seqs = [list(range(10 + 10 * i, 16 + 10 * i)) for i in range(4)]
    val = EncodedSplit(np.asarray(sum(seqs, []), dtype=np.int32), np.arange(0, 25, 6, dtype=np.int64),
                       np.full(4, 3, dtype=np.int32), truncated=np.array([False, True, False, True]))
    data = PreparedData(micro_data.tokenizer, micro_data.train, val, micro_data.dataset_stats)
    run = new_run(tmp_path, data)
    run.model = Successor(len(run.tokenizer))
    metrics = run.evaluate()
    assert metrics["val_acc"] == 1.0           # every answer token is predicted...
    assert metrics["val_exact"] == 0.5         # ...but only the two whole answers are exact
    val.truncated[:] = False
    assert run.evaluate()["val_exact"] == 1.0


def test_validation_is_also_reported_per_module(tmp_path, micro_data):
    # Rows 0-1 are one module, rows 2-3 another; max_len cut both rows of the first.
    seqs = [list(range(10 + 10 * i, 16 + 10 * i)) for i in range(4)]
    val = EncodedSplit(np.asarray(sum(seqs, []), dtype=np.int32), np.arange(0, 25, 6, dtype=np.int64),
                       np.full(4, 3, dtype=np.int32), modules=np.array([1, 1, 2, 2], dtype=np.int32),
                       truncated=np.array([True, True, False, False]),
                       module_names=("absent", "geometry", "zodiac"))
    data = PreparedData(micro_data.tokenizer, micro_data.train, val, micro_data.dataset_stats)
    run = new_run(tmp_path, data)
    run.model = Successor(len(run.tokenizer))
    metrics = run.evaluate()
    by_module = metrics["val_modules"]
    assert set(by_module) == {"geometry", "zodiac"}          # a module without rows has no entry
    assert (by_module["geometry"]["exact"], by_module["zodiac"]["exact"]) == (0.0, 1.0)
    assert metrics["val_exact"] == 0.5
    # Equal token counts per module: the overall loss is the mean of the two.
    assert metrics["val_loss"] == pytest.approx((by_module["geometry"]["loss"] + by_module["zodiac"]["loss"]) / 2)


def test_a_run_needs_max_len_resolved_to_the_data(tmp_path, micro_data):
    with pytest.raises(ValueError, match="train.max_len='auto' must be resolved"):
        new_run(tmp_path, micro_data, "train.max_len=auto")
