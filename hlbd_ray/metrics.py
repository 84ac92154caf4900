"""Language-model metrics from summed counts: true loss, overflow-safe perplexity,
token accuracy with padding masked out, and their all-reduce across workers.

[UNK] stands for a character the vocabulary cannot hold, so predicting it is never a
match: a position whose label is [UNK] counts as a wrong token (it stays in the
accuracy's denominator, which is the loss's token count) and its answer is never exact.
Every metric is built from sums (loss x tokens, correct tokens, tokens) so that windows,
micro-batches and workers combine exactly: a mean of means would weight a short batch
like a long one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from hlbd_ray.data import IGNORE_INDEX
from hlbd_ray.tokenizer import UNK_ID

PPL_LOSS_CAP = 20.0


def finite_or_none(value: float | None) -> float | None:
    """Non-finite numbers become None: a report says 'missing', never NaN as a number."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def perplexity(loss: float | None) -> float | None:
    """exp(min(loss, 20)): the cap keeps an early, huge loss from overflowing to inf."""
    loss = finite_or_none(loss)
    return None if loss is None else math.exp(min(loss, PPL_LOSS_CAP))


@dataclass
class TokenCounts:
    """Summed loss, correct predictions and counted tokens of one or more batches."""

    loss_sum: float = 0.0
    correct: int = 0
    tokens: int = 0

    def add(self, other: TokenCounts) -> None:
        self.loss_sum += other.loss_sum
        self.correct += other.correct
        self.tokens += other.tokens

    @property
    def loss(self) -> float | None:
        return finite_or_none(self.loss_sum / self.tokens) if self.tokens else None

    @property
    def acc(self) -> float | None:
        return self.correct / self.tokens if self.tokens else None


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over the labelled tokens, in fp32 whatever the autocast dtype."""
    return F.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def count_tokens(logits: torch.Tensor, labels: torch.Tensor, loss_sum: torch.Tensor) -> TokenCounts:
    """Counts of one batch; accuracy only over labels != -100 (padding, masked prompt), and
    an [UNK] label is never predicted correctly."""
    mask = labels != IGNORE_INDEX
    correct = ((logits.argmax(-1) == labels) & mask & (labels != UNK_ID)).sum()
    return TokenCounts(float(loss_sum.detach()), int(correct), int(mask.sum()))


def exact_sequences(logits: torch.Tensor, labels: torch.Tensor, answer: torch.Tensor,
                    truncated: torch.Tensor | None = None) -> tuple[int, int]:
    """(sequences whose every answer token is the argmax, sequences with an answer token)."""
    hit, has_answer = exact_rows(logits, labels, answer, truncated)
    return int(hit.sum()), int(has_answer.sum())


def exact_rows(logits: torch.Tensor, labels: torch.Tensor, answer: torch.Tensor,
               truncated: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (every answer token is the argmax, the row has an answer token), bool [B].

    `answer` is the batch's answer mask. Under teacher forcing this equals exact greedy
    decoding: if every argmax matches, greedy decoding reproduces the answer token by
    token (each step sees the true prefix); the first mismatch is exactly where greedy
    decoding would diverge. An answer holding [UNK] is never exact: decoding can at best
    print "[UNK]", never the character it replaced. A `truncated` row (max_len cut its
    answer and [EOS]) is never exact: matching the prefix is not reproducing the answer.
    """
    wrong = (((logits.argmax(-1) != labels) | (labels == UNK_ID)) & answer).any(dim=1)
    if truncated is not None:
        wrong |= truncated
    has_answer = answer.any(dim=1)
    return has_answer & ~wrong, has_answer


ROW_COUNTS = ("loss_sum", "tokens", "correct", "exact", "answered")


def row_counts(logits: torch.Tensor, labels: torch.Tensor, answer: torch.Tensor,
               truncated: torch.Tensor | None = None) -> torch.Tensor:
    """Per row, the counts behind the validation metrics, float64 [B, len(ROW_COUNTS)]:
    summed loss and labelled tokens, correct tokens, exact answer, has an answer. Summed
    over any set of rows (a module, a worker, the split) they give that set's metrics."""
    token_loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                                 ignore_index=IGNORE_INDEX, reduction="none").view_as(labels)
    mask = labels != IGNORE_INDEX
    correct = (logits.argmax(-1) == labels) & mask & (labels != UNK_ID)
    hit, has_answer = exact_rows(logits, labels, answer, truncated)
    return torch.stack([token_loss.sum(1).double(), mask.sum(1).double(), correct.sum(1).double(),
                        hit.double(), has_answer.double()], dim=1)


def all_reduce_sums(values: list[float]) -> list[float]:
    """Sum a short vector over all workers (identity with one worker or no process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return list(values)
    # float64 keeps integer counts exact far beyond any realistic token count.
    tensor = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        tensor = tensor.cuda()
    torch.distributed.all_reduce(tensor)
    return tensor.cpu().tolist()


@dataclass
class Window:
    """What happened since the last report: per-batch true losses and summed counts."""

    counts: TokenCounts = field(default_factory=TokenCounts)
    batch_loss_sums: list[float] = field(default_factory=list)
    batch_tokens: list[int] = field(default_factory=list)
    fw_ms: float = 0.0
    bw_ms: float = 0.0
    input_tokens: int = 0
    grad_norms: list[float] = field(default_factory=list)

    def add_batch(self, counts: TokenCounts, input_tokens: int, fw_ms: float, bw_ms: float) -> None:
        self.counts.add(counts)
        self.batch_loss_sums.append(counts.loss_sum)
        self.batch_tokens.append(counts.tokens)
        self.input_tokens += input_tokens
        self.fw_ms += fw_ms
        self.bw_ms += bw_ms

    @property
    def batches(self) -> int:
        return len(self.batch_tokens)

    def reduced(self) -> Window:
        """The window summed over workers (one all-reduce); timings stay this worker's."""
        n = self.batches
        flat = [self.counts.loss_sum, self.counts.correct, self.counts.tokens, self.input_tokens,
                *self.batch_loss_sums, *self.batch_tokens]
        out = all_reduce_sums(flat)
        total = Window(TokenCounts(out[0], int(out[1]), int(out[2])),
                       out[4:4 + n], [int(t) for t in out[4 + n:]],
                       self.fw_ms, self.bw_ms, int(out[3]), list(self.grad_norms))
        return total

    def batch_losses(self) -> list[float | None]:
        """True per-batch loss (token mean, before any accumulation division)."""
        return [finite_or_none(s / t) if t else None
                for s, t in zip(self.batch_loss_sums, self.batch_tokens)]
