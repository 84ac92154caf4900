"""The optimizer and its learning-rate schedule.

AdamW over two parameter groups (matrices decayed; norms, biases and embeddings not),
and a linear warmup followed by cosine annealing with warm restarts, stepped once per
optimizer step.
"""

from __future__ import annotations

import math
from functools import partial

import torch

from hlbd_ray.config import TrainConfig


def lr_multiplier(step: int, t: TrainConfig) -> float:
    """Linear warmup, then cosine annealing with warm restarts (T_0, T_mult, eta_min)."""
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    pos, period = step - t.warmup_steps, t.restart_steps
    while pos >= period:
        pos, period = pos - period, period * t.restart_mult
    floor = t.min_lr / t.lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * pos / period))


def build_optimizer(model: torch.nn.Module, t: TrainConfig) -> torch.optim.AdamW:
    """AdamW; norms, biases and embeddings are not decayed (decay would shrink them to no end)."""
    embedding_params = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding)
                        for p in m.parameters()}
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        plain = param.ndim < 2 or id(param) in embedding_params
        (no_decay if plain else decay).append(param)
    groups = [{"params": decay, "weight_decay": t.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, 0.95))


def build_lr_schedule(optimizer: torch.optim.Optimizer, t: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule as a torch scheduler, so a checkpoint saves and restores its position."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_multiplier, t=t))
