"""The optimizer's parameter groups and the learning-rate schedule planned for its run."""

from __future__ import annotations

import pytest
import torch

from hlbd_ray.data import num_batches
from hlbd_ray.errors import UserError
from hlbd_ray.model import APTModel, ModelSpec
from hlbd_ray.optim import LRSchedule, build_optimizer, run_length
from hlbd_ray.session import LocalSession
from hlbd_ray.train import TrainRun

from .conftest import micro_config


def lrs_of_a_real_run(tmp_path, data, *overrides) -> tuple[TrainRun, list[float]]:
    """Train in-process and return the LR each optimizer step actually used."""
    cfg = micro_config("train.lr=1e-3", "train.min_lr=1e-5", *overrides, output_dir=tmp_path)
    run = TrainRun(cfg, data, LocalSession(tmp_path / "run"))
    used: list[float] = []
    run.optimizer.register_step_pre_hook(lambda opt, *_: used.append(opt.param_groups[0]["lr"]))
    run.fit()
    return run, used


@pytest.mark.parametrize("overrides", [
    ("train.epochs=3", "train.grad_accum=3"),     # a shorter last group in every epoch
    ("train.epochs=4", "train.max_steps=17"),     # max_steps ends the run (and the cosine) early
], ids=["epochs", "max_steps"])
def test_cosine_reaches_min_lr_exactly_at_the_runs_last_step_and_never_rises(tmp_path, micro_data, overrides):
    run, used = lrs_of_a_real_run(tmp_path, micro_data, "train.warmup_steps=3", *overrides)
    t = run.t
    # The plan's length is the number of steps the loop really took.
    assert len(used) == run.total_steps == run.state.step
    if t.max_steps:
        assert run.total_steps == t.max_steps < t.epochs * run.steps_per_epoch
    else:
        assert run.steps_per_epoch == -(-num_batches(micro_data.train, t.batch_size) // t.grad_accum)
        assert run.epoch_batches % t.grad_accum != 0
    assert used[:3] == pytest.approx([t.lr / 3, 2 * t.lr / 3, t.lr], rel=1e-12)
    after = used[t.warmup_steps - 1:]
    assert all(b <= a for a, b in zip(after, after[1:]))
    assert used[-1] == pytest.approx(t.min_lr, abs=1e-12)
    assert used[-2] > t.min_lr


def test_restarts_are_the_references_epoch_counted_warm_restarts(micro_data):
    """T_0 = 1 epoch, T_mult = 2: restarts at the first step of epochs 1, 3 and 7 (0-based),
    as torch's CosineAnnealingWarmRestarts stepped with fractional epochs gives them."""
    t = micro_config("train.schedule=restarts", "train.restart_period_epochs=1", "train.restart_period_mult=2",
                     "train.warmup_steps=3", "train.lr=1e-3", "train.min_lr=1e-5", "train.epochs=8").train
    per_epoch, total = run_length(t, micro_data.train, 1)
    schedule = LRSchedule.plan(t, per_epoch, total)
    lrs = [t.lr * schedule(step) for step in range(total)]
    rises = [step for step in range(t.warmup_steps, total) if lrs[step] > lrs[step - 1]]
    assert rises == [per_epoch, 3 * per_epoch, 7 * per_epoch]
    assert all(lrs[step] == pytest.approx(t.lr, rel=1e-12) for step in rises)

    param = torch.nn.Parameter(torch.zeros(1))
    reference = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        torch.optim.SGD([param], lr=t.lr), T_0=1, T_mult=2, eta_min=t.min_lr)
    for step in range(t.warmup_steps, total):
        reference.step(step / per_epoch)
        assert lrs[step] == pytest.approx(reference.get_last_lr()[0], rel=1e-9, abs=1e-15), step
    # During warmup the ramp multiplies the cosine.
    assert lrs[0] == pytest.approx(t.lr / 3 * schedule._restarts(0), rel=1e-12)


def test_constant_is_flat_after_warmup(micro_data):
    t = micro_config("train.schedule=constant", "train.warmup_steps=4", "train.lr=1e-3").train
    per_epoch, total = run_length(t, micro_data.train, 1)
    schedule = LRSchedule.plan(t, per_epoch, total)
    assert [schedule(s) for s in range(total)] == pytest.approx([0.25, 0.5, 0.75] + [1.0] * (total - 3))


def test_run_length_counts_each_workers_share(micro_data):
    t = micro_config("train.grad_accum=1", "train.batch_size=8").train
    one, two = run_length(t, micro_data.train, 1)[0], run_length(t, micro_data.train, 2)[0]
    assert one == num_batches(micro_data.train, 8, 1) and two == num_batches(micro_data.train, 8, 2) < one


def test_a_warmup_as_long_as_the_run_is_refused(micro_data):
    t = micro_config("train.epochs=1", "train.grad_accum=1", "train.batch_size=8").train
    steps = num_batches(micro_data.train, 8)
    with pytest.raises(UserError, match=f"train.warmup_steps={steps} must be shorter than the run: {steps} "):
        run_length(micro_config("train.epochs=1", "train.grad_accum=1", "train.batch_size=8",
                                f"train.warmup_steps={steps}").train, micro_data.train, 1)
    assert run_length(t, micro_data.train, 1) == (steps, steps)


def test_the_reported_lr_is_the_one_the_step_just_taken_used(tmp_path, micro_data):
    run, used = lrs_of_a_real_run(tmp_path, micro_data, "train.epochs=2", "train.report_every_steps=1")
    reports = run.session.reports
    assert len(reports) == len(used)     # one report per step: every step's LR is checked
    for report in reports:
        assert report["lr"] == used[report["step"] - 1]
        assert report["lr"] == pytest.approx(run.t.lr * run.scheduler.lr_lambdas[0](report["step"] - 1))


def test_a_resumed_run_continues_the_schedule_step_for_step(tmp_path, micro_data):
    through, used = lrs_of_a_real_run(tmp_path / "a", micro_data, "train.epochs=3")
    # The same run, crashed at the first step of epoch 2 and resumed from its epoch-1 checkpoint.
    crash = f"fault.raise_at_step={through.steps_per_epoch}"
    with pytest.raises(RuntimeError, match="injected fault"):
        lrs_of_a_real_run(tmp_path / "b", micro_data, "train.epochs=3", crash)
    cfg = micro_config("train.lr=1e-3", "train.min_lr=1e-5", "train.epochs=3", crash, output_dir=tmp_path / "b")
    resumed = TrainRun(cfg, micro_data, LocalSession(tmp_path / "c", resume_from=tmp_path / "b" / "run" /
                                                     "checkpoint_000000"))
    assert resumed.state.step == through.steps_per_epoch
    after: list[float] = []
    resumed.optimizer.register_step_pre_hook(lambda opt, *_: after.append(opt.param_groups[0]["lr"]))
    resumed.fit()
    assert after == used[through.steps_per_epoch:]


def test_a_run_resumed_with_more_epochs_replans_its_cosine(tmp_path, micro_data, capsys):
    short, _ = lrs_of_a_real_run(tmp_path / "a", micro_data, "train.epochs=1")
    cfg = micro_config("train.lr=1e-3", "train.min_lr=1e-5", "train.epochs=3", output_dir=tmp_path / "b")
    longer = TrainRun(cfg, micro_data, LocalSession(tmp_path / "b", resume_from=short.session.checkpoints[-1]))
    assert "LR schedule differs from the checkpoint's {'total_steps'" in capsys.readouterr().err
    step = longer.state.step
    # The next step's LR comes from the new plan, not from the optimizer state of the old one.
    assert longer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * longer.scheduler.lr_lambdas[0](step))
    assert longer.optimizer.param_groups[0]["lr"] > 10 * cfg.train.min_lr


def test_norms_biases_and_embeddings_are_not_decayed():
    t = micro_config().train
    model = APTModel(ModelSpec(vocab_size=50, d_model=32, num_heads=4, num_layers=2, d_ff=64))
    decay, no_decay = build_optimizer(model, t).param_groups
    assert decay["weight_decay"] == t.weight_decay and no_decay["weight_decay"] == 0.0
    embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding)
                  for p in m.parameters()}
    assert embeddings and embeddings <= {id(p) for p in no_decay["params"]}
    assert all(p.ndim >= 2 for p in decay["params"])
    assert all(p.ndim < 2 or id(p) in embeddings for p in no_decay["params"])
