"""Metrics: perplexity clamp, masked accuracy, exact match, windows from summed counts."""

from __future__ import annotations

import math

import torch

from hlbd_ray.data import IGNORE_INDEX
from hlbd_ray.metrics import (
    PPL_LOSS_CAP,
    TokenCounts,
    Window,
    count_tokens,
    exact_sequences,
    finite_or_none,
    perplexity,
    token_loss_sum,
)
from hlbd_ray.model import APTModel, ModelSpec
from hlbd_ray.tokenizer import UNK_ID, CharTokenizer


def test_perplexity_is_exp_of_loss_clamped_at_20():
    assert perplexity(1.0) == math.exp(1.0)
    assert perplexity(25.0) == math.exp(PPL_LOSS_CAP) == perplexity(1e6)
    assert perplexity(float("nan")) is None and perplexity(float("inf")) is None
    assert perplexity(None) is None


def test_non_finite_values_become_missing():
    assert finite_or_none(float("nan")) is None and finite_or_none(-float("inf")) is None
    assert finite_or_none(2) == 2.0


def test_masked_accuracy_against_a_hand_computed_case():
    # Vocabulary of 4 (id 1 is [UNK], unused here); argmax per position: 2, 0, 3, 3.
    logits = torch.tensor([[[0.0, 0.0, 5.0, 0.0], [5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 5.0],
                            [0.0, 0.0, 0.0, 5.0]]])
    labels = torch.tensor([[2, 3, IGNORE_INDEX, 3]])
    counts = count_tokens(logits, labels, token_loss_sum(logits, labels))
    # Counted: positions 0 (right), 1 (wrong), 3 (right); position 2 is padding.
    assert (counts.correct, counts.tokens) == (2, 3)
    assert counts.acc == 2 / 3
    expected = sum(-torch.log_softmax(logits[0, i], -1)[labels[0, i]] for i in (0, 1, 3)).item()
    assert math.isclose(counts.loss_sum, expected, rel_tol=1e-6)
    assert math.isclose(counts.loss, expected / 3, rel_tol=1e-6)


def test_predicting_unk_is_never_a_match():
    assert UNK_ID == 1 and CharTokenizer.build(["ab"], max_vocab=50).unk_id == UNK_ID
    # Argmax 2, 1, 1: the model "predicts" [UNK] where the label is [UNK] (position 1).
    logits = torch.tensor([[[0.0, 0.0, 5.0], [0.0, 5.0, 0.0], [0.0, 5.0, 0.0]]])
    labels = torch.tensor([[2, UNK_ID, 2]])
    counts = count_tokens(logits, labels, token_loss_sum(logits, labels))
    assert (counts.correct, counts.tokens) == (1, 3)           # [UNK] stays in the denominator
    answer = torch.tensor([[True, True, False]])
    assert exact_sequences(logits, labels, answer) == (0, 1)
    # The same answer without the [UNK] position is exact: only [UNK] made it inexact.
    assert exact_sequences(logits, labels, torch.tensor([[True, False, False]])) == (1, 1)


def test_counts_combine_token_weighted_not_as_mean_of_means():
    total = TokenCounts()
    total.add(TokenCounts(loss_sum=10.0, correct=1, tokens=10))   # mean 1.0
    total.add(TokenCounts(loss_sum=3.0, correct=1, tokens=1))     # mean 3.0
    assert math.isclose(total.loss, 13 / 11) and total.loss != 2.0


def test_window_keeps_true_per_batch_losses():
    w = Window()
    w.add_batch(TokenCounts(8.0, 2, 4), input_tokens=6, fw_ms=1.0, bw_ms=2.0)
    w.add_batch(TokenCounts(float("nan"), 0, 2), input_tokens=3, fw_ms=1.0, bw_ms=2.0)
    assert w.batch_losses() == [2.0, None]
    reduced = w.reduced()  # no process group: identity
    assert reduced.batch_losses() == [2.0, None] and reduced.input_tokens == 9


def greedy_decode(model: APTModel, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    for _ in range(steps):
        logits = model(torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_exact_match_by_teacher_forcing_equals_greedy_decoding():
    torch.manual_seed(0)
    model = APTModel(ModelSpec(vocab_size=7, d_model=16, num_heads=2, num_layers=1, d_ff=32,
                               dropout=0.0, max_seq_len=32)).eval()
    prompt = [1, 3, 4]
    with torch.no_grad():
        greedy = greedy_decode(model, prompt, steps=4)
        # A sequence whose answer IS the greedy continuation counts as exact...
        seq = torch.tensor([prompt + greedy])
        labels = seq[:, 1:].clone()
        labels[:, : len(prompt) - 1] = IGNORE_INDEX
        logits = model(seq[:, :-1])
        assert exact_sequences(logits, labels, labels != IGNORE_INDEX) == (1, 1)
        # ...and changing any one answer token makes it inexact.
        for k in range(len(greedy)):
            other = list(greedy)
            other[k] = (other[k] + 1) % 7
            seq = torch.tensor([prompt + other])
            labels = seq[:, 1:].clone()
            labels[:, : len(prompt) - 1] = IGNORE_INDEX
            assert exact_sequences(model(seq[:, :-1]), labels, labels != IGNORE_INDEX) == (0, 1)


def test_a_truncated_answer_is_never_exact():
    labels = torch.tensor([[IGNORE_INDEX, 3, 4], [IGNORE_INDEX, 3, 4]])
    logits = torch.nn.functional.one_hot(torch.tensor([[0, 3, 4], [0, 3, 4]]), 6).float()
    answer = labels != IGNORE_INDEX
    assert exact_sequences(logits, labels, answer) == (2, 2)
    # Row 1 lost the end of its answer (and its [EOS]) to max_len: its prefix is not the answer.
    assert exact_sequences(logits, labels, answer, torch.tensor([False, True])) == (1, 2)
