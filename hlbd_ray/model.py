"""The APT language model: a strictly causal decoder-only transformer.

Position t only ever sees tokens 0..t, so loss, perplexity and accuracy measure
next-token prediction: no position can read the token it is asked to predict.
Two attention kinds share one block:

- `standard`: fused QKV and the causal scaled_dot_product_attention kernel.
- `autopoietic`: the scores q.k/sqrt(d) go through a small learned function applied to
  each score on its own, s' = s + alpha * mlp(s / temperature), and only then get the
  causal mask. Being pointwise, the transform cannot move information between
  positions, and because the mask comes after it, no future position can contribute.
  Its kernel, and the CPU dropout, live in `hlbd_ray.kernels`.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from hlbd_ray.config import Attention, ModelConfig, check_model
from hlbd_ray.errors import UserError
from hlbd_ray.kernels import ScoreMLP, dropout

SCORE_MLP_HIDDEN = 8  # width of the autopoietic per-score MLP


@dataclass(kw_only=True)
class ModelSpec(ModelConfig):
    """Everything needed to rebuild the model: the model config plus the sizes the data set."""

    vocab_size: int
    max_seq_len: int = 256

    def __post_init__(self) -> None:
        # Refuse at construction: 256 / 12 heads must never reach a reshape deep inside.
        check_model(self)
        for key in ("vocab_size", "max_seq_len"):
            if getattr(self, key) <= 0:
                raise UserError(f"model {key} must be > 0, got {getattr(self, key)}")
        # A spec built in code (not through the config schema) may hold a plain string.
        if self.attention not in tuple(Attention):
            raise UserError(f"model.attention must be one of {[a.value for a in Attention]}, "
                            f"got {self.attention!r}")
        self.attention = Attention(self.attention)

    @classmethod
    def from_config(cls, model_cfg: ModelConfig, vocab_size: int, max_seq_len: int) -> ModelSpec:
        return cls(**asdict(model_cfg), vocab_size=vocab_size, max_seq_len=max_seq_len)


class CausalSelfAttention(nn.Module):
    future: torch.Tensor  # a buffer: nn.Module's __getattr__ alone types it Tensor | Module

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.num_heads, self.dropout = spec.num_heads, spec.dropout
        self.autopoietic = spec.attention == "autopoietic"
        # One matmul for q, k and v instead of three.
        self.qkv = nn.Linear(spec.d_model, 3 * spec.d_model)
        self.proj = nn.Linear(spec.d_model, spec.d_model)
        future = torch.ones(spec.max_seq_len, spec.max_seq_len, dtype=torch.bool).triu(1)
        self.register_buffer("future", future, persistent=False)
        if self.autopoietic:
            hidden = SCORE_MLP_HIDDEN
            # Shared by the heads of a layer. w1 ~ N(0, 1) because scores are O(1).
            self.w1 = nn.Parameter(torch.randn(hidden))
            self.b1 = nn.Parameter(torch.zeros(hidden))
            self.w2 = nn.Parameter(torch.randn(hidden) / math.sqrt(hidden))
            # No output bias: softmax ignores a constant shift, so it would never learn.
            self.log_temperature = nn.Parameter(torch.zeros(()))
            # alpha = 0: the block starts as exact standard attention and learns to depart.
            self.alpha = nn.Parameter(torch.zeros(()))

    def transform(self, scores: torch.Tensor) -> torch.Tensor:
        """s + alpha * mlp(s / temperature), each score on its own (no mask here)."""
        # Fold temperature and alpha into the hidden weights: same function, fewer passes.
        a = self.w1 / self.log_temperature.exp()
        return ScoreMLP.apply(scores, a, self.b1, self.alpha * self.w2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        # [B, T, 3, H, hd] -> three [B, H, T, hd] views, no copies.
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        # The fused causal kernel, except where it cannot serve: the autopoietic transform,
        # and attention dropout on CPU, where the kernel falls back to PyTorch's fp32 math
        # path, which measured slower than the explicit one below (~20% of a bf16 step).
        if not self.autopoietic and (p == 0.0 or x.is_cuda):
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            # Scale q rather than the T x T scores: T / head_dim times less work.
            scores = (q * (q.size(-1) ** -0.5)) @ k.transpose(-2, -1)
            if self.autopoietic:
                # fp32 even under autocast: bf16 keeps ~3 digits of a score, and fp32
                # elementwise work measured faster on CPU.
                scores = self.transform(scores.float())
            # The mask comes after the transform, so no future score can leak through it.
            scores = scores.masked_fill(self.future[:T, :T], float("-inf"))
            y = dropout(scores.softmax(dim=-1), p, self.training) @ v
        y = y.transpose(1, 2).reshape(B, T, C)
        return dropout(self.proj(y), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.dropout = spec.dropout
        self.ln1, self.ln2 = nn.LayerNorm(spec.d_model), nn.LayerNorm(spec.d_model)
        self.attn = CausalSelfAttention(spec)
        self.fc = nn.Linear(spec.d_model, spec.d_ff)
        self.fc_out = nn.Linear(spec.d_ff, spec.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        mlp = self.fc_out(F.gelu(self.fc(self.ln2(x))))
        return x + dropout(mlp, self.dropout, self.training)


class APTModel(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.tok_emb = nn.Embedding(spec.vocab_size, spec.d_model)
        self.pos_emb = nn.Embedding(spec.max_seq_len, spec.d_model)
        blocks = [Block(spec) for _ in range(spec.num_layers)]
        self.blocks = nn.ModuleList(blocks)
        self.ln_f = nn.LayerNorm(spec.d_model)
        self.apply(self._init_weights)
        # GPT-2: each residual branch adds to the stream, so scale the layers that write
        # into it by 1/sqrt(2 * layers) to keep the stream's variance flat with depth.
        for block in blocks:  # the typed list: iterating the ModuleList yields bare Modules
            for layer in (block.attn.proj, block.fc_out):
                nn.init.normal_(layer.weight, std=0.02 / math.sqrt(2 * spec.num_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] token ids -> [B, T, vocab] logits (bf16 under autocast: cast for the loss)."""
        T = input_ids.size(1)
        if T > self.spec.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.spec.max_seq_len}")
        pos = torch.arange(T, device=input_ids.device)
        x = dropout(self.tok_emb(input_ids) + self.pos_emb(pos), self.spec.dropout, self.training)
        for block in self.blocks:
            x = block(x)
        # Tied head: the output projection is the token embedding itself.
        return F.linear(self.ln_f(x), self.tok_emb.weight)


def resolve_factory(factory: str) -> Callable[[ModelSpec], nn.Module]:
    """The function named by "package.module:function"; called up front so a bad name
    is a user error before any Ray work starts."""
    module_name, _, func_name = factory.partition(":")
    if not module_name or not func_name:
        raise UserError(f"model.factory={factory!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # a user's module can fail to import in any way
        raise UserError(f"model.factory={factory!r}: cannot import {module_name!r} "
                        f"({type(err).__name__}: {err})") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise UserError(f"model.factory={factory!r}: {module_name!r} has no function {func_name!r}")
    return func


def build_model(spec: ModelSpec, factory: str | None = None) -> nn.Module:
    """APTModel(spec), or `factory(spec)` for a "package.module:function" string."""
    if not factory:
        return APTModel(spec)
    model = resolve_factory(factory)(spec)
    if not isinstance(model, nn.Module):
        raise UserError(f"model.factory={factory!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model

