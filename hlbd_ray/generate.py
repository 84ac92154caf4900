"""Using a trained model: load a checkpoint and greedily decode answers to prompts.

Decoding builds the sequence exactly as training does (`[BOS] prompt [SEP]`, then the
answer until `[EOS]`, `hlbd_ray/data.py`) with the checkpoint's own vocabulary, and stops
at `[EOS]` or at the model's context (`train.max_len`): an answer cut there is marked,
never passed off as complete. `exact_by_decoding` scores a split this way; the tests
hold it against the teacher-forced `val_exact` a run reports.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hlbd_ray.checkpoint import CheckpointError, load_state
from hlbd_ray.config import from_dict
from hlbd_ray.data import EncodedSplit, iter_batches
from hlbd_ray.errors import UserError
from hlbd_ray.metrics import TokenCounts, count_tokens, token_loss_sum
from hlbd_ray.model import ModelSpec, build_model
from hlbd_ray.precision import resolve_precision
from hlbd_ray.session import autocast
from hlbd_ray.storage import is_uri, local_copy
from hlbd_ray.tokenizer import PAD_ID, CharTokenizer

DECODE_BATCH = 64  # prompts decoded side by side


def best_checkpoint(experiment: str | Path) -> str | Path:
    """The checkpoint a sweep folder's `best.json` names (its `checkpoint` key): a local
    folder, or a URI when the sweep's storage_path was one."""
    path = Path(experiment) / "best.json"
    if not path.is_file():
        raise UserError(f"no best.json in {experiment}: not a finished sweep folder (or give --checkpoint)")
    try:
        best = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: unreadable: {err}") from None
    checkpoint = best.get("checkpoint") if isinstance(best, dict) else None
    if not isinstance(checkpoint, str) or not checkpoint:
        raise UserError(f"{path} names no checkpoint")
    return checkpoint if is_uri(checkpoint) else Path(checkpoint)


@dataclass
class Decoder:
    """A checkpoint's model and vocabulary, ready to decode."""

    model: torch.nn.Module
    tokenizer: CharTokenizer
    max_len: int        # the model's context: [BOS] prompt [SEP] answer [EOS] fits in it
    precision: str      # resolved: fp32, bf16 or fp16
    device: torch.device

    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu", precision: str | None = None) -> Decoder:
        """The model of checkpoint `folder` (loaded with weights_only=True), in eval mode.

        `precision` None: the run's own `train.precision`, resolved for this device.
        `folder` may be a URI in storage (s3://...): it is fetched into a temporary folder.
        """
        if is_uri(str(folder)):
            with local_copy(str(folder)) as local:
                return cls.load(local, device, precision)
        state = load_state(folder)
        cfg = from_dict(state["config"])
        tokenizer = CharTokenizer.from_dict(state["tokenizer"])
        spec = ModelSpec.from_config(cfg.model, len(tokenizer), cfg.train.max_len)
        model = build_model(spec, cfg.model.factory)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as err:
            raise CheckpointError(f"checkpoint {folder} does not fit its own config's model: "
                                  f"{str(err).splitlines()[0]}") from None
        target = torch.device(device)
        return cls(model.to(target).eval(), tokenizer, spec.max_seq_len,
                   resolve_precision(precision or str(cfg.train.precision), target), target)

    def prefix(self, prompt: str) -> list[int]:
        """`[BOS] prompt [SEP]`, the layout `data.encode_pairs` trains on."""
        tok = self.tokenizer
        return [tok.bos_id, *tok.encode(prompt), tok.sep_id]

    def decode(self, prefixes: Sequence[Sequence[int]]) -> list[list[int]]:
        """Greedy continuations of `prefixes`, each ending with [EOS] unless the context ran out."""
        out: list[list[int]] = []
        for begin in range(0, len(prefixes), DECODE_BATCH):
            out.extend(self._decode_batch(prefixes[begin:begin + DECODE_BATCH]))
        return out

    @torch.no_grad()
    def _decode_batch(self, prefixes: Sequence[Sequence[int]]) -> list[list[int]]:
        """Rows right-padded in one buffer; each step runs the rows still going and appends
        the argmax at each row's own last position (causal: padding after it cannot matter)."""
        ids = torch.full((len(prefixes), self.max_len), PAD_ID, dtype=torch.long)
        for row, prefix in enumerate(prefixes):
            ids[row, :len(prefix)] = torch.as_tensor(prefix, dtype=torch.long)
        ids = ids.to(self.device)
        starts = torch.as_tensor([len(p) for p in prefixes], device=self.device)
        lengths = starts.clone()
        going = lengths < self.max_len
        while bool(going.any()):
            rows = going.nonzero().squeeze(1)
            with autocast(self.precision, self.device):
                logits = self.model(ids[rows, :int(lengths[rows].max())])
            tokens = logits[torch.arange(len(rows), device=self.device), lengths[rows] - 1].argmax(-1)
            ids[rows, lengths[rows]] = tokens
            lengths[rows] += 1
            going[rows] = (tokens != self.tokenizer.eos_id) & (lengths[rows] < self.max_len)
        return [ids[r, int(starts[r]):int(lengths[r])].tolist() for r in range(len(prefixes))]

    def answer(self, prompts: Sequence[str]) -> list[tuple[str, bool]]:
        """(answer text, complete) per prompt; complete is False where the context ran out."""
        eos = self.tokenizer.eos_id
        return [(self.tokenizer.decode(tokens), tokens[-1:] == [eos])
                for tokens in self.decode([self.prefix(p) for p in prompts])]

    @torch.no_grad()
    def validation_loss(self, split: EncodedSplit, loss_on: str = "answer", batch_size: int = 64) -> float | None:
        """The token-weighted mean loss over `split`, as a run's validation computes it
        (dropout off, the labels `loss_on` selects): a checkpoint re-scored on its own.
        None when no token counts or the loss is not finite (as a run reports it)."""
        counts = TokenCounts()
        for batch in iter_batches(split, batch_size, seed=0, epoch=0, shuffle=False, loss_on=loss_on):
            b = batch.to(self.device)
            with autocast(self.precision, self.device):
                logits = self.model(b.inputs)
            counts.add(count_tokens(logits, b.labels, token_loss_sum(logits, b.labels)))
        return counts.loss

    def exact_by_decoding(self, split: EncodedSplit) -> np.ndarray:
        """Per sequence of `split`: does greedy decoding reproduce its answer and [EOS]?

        Never for an answer that holds [UNK] (the model can only print "[UNK]") or one
        that max_len cut (no [EOS] to reproduce)."""
        seqs = [split.sequence(i).tolist() for i in range(len(split))]
        starts = [int(s) for s in split.answer_starts]
        decoded = self.decode([seq[:start] for seq, start in zip(seqs, starts)])
        tok = self.tokenizer
        return np.array([got == seq[start:] and seq[-1] == tok.eos_id and tok.unk_id not in seq[start:]
                         for got, seq, start in zip(decoded, seqs, starts)], dtype=bool)


def read_prompts(arguments: Sequence[str], file: str | None = None) -> list[tuple[str, str]]:
    """(where, prompt) from the arguments, then from `file`, one per line. A literal `\\n`
    stands for a newline, so multi-line prompts (HLBD Full) fit on one line."""
    items = [(f"prompt argument {i + 1}", text) for i, text in enumerate(arguments)]
    if file is not None:
        try:
            lines = Path(file).read_text(encoding="utf-8-sig").splitlines()
        except FileNotFoundError:
            raise UserError(f"prompt file not found: {file}") from None
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"prompt file {file}: {err}") from None
        items += [(f"{file} line {i + 1}", line) for i, line in enumerate(lines)]
    if not items:
        raise UserError("no prompts: give them as arguments or in a file (--file)")
    for where, text in items:
        if not text.strip():
            raise UserError(f"{where}: empty prompt")
    return [(where, text.replace("\\n", "\n")) for where, text in items]


def check_prompts(decoder: Decoder, prompts: Sequence[tuple[str, str]]) -> list[str]:
    """Refuse a prompt the model's context cannot hold (the rule training's data applies);
    returns one note per prompt with characters the vocabulary lacks."""
    notes = []
    for where, text in prompts:
        prefix = decoder.prefix(text)
        if len(prefix) + 1 > decoder.max_len:
            raise UserError(f"{where}: the prompt is {len(prefix) - 2} tokens; the model's context of "
                            f"{decoder.max_len} holds prompts of at most {decoder.max_len - 3} "
                            "([BOS] prompt [SEP] and one answer token)")
        unknown = prefix.count(decoder.tokenizer.unk_id)
        if unknown:
            notes.append(f"note: {where}: {unknown} characters unknown to the model's vocabulary became [UNK]")
    return notes
