"""Procedural arithmetic and word problems with an integer answer and a worked solution ending in \\boxed{}.

Difficulty 1: one-digit + and -; 2: two-digit + and -, two-digit x one-digit *; 3: three-digit + and -,
two-digit x two-digit *. Subtraction never goes below zero. The held-out split is decided by the
arithmetic alone (`a op b`), so a validation fact never appears in training under other wording.

Two options shape the mix within a difficulty. `carries=False` keeps only problems without a carry or
borrow in any decimal column (long addition, subtraction and multiplication): each digit of the answer is
then a one-digit fact of its column, so a held-out problem is a new combination of digit facts seen in
training (learnable by a small model). `max_b` caps the second operand (difficulty 2 with `max_b=9`:
two-digit +, - and * with a one-digit number).
"""

from __future__ import annotations

import operator
import random

from data.tasks.records import Draft, sample
from model.errors import MoeforgeError

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
RANGES = {  # difficulty -> op -> (max a, max b)
    1: {"+": (9, 9), "-": (9, 9)},
    2: {"+": (99, 99), "-": (99, 99), "*": (99, 9)},
    3: {"+": (999, 999), "-": (999, 999), "*": (99, 99)},
}
NAMES = ("Ada", "Ben", "Cleo", "Dev", "Emma", "Finn", "Gus", "Hana")
ITEMS = ("apples", "books", "coins", "marbles", "pencils", "stickers")
WORDS = {
    "+": ("{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
          "A box holds {a} {item}. Someone adds {b} {item}. How many {item} are in the box?"),
    "-": ("{name} has {a} {item} and gives away {b}. How many {item} does {name} have left?",
          "There are {a} {item} on a table. {name} takes {b}. How many {item} are on the table now?"),
    "*": ("{name} has {a} bags with {b} {item} in each bag. How many {item} does {name} have?",
          "There are {a} rows of {b} {item}. How many {item} are there in total?"),
}
BARE = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.")


def digits(x: int) -> list[int]:
    """Decimal digits of `x` >= 0, least significant first."""
    return [int(d) for d in reversed(str(x))]


def carries(a: int, op: str, b: int) -> bool:
    """True when computing `a op b` column by column carries (+, *) or borrows (-) somewhere."""
    da, db = digits(a), digits(b)
    if op == "+":
        return any(x + y >= 10 for x, y in zip(da, db))
    if op == "-":
        return any(x < y for x, y in zip(da, db))
    columns = [0] * (len(da) + len(db))
    for i, x in enumerate(da):
        for j, y in enumerate(db):
            columns[i + j] += x * y
    return any(c >= 10 for c in columns)


def draw(difficulty: int, rng: random.Random, with_carries: bool = True, max_b: int | None = None) -> Draft:
    """One problem at `difficulty` (only carry-free ones unless `with_carries`; b <= `max_b`)."""
    op = rng.choice(sorted(RANGES[difficulty]))
    max_a, top_b = RANGES[difficulty][op]
    if max_b is not None:
        top_b = min(top_b, max_b)
    while True:
        a, b = rng.randint(0, max_a), rng.randint(0, top_b)
        if op == "-" and b > a:
            a, b = b, a
        if with_carries or not carries(a, op, b):
            break
    c = OPS[op](a, b)
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    templates = WORDS[op] + BARE
    t = rng.randrange(len(templates))
    prompt = templates[t].format(a=a, b=b, op=op, name=name, item=item)
    solution = f"{a} {op} {b} = {c}. The answer is \\boxed{{{c}}}."
    return Draft(key=prompt, split_key=f"{a}{op}{b}", prompt=prompt, answer=str(c),
                 solution=solution)


def math_tasks(split: str, n: int, seed: int = 0, difficulty: int = 1, val_fraction: float = 0.1,
               carries: bool = True, max_b: int | None = None) -> list[dict]:
    """`n` math task records of `split` ('train'|'val'), deterministic for `seed`; `carries=False`: only
    problems without a carry or borrow; `max_b`: the largest second operand."""
    if difficulty not in RANGES:
        raise MoeforgeError(f"domain.difficulty: must be one of {sorted(RANGES)}, got {difficulty}")
    if not isinstance(carries, bool):
        raise MoeforgeError(f"domain.carries: must be true or false, got {carries!r}")
    if max_b is not None and (isinstance(max_b, bool) or not isinstance(max_b, int) or max_b < 1):
        raise MoeforgeError(f"domain.max_b: must be an integer >= 1 or null, got {max_b!r}")
    return sample("math", lambda rng: draw(difficulty, rng, carries, max_b), split, n, seed, val_fraction)
