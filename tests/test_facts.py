"""Facts: each module's key on the generator and on the real files, and the split by fact."""

from __future__ import annotations

import random
import re
from collections import defaultdict

import pytest

from hlbd_ray import datagen
from hlbd_ray.config import DataConfig
from hlbd_ray.data import Pair, load_pairs, prepare_data, read_file
from hlbd_ray.errors import UserError
from hlbd_ray.facts import full_fact, hardcore_fact, split_pairs, twins_in_train

from .conftest import HLBD_DIR

needs_data = pytest.mark.usefixtures("hlbd_dir")
FULL, HARDCORE_V2, HARDCORE_V1 = (str(HLBD_DIR / n) for n in
                                  ("HLBD_Full_V2.json", "HLBD_Hardcore_Full_V2.json", "HLBD_Hardcore_Full.json"))
ZODIAC = "鼠牛虎兔龙蛇马羊猴鸡狗猪"
_TERM = [re.compile(p) for p in (r"^'(.+)'(?:的英文是|用英语怎么说)？$", r"^如何用英语表达'(.+)'？$",
                                  r"^英文中(.+)怎么说？$",
                                  r"^(.+?)(?:用英文怎么说|用英语怎么说|的英语是什么|的英文翻译是|的英文是)？$")]


def generated_fact(module: str, prompt: str) -> object:
    """What a generated prompt asks, parsed here from its wording (not with facts.py's rules):
    the shape and operands, the expression, the year / position / start and step modulo 12,
    the quantity and operands, the Chinese term."""
    numbers = [int(n) for n in re.findall(r"[0-9]+", prompt)]
    if module == "geometry":
        shape = next(s for s in ("等腰", "三角形", "长方形", "正方形", "圆") if s in prompt)
        return shape, "面积" in prompt, "周长" in prompt, tuple(sorted(numbers))
    if module == "arithmetic":
        return re.search(r"\d+(?: [-+×÷] \d+)+", prompt).group(0)
    if module == "zodiac":
        if re.match(r"\d{4}年", prompt):
            return "year", numbers[0]
        if prompt.startswith(("十二生肖", "生肖排序")):
            return "position", numbers[0]
        step = numbers[0] if numbers else 1
        backwards = "前" in prompt or "上一个" in prompt
        return "step", prompt[0], (-step if backwards else step) % 12
    if module == "physics":
        top, bottom = numbers[:2]
        if "秒" in prompt and prompt.index("秒") < prompt.index("米"):
            top, bottom = bottom, top   # "一辆小车{t}秒行驶了{d}米"
        return next(q for q in ("速度", "压强", "密度") if q in prompt), top, bottom
    return next(m.group(1) for m in (p.match(prompt) for p in _TERM) if m)


@pytest.fixture(scope="module")
def generated() -> dict:
    return datagen.generate(1000, seed=0)   # conf/sweep.yaml's data


@pytest.mark.parametrize("module", datagen.MODULES)
def test_every_wording_of_a_generated_fact_gets_one_key(generated, module):
    keys_of = defaultdict(set)
    for item in generated["data"][module]:
        keys_of[generated_fact(module, item["input"])].add(hardcore_fact(module, item["input"], item["output"]))
    assert all(len(keys) == 1 for keys in keys_of.values())
    # Facts only merge by coincidence (a 2x2 square's area and a radius 2 circle's diameter
    # are both 4; 3 + 58 and 58 + 3): at most 2% of them.
    distinct = len(set().union(*keys_of.values()))
    assert len(keys_of) * 0.98 <= distinct <= len(keys_of)
    # Several wordings per fact exist, so the rule has something to group.
    assert len(generated["data"][module]) > distinct


def test_the_split_of_the_generator_leaves_no_fact_on_both_sides(generated):
    data = prepare_data(DataConfig(generated_per_module=1000, seed=0))
    modules = data.dataset_stats["modules"]
    assert {m: modules[m]["val_with_train_twin"] for m in datagen.MODULES} == dict.fromkeys(datagen.MODULES, 0)
    assert data.dataset_stats["split"]["val_with_train_twin"] == 0
    # The same, by this test's own reading of the prompts.
    pairs, _ = load_pairs([], generated_per_module=1000, seed=0)
    train, val = split_pairs(pairs, 0.1, seed=0)
    seen = {(p.module, generated_fact(p.module, p.prompt)) for p in train}
    assert not [p.prompt for p in val if (p.module, generated_fact(p.module, p.prompt)) in seen]
    # Every module is validated, in proportion (whole facts overshoot the 10% a little).
    assert all(95 <= modules[m]["val_pairs"] <= 110 for m in datagen.MODULES)


def test_twins_are_counted_when_a_fact_straddles_the_split(generated):
    """The counter is not vacuous: a split of single pairs (the old one) leaves twins."""
    pairs, _ = load_pairs([], generated_per_module=1000, seed=0)
    order = random.Random(0).sample(range(len(pairs)), len(pairs))
    val_rows = set(order[:500])
    train = [p for i, p in enumerate(pairs) if i not in val_rows]
    val = [p for i, p in enumerate(pairs) if i in val_rows]
    twins = twins_in_train(train, val)
    val_counts = {m: sum(p.module == m for p in val) for m in datagen.MODULES}
    # reverse_english has 220 facts in 1,000 pairs: nearly every held-out pair has a twin.
    assert twins["reverse_english"] >= 0.9 * val_counts["reverse_english"]
    assert 0 < twins["geometry"] < val_counts["geometry"]


# --- the real files ----------------------------------------------------------------------

def facts_per_module(pairs: list[Pair]) -> dict[str, int]:
    out: dict[str, set[str]] = defaultdict(set)
    for pair in pairs:
        out[pair.module].add(pair.fact)
    return {module: len(facts) for module, facts in out.items()}


@needs_data
def test_hardcore_v2_facts_per_module():
    _, pairs = read_file(HARDCORE_V2)
    assert facts_per_module(pairs) == {"geometry": 625, "arithmetic": 1764, "zodiac": 228, "physics": 825,
                                       "reverse_english": 183}
    by_prompt = {p.prompt: p.fact for p in pairs}
    same = [  # rewordings of one fact, each taken from the file
        ["四用英文怎么说？", "四的英文翻译是？", "英文中四怎么说？"],
        ["马的下一个生肖是？", "马之后是什么？", "十二生肖中马后面是？", "马后面是什么生肖？"],
        ["长8宽30的长方形面积是多少？", "长30、宽8的长方形，求面积", "长方形长30宽8，面积是？"],
        ["58 + 3 = ?", "3 + 58 = ?"],
        ["2101年属什么？", "2101年是什么生肖年？"],
    ]
    for prompts in same:
        assert len({by_prompt[p] for p in prompts}) == 1, prompts
    # Other facts, some with the same answer (2101 and 2113 are both 鸡年).
    different = ["马后面是什么生肖？", "马前面是什么生肖？", "长8宽30的长方形面积是多少？", "2101年属什么？",
                 "2113年属什么？"]
    assert len({by_prompt[p] for p in different}) == len(different)
    years = [p for p in pairs if p.module == "zodiac" and re.match(r"\d{4}年", p.prompt)]
    # Two wordings per year ("N年是什么生肖年？", "N年属什么？"); the year is the fact.
    assert len(years) == 240 and len({p.fact for p in years}) == 120


@needs_data
def test_hardcore_v1_and_full_facts():
    _, old = read_file(HARDCORE_V1)
    assert facts_per_module(old) == {"geometry": 10, "arithmetic": 423, "zodiac": 15, "physics": 10,
                                     "reverse_english": 20}
    _, full = read_file(FULL)
    assert facts_per_module(full) == {"full": 5000}
    assert full[0].fact == full_fact("视频聊天", full[0].prompt) == "视频聊天"


def test_fact_rules_on_their_own():
    assert hardcore_fact("reverse_english", "'我很开心'的英文是？", "I'm very happy") == \
        hardcore_fact("reverse_english", "如何用英语表达'我很开心'？", " i'm  very happy.")
    assert hardcore_fact("zodiac", "2101年属什么？", "鸡年") != hardcore_fact("zodiac", "2113年属什么？", "鸡年")
    assert hardcore_fact("physics", "压力99N，受力面积9m²，压强是多少Pa？", "11 Pa") == "11pa|9,99"
    assert hardcore_fact("my_module", "x is 7.0", "y") == hardcore_fact("my_module", "is x 7?", "Y")
    assert full_fact(None, "[EMOJI] 🐱 猫") == "prompt:[emoji]🐱猫" != full_fact("猫", "[EMOJI] 🐱 猫")


# --- the split -----------------------------------------------------------------------------

def worded(fact_count: int, wordings: int, module: str = "m") -> list[Pair]:
    return [Pair(f"{module}{i}-{w}", f"a{i}", "t.json", module, f"a{i}")
            for i in range(fact_count) for w in range(wordings)]


def test_split_keeps_every_fact_whole_is_seeded_and_ignores_input_order():
    pairs = worded(50, 4) + worded(40, 1, "n")
    train, val = split_pairs(pairs, 0.1, seed=5)
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(pairs)
    assert not {(p.module, p.fact) for p in train} & {(p.module, p.fact) for p in val}
    # 10% of each module: 5 whole facts of m, 4 of n.
    assert [sum(p.module == m for p in val) for m in "mn"] == [20, 4]
    assert split_pairs(pairs, 0.1, seed=5) == (train, val)
    assert split_pairs(pairs, 0.1, seed=6)[1] != val
    assert train == sorted(train, key=pairs.index)                  # input order kept
    shuffled = random.Random(1).sample(pairs, len(pairs))
    assert set(split_pairs(shuffled, 0.1, seed=5)[1]) == set(val)   # whatever order they came in


def test_a_module_with_one_fact_trains_and_a_lone_fact_cannot_be_split():
    lone = Pair("x", "y", "t.json", "solo", "y")
    train, val = split_pairs(worded(3, 2) + [lone], 0.1, seed=0)
    assert lone in train and len(val) == 2 and len({p.fact for p in val}) == 1
    with pytest.raises(UserError, match="at least 2 distinct facts in one module"):
        split_pairs(worded(1, 5), 0.1, seed=0)


@needs_data
def test_the_split_of_the_real_files_leaves_no_fact_on_both_sides():
    data = prepare_data(DataConfig(paths=[FULL, HARDCORE_V2, HARDCORE_V1]))
    stats = data.dataset_stats
    assert {m: r["val_with_train_twin"] for m, r in stats["modules"].items()} == dict.fromkeys(
        ["full", "geometry", "arithmetic", "zodiac", "physics", "reverse_english"], 0)
    split = stats["split"]
    assert split["train"]["pairs"] + split["val"]["pairs"] == stats["total"]["pairs"] == 10426
    assert split["val"]["facts"] == sum(r["val_facts"] for r in stats["modules"].values())
    assert stats["modules"]["reverse_english"] | {"length": None} == {
        "pairs": 930, "facts": 183, "train_pairs": 834, "val_pairs": 96, "train_facts": 164, "val_facts": 19,
        "val_with_train_twin": 0, "length": None, "truncated": 0, "val_unk_tokens": 49}
