"""Procedural arithmetic and word problems with an integer answer and a worked solution ending in \\boxed{}.

Difficulty 1: one-digit + and -; 2: two-digit + and -, two-digit x one-digit *; 3: three-digit + and -,
two-digit x two-digit *. Subtraction never goes below zero. The held-out split is decided by the
arithmetic alone (`a op b`), so a validation fact never appears in training under other wording.
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


def draw(difficulty: int, rng: random.Random) -> Draft:
    """One problem at `difficulty`."""
    op = rng.choice(sorted(RANGES[difficulty]))
    max_a, max_b = RANGES[difficulty][op]
    a, b = rng.randint(0, max_a), rng.randint(0, max_b)
    if op == "-" and b > a:
        a, b = b, a
    c = OPS[op](a, b)
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    templates = WORDS[op] + BARE
    t = rng.randrange(len(templates))
    prompt = templates[t].format(a=a, b=b, op=op, name=name, item=item)
    solution = f"{a} {op} {b} = {c}. The answer is \\boxed{{{c}}}."
    return Draft(key=prompt, split_key=f"{a}{op}{b}", prompt=prompt, answer=str(c),
                 solution=solution)


def math_tasks(split: str, n: int, seed: int = 0, difficulty: int = 1,
               val_fraction: float = 0.1) -> list[dict]:
    """`n` math task records of `split` ('train'|'val'), deterministic for `seed`."""
    if difficulty not in RANGES:
        raise MoeforgeError(f"domain.difficulty: must be one of {sorted(RANGES)}, got {difficulty}")
    return sample("math", lambda rng: draw(difficulty, rng), split, n, seed, val_fraction)
