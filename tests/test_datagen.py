"""The built-in generator: deterministic, well-formed, and every answer recomputed here."""

from __future__ import annotations

import ast
import json
import re
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction

import pytest

from hlbd_ray import datagen
from hlbd_ray.data import load_pairs, read_file
from hlbd_ray.errors import EXIT_OK, EXIT_USER_ERROR, UserError, run_cli

ZODIAC = "鼠牛虎兔龙蛇马羊猴鸡狗猪"


@pytest.fixture(scope="module")
def doc() -> dict:
    return datagen.generate(400, seed=7)


def pairs_of(doc: dict, module: str) -> list[tuple[str, str]]:
    return [(p["input"], p["output"]) for p in doc["data"][module]]


def test_same_seed_same_output_and_prefix_stable(doc):
    assert datagen.generate(400, seed=7) == doc
    assert datagen.generate(400, seed=8)["data"] != doc["data"]
    # Asking for fewer pairs gives the first ones of a larger request.
    small = datagen.generate(25, seed=7)
    assert all(small["data"][m] == doc["data"][m][:25] for m in datagen.MODULES)


def test_shape_counts_and_distinct_prompts(doc):
    assert list(doc["data"]) == list(datagen.MODULES)
    assert doc["metadata"]["total_samples"] == 2000
    for module, items in doc["data"].items():
        assert len(items) == 400
        assert len({item["input"] for item in items}) == 400, module
        assert all(set(item) == {"input", "output"} and item["output"] for item in items)


def test_prompts_use_several_phrasings(doc):
    # Digits stripped, what remains is the template; one template per module would let a
    # model key on the wording.
    for module in datagen.MODULES:
        templates = {re.sub(r"\d+", "N", prompt) for prompt, _ in pairs_of(doc, module)}
        assert len(templates) >= 4, module


def _safe_eval(expression: str) -> Fraction:
    """Integers with + - * / only; anything else in the tree fails the test."""
    ops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
           ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return Fraction(node.value)
        raise AssertionError(f"unexpected syntax in {expression!r}")

    return walk(ast.parse(expression, mode="eval").body)


def test_arithmetic_answers(doc):
    for prompt, answer in pairs_of(doc, "arithmetic"):
        expression = re.search(r"\d+(?: [-+×÷] \d+)+", prompt).group(0)
        value = _safe_eval(expression.replace("×", "*").replace("÷", "/"))
        assert value.denominator == 1 and value >= 0, prompt
        assert answer == str(value.numerator), prompt


def _angle(answer: str) -> Fraction:
    assert answer.endswith("度")
    return Fraction(answer[:-1])


def test_geometry_answers(doc):
    half_degrees = 0
    for prompt, answer in pairs_of(doc, "geometry"):
        numbers = [int(n) for n in re.findall(r"\d+", prompt)]
        if "等腰" in prompt:
            base = _angle(answer)
            assert numbers[0] + 2 * base == 180, prompt
            half_degrees += base.denominator == 2
        elif "三角形" in prompt:
            assert sum(numbers) + _angle(answer) == 180, prompt
        elif "长方形" in prompt:
            length, width = numbers
            assert int(answer) == (length * width if "面积" in prompt else 2 * (length + width)), prompt
        elif "正方形" in prompt:
            side = numbers[0]
            assert int(answer) == (side * side if "面积" in prompt else 4 * side), prompt
        else:
            assert "半径" in prompt and int(answer) == 2 * numbers[0], prompt
    # Odd apex angles must give half degrees, not a rounded-down whole number.
    assert half_degrees > 0


def test_zodiac_answers(doc):
    anchors = {2024: "龙", 2020: "鼠", 1900: "鼠", 2099: "羊"}
    assert all(datagen.zodiac_of_year(year) == animal for year, animal in anchors.items())
    for prompt, answer in pairs_of(doc, "zodiac"):
        year = re.match(r"(\d{4})年", prompt)
        if year:
            assert answer == ZODIAC[(int(year.group(1)) - 2024 + 4) % 12] + "年", prompt
            continue
        position = re.search(r"第(\d+)(位|的)", prompt)
        if position and prompt.startswith(("十二生肖", "生肖排序")):
            assert answer == ZODIAC[int(position.group(1)) - 1], prompt
            continue
        start = ZODIAC.index(prompt[0])
        steps = re.search(r"(\d+)个", prompt)
        step = int(steps.group(1)) if steps else 1
        backwards = "前" in prompt or "上一个" in prompt
        assert answer == ZODIAC[(start + (-step if backwards else step)) % 12], prompt


def test_physics_answers_rounded_half_up_as_stated(doc):
    for prompt, answer in pairs_of(doc, "physics"):
        decimals = {"一": 1, "两": 2}[re.search(r"保留(.)位小数", prompt).group(1)]
        top, bottom = (int(n) for n in re.findall(r"\d+", prompt.split("（")[0])[:2])
        if "秒" in prompt and prompt.index("秒") < prompt.index("米"):
            top, bottom = bottom, top  # "一辆小车{t}秒行驶了{d}米"
        value, unit = answer.split(" ")
        assert unit == ("m/s" if "速度" in prompt else "Pa" if "压强" in prompt else "g/cm³"), prompt
        assert len(value.split(".")[1]) == decimals, prompt
        exact = Decimal(top) / Decimal(bottom)
        assert Decimal(value) == exact.quantize(Decimal(10) ** -decimals, rounding=ROUND_HALF_UP), prompt


def test_round_half_up_goes_up_on_exact_halves():
    assert datagen.round_half_up(Fraction(1, 8), 2) == "0.13"  # float rounding would give 0.12
    assert datagen.round_half_up(Fraction(189), 1) == "189.0"


_TERM = [re.compile(p) for p in (r"^'(.+)'(?:的英文是|用英语怎么说)？$", r"^如何用英语表达'(.+)'？$",
                                  r"^英文中(.+)怎么说？$", r"^(.+?)(?:用英文怎么说|用英语怎么说|的英语是什么|的英文翻译是|的英文是)？$")]


def test_reverse_english_answers(doc):
    known = {"四": "Four", "十": "Ten", "二十三": "Twenty-three", "九十九": "Ninety-nine", "一百": "One hundred"}
    lexicon = datagen.english_lexicon()
    assert all(lexicon[zh] == en for zh, en in known.items())
    for prompt, answer in pairs_of(doc, "reverse_english"):
        term = next(m.group(1) for m in (p.match(prompt) for p in _TERM) if m)
        assert lexicon[term] == answer, prompt


def test_write_produces_a_readable_hardcore_file(tmp_path):
    path = datagen.write(tmp_path / "gen.json", per_module=5, seed=1)
    assert json.loads(path.read_text(encoding="utf-8")) == datagen.generate(5, seed=1)
    fmt, pairs = read_file(str(path))
    assert fmt == "hardcore" and len(pairs) == 25


def test_the_command_line_writes_the_pairs_a_run_would_generate(tmp_path, capsys):
    path = tmp_path / "gen.json"
    assert run_cli(datagen.main, [str(path), "--per-module", "5", "--seed", "2"]) == EXIT_OK
    from_file, _ = load_pairs([str(path)], generated_per_module=0, seed=2)
    in_memory, _ = load_pairs([], generated_per_module=5, seed=2)
    assert [(p.prompt, p.answer, p.module) for p in from_file] == \
        [(p.prompt, p.answer, p.module) for p in in_memory]
    capsys.readouterr()
    assert run_cli(datagen.main, [str(tmp_path / "none.json"), "--per-module", "0"]) == EXIT_USER_ERROR
    assert capsys.readouterr().err.strip() == "error: pairs per module must be > 0, got 0"
    assert not (tmp_path / "none.json").exists()


@pytest.mark.parametrize("per_module", [0, 3000])
def test_impossible_sizes_are_user_errors(per_module):
    with pytest.raises(UserError, match="per.module"):
        datagen.generate(per_module, seed=0)
