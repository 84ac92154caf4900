"""The character tokenizer: stable ids, tags as tokens, round trips, refused tampering."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hlbd_ray.errors import UserError
from hlbd_ray.tokenizer import PAD_ID, SPECIALS, TAGS, CharTokenizer

TEXTS = ["视频聊天\n[EMOJI] 📹 视频聊天", "[PY] shì pín\n[EN] Video chat", "[JP] ビデオ通話\n[KR] 영상통화", "45 + 42 = ?"]
SAMPLE = "[EN] Video chat\n[KR] 영상통화 📹"


def build() -> CharTokenizer:
    return CharTokenizer.build(TEXTS, max_vocab=1000)


def test_specials_and_tags_have_fixed_ids():
    tok = build()
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.sep_id) == (0, 1, 2, 3, 4) == tuple(range(5))
    assert PAD_ID == tok.pad_id
    assert tok.to_dict()["tokens"][:11] == list(SPECIALS + TAGS)


def test_order_is_by_count_then_character_whatever_the_input_order():
    tok = build()
    assert CharTokenizer.build(list(reversed(TEXTS)), 1000).to_dict() == tok.to_dict()
    chars = tok.to_dict()["tokens"][11:]
    counts = {c: sum(t.count(c) for t in TEXTS) for c in chars}
    assert chars == sorted(chars, key=lambda c: (-counts[c], c))
    assert "[" not in chars  # tag text is never counted as characters


_CHILD = (
    "import json; from hlbd_ray.tokenizer import CharTokenizer;"
    "texts = json.loads(input()); tok = CharTokenizer.build(set(texts), 1000);"
    "print(json.dumps([tok.to_dict(), tok.encode(texts[0])]))"
)


@pytest.mark.parametrize("hash_seed", ["1", "4242"])
def test_same_ids_in_a_process_with_another_hash_seed(hash_seed):
    # The child builds from a set: its iteration order follows the string hash seed.
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    out = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps([SAMPLE] + TEXTS), env=env,
                         capture_output=True, text=True, check=True).stdout
    vocab, ids = json.loads(out)
    here = CharTokenizer.build(TEXTS + [SAMPLE], 1000)
    assert vocab == here.to_dict()
    assert ids == here.encode(SAMPLE)


def test_tags_are_single_tokens_and_specials_in_text_are_not():
    tok = build()
    vocab = tok.to_dict()["tokens"]
    ids = tok.encode("[EN]Vi[KR]")
    assert [vocab[i] for i in ids] == ["[EN]", "V", "i", "[KR]"]
    # A literal "[SEP]" in the data is five characters, never the separator.
    assert tok.sep_id not in tok.encode("a[SEP]b") and len(tok.encode("a[SEP]b")) == 7


def test_newline_is_a_token_and_round_trip_is_exact():
    tok = build()
    assert tok.encode("a\nb")[1] == tok.to_dict()["tokens"].index("\n")
    for text in TEXTS + [SAMPLE]:
        assert tok.decode(tok.encode(text)) == text


def test_decode_skips_structural_tokens_but_shows_unknowns():
    tok = build()
    ids = [tok.bos_id, *tok.encode("45"), tok.sep_id, tok.unk_id, tok.eos_id, tok.pad_id]
    assert tok.decode(ids) == "45[UNK]"
    assert tok.decode(ids, skip_special=False) == "[BOS]45[SEP][UNK][EOS][PAD]"


def test_rarest_characters_beyond_max_vocab_become_unk():
    tok = CharTokenizer.build(["aaab", "bbc", "d"], max_vocab=len(SPECIALS) + len(TAGS) + 2)
    assert len(tok) == 13
    assert tok.to_dict()["tokens"][11:] == ["a", "b"]  # a and b tie at 3: character order
    assert tok.encode("abcd") == [11, 12, tok.unk_id, tok.unk_id]
    with pytest.raises(UserError, match="max_vocab"):
        CharTokenizer.build(["abc"], max_vocab=11)


def test_save_and_load_round_trip(tmp_path):
    tok = build()
    path = tok.save(tmp_path / "sub" / "tokenizer.json")
    loaded = CharTokenizer.load(path)
    assert loaded.to_dict() == tok.to_dict() and loaded.encode(SAMPLE) == tok.encode(SAMPLE)


def _tampered(change):
    values = build().to_dict()
    change(values)
    return values


@pytest.mark.parametrize("values", [
    ["[PAD]"],
    _tampered(lambda v: v.update(format="other/1")),
    _tampered(lambda v: v.update(tokens="abc")),
    _tampered(lambda v: v["tokens"].append(7)),
    _tampered(lambda v: v["tokens"].__setitem__(0, "[UNK]")),  # specials out of order
    _tampered(lambda v: v["tokens"].pop(5)),  # a tag missing
    _tampered(lambda v: v["tokens"].append("ab")),
    _tampered(lambda v: v["tokens"].append(v["tokens"][-1])),
], ids=["not-object", "format", "tokens-not-list", "non-string", "specials-order", "tag-missing",
        "multi-char", "duplicate"])
def test_tampered_vocabulary_is_refused(values):
    with pytest.raises(UserError, match="invalid tokenizer vocabulary"):
        CharTokenizer.from_dict(values)


def test_load_names_the_file_it_refuses(tmp_path):
    broken = tmp_path / "tok.json"
    broken.write_text('{"format": "hlbd_ray.char_tokenizer/1", "tokens": ["x"]}', encoding="utf-8")
    with pytest.raises(UserError, match="tok.json"):
        CharTokenizer.load(broken)
    (tmp_path / "cut.json").write_text('{"tokens": [', encoding="utf-8")
    with pytest.raises(UserError, match="cut.json"):
        CharTokenizer.load(tmp_path / "cut.json")
