"""Training FLOPs per token of the APT model, for the MFU columns of bench/step.py."""

from __future__ import annotations

from hlbd_ray.model import ModelSpec


def flops_per_token(spec: ModelSpec, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), for MFU.

    6 * N for the N matmul weights (2 forward, 4 backward per weight and token): per
    layer qkv + proj (4 d^2) and the MLP (2 d d_ff), plus the tied head (d V); the
    embedding lookups are not matmuls. Attention adds q.k and att.v, 2 * 2 d T forward
    per layer and token, so 12 L d T with backward (full T, the usual convention, even
    though causal kernels skip half). The autopoietic transform's elementwise work is
    not counted: MFU measures matmul throughput.
    """
    d, L = spec.d_model, spec.num_layers
    matmul_params = L * (4 * d * d + 2 * d * spec.d_ff) + d * spec.vocab_size
    return 6.0 * matmul_params + 12.0 * L * d * seq_len
