"""The model: strict causality (with negative controls), shapes, tied head, the
autopoietic transform, the factory hook, bf16 autocast and a tiny overfit."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hlbd_ray import model as model_module
from hlbd_ray.config import ModelConfig
from hlbd_ray.errors import UserError
from hlbd_ray.model import APTModel, ModelSpec, build_model

MODES = ["standard", "autopoietic"]
V, T = 50, 12


def micro_spec(attention: str = "standard", dropout: float = 0.0, **kw) -> ModelSpec:
    values = dict(vocab_size=V, d_model=32, num_heads=4, num_layers=2, d_ff=64,
                  dropout=dropout, max_seq_len=16, attention=attention)
    return ModelSpec(**{**values, **kw})


def micro_model(attention: str, dropout: float = 0.0, seed: int = 0) -> APTModel:
    torch.manual_seed(seed)
    model = APTModel(micro_spec(attention, dropout))
    if attention == "autopoietic":
        # At init the transform is the identity; make it bite so the tests exercise it.
        with torch.no_grad():
            for block in model.blocks:
                block.attn.alpha.fill_(1.0)
                block.attn.b1.normal_()
    return model


# Importable as "tests.test_model:tiny_factory" by build_model.
class TinyLM(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.emb = nn.Embedding(spec.vocab_size, spec.vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.emb(input_ids)


def tiny_factory(spec: ModelSpec) -> nn.Module:
    return TinyLM(spec)


def not_a_module(spec: ModelSpec) -> str:
    return "logits, trust me"


def leaks_future(model: nn.Module, seed: int = 0) -> bool:
    """True if changing the tokens after some position t changes a logit at <= t.

    The forward passes are seeded alike, so this also holds in training mode with
    dropout (same shapes, same random draws)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (3, T), generator=gen)
    for t in (0, 4, T - 2):
        y = x.clone()
        y[:, t + 1:] = torch.randint(0, V, (3, T - t - 1), generator=gen)
        assert not torch.equal(x[:, t + 1:], y[:, t + 1:])
        with torch.no_grad():
            torch.manual_seed(1)
            a = model(x)
            torch.manual_seed(1)
            b = model(y)
        if not torch.allclose(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-6):
            return True
        # The later positions do see the change: the comparison is not vacuous.
        assert not torch.allclose(a[:, t + 1:], b[:, t + 1:], atol=1e-4)
    return False


@pytest.mark.parametrize("attention", MODES)
def test_causal_in_eval_and_in_training_with_dropout(attention: str) -> None:
    model = micro_model(attention, dropout=0.2)
    assert not leaks_future(model.eval())
    assert not leaks_future(model.train())


def test_negative_control_noncausal_kernel_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    real = F.scaled_dot_product_attention

    def no_mask(q, k, v, dropout_p=0.0, is_causal=False):
        return real(q, k, v, dropout_p=dropout_p, is_causal=False)

    model = micro_model("standard").eval()
    assert not leaks_future(model)
    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", no_mask)
    assert leaks_future(model)


def test_negative_control_missing_mask_is_caught() -> None:
    model = micro_model("autopoietic").eval()
    for block in model.blocks:
        block.attn.future.zero_()
    assert leaks_future(model)


@pytest.mark.parametrize("attention", MODES)
def test_shapes_and_tied_head(attention: str) -> None:
    model = micro_model(attention).eval()
    x = torch.randint(1, V, (2, 7))
    assert model(x).shape == (2, 7, V)
    # One [V, d] matrix serves as embedding and output projection.
    assert sum(p.shape == (V, 32) for p in model.parameters()) == 1
    with torch.no_grad():
        model.tok_emb.weight[0].zero_()  # token 0 is not in x, so only the head uses it
        assert torch.equal(model(x)[..., 0], torch.zeros(2, 7))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_spec_refuses_bad_heads_and_builds_from_config() -> None:
    with pytest.raises(UserError, match=r"valid head counts for d_model=256: \[1, 2, 4, 8, 16"):
        ModelSpec(vocab_size=V, d_model=256, num_heads=12)
    with pytest.raises(UserError, match="attention"):
        micro_spec(attention="global")
    spec = ModelSpec.from_config(ModelConfig(num_heads=4, attention="autopoietic"), vocab_size=99, max_seq_len=64)
    assert (spec.num_heads, spec.vocab_size, spec.max_seq_len, spec.attention) == (4, 99, 64, "autopoietic")


def test_init_scales_residual_projections() -> None:
    torch.manual_seed(0)
    model = APTModel(ModelSpec(vocab_size=V, d_model=128, num_heads=4, num_layers=8, d_ff=512))
    expected = 0.02 / math.sqrt(2 * 8)
    assert model.blocks[0].fc_out.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert model.blocks[0].fc.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_autopoietic_starts_as_standard_attention() -> None:
    torch.manual_seed(0)
    standard = APTModel(micro_spec("standard")).eval()
    auto = APTModel(micro_spec("autopoietic")).eval()
    missing, unexpected = auto.load_state_dict(standard.state_dict(), strict=False)
    assert not unexpected and all(k.split(".")[-1] in {"w1", "b1", "w2", "log_temperature", "alpha"}
                                  for k in missing)
    x = torch.randint(0, V, (2, T))
    with torch.no_grad():
        torch.testing.assert_close(auto(x), standard(x), rtol=1e-5, atol=1e-5)
        s = torch.randn(2, 4, T, T)
        assert torch.equal(auto.blocks[0].attn.transform(s), s)


def test_autopoietic_transform_is_pointwise() -> None:
    attn = micro_model("autopoietic").blocks[0].attn
    s = torch.randn(2, 4, T, T)
    with torch.no_grad():
        out = attn.transform(s)
        bumped = s.clone()
        bumped[1, 2, 5, 3] += 1.0
        changed = (attn.transform(bumped) != out).nonzero().tolist()
    assert changed == [[1, 2, 5, 3]]
    assert not torch.allclose(out, s, atol=1e-3)  # alpha = 1 here: a real transform


@pytest.mark.parametrize("attention", MODES)
def test_bf16_autocast_forward_and_backward(attention: str) -> None:
    model = micro_model(attention, dropout=0.1).train()
    x = torch.randint(0, V, (2, T))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    assert logits.shape == (2, T, V) and torch.isfinite(logits.float()).all()
    F.cross_entropy(logits.float().view(-1, V), x.view(-1)).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("attention", MODES)
def test_tiny_model_overfits_a_tiny_batch(attention: str) -> None:
    model = micro_model(attention, seed=1).train()
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (4, T + 1), generator=gen)
    inputs, labels = x[:, :-1], x[:, 1:].clone()
    labels[:, -3:] = -100  # right padding is ignored by the loss
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(50):
        loss = F.cross_entropy(model(inputs).view(-1, V), labels.reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > math.log(V) - 0.5
    assert losses[-1] < 0.1 * losses[0]


def test_build_model_and_factory() -> None:
    spec = micro_spec()
    assert isinstance(build_model(spec), APTModel)
    made = build_model(spec, "tests.test_model:tiny_factory")
    assert isinstance(made, TinyLM) and made.spec is spec
    for factory in ["no_such_package.models:make", "tests.test_model:no_such_function",
                    "tests.test_model:not_a_module", "tests.test_model"]:
        with pytest.raises(UserError) as err:
            build_model(spec, factory)
        assert repr(factory) in str(err.value)
