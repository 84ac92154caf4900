"""A character tokenizer whose ids are the same in every run and every process.

Ids: the special tokens first ([PAD] is 0), then the HLBD tags, then characters sorted
by (-count, character). Counting and sorting never look at input order or at Python's
string hashing, so workers that build it separately agree, and a checkpoint's saved
vocabulary decodes the same ids later. Newlines are ordinary characters (the HLBD
answers are one language per line, and the line structure is part of what is learnt).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NoReturn

from hlbd_ray.errors import UserError
from hlbd_ray.files import atomic_write_json

PAD, UNK, BOS, EOS, SEP = "[PAD]", "[UNK]", "[BOS]", "[EOS]", "[SEP]"
SPECIALS = (PAD, UNK, BOS, EOS, SEP)
# from_dict insists on this order, so [PAD] is id 0 and [UNK] id 1 in every vocabulary.
PAD_ID = SPECIALS.index(PAD)
UNK_ID = SPECIALS.index(UNK)
TAGS = ("[EMOJI]", "[PHRASE]", "[EN]", "[PY]", "[JP]", "[KR]")
_FORMAT = "hlbd_ray.char_tokenizer/1"
# Only tags are recognised inside text: a literal "[SEP]" typed in a data file stays
# five characters, so data can never inject a structural token.
_TAG_SPLIT = re.compile("(" + "|".join(re.escape(tag) for tag in TAGS) + ")")
_TAG_SET = frozenset(TAGS)


def _pieces(text: str) -> Iterable[str]:
    """Tags whole, everything else one character at a time."""
    for part in _TAG_SPLIT.split(text):
        if part in _TAG_SET:
            yield part
        else:
            yield from part


class CharTokenizer:
    def __init__(self, tokens: Sequence[str]):
        self._tokens = list(tokens)
        self._ids = {token: i for i, token in enumerate(self._tokens)}
        self._unk = self._ids[UNK]
        self._skipped = frozenset(self._ids[t] for t in (PAD, BOS, EOS, SEP))

    @classmethod
    def build(cls, texts: Iterable[str], max_vocab: int) -> CharTokenizer:
        """Vocabulary of at most `max_vocab` ids; the rarest characters beyond it become [UNK]."""
        reserved = len(SPECIALS) + len(TAGS)
        if max_vocab <= reserved:
            raise UserError(f"data.max_vocab={max_vocab} leaves no room for characters: "
                            f"{reserved} ids are special tokens and tags")
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(piece for piece in _pieces(text) if piece not in _TAG_SET)
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        chars = [char for char, _ in ranked[: max_vocab - reserved]]
        return cls(list(SPECIALS) + list(TAGS) + chars)

    def __len__(self) -> int:
        return len(self._tokens)

    @property
    def pad_id(self) -> int:
        return self._ids[PAD]

    @property
    def unk_id(self) -> int:
        return self._unk

    @property
    def bos_id(self) -> int:
        return self._ids[BOS]

    @property
    def eos_id(self) -> int:
        return self._ids[EOS]

    @property
    def sep_id(self) -> int:
        return self._ids[SEP]

    def encode(self, text: str) -> list[int]:
        ids, unk = self._ids, self._unk
        return [ids.get(piece, unk) for piece in _pieces(text)]

    def unknown(self, text: str) -> list[str]:
        """The characters of `text` that encode to [UNK] (the vocabulary lacks them)."""
        return [piece for piece in _pieces(text) if piece not in self._ids]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text for `ids`; [PAD], [BOS], [EOS] and [SEP] are left out unless skip_special is False.

        [UNK] always shows: it stands for content the vocabulary could not hold.
        """
        tokens = self._tokens
        return "".join(tokens[i] for i in ids if not (skip_special and i in self._skipped))

    def to_dict(self) -> dict:
        return {"format": _FORMAT, "tokens": list(self._tokens)}

    @classmethod
    def from_dict(cls, values: object) -> CharTokenizer:
        """Inverse of `to_dict`; anything but a vocabulary this class could have built is refused."""
        if not isinstance(values, dict):
            raise UserError("invalid tokenizer vocabulary: not a JSON object")
        _check(values.get("format") == _FORMAT, f"format is {values.get('format')!r}, expected {_FORMAT!r}")
        tokens = values.get("tokens")
        if not (isinstance(tokens, list) and all(isinstance(t, str) for t in tokens)):
            _fail("'tokens' must be a list of strings")  # an `if`, so the type checker sees a list below
        head = len(SPECIALS) + len(TAGS)
        _check(tuple(tokens[:head]) == SPECIALS + TAGS, f"the first {head} tokens must be {list(SPECIALS + TAGS)}")
        chars = tokens[head:]
        bad = next((t for t in chars if len(t) != 1), None)
        _check(bad is None, f"token {bad!r} is not a single character")
        _check(len(set(chars)) == len(chars), "duplicate tokens")
        return cls(tokens)

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> CharTokenizer:
        try:
            values = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"tokenizer file {path}: {err}") from None
        try:
            return cls.from_dict(values)
        except UserError as err:
            raise UserError(f"tokenizer file {path}: {err}") from None


def _check(ok: bool, problem: str) -> None:
    if not ok:
        _fail(problem)


def _fail(problem: str) -> NoReturn:
    raise UserError(f"invalid tokenizer vocabulary: {problem}")
