"""The data report: what a run is about to learn, before it spends an hour learning it.

`describe_split` computes, per HLBD module, the pairs and facts on each side of the
split, the validation pairs whose fact is also in training (0: the split is by fact),
the sequence lengths before any cut (p50, p99, max), how many sequences max_len cuts, and
the validation characters the training vocabulary lacks; prepare_data merges it into
dataset_stats. `format_table` prints it for the console and `write_report` writes it as
dataset_report.json.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hlbd_ray.facts import twins_in_train
from hlbd_ray.files import atomic_write_json
from hlbd_ray.tokenizer import CharTokenizer

if TYPE_CHECKING:
    from hlbd_ray.data import Pair

REPORT_FILE = "dataset_report.json"
REPORT_FORMAT = "hlbd_ray.dataset_report/1"
TOP_UNKNOWN = 20  # unknown characters listed by name (all are counted)


def length_stats(lengths: np.ndarray) -> dict[str, int | None]:
    """p50, p99 and max of sequence lengths, each a length that occurs (inverted CDF)."""
    if not len(lengths):
        return {"p50": None, "p99": None, "max": None}
    p50, p99 = np.percentile(lengths, [50, 99], method="inverted_cdf")
    return {"p50": int(p50), "p99": int(p99), "max": int(lengths.max())}


def describe_split(train: Sequence[Pair], val: Sequence[Pair], lengths: dict[str, np.ndarray],
                   tokenizer: CharTokenizer, modules: Sequence[str], max_len: int) -> dict[str, Any]:
    """The report's numbers; `lengths` holds each side's uncut sequence lengths."""
    unknown = [tokenizer.unknown(p.prompt) + tokenizer.unknown(p.answer) for p in val]
    twins = twins_in_train(train, val)
    rows = {}
    for module in modules:
        t = np.asarray([p.module == module for p in train], dtype=bool)
        v = np.asarray([p.module == module for p in val], dtype=bool)
        train_facts = {p.fact for p in train if p.module == module}
        val_facts = {p.fact for p in val if p.module == module}
        both = np.concatenate([lengths["train"][t], lengths["val"][v]])
        rows[module] = {
            "pairs": int(t.sum() + v.sum()), "facts": len(train_facts | val_facts),
            "train_pairs": int(t.sum()), "val_pairs": int(v.sum()),
            "train_facts": len(train_facts), "val_facts": len(val_facts),
            "val_with_train_twin": twins[module],
            "length": length_stats(both), "truncated": int((both > max_len).sum()),
            "val_unk_tokens": sum(len(u) for u, p in zip(unknown, val) if p.module == module),
        }
    everything = np.concatenate([lengths["train"], lengths["val"]])
    chars = Counter(char for found in unknown for char in found)
    return {
        "split": {"by": "fact",
                  "train": {"pairs": len(train), "facts": sum(r["train_facts"] for r in rows.values())},
                  "val": {"pairs": len(val), "facts": sum(r["val_facts"] for r in rows.values())},
                  "val_with_train_twin": sum(twins.values())},
        "modules": rows,
        # Tokens of [BOS] prompt [SEP] answer [EOS] before max_len cuts anything.
        "lengths": length_stats(everything),
        "truncated_share": float((everything > max_len).mean()) if len(everything) else 0.0,
        "val_unk_tokens": sum(chars.values()),
        "val_unk_pairs": sum(bool(found) for found in unknown),
        "val_unk_chars": dict(sorted(chars.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_UNKNOWN]),
    }


def _num(value: Any) -> str:
    return "-" if value is None else str(value)


def format_table(stats: dict[str, Any]) -> str:
    """A short console table of the report, one row per module and a total."""
    head = (f"{'module':<16} {'pairs':>6} {'facts':>6} {'train':>6} {'val':>5} {'val facts':>9} "
            f"{'twins':>5} {'len p50':>7} {'p99':>4} {'max':>4} {'cut':>5} {'val unk':>7}")
    lines = [head]
    rows = dict(stats["modules"])
    split = stats["split"]
    rows["all"] = {"pairs": split["train"]["pairs"] + split["val"]["pairs"],
                   "facts": split["train"]["facts"] + split["val"]["facts"],
                   "train_pairs": split["train"]["pairs"], "val_pairs": split["val"]["pairs"],
                   "val_facts": split["val"]["facts"], "val_with_train_twin": split["val_with_train_twin"],
                   "length": stats["lengths"], "truncated": stats["truncated_train"] + stats["truncated_val"],
                   "val_unk_tokens": stats["val_unk_tokens"]}
    for name, r in rows.items():
        n = r["length"]
        lines.append(f"{name:<16} {r['pairs']:>6} {r['facts']:>6} {r['train_pairs']:>6} {r['val_pairs']:>5} "
                     f"{r['val_facts']:>9} {r['val_with_train_twin']:>5} {_num(n['p50']):>7} "
                     f"{_num(n['p99']):>4} {_num(n['max']):>4} {r['truncated']:>5} {r['val_unk_tokens']:>7}")
    mode = "auto" if stats["max_len_requested"] == "auto" else "explicit"
    lines.append(f"lengths in tokens of [BOS] prompt [SEP] answer [EOS]; max_len {stats['max_len']} ({mode}) "
                 f"cuts {rows['all']['truncated']} ({100 * stats['truncated_share']:.1f}%); "
                 "twins: validation pairs whose fact is also in training")
    if stats["val_unk_chars"]:
        shown = ", ".join(f"{char!r} {count}" for char, count in stats["val_unk_chars"].items())
        lines.append(f"validation characters missing from the training vocabulary: {stats['val_unk_tokens']} "
                     f"in {stats['val_unk_pairs']} pairs ({shown})")
    levels = stats["total"].get("levels")
    if levels and (levels["missing"] or levels["unknown_keys"]):
        missing = ", ".join(f"{k} {v}" for k, v in levels["missing"].items()) or "none"
        unknown = ", ".join(f"{k} {v}" for k, v in levels["unknown_keys"].items()) or "none"
        lines.append(f"Full samples without a level (left out of their text): {missing}; "
                     f"unknown keys (ignored): {unknown}")
    return "\n".join(lines)


def write_report(folder: str | Path, stats: dict[str, Any]) -> Path:
    """dataset_report.json in `folder`, written atomically."""
    return atomic_write_json(Path(folder) / REPORT_FILE, {"format": REPORT_FORMAT, **stats})
