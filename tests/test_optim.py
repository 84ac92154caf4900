"""The optimizer's parameter groups and the learning-rate schedule."""

from __future__ import annotations

import pytest
import torch

from hlbd_ray.model import APTModel, ModelSpec
from hlbd_ray.optim import build_optimizer, lr_multiplier

from .conftest import micro_config


def test_lr_schedule_warms_up_then_restarts_with_growing_periods():
    cfg = micro_config("train.warmup_steps=4", "train.restart_steps=10", "train.restart_mult=2",
                       "train.lr=1e-3", "train.min_lr=1e-5")
    t = cfg.train
    lrs = [lr_multiplier(s, t) * t.lr for s in range(4 + 10 + 20 + 1)]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[4] == pytest.approx(1e-3)                      # first cosine period starts at the peak
    assert lrs[13] == pytest.approx(1e-5, abs=3e-5)           # ...and ends near min_lr
    assert lrs[14] == pytest.approx(1e-3)                     # warm restart
    assert lrs[34] == pytest.approx(1e-3)                     # second period is twice as long
    assert min(lrs) >= 1e-5 - 1e-12


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

