"""A built-in, deterministic HLBD Hardcore-shaped data set with answers that are correct.

Used when no data files are given, so a run works out of the box and tests need no
downloads. The prompts follow the phrasing of the published Hardcore V2 file, with
several phrasings per task so a model cannot key on one template, but every answer is
computed here: isosceles base angles keep their half degree ("35.5度") where the
published file rounds down, and physics answers are rounded half-up to the number of
decimals the prompt itself asks for, printed with exactly that many decimals.

Each module draws from its own random stream seeded by (seed, module), so the output is
identical for the same seed in every process, and a module's first k pairs do not
depend on how many pairs are asked for.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from pathlib import Path

from hlbd_ray.errors import UserError, run_cli
from hlbd_ray.files import atomic_write_json

MODULES = ("geometry", "arithmetic", "zodiac", "physics", "reverse_english")
ZODIAC = "鼠牛虎兔龙蛇马羊猴鸡狗猪"
# 2020 was a year of the rat: index 0 of ZODIAC.
ZODIAC_BASE_YEAR = 2020
# Consecutive draws that only repeat earlier prompts before a module counts as exhausted
# (its space of distinct prompts is finite: 12 animals, 200 years, ...).
_MAX_REPEATS = 10_000

Task = tuple[str, str]
Maker = Callable[[random.Random], Task]


# --- geometry -------------------------------------------------------------------------

def _degrees(value: Fraction) -> str:
    # Half degrees are exact in decimal, so this never rounds.
    return f"{value.numerator}度" if value.denominator == 1 else f"{float(value)}度"


def _third_angle(rng: random.Random) -> Task:
    a = rng.randint(1, 177)
    b = rng.randint(1, 178 - a)
    prompt = rng.choice([
        "一个三角形有一个{a}度的角，另一个{b}度的角，第三个角是多少度？",
        "三角形的两个角是{a}°和{b}°，求第三个角",
        "三角形两个角分别是{a}度和{b}度，第三个角是多少度？",
        "已知三角形两个内角为{a}度和{b}度，第三个内角是几度？",
    ]).format(a=a, b=b)
    return prompt, _degrees(Fraction(180 - a - b))


def _isosceles_base(rng: random.Random) -> Task:
    apex = rng.randint(1, 179)
    prompt = rng.choice([
        "等腰三角形顶角是{x}度，底角是多少度？",
        "等腰三角形的顶角为{x}度，求底角",
        "一个等腰三角形的顶角是{x}°，每个底角是多少度？",
    ]).format(x=apex)
    return prompt, _degrees(Fraction(180 - apex, 2))


def _rectangle(rng: random.Random) -> Task:
    length, width = rng.randint(1, 50), rng.randint(1, 50)
    if rng.random() < 0.5:
        prompt = rng.choice(["长{l}宽{w}的长方形面积是多少？", "长方形长{l}宽{w}，面积是？",
                             "长{l}、宽{w}的长方形，求面积"])
        answer = length * width
    else:
        prompt = rng.choice(["长{l}宽{w}的长方形周长是多少？", "长方形长{l}宽{w}，周长是？",
                             "长{l}、宽{w}的长方形，求周长"])
        answer = 2 * (length + width)
    return prompt.format(l=length, w=width), str(answer)


def _square(rng: random.Random) -> Task:
    side = rng.randint(1, 60)
    if rng.random() < 0.5:
        prompt = rng.choice(["边长为{a}的正方形面积是多少？", "正方形边长{a}，面积是？", "边长{a}的正方形，求面积"])
        answer = side * side
    else:
        prompt = rng.choice(["边长为{a}的正方形周长是多少？", "正方形边长{a}，周长是？", "边长{a}的正方形，求周长"])
        answer = 4 * side
    return prompt.format(a=side), str(answer)


def _diameter(rng: random.Random) -> Task:
    radius = rng.randint(1, 100)
    prompt = rng.choice(["半径为{r}的圆，直径是多少？", "半径{r}的圆，求直径", "圆的半径是{r}，直径是？"])
    return prompt.format(r=radius), str(2 * radius)


# --- arithmetic -----------------------------------------------------------------------

def _evaluate(numbers: list[int], ops: list[str]) -> int:
    """× binds tighter than + and -; ÷ never appears mixed with other operators."""
    terms, signs, current = [], [1], numbers[0]
    for op, value in zip(ops, numbers[1:]):
        if op == "×":
            current *= value
        else:
            terms.append(current)
            signs.append(1 if op == "+" else -1)
            current = value
    terms.append(current)
    return sum(sign * term for sign, term in zip(signs, terms))


def _arithmetic(rng: random.Random) -> Task:
    shape = rng.choice(["+", "-", "×", "÷", "×+", "+×", "×-", "+++", "+-+", "+-", "-+"])
    if shape == "÷":
        divisor, quotient = rng.randint(1, 12), rng.randint(0, 20)
        expression, answer = f"{divisor * quotient} ÷ {divisor}", quotient
    else:
        ops = list(shape)
        # Factors of a product stay in the times tables; terms of a sum go up to 99.
        factor = ["×" in ops[max(i - 1, 0):i + 1] for i in range(len(ops) + 1)]
        answer = -1
        while answer < 0:  # the published set has no negative answers; keep that range
            numbers = [rng.randint(1, 12) if f else rng.randint(0, 99) for f in factor]
            answer = _evaluate(numbers, ops)
        expression = " ".join([str(numbers[0])] + [f"{op} {n}" for op, n in zip(ops, numbers[1:])])
    prompt = rng.choice(["{e} = ?", "{e} 等于多少？", "计算：{e}", "{e} 的结果是多少？"])
    return prompt.format(e=expression), str(answer)


# --- zodiac ---------------------------------------------------------------------------

def zodiac_of_year(year: int) -> str:
    return ZODIAC[(year - ZODIAC_BASE_YEAR) % 12]


def _zodiac_year(rng: random.Random) -> Task:
    year = rng.randint(1900, 2099)
    prompt = rng.choice(["{y}年是什么生肖年？", "{y}年属什么？", "{y}年出生的人属什么生肖？"])
    return prompt.format(y=year), f"{zodiac_of_year(year)}年"


def _zodiac_position(rng: random.Random) -> Task:
    index = rng.randrange(12)
    prompt = rng.choice(["十二生肖第{n}位是什么？", "生肖排序第{n}位是哪个？", "十二生肖排第{n}的是？"])
    return prompt.format(n=index + 1), ZODIAC[index]


def _zodiac_step(rng: random.Random) -> Task:
    index, step = rng.randrange(12), rng.randint(1, 11)
    animal = ZODIAC[index]
    if rng.random() < 0.25:
        if rng.random() < 0.5:
            prompt = rng.choice(["{a}的下一个生肖是？", "{a}后面是什么生肖？"]).format(a=animal)
            return prompt, ZODIAC[(index + 1) % 12]
        prompt = rng.choice(["{a}的上一个生肖是？", "{a}前面是什么生肖？"]).format(a=animal)
        return prompt, ZODIAC[(index - 1) % 12]
    if rng.random() < 0.7:
        prompt = rng.choice(["{a}后面第{k}个是什么？", "{a}往后数{k}个是什么生肖？"])
        return prompt.format(a=animal, k=step), ZODIAC[(index + step) % 12]
    prompt = rng.choice(["{a}前面第{k}个是什么？", "{a}往前数{k}个是什么生肖？"])
    return prompt.format(a=animal, k=step), ZODIAC[(index - step) % 12]


# --- physics --------------------------------------------------------------------------

_DECIMAL_WORDS = {1: "一", 2: "两"}


def round_half_up(value: Fraction, decimals: int) -> str:
    """Exact rounding of a ratio of integers (no float error), printed with `decimals` places."""
    exact = Decimal(value.numerator) / Decimal(value.denominator)
    return str(exact.quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP))


def _physics(rng: random.Random) -> Task:
    kind = rng.choice(["speed", "pressure", "density"])
    if kind == "speed":
        top, bottom, decimals, unit = rng.randint(1, 500), rng.randint(1, 20), 1, "m/s"
        prompt = rng.choice(["物体运动{a}米用了{b}秒，速度是多少m/s？", "一辆小车{b}秒行驶了{a}米，平均速度是多少m/s？"])
    elif kind == "pressure":
        top, bottom, decimals, unit = rng.randint(1, 100), rng.randint(1, 20), 1, "Pa"
        prompt = rng.choice(["压力{a}N，受力面积{b}m²，压强是多少Pa？", "{a}N的压力作用在{b}m²的面积上，压强是多少Pa？"])
    else:
        top, bottom, decimals, unit = rng.randint(1, 500), rng.randint(1, 100), 2, "g/cm³"
        prompt = rng.choice(["质量{a}g，体积{b}cm³的物体，密度是多少g/cm³？", "一个物体质量{a}g、体积{b}cm³，求密度（g/cm³）"])
    prompt = prompt.format(a=top, b=bottom) + f"（保留{_DECIMAL_WORDS[decimals]}位小数）"
    return prompt, f"{round_half_up(Fraction(top, bottom), decimals)} {unit}"


# --- reverse_english ------------------------------------------------------------------

_WORDS = {
    "苹果": "Apple", "香蕉": "Banana", "西瓜": "Watermelon", "葡萄": "Grape", "草莓": "Strawberry",
    "桃子": "Peach", "猫": "Cat", "狗": "Dog", "鸟": "Bird", "鱼": "Fish", "马": "Horse", "猪": "Pig",
    "羊": "Sheep", "鸡": "Chicken", "书": "Book", "笔": "Pen", "纸": "Paper", "桌子": "Table",
    "椅子": "Chair", "床": "Bed", "门": "Door", "窗户": "Window", "家": "Home", "学校": "School",
    "医院": "Hospital", "银行": "Bank", "商店": "Shop", "公园": "Park", "水": "Water", "米饭": "Rice",
    "面包": "Bread", "牛奶": "Milk", "茶": "Tea", "红色": "Red", "蓝色": "Blue", "绿色": "Green",
    "黄色": "Yellow", "黑色": "Black", "白色": "White", "紫色": "Purple", "灰色": "Gray",
    "父亲": "Father", "母亲": "Mother", "哥哥": "Elder brother", "姐姐": "Elder sister",
    "儿子": "Son", "女儿": "Daughter", "朋友": "Friend", "老师": "Teacher", "学生": "Student",
    "手": "Hand", "脚": "Foot", "眼睛": "Eye", "耳朵": "Ear", "头": "Head", "今天": "Today",
    "明天": "Tomorrow", "昨天": "Yesterday", "早上": "Morning", "中午": "Noon", "晚上": "Evening",
    "春天": "Spring", "夏天": "Summer", "秋天": "Autumn", "冬天": "Winter", "太阳": "Sun",
    "月亮": "Moon", "星星": "Star", "雨": "Rain", "雪": "Snow", "风": "Wind", "山": "Mountain",
    "河": "River", "大": "Big", "小": "Small", "新": "New", "旧": "Old", "冷": "Cold", "热": "Hot",
    "快": "Fast", "慢": "Slow", "好": "Good", "读": "Read", "写": "Write", "跑": "Run", "跳": "Jump",
    "吃": "Eat", "喝": "Drink", "睡": "Sleep", "看": "Look", "听": "Listen", "你好": "Hello",
    "谢谢": "Thank you", "再见": "Goodbye", "晚安": "Good night", "对不起": "Sorry",
    "新年快乐": "Happy New Year", "生日快乐": "Happy birthday", "圣诞快乐": "Merry Christmas",
}
_SENTENCES = {
    "我爱你": "I love you", "我很开心": "I'm very happy", "我很难过": "I'm very sad",
    "今天天气很好": "The weather is nice today", "他在学校": "He is at school",
    "她在看电视": "She is watching TV", "我在工作": "I'm working", "我饿了": "I'm hungry",
    "我渴了": "I'm thirsty", "这很难": "This is difficult", "天气真热": "It's very hot",
    "我找不到了": "I can't find it", "你叫什么名字": "What's your name", "我是学生": "I am a student",
    "我们走吧": "Let's go", "请坐": "Please sit down", "没关系": "It doesn't matter",
    "我不知道": "I don't know", "多少钱": "How much is it", "明天见": "See you tomorrow",
}
_DIGITS = "零一二三四五六七八九"
_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
         "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def chinese_number(n: int) -> str:
    """0..100 as written in Chinese: 十, 十一, 二十, 二十三, 一百."""
    if n == 100:
        return "一百"
    tens, ones = divmod(n, 10)
    if tens == 0:
        return _DIGITS[ones]
    head = "" if tens == 1 else _DIGITS[tens]
    return head + "十" + (_DIGITS[ones] if ones else "")


def english_number(n: int) -> str:
    """0..100 in English, capitalised like the rest of the answers: "Twenty-three"."""
    if n == 100:
        return "One hundred"
    tens, ones = divmod(n, 10)
    word = _ONES[n] if n < 20 else _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    return word.capitalize()


def english_lexicon() -> dict[str, str]:
    """Every Chinese term the module asks about, with its English answer."""
    lexicon = {chinese_number(n): english_number(n) for n in range(101)}
    lexicon.update(_WORDS)
    lexicon.update(_SENTENCES)
    return lexicon


_LEXICON = english_lexicon()
_TERMS = sorted(_LEXICON)  # sorted: the draw must not depend on dict insertion details


def _reverse_english(rng: random.Random) -> Task:
    term = rng.choice(_TERMS)
    templates = ["{t}用英文怎么说？", "{t}用英语怎么说？", "{t}的英语是什么？", "{t}的英文翻译是？",
                 "英文中{t}怎么说？", "{t}的英文是？"]
    if term in _SENTENCES:
        templates = ["'{t}'的英文是？", "如何用英语表达'{t}'？", "'{t}'用英语怎么说？"]
    return rng.choice(templates).format(t=term), _LEXICON[term]


_MAKERS: dict[str, list[Maker]] = {
    "geometry": [_third_angle, _isosceles_base, _rectangle, _square, _diameter],
    "arithmetic": [_arithmetic],
    "zodiac": [_zodiac_year, _zodiac_position, _zodiac_step],
    "physics": [_physics],
    "reverse_english": [_reverse_english],
}


def _module_pairs(module: str, count: int, seed: int) -> list[dict[str, str]]:
    # A string seed is hashed with SHA-512 by `random`, independent of PYTHONHASHSEED.
    rng = random.Random(f"hlbd-datagen:{seed}:{module}")
    makers, repeats = _MAKERS[module], 0
    seen: set[str] = set()
    pairs: list[dict[str, str]] = []
    while len(pairs) < count:
        prompt, answer = rng.choice(makers)(rng)
        if prompt in seen:  # distinct prompts: no duplicates for the loader to drop
            repeats += 1
            if repeats == _MAX_REPEATS:
                raise UserError(f"the built-in generator found only {len(pairs)} distinct {module} prompts; "
                                f"lower data.generated_per_module (got {count})")
            continue
        seen.add(prompt)
        pairs.append({"input": prompt, "output": answer})
        repeats = 0
    return pairs


def generate(per_module: int, seed: int) -> dict:
    """An HLBD Hardcore-shaped document: {"metadata": ..., "data": {module: [pairs]}}."""
    if per_module <= 0:
        raise UserError(f"pairs per module must be > 0, got {per_module}")
    data = {module: _module_pairs(module, per_module, seed) for module in MODULES}
    metadata = {
        "name": "HLBD generated",
        "seed": seed,
        "per_module": per_module,
        "total_samples": per_module * len(MODULES),
        "modules": list(MODULES),
        "rounding": "physics: half-up to the decimals the prompt asks for; angles exact",
    }
    return {"metadata": metadata, "data": data}


def write(path: str | Path, per_module: int, seed: int) -> Path:
    """Write `generate(per_module, seed)` as a JSON file (atomically)."""
    return atomic_write_json(path, generate(per_module, seed))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m hlbd_ray.datagen", description=__doc__.splitlines()[0])
    parser.add_argument("output", help="JSON file to write")
    parser.add_argument("--per-module", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write(args.output, args.per_module, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
