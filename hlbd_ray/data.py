"""HLBD data: files -> pairs -> train/val split -> token sequences -> batches.

Both HLBD shapes are read, detected per file; a file that is not exactly one of them is
refused with one line naming the file and the problem, never skipped. Everything that
crosses a process boundary (`PreparedData`) is numpy arrays and plain dicts, cheap to
pickle into Ray's object store, and every ordering (dedup, split, epoch shuffle,
sharding) depends only on the data and the seeds, so all workers see the same thing.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hlbd_ray import datagen, hlbd_data
from hlbd_ray.config import DataConfig
from hlbd_ray.datareport import describe_split
from hlbd_ray.errors import UserError
from hlbd_ray.facts import full_fact, hardcore_fact, split_pairs
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
    fact: str    # what the pair states (facts.py): pairs of one fact stay on one side of the split


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


# A Full sample's levels, in order, as the reference reads them: the prompt is the concept
# and levels 1-3, the answer levels 4-8, each (level, field, tag) one line.
_PROMPT_LEVELS = (("level_1", "字卡", "[EMOJI]"), ("level_2", "短语", "[PHRASE]"), ("level_3", "数学", ""))
_ANSWER_LEVELS = (("level_4", "拼音", "[PY]"), ("level_5", "英文", "[EN]"), ("level_6", "中文", ""),
                  ("level_7", "日文", "[JP]"), ("level_8", "韩文", "[KR]"))
_FULL_KEYS = frozenset(["concept", *(level for level, _, _ in _PROMPT_LEVELS + _ANSWER_LEVELS)])


@dataclass
class LevelCounts:
    """What the Full reader left out: samples missing each known key, and unknown keys seen."""

    missing: Counter[str] = field(default_factory=Counter)
    unknown: Counter[str] = field(default_factory=Counter)

    def to_dict(self) -> dict[str, dict[str, int]]:
        return {"missing": dict(sorted(self.missing.items())), "unknown_keys": dict(sorted(self.unknown.items()))}


def _full_pair(sample: Any, where: str, source: str, counts: LevelCounts) -> Pair:
    """Like the reference's reader: a level the sample lacks is left out of the text (and
    counted), an unknown key is ignored (and counted); a level that is present must be
    well-formed, and a sample must keep some prompt and some answer."""
    if not isinstance(sample, dict):
        raise UserError(f"{where}: must be an object, got {_kind(sample)}")
    missing, unknown = _FULL_KEYS - sample.keys(), sample.keys() - _FULL_KEYS
    if missing or unknown:
        counts.missing.update(missing)
        counts.unknown.update(unknown)

    def line(level: str, key: str, tag: str) -> list[str]:
        if level not in sample:
            return []
        node = sample[level]
        if level == "level_8" and isinstance(node, dict) and key not in node and "韩문" in node:
            # Some published files spell the Korean key half in Hangul; accept it where the
            # correct key is absent (a missing key is reported under the correct spelling).
            key = "韩문"
        text = _text(sample, (level, key), where)
        if level == "level_1":  # the emoji goes before the word card
            text = f"{_text(sample, (level, 'emoji'), where)} {text}"
        return [f"{tag} {text}" if tag else text]

    concept = _text(sample, ("concept",), where) if "concept" in sample else None
    prompt = ([concept] if concept is not None else []) + [t for spec in _PROMPT_LEVELS for t in line(*spec)]
    answer = [t for spec in _ANSWER_LEVELS for t in line(*spec)]
    for part, lines, keys in (("prompt", prompt, "'concept', 'level_1', 'level_2', 'level_3'"),
                              ("answer", answer, "'level_4' to 'level_8'")):
        if not lines:
            raise UserError(f"{where}: no {part}: the sample has none of {keys}")
    text = "\n".join(prompt)
    return Pair(text, "\n".join(answer), source, FULL_MODULE, full_fact(concept, text))


def _full_pairs(samples: Any, name: str, source: str, counts: LevelCounts) -> list[Pair]:
    if not isinstance(samples, list) or not samples:
        raise UserError(f"{name}: 'samples' must be a non-empty array, got "
                        + ("an empty array" if isinstance(samples, list) else _kind(samples)))
    return [_full_pair(sample, f"{name}: sample {i}", source, counts) for i, sample in enumerate(samples)]


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
            prompt, answer = _text(item, ("input",), where), _text(item, ("output",), where)
            pairs.append(Pair(prompt, answer, source, module, hardcore_fact(module, prompt, answer)))
    if not pairs:
        raise UserError(f"{name}: every module in 'data' is empty")
    return pairs


def parse_document(doc: Any, name: str, source: str,
                   counts: LevelCounts | None = None) -> tuple[str, list[Pair]]:
    """("full" | "hardcore", pairs) for a decoded JSON document; `name` prefixes errors.

    `counts` receives what the Full reader left out (missing levels, unknown keys).
    """
    is_object = isinstance(doc, dict)
    if is_object and "samples" in doc and "data" in doc:
        raise UserError(f"{name}: has both 'samples' (HLBD Full) and 'data' (HLBD Hardcore); "
                        "a file must be one or the other")
    if is_object and "samples" in doc:
        return "full", _full_pairs(doc["samples"], name, source, counts if counts is not None else LevelCounts())
    if is_object and "data" in doc:
        return "hardcore", _hardcore_pairs(doc["data"], name, source)
    found = f"keys {sorted(doc)[:8]}" if is_object else _kind(doc)
    raise UserError(f"{name}: not an HLBD file: expected an object with 'samples' (Full) or "
                    f"'data' (Hardcore), found {found}")


def read_file(path: str, counts: LevelCounts | None = None) -> tuple[str, list[Pair]]:
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
    return parse_document(doc, str(path), file.name, counts)


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
    sources: list[tuple[dict[str, Any], list[Pair]]] = []  # (file info, its pairs)
    if not paths:
        doc = datagen.generate(generated_per_module, seed)
        _, pairs = parse_document(doc, GENERATED, GENERATED)
        info = {"path": None, "source": GENERATED, "format": "hardcore", "seed": seed,
                "per_module": generated_per_module}
        sources.append((info, pairs))
    resolved = [hlbd_data.resolve(given) for given in paths]  # a bad name fails before any read
    for given, path in zip(paths, resolved):
        counts = LevelCounts()
        fmt, pairs = read_file(path, counts)
        # `name` keeps the config's spelling (hlbd:full), `path` the file actually read.
        info = {"path": path, "name": given, "source": Path(path).name, "format": fmt}
        sources.append(({**info, "levels": counts.to_dict()} if fmt == "full" else info, pairs))
    pairs, stats = _dedup(sources)
    levels = [f["levels"] for f in stats["files"] if "levels" in f]
    if levels:  # Full samples missing a level or carrying unknown keys, over all Full files
        stats["total"]["levels"] = {kind: dict(sum((Counter(lv[kind]) for lv in levels), Counter()))
                                    for kind in ("missing", "unknown_keys")}
    return pairs, stats


# --- sequences ------------------------------------------------------------------------

@dataclass(init=False)  # modules/truncated may be omitted, yet are always arrays once built
class EncodedSplit:
    """Sequences [BOS] prompt [SEP] answer [EOS], concatenated.

    Sequence i is tokens[offsets[i]:offsets[i + 1]]; answer_starts[i] is the index inside
    it of the first answer token (right after [SEP]). modules[i] indexes module_names
    (one list for both splits of a PreparedData), so evaluation can group by HLBD module;
    truncated[i] says max_len cut the sequence: it lost its [EOS] and the end of its answer.
    A split built by hand defaults to one module and nothing cut.
    """

    tokens: np.ndarray  # int32
    offsets: np.ndarray  # int64, len(self) + 1
    answer_starts: np.ndarray  # int32
    modules: np.ndarray  # int32, len(self)
    truncated: np.ndarray  # bool, len(self)
    module_names: tuple[str, ...]

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, answer_starts: np.ndarray,
                 modules: np.ndarray | None = None, truncated: np.ndarray | None = None,
                 module_names: tuple[str, ...] = ("all",)) -> None:
        self.tokens, self.offsets, self.answer_starts = tokens, offsets, answer_starts
        self.modules = np.zeros(len(self), dtype=np.int32) if modules is None else modules
        self.truncated = np.zeros(len(self), dtype=bool) if truncated is None else truncated
        self.module_names = module_names

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def sequence(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def encode_sequences(pairs: list[Pair], tokenizer: CharTokenizer) -> tuple[list[list[int]], list[int]]:
    """Each pair's whole sequence [BOS] prompt [SEP] answer [EOS], uncut, and its answer start."""
    seqs, starts = [], []
    for pair in pairs:
        prompt = tokenizer.encode(pair.prompt)
        answer = tokenizer.encode(pair.answer)
        seqs.append([tokenizer.bos_id, *prompt, tokenizer.sep_id, *answer, tokenizer.eos_id])
        starts.append(len(prompt) + 2)
    return seqs, starts


def pack(seqs: list[list[int]], starts: list[int], modules: list[int], module_names: tuple[str, ...],
         max_len: int) -> EncodedSplit:
    """The sequences cut at max_len (each cut one marked), as one EncodedSplit."""
    longest = max(starts, default=2) - 2
    if longest + 3 > max_len:
        raise UserError(f"train.max_len={max_len} is too short: the longest prompt has {longest} tokens "
                        f"and [BOS] prompt [SEP] plus one answer token needs {longest + 3}")
    lengths = np.asarray([len(seq) for seq in seqs], dtype=np.int64)
    kept = np.minimum(lengths, max_len)
    flat: list[int] = []
    for seq in seqs:
        flat.extend(seq[:max_len])
    return EncodedSplit(np.asarray(flat, dtype=np.int32), np.concatenate([[0], np.cumsum(kept)]).astype(np.int64),
                        np.asarray(starts, dtype=np.int32), np.asarray(modules, dtype=np.int32),
                        lengths > max_len, tuple(module_names))


def encode_pairs(pairs: list[Pair], tokenizer: CharTokenizer, max_len: int) -> EncodedSplit:
    """The pairs as one split cut at max_len; `truncated` marks each sequence cut."""
    names = tuple(dict.fromkeys(pair.module for pair in pairs))
    index = {name: i for i, name in enumerate(names)}
    return pack(*encode_sequences(pairs, tokenizer), [index[p.module] for p in pairs], names, max_len)


def auto_max_len(longest: int, cap: int) -> int:
    """The longest sequence rounded up to a multiple of 8 (tile-friendly shapes), at most `cap`."""
    return min(-(-longest // 8) * 8, cap)


# An explicit max_len (or a cap) may cut at most this share of the answers unless the
# user says train.allow_truncation=true: a cut answer is a different task, and its prefix
# could score as exact.
TRUNCATION_LIMIT = 0.01


def check_truncation(stats: dict, max_len: int | str, cap: int) -> None:
    """Refuse a max_len that cuts more than TRUNCATION_LIMIT of the answers, in one line."""
    cut = stats["truncated_train"] + stats["truncated_val"]
    total = stats["train_pairs"] + stats["val_pairs"]
    if cut <= TRUNCATION_LIMIT * total:
        return
    longest = stats["lengths"]["max"]
    if max_len == "auto":
        setting, fix = f"train.max_len=auto, capped at train.max_len_cap={cap},", f"train.max_len_cap={longest}"
    else:
        setting, fix = f"train.max_len={max_len}", "train.max_len=auto picks it"
    raise UserError(f"{setting} cuts {100 * cut / total:.1f}% of the answers ({cut} of {total}, losing their "
                    f"[EOS]); max_len {longest} would cut none ({fix}); "
                    "set train.allow_truncation=true to train on cut answers anyway")


@dataclass
class PreparedData:
    """What every worker needs, built once by the driver and shared through Ray."""

    tokenizer: dict  # CharTokenizer.to_dict()
    train: EncodedSplit
    val: EncodedSplit
    dataset_stats: dict

    def build_tokenizer(self) -> CharTokenizer:
        return CharTokenizer.from_dict(self.tokenizer)


def prepare_data(data_cfg: DataConfig, max_len: int | str = "auto", *, max_len_cap: int = 512,
                 allow_truncation: bool = False) -> PreparedData:
    """Load, split by fact, build the vocabulary from the training pairs only, and encode.

    `max_len` "auto" is auto_max_len of the data; dataset_stats["max_len"] is the length
    used. Cutting more than TRUNCATION_LIMIT of the answers is refused unless allowed.
    """
    pairs, stats = load_pairs(list(data_cfg.paths), data_cfg.generated_per_module, data_cfg.seed)
    train_pairs, val_pairs = split_pairs(pairs, data_cfg.val_fraction, data_cfg.seed)
    tokenizer = CharTokenizer.build((t for p in train_pairs for t in (p.prompt, p.answer)), data_cfg.max_vocab)
    names = tuple(dict.fromkeys(pair.module for pair in pairs))  # one module index for both splits
    index = {name: i for i, name in enumerate(names)}
    sides = {"train": train_pairs, "val": val_pairs}
    encoded = {side: encode_sequences(side_pairs, tokenizer) for side, side_pairs in sides.items()}
    lengths = {side: np.asarray([len(seq) for seq in seqs], dtype=np.int64) for side, (seqs, _) in encoded.items()}
    longest = int(max(lengths["train"].max(), lengths["val"].max()))
    length = auto_max_len(longest, max_len_cap) if max_len == "auto" else int(max_len)
    train, val = (pack(*encoded[side], [index[p.module] for p in sides[side]], names, length)
                  for side in ("train", "val"))
    stats.update({
        "train_pairs": len(train), "val_pairs": len(val), "max_len": length, "max_len_requested": max_len,
        "max_len_cap": max_len_cap, "vocab_size": len(tokenizer),
        "truncated_train": int(train.truncated.sum()), "truncated_val": int(val.truncated.sum()),
        **describe_split(train_pairs, val_pairs, lengths, tokenizer, names, length),
    })
    if not allow_truncation:
        check_truncation(stats, max_len, max_len_cap)
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
    truncated: torch.Tensor  # bool [B]: max_len cut the row's answer (never an exact match)
    modules: torch.Tensor | None = None  # int64 [B]: each row's index into the split's module_names

    def to(self, device: torch.device) -> Batch:
        return Batch(self.inputs.to(device), self.labels.to(device), self.answer.to(device),
                     self.truncated.to(device), None if self.modules is None else self.modules.to(device))


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
    return Batch(torch.from_numpy(inputs), torch.from_numpy(labels), torch.from_numpy(answer),
                 torch.from_numpy(split.truncated[rows]), torch.from_numpy(split.modules[rows].astype(np.int64)))


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
