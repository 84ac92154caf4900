"""Facts: which pairs state the same thing, and a split that keeps each fact on one side.

HLBD states one fact in several wordings ("苹果用英文怎么说？" and "苹果的英文是？" both
ask for "Apple"). A split of single pairs puts such rewordings on both sides, and the
validation metrics then measure recall of a training pair instead of generalisation.
Every pair therefore carries a fact key, and the split assigns whole facts.

The rules, per module (the reader computes the key when it builds the pair):

- `full` (HLBD Full): the concept. A sample is one concept told in eight levels; the
  published V2 file has 5,000 samples and 5,000 distinct concepts. A sample without a
  concept is its own fact (its whole prompt).
- `zodiac`: if the prompt names an animal, that animal and the answer. For "X后面第k个",
  "X的下一个", "X往前数k个" the pair (X, answer) fixes the step modulo 12, so
  "马的下一个生肖是？", "马后面第1个是什么？" and "马之后是什么？" are one fact; the rule
  also covers "X的五行属性是？". Otherwise (a year, a position in the cycle): the numbers
  of the prompt and the answer, so "2101年属什么？" and "2101年是什么生肖年？" are one
  fact, 2101 and 2113 two.
- every other module (geometry, arithmetic, physics, reverse_english, and modules this
  code does not know): the answer and the numbers of the prompt, sorted. The templates
  change the words and the order of the operands, never the operands or the answer:
  "长20宽5的长方形面积" and "长方形长5宽20，面积是？" (100), "三角形的两个角是39°和107°"
  and "一个三角形有一个107度的角，另一个39度的角" (34度), "物体运动233米用了19秒" and
  "一辆小车19秒行驶了233米" are one fact each. reverse_english prompts hold no digits, so
  its key is the English answer: every wording of "苹果" is one fact (and a synonym with
  the same answer, 父亲/爸爸 -> Father, joins it: a merge only makes the split stricter).

Answers compare case-, space- and final-punctuation-insensitively; numbers compare by
value (7 and 7.0 are one). A key that merges two facts by coincidence (a 4x4 square's
area and perimeter are both 16) keeps both on one side, which is the safe direction.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Sequence
from decimal import Decimal
from typing import Protocol, TypeVar

from hlbd_ray.errors import UserError

ZODIAC_ANIMALS = frozenset("鼠牛虎兔龙蛇马羊猴鸡狗猪")
_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?")  # ASCII digits: "m²" and "cm³" are units, not numbers
_SPACE = re.compile(r"\s+")
_FINAL_PUNCTUATION = ".。!！?？"


class HasFact(Protocol):
    # Read-only, so frozen dataclasses (data.Pair) match too.
    @property
    def module(self) -> str: ...

    @property
    def fact(self) -> str: ...


P = TypeVar("P", bound=HasFact)


def normalise(text: str) -> str:
    return _SPACE.sub("", text).casefold().rstrip(_FINAL_PUNCTUATION)


def _numbers(text: str) -> str:
    return ",".join(sorted(format(Decimal(n).normalize(), "f") for n in _NUMBER.findall(text)))


def full_fact(concept: str | None, prompt: str) -> str:
    """A Full sample's key: its concept, or its whole prompt when it has none."""
    return normalise(concept) if concept is not None else "prompt:" + normalise(prompt)


def hardcore_fact(module: str, prompt: str, answer: str) -> str:
    """A Hardcore (or generated) pair's key, by the module's rule in the module docstring."""
    if module == "zodiac":
        animals = "".join(char for char in prompt if char in ZODIAC_ANIMALS)
        if animals:
            return f"{animals}->{normalise(answer)}"
    return f"{normalise(answer)}|{_numbers(prompt)}"


def _rank(seed: int, module: str, fact: str) -> bytes:
    # A keyed hash, not Python's hash(): the same order in every process and Python build,
    # and independent of the order in which the pairs were read.
    return hashlib.blake2b(f"{seed}\x00{module}\x00{fact}".encode(), digest_size=8).digest()


def split_pairs(pairs: Sequence[P], val_fraction: float, seed: int) -> tuple[list[P], list[P]]:
    """(train, val) by fact: every fact lies wholly on one side; both keep the input order.

    Per module, facts are taken in a seeded hash order until the module's validation
    share reaches val_fraction of its pairs (at least one fact, never its last one), so
    each module with two facts or more is validated, and in proportion.
    """
    facts: dict[tuple[str, str], list[int]] = {}
    for i, pair in enumerate(pairs):
        facts.setdefault((pair.module, pair.fact), []).append(i)
    by_module: dict[str, list[tuple[str, str]]] = {}
    for key in facts:
        by_module.setdefault(key[0], []).append(key)
    held_out: set[int] = set()
    for keys in by_module.values():
        target = max(1, round(val_fraction * sum(len(facts[k]) for k in keys)))
        keys.sort(key=lambda k: (_rank(seed, *k), k))
        taken = 0
        for key in keys[:-1]:
            if taken >= target:
                break
            held_out.update(facts[key])
            taken += len(facts[key])
    if not held_out:
        raise UserError(f"need at least 2 distinct facts in one module for a train/validation split, "
                        f"got {len(facts)} fact(s) in {len(pairs)} pair(s)")
    train = [pair for i, pair in enumerate(pairs) if i not in held_out]
    val = [pair for i, pair in enumerate(pairs) if i in held_out]
    return train, val


def twins_in_train(train: Sequence[HasFact], val: Sequence[HasFact]) -> Counter[str]:
    """Per module, validation pairs whose fact also appears in training (0 after split_pairs)."""
    seen = {(pair.module, pair.fact) for pair in train}
    return Counter(pair.module for pair in val if (pair.module, pair.fact) in seen)
