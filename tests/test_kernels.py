"""The model's hand-written kernels against the plain PyTorch they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hlbd_ray.kernels import ScoreMLP, dropout


def test_score_mlp_gradients_across_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ScoreMLP, "block_elems", 7)  # several blocks, a ragged last one
    gen = torch.Generator().manual_seed(0)
    args = [torch.randn(*shape, dtype=torch.float64, generator=gen).requires_grad_()
            for shape in [(2, 3, 4, 4), (8,), (8,), (8,)]]
    assert torch.autograd.gradcheck(ScoreMLP.apply, args)
    s, a, b, c = args
    reference = s + (c * F.gelu(s.unsqueeze(-1) * a + b)).sum(-1)
    torch.testing.assert_close(ScoreMLP.apply(s, a, b, c), reference)


def test_dropout_keeps_the_mean_and_drops_p() -> None:
    torch.manual_seed(0)
    x = torch.ones(200_000)
    y = dropout(x, 0.25, training=True)
    assert (y == 0).float().mean().item() == pytest.approx(0.25, abs=0.01)
    assert y.mean().item() == pytest.approx(1.0, abs=0.01)
    assert dropout(x, 0.25, training=False) is x
