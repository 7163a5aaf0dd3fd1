"""Procedural small Python function tasks with hidden `assert` tests and a reference implementation.

Each template has a prompt, a one-line body, a Python callable that computes the expected values (the
tests are built from it, independently of the reference source) and an input generator. A task is
(template, parameter, function name); its split is a hash of that triple.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from data.tasks.records import Draft, sample

Inputs = Callable[[random.Random], tuple]


def _ints(rng: random.Random) -> tuple:
    return (rng.randint(-20, 20),)


def _pair(rng: random.Random) -> tuple:
    return (rng.randint(-20, 20), rng.randint(-20, 20))


def _list(rng: random.Random) -> tuple:
    return ([rng.randint(-9, 9) for _ in range(rng.randint(1, 5))],)


def _word(rng: random.Random) -> tuple:
    return ("".join(rng.choice("abcde") for _ in range(rng.randint(0, 6))),)


@dataclass(frozen=True)
class Template:
    name: str          # template id
    prompt: str        # formatted with k, fn, args
    body: str          # the return expression, formatted with k
    args: str          # parameter list
    fn: Callable[[Any, tuple], Any]  # (k, args) -> expected value
    inputs: Inputs
    ks: tuple = (None,)


DIGITS = tuple(range(1, 10))
TEMPLATES = (
    Template("add", "returns {x} plus {k}", "x + {k}", "x", lambda k, a: a[0] + k, _ints, DIGITS),
    Template("sub", "returns {x} minus {k}", "x - {k}", "x", lambda k, a: a[0] - k, _ints, DIGITS),
    Template("mul", "returns {x} times {k}", "x * {k}", "x", lambda k, a: a[0] * k, _ints, DIGITS[1:]),
    Template("square", "returns the square of {x}", "x * x", "x", lambda k, a: a[0] * a[0], _ints),
    Template("abs", "returns the absolute value of {x}", "abs(x)", "x", lambda k, a: abs(a[0]), _ints),
    Template("even", "returns True if {x} is even, else False", "x % 2 == 0", "x", lambda k, a: a[0] % 2 == 0,
             _ints),
    Template("max", "returns the larger of a and b", "max(a, b)", "a, b", lambda k, a: max(a), _pair),
    Template("min", "returns the smaller of a and b", "min(a, b)", "a, b", lambda k, a: min(a), _pair),
    Template("reverse", "returns the list xs reversed", "xs[::-1]", "xs", lambda k, a: a[0][::-1], _list),
    Template("sum", "returns the sum of the list xs", "sum(xs)", "xs", lambda k, a: sum(a[0]), _list),
    Template("first", "returns the first element of the list xs", "xs[0]", "xs", lambda k, a: a[0][0], _list),
    Template("len", "returns the length of the string s", "len(s)", "s", lambda k, a: len(a[0]), _word),
    Template("count", "returns how many times the letter {k!r} occurs in the string s", "s.count({k!r})", "s",
             lambda k, a: a[0].count(k), _word, tuple("abcde")),
    Template("suffix", "returns the string s followed by {k!r}", "s + {k!r}", "s", lambda k, a: a[0] + k,
             _word, ("!", "?", "ok", "xy", "_")),
)
FUNCTION_NAMES = ("f", "g", "h", "solve", "compute", "answer", "func", "calc", "fn", "run")


def draw(rng: random.Random) -> Draft:
    """One code task."""
    t = rng.choice(TEMPLATES)
    k = rng.choice(t.ks)
    name = rng.choice(FUNCTION_NAMES)
    prompt = f"Write a Python function `{name}({t.args})` that {t.prompt.format(k=k, x='x')}."
    code = f"def {name}({t.args}):\n    return {t.body.format(k=k)}\n"
    case_rng = random.Random(f"{t.name}|{k}|{name}")
    cases = [t.inputs(case_rng) for _ in range(4)]
    tests = "\n".join(f"assert {name}({', '.join(map(repr, args))}) == {t.fn(k, args)!r}" for args in cases)
    return Draft(key=f"{t.name}|{k}|{name}", split_key=f"{t.name}|{k}|{name}", prompt=prompt, answer=code,
                 solution=f"```python\n{code}```", tests=tests + "\n", entry_point=name)


def code_tasks(split: str, n: int, seed: int = 0, val_fraction: float = 0.1) -> list[dict]:
    """`n` code task records of `split` ('train'|'val'), deterministic for `seed`."""
    return sample("code", draw, split, n, seed, val_fraction)
