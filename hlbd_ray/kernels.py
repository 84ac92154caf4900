"""Hand-written kernels of the model, kept apart so that model.py reads as the model.

- `ScoreMLP`: the autopoietic attention's pointwise transform of the scores,
  s + sum_j c_j * gelu(a_j * s + b_j), as one autograd function that saves only the
  scores and recomputes the hidden units in backward.
- `dropout`: F.dropout, with a faster mask on CPU.

They exist for memory and speed only: tests check ScoreMLP against the plain expression
(values and gradients) and that dropout keeps the mean and drops a share p.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class ScoreMLP(torch.autograd.Function):
    """out = s + sum_j c_j * gelu(a_j * s + b_j), elementwise, saving only s.

    Plain autograd would keep every hidden unit's [B, H, T, T] activation for the
    backward pass (26x the size of the scores, over 1 GB for the playground model);
    here backward recomputes them. On CPU the work runs over cache-sized blocks of
    scores, all hidden units per block, so the scores come from memory once, not once
    per unit (measured 2-3x faster). A GPU gets one block: fewer kernel launches.
    """

    block_elems = 1 << 18  # 1 MB of fp32: fits a core's L2 cache

    @staticmethod
    def _blocks(*tensors: torch.Tensor):
        size = tensors[0].numel() if tensors[0].is_cuda else ScoreMLP.block_elems
        return zip(*(t.view(-1).split(size) for t in tensors))

    @staticmethod
    def forward(ctx, s: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        s = s.contiguous()
        ctx.save_for_backward(s, a, b, c)
        out = s.clone()
        for s_blk, out_blk in ScoreMLP._blocks(s, out):
            for j in range(a.numel()):  # the hidden width, never batch, heads or positions
                out_blk.addcmul_(torch.ops.aten.gelu_(torch.addcmul(b[j], s_blk, a[j])), c[j])
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        s, a, b, c = ctx.saved_tensors
        grad = grad.contiguous()
        grad_s = grad.clone()
        # Per hidden unit: sums of grad * gelu(z), grad * gelu'(z) and grad * gelu'(z) * s.
        sums = torch.zeros(3, a.numel(), dtype=a.dtype, device=a.device)
        for s_blk, g_blk, gs_blk in ScoreMLP._blocks(s, grad, grad_s):
            for j in range(a.numel()):
                z = torch.addcmul(b[j], s_blk, a[j])
                # grad * gelu'(z) in one fused pass (the kernel autograd uses for F.gelu).
                g_z = torch.ops.aten.gelu_backward(g_blk, z)
                sums[0, j] += torch.dot(g_blk, torch.ops.aten.gelu_(z))
                sums[1, j] += g_z.sum()
                sums[2, j] += torch.dot(g_z, s_blk)
                gs_blk.addcmul_(g_z, c[j] * a[j])
        return grad_s, c * sums[2], c * sums[1], sums[0]


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout, with the CPU mask drawn by torch.rand: measured ~1.7x faster there."""
    if not training or p == 0.0:
        return x
    if x.is_cuda:
        return F.dropout(x, p, True)
    keep = (torch.rand(x.shape, device=x.device) >= p).to(x.dtype)
    return x * keep.mul_(1.0 / (1.0 - p))
