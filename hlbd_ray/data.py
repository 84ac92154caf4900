"""HLBD data: files -> pairs -> train/val split -> token sequences -> batches.

Both HLBD shapes are read, detected per file; a file that is not exactly one of them is
refused with one line naming the file and the problem, never skipped. Everything that
crosses a process boundary (`PreparedData`) is numpy arrays and plain dicts, cheap to
pickle into Ray's object store, and every ordering (dedup, split, epoch shuffle,
sharding) depends only on the data and the seeds, so all workers see the same thing.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from hlbd_ray import datagen, hlbd_data
from hlbd_ray.config import DataConfig
from hlbd_ray.errors import UserError
from hlbd_ray.tokenizer import PAD_ID, CharTokenizer

IGNORE_INDEX = -100  # label value that cross-entropy and token accuracy skip
FULL_MODULE = "full"
GENERATED = "generated"


@dataclass(frozen=True)
class Pair:
    prompt: str
    answer: str
    source: str  # file name, or "generated"
    module: str  # Hardcore module name, or "full" for HLBD Full samples


# --- reading --------------------------------------------------------------------------

_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
               int: "a number", float: "a number", type(None): "null"}


def _kind(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _text(node: Any, keys: tuple[str, ...], where: str) -> str:
    """The string at `keys` inside `node`, or a UserError naming the key path."""
    for depth, key in enumerate(keys):
        if not isinstance(node, dict):
            raise UserError(f"{where}: '{'.'.join(keys[:depth])}' must be an object, got {_kind(node)}")
        if key not in node:
            raise UserError(f"{where}: missing key '{'.'.join(keys[:depth + 1])}'")
        node = node[key]
    if not isinstance(node, str):
        raise UserError(f"{where}: '{'.'.join(keys)}' must be a string, got {_kind(node)}")
    return node


def _full_pair(sample: Any, where: str, source: str) -> Pair:
    if not isinstance(sample, dict):
        raise UserError(f"{where}: must be an object, got {_kind(sample)}")
    level_8 = sample.get("level_8")
    # Some published files spell the Korean key half in Hangul; accept it where the
    # correct key is absent (a missing key is reported under the correct spelling).
    korean = "韩문" if isinstance(level_8, dict) and "韩文" not in level_8 and "韩문" in level_8 else "韩文"

    def get(*keys: str) -> str:
        return _text(sample, keys, where)

    prompt = [get("concept"), f"[EMOJI] {get('level_1', 'emoji')} {get('level_1', '字卡')}",
              f"[PHRASE] {get('level_2', '短语')}", get("level_3", "数学")]
    answer = [f"[PY] {get('level_4', '拼音')}", f"[EN] {get('level_5', '英文')}", get("level_6", "中文"),
              f"[JP] {get('level_7', '日文')}", f"[KR] {get('level_8', korean)}"]
    return Pair("\n".join(prompt), "\n".join(answer), source, FULL_MODULE)


def _full_pairs(samples: Any, name: str, source: str) -> list[Pair]:
    if not isinstance(samples, list) or not samples:
        raise UserError(f"{name}: 'samples' must be a non-empty array, got "
                        + ("an empty array" if isinstance(samples, list) else _kind(samples)))
    return [_full_pair(sample, f"{name}: sample {i}", source) for i, sample in enumerate(samples)]


def _hardcore_pairs(data: Any, name: str, source: str) -> list[Pair]:
    if not isinstance(data, dict) or not data:
        raise UserError(f"{name}: 'data' must be a non-empty object of modules, got "
                        + ("an empty object" if isinstance(data, dict) else _kind(data)))
    pairs = []
    for module, items in data.items():
        if not isinstance(items, list):
            raise UserError(f"{name}: 'data.{module}' must be an array of {{input, output}} objects, "
                            f"got {_kind(items)}")
        for i, item in enumerate(items):
            where = f"{name}: data.{module}[{i}]"
            if not isinstance(item, dict):
                raise UserError(f"{where}: must be an object, got {_kind(item)}")
            pairs.append(Pair(_text(item, ("input",), where), _text(item, ("output",), where), source, module))
    if not pairs:
        raise UserError(f"{name}: every module in 'data' is empty")
    return pairs


def parse_document(doc: Any, name: str, source: str) -> tuple[str, list[Pair]]:
    """("full" | "hardcore", pairs) for a decoded JSON document; `name` prefixes errors."""
    is_object = isinstance(doc, dict)
    if is_object and "samples" in doc and "data" in doc:
        raise UserError(f"{name}: has both 'samples' (HLBD Full) and 'data' (HLBD Hardcore); "
                        "a file must be one or the other")
    if is_object and "samples" in doc:
        return "full", _full_pairs(doc["samples"], name, source)
    if is_object and "data" in doc:
        return "hardcore", _hardcore_pairs(doc["data"], name, source)
    found = f"keys {sorted(doc)[:8]}" if is_object else _kind(doc)
    raise UserError(f"{name}: not an HLBD file: expected an object with 'samples' (Full) or "
                    f"'data' (Hardcore), found {found}")


def read_file(path: str) -> tuple[str, list[Pair]]:
    """("full" | "hardcore", pairs) of one HLBD JSON file; any problem is a UserError."""
    file = Path(path)
    if not file.exists():
        raise UserError(f"data file not found: {path}")
    if not file.is_file():
        raise UserError(f"data path {path} is not a file (give HLBD JSON files, not folders)")
    try:
        # utf-8-sig: a byte-order mark, as some editors write, is not an error.
        text = file.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start})") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read: {err.strerror or err}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    return parse_document(doc, str(path), file.name)


def _dedup(sources: list[tuple[dict, list[Pair]]]) -> tuple[list[Pair], dict]:
    """Keep the first of pairs with equal prompt and answer, across and within files."""
    seen: set[tuple[str, str]] = set()
    kept: list[Pair] = []
    files: list[dict] = []
    modules: Counter[str] = Counter()
    for info, pairs in sources:
        file_modules: Counter[str] = Counter()
        for pair in pairs:
            key = (pair.prompt, pair.answer)
            if key not in seen:
                seen.add(key)
                kept.append(pair)
                file_modules[pair.module] += 1
        kept_here = sum(file_modules.values())
        files.append({**info, "read": len(pairs), "pairs": kept_here,
                      "duplicates_dropped": len(pairs) - kept_here, "modules": dict(file_modules)})
        modules.update(file_modules)
    total = {"files": len(files), "pairs": len(kept), "duplicates_dropped": sum(f["duplicates_dropped"] for f in files),
             "modules": dict(modules)}
    return kept, {"files": files, "total": total}


def load_pairs(paths: list[str], generated_per_module: int, seed: int) -> tuple[list[Pair], dict]:
    """Pairs of all `paths` in order (duplicates dropped), or generated ones if `paths` is empty.

    A path is a file or the short name of a shipped file (`hlbd:full`, see hlbd_data).
    """
    sources = []
    if not paths:
        doc = datagen.generate(generated_per_module, seed)
        _, pairs = parse_document(doc, GENERATED, GENERATED)
        info = {"path": None, "source": GENERATED, "format": "hardcore", "seed": seed,
                "per_module": generated_per_module}
        sources.append((info, pairs))
    resolved = [hlbd_data.resolve(given) for given in paths]  # a bad name fails before any read
    for given, path in zip(paths, resolved):
        fmt, pairs = read_file(path)
        # `name` keeps the config's spelling (hlbd:full), `path` the file actually read.
        sources.append(({"path": path, "name": given, "source": Path(path).name, "format": fmt}, pairs))
    return _dedup(sources)


def split_pairs(pairs: list[Pair], val_fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(train, val): a seeded random hold-out; both keep the input order."""
    n = len(pairs)
    if n < 2:
        raise UserError(f"need at least 2 pairs for a train/validation split, got {n}")
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    order = list(range(n))
    # A string seed is hashed with SHA-512, the same in every process and Python build.
    random.Random(f"hlbd-split:{seed}").shuffle(order)
    held_out = set(order[:n_val])
    train = [pair for i, pair in enumerate(pairs) if i not in held_out]
    val = [pair for i, pair in enumerate(pairs) if i in held_out]
    return train, val


# --- sequences ------------------------------------------------------------------------

@dataclass
class EncodedSplit:
    """Sequences [BOS] prompt [SEP] answer [EOS], concatenated.

    Sequence i is tokens[offsets[i]:offsets[i + 1]]; answer_starts[i] is the index inside
    it of the first answer token (right after [SEP]).
    """

    tokens: np.ndarray  # int32
    offsets: np.ndarray  # int64, len(self) + 1
    answer_starts: np.ndarray  # int32

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def sequence(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def encode_pairs(pairs: list[Pair], tokenizer: CharTokenizer, max_len: int) -> tuple[EncodedSplit, int]:
    """(split, number of sequences cut); a long answer is cut at max_len, losing [EOS]."""
    prompts = [tokenizer.encode(pair.prompt) for pair in pairs]
    longest = max((len(p) for p in prompts), default=0)
    if longest + 3 > max_len:
        raise UserError(f"train.max_len={max_len} is too short: the longest prompt has {longest} tokens "
                        f"and [BOS] prompt [SEP] plus one answer token needs {longest + 3}")
    flat: list[int] = []
    offsets, starts, truncated = [0], [], 0
    for pair, prompt in zip(pairs, prompts):
        seq = [tokenizer.bos_id, *prompt, tokenizer.sep_id, *tokenizer.encode(pair.answer), tokenizer.eos_id]
        if len(seq) > max_len:
            seq, truncated = seq[:max_len], truncated + 1
        flat.extend(seq)
        offsets.append(len(flat))
        starts.append(len(prompt) + 2)
    split = EncodedSplit(np.asarray(flat, dtype=np.int32), np.asarray(offsets, dtype=np.int64),
                         np.asarray(starts, dtype=np.int32))
    return split, truncated


@dataclass
class PreparedData:
    """What every worker needs, built once by the driver and shared through Ray."""

    tokenizer: dict  # CharTokenizer.to_dict()
    train: EncodedSplit
    val: EncodedSplit
    dataset_stats: dict

    def build_tokenizer(self) -> CharTokenizer:
        return CharTokenizer.from_dict(self.tokenizer)


def prepare_data(data_cfg: DataConfig, max_len: int) -> PreparedData:
    """Load, split, build the vocabulary from the training pairs only, and encode."""
    pairs, stats = load_pairs(list(data_cfg.paths), data_cfg.generated_per_module, data_cfg.seed)
    train_pairs, val_pairs = split_pairs(pairs, data_cfg.val_fraction, data_cfg.seed)
    tokenizer = CharTokenizer.build((t for p in train_pairs for t in (p.prompt, p.answer)), data_cfg.max_vocab)
    train, train_cut = encode_pairs(train_pairs, tokenizer, max_len)
    val, val_cut = encode_pairs(val_pairs, tokenizer, max_len)
    stats.update({
        "train_pairs": len(train), "val_pairs": len(val), "max_len": max_len, "vocab_size": len(tokenizer),
        "truncated_train": train_cut, "truncated_val": val_cut,
        # Validation characters the training vocabulary never saw.
        "val_unk_tokens": int(np.count_nonzero(val.tokens == tokenizer.unk_id)),
    })
    return PreparedData(tokenizer.to_dict(), train, val, stats)


# --- batches --------------------------------------------------------------------------

def _rank_rows(n: int, *, seed: int, epoch: int, shuffle: bool, rank: int, world_size: int) -> np.ndarray:
    """This rank's rows for the epoch, sharded like torch's DistributedSampler."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    order = np.random.default_rng([seed % 2**63, epoch]).permutation(n) if shuffle else np.arange(n)
    # Wrap around so every rank gets the same number of rows, hence of batches: a rank
    # with one batch fewer would leave the others waiting in all-reduce forever.
    total = -(-n // world_size) * world_size
    return np.resize(order, total)[rank::world_size]


def num_batches(split: EncodedSplit, batch_size: int, world_size: int = 1) -> int:
    """Batches per rank in one epoch (the last, partial batch included)."""
    per_rank = -(-len(split) // world_size)
    return -(-per_rank // batch_size)


@dataclass
class Batch:
    """One micro-batch, each tensor [B, T] with T the longest sequence in it minus one."""

    inputs: torch.Tensor   # token ids, right-padded with [PAD]
    labels: torch.Tensor   # the next token; IGNORE_INDEX where no loss is taken
    answer: torch.Tensor   # bool: the next token is an answer token or its [EOS]

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.inputs.to(device), self.labels.to(device), self.answer.to(device))


def make_batch(split: EncodedSplit, rows: np.ndarray, loss_on: str = "answer") -> Batch:
    """The batch of `rows`: inputs, labels and the answer mask.

    Labels hold IGNORE_INDEX at padding and, with loss_on="answer", wherever the next
    token is still prompt or [SEP]. The answer mask does not depend on loss_on: exact
    match always scores the answer alone.
    """
    if loss_on not in ("answer", "all"):
        raise ValueError(f"loss_on must be 'answer' or 'all', got {loss_on!r}")
    rows = np.asarray(rows)
    starts, ends = split.offsets[rows], split.offsets[rows + 1]
    width = int((ends - starts).max()) - 1
    inputs = np.full((len(rows), width), PAD_ID, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    answer = np.zeros((len(rows), width), dtype=bool)
    for r, (row, start, end) in enumerate(zip(rows, starts, ends)):
        seq, n = split.tokens[start:end], end - start - 1
        inputs[r, :n] = seq[:-1]
        labels[r, :n] = seq[1:]
        # labels[j] is token j + 1: the first answer token is predicted at j = start - 1.
        answer[r, split.answer_starts[row] - 1:n] = True
    if loss_on == "answer":
        labels[~answer] = IGNORE_INDEX
    return Batch(torch.from_numpy(inputs), torch.from_numpy(labels), torch.from_numpy(answer))


def iter_batches(split: EncodedSplit, batch_size: int, *, seed: int, epoch: int, shuffle: bool,
                 rank: int = 0, world_size: int = 1, loss_on: str = "answer",
                 start_batch: int = 0) -> Iterator[Batch]:
    """This rank's batches of one epoch; `start_batch` skips the first k (mid-epoch resume).

    The permutation depends on (seed, epoch) only, so every rank computes the same one
    and takes its own stride of it; skipping is slicing, no batch is built and thrown away.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    rows = _rank_rows(len(split), seed=seed, epoch=epoch, shuffle=shuffle, rank=rank, world_size=world_size)
    for begin in range(start_batch * batch_size, len(rows), batch_size):
        yield make_batch(split, rows[begin:begin + batch_size], loss_on)
