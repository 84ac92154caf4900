"""The optimizer and its learning-rate schedule.

AdamW over two parameter groups (matrices decayed; norms, biases and embeddings not),
and a schedule stepped once per optimizer step (`train.schedule`), planned for the run
it belongs to:

- `cosine`: linear warmup, then one cosine from `lr` down to `min_lr` that reaches it at
  exactly the run's last optimizer step, so every run ends annealed and ASHA's rungs see
  each trial at the same fraction of its schedule.
- `restarts`: the reference's CosineAnnealingWarmRestarts counted in epochs (T_0 =
  `restart_period_epochs`, T_mult = `restart_period_mult`, eta_min = `min_lr`), so every
  restart falls on an epoch boundary; the warmup multiplies the first steps.
- `constant`: linear warmup, then `lr`.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch

from hlbd_ray.config import TrainConfig
from hlbd_ray.data import EncodedSplit, num_batches
from hlbd_ray.errors import UserError


def run_length(t: TrainConfig, train: EncodedSplit, world_size: int) -> tuple[int, int]:
    """(optimizer steps per epoch, optimizer steps in the whole run); a warmup that would
    fill the whole run is refused with one line.

    An epoch is `num_batches` micro-batches per worker in groups of grad_accum, the last
    group possibly shorter (the loop keeps it); max_steps, when set, ends the run early.
    """
    per_epoch = -(-num_batches(train, t.batch_size, world_size) // t.grad_accum)
    total = min(t.epochs * per_epoch, t.max_steps) if t.max_steps > 0 else t.epochs * per_epoch
    if t.warmup_steps >= total:
        limit = f", cut to max_steps={t.max_steps}" if t.max_steps > 0 else ""
        raise UserError(f"train.warmup_steps={t.warmup_steps} must be shorter than the run: "
                        f"{total} optimizer steps ({t.epochs} epochs x {per_epoch} steps{limit})")
    return per_epoch, total


def _cosine(fraction: float, floor: float) -> float:
    """From 1 at fraction 0 down to `floor` at fraction 1."""
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * fraction))


@dataclass
class LRSchedule:
    """The LR multiplier of optimizer step `step` (0-based): the step's LR is lr x this.

    Its fields are plain values, so the torch scheduler's state (in every checkpoint)
    records the plan it followed; `restore_lr_schedule` compares it on resume.
    """

    schedule: str
    warmup_steps: int
    steps_per_epoch: int
    total_steps: int
    floor: float                 # min_lr / lr
    restart_period_epochs: int
    restart_period_mult: int

    @classmethod
    def plan(cls, t: TrainConfig, steps_per_epoch: int, total_steps: int) -> LRSchedule:
        return cls(str(t.schedule), t.warmup_steps, steps_per_epoch, total_steps, t.min_lr / t.lr,
                   t.restart_period_epochs, t.restart_period_mult)

    def __call__(self, step: int) -> float:
        warmup = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        if self.schedule == "constant":
            return warmup
        if self.schedule == "restarts":
            return warmup * self._restarts(step)
        if step < self.warmup_steps:
            return warmup
        # One cosine over the steps after warmup; the last step lands on fraction 1.
        span = self.total_steps - 1 - self.warmup_steps
        return _cosine(min(1.0, (step - self.warmup_steps) / span) if span > 0 else 1.0, self.floor)

    def _restarts(self, step: int) -> float:
        # Whole steps, not float epochs: a restart lands exactly on an epoch's first step.
        pos, period = step, self.restart_period_epochs * self.steps_per_epoch
        while pos >= period:
            pos, period = pos - period, period * self.restart_period_mult
        return _cosine(pos / period, self.floor)


def build_optimizer(model: torch.nn.Module, t: TrainConfig) -> torch.optim.AdamW:
    """AdamW; norms, biases and embeddings are not decayed (decay would shrink them to no end)."""
    embedding_params = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding)
                        for p in m.parameters()}
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        plain = param.ndim < 2 or id(param) in embedding_params
        (no_decay if plain else decay).append(param)
    groups = [{"params": decay, "weight_decay": t.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, 0.95))


def build_lr_schedule(optimizer: torch.optim.Optimizer, t: TrainConfig, steps_per_epoch: int,
                      total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule as a torch scheduler, so a checkpoint saves and restores its position."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule.plan(t, steps_per_epoch, total_steps))


def restore_lr_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, state: dict[str, Any]) -> None:
    """Continue from a checkpoint's scheduler state (its step count) under this run's plan.

    The plan is the config's: a run resumed with more epochs re-plans its cosine to the
    new end rather than sitting at min_lr (a note says so). The optimizer state loaded
    before this holds the next step's LR under the checkpoint's plan, so it is set again.
    """
    saved = [plan for plan in state.get("lr_lambdas", []) if plan]
    current = []
    for fn in scheduler.lr_lambdas:
        if not isinstance(fn, LRSchedule):  # asdict would fail on it anyway, less clearly
            raise TypeError(f"the scheduler's LR function is {type(fn).__name__}, not build_lr_schedule's LRSchedule")
        current.append(asdict(fn))
    scheduler.load_state_dict({**state, "lr_lambdas": [None] * len(scheduler.lr_lambdas)})
    if saved and saved != current:
        changed = {k: (saved[0].get(k), v) for k, v in current[0].items() if saved[0].get(k) != v}
        print(f"note: the LR schedule differs from the checkpoint's {changed} (old, new); "
              f"it follows this run's plan from step {scheduler.last_epoch}", file=sys.stderr, flush=True)
    for group, base, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(scheduler.last_epoch)
