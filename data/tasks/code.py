"""Procedural small Python function tasks with hidden `assert` tests and a reference implementation.

Each template has a description, a one-line body, a Python callable that computes the expected values
(the tests are built from it, independently of the reference source) and an input generator. A task's
function is (template, parameter, function name); its split is a hash of that triple, so the prompt
phrasings of one function all land in the same split.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from data.tasks.records import Draft, sample


def _int(rng: random.Random) -> tuple:
    return (rng.randint(-20, 20),)


def _pair(rng: random.Random) -> tuple:
    return (rng.randint(-20, 20), rng.randint(-20, 20))


def _list(rng: random.Random) -> tuple:
    return ([rng.randint(-9, 9) for _ in range(rng.randint(1, 6))],)


def _word(rng: random.Random) -> tuple:
    return ("".join(rng.choice("abcdexyz") for _ in range(rng.randint(0, 6))),)


@dataclass(frozen=True)
class Template:
    name: str                         # template id
    text: str                         # what the function returns, formatted with k
    body: str                         # the return expression, formatted with k
    args: str                         # parameter list
    fn: Callable[[Any, tuple], Any]   # (k, args) -> expected value
    inputs: Callable[[random.Random], tuple]
    ks: tuple = (None,)


R = range
TEMPLATES = (
    Template("add", "x plus {k}", "x + {k}", "x", lambda k, a: a[0] + k, _int, tuple(R(1, 31))),
    Template("sub", "x minus {k}", "x - {k}", "x", lambda k, a: a[0] - k, _int, tuple(R(1, 31))),
    Template("mul", "x times {k}", "x * {k}", "x", lambda k, a: a[0] * k, _int, tuple(R(2, 13))),
    Template("mod", "the remainder of x divided by {k}", "x % {k}", "x", lambda k, a: a[0] % k, _int,
             tuple(R(2, 10))),
    Template("gt", "True if x is greater than {k}, else False", "x > {k}", "x", lambda k, a: a[0] > k, _int,
             tuple(R(-5, 11))),
    Template("square", "the square of x", "x * x", "x", lambda k, a: a[0] * a[0], _int),
    Template("abs", "the absolute value of x", "abs(x)", "x", lambda k, a: abs(a[0]), _int),
    Template("even", "True if x is even, else False", "x % 2 == 0", "x", lambda k, a: a[0] % 2 == 0, _int),
    Template("max2", "the larger of a and b", "max(a, b)", "a, b", lambda k, a: max(a), _pair),
    Template("min2", "the smaller of a and b", "min(a, b)", "a, b", lambda k, a: min(a), _pair),
    Template("sum2", "the sum of a and b", "a + b", "a, b", lambda k, a: a[0] + a[1], _pair),
    Template("reverse", "the list xs reversed", "xs[::-1]", "xs", lambda k, a: a[0][::-1], _list),
    Template("sum", "the sum of the list xs", "sum(xs)", "xs", lambda k, a: sum(a[0]), _list),
    Template("maxl", "the largest element of the list xs", "max(xs)", "xs", lambda k, a: max(a[0]), _list),
    Template("minl", "the smallest element of the list xs", "min(xs)", "xs", lambda k, a: min(a[0]), _list),
    Template("first", "the first element of the list xs", "xs[0]", "xs", lambda k, a: a[0][0], _list),
    Template("last", "the last element of the list xs", "xs[-1]", "xs", lambda k, a: a[0][-1], _list),
    Template("take", "the first {k} elements of the list xs", "xs[:{k}]", "xs", lambda k, a: a[0][:k], _list,
             tuple(R(1, 5))),
    Template("ladd", "the list xs with {k} added to each element", "[v + {k} for v in xs]", "xs",
             lambda k, a: [v + k for v in a[0]], _list, tuple(R(1, 10))),
    Template("lmul", "the list xs with each element multiplied by {k}", "[v * {k} for v in xs]", "xs",
             lambda k, a: [v * k for v in a[0]], _list, tuple(R(2, 10))),
    Template("count_gt", "how many elements of the list xs are greater than {k}",
             "len([v for v in xs if v > {k}])", "xs", lambda k, a: len([v for v in a[0] if v > k]), _list,
             tuple(R(-3, 6))),
    Template("len", "the length of the string s", "len(s)", "s", lambda k, a: len(a[0]), _word),
    Template("upper", "the string s in upper case", "s.upper()", "s", lambda k, a: a[0].upper(), _word),
    Template("count", "how many times the letter {k!r} occurs in the string s", "s.count({k!r})", "s",
             lambda k, a: a[0].count(k), _word, tuple("abcdexyz")),
    Template("suffix", "the string s followed by {k!r}", "s + {k!r}", "s", lambda k, a: a[0] + k, _word,
             ("!", "?", "ok", "xy", "_", "-", "42", ".")),
    Template("repeat", "the string s repeated {k} times", "s * {k}", "s", lambda k, a: a[0] * k, _word,
             tuple(R(2, 5))),
)
FUNCTION_NAMES = ("f", "g", "h", "solve", "compute", "answer", "func", "calc", "fn", "run", "result", "go",
                  "apply", "work", "value", "do_it", "transform", "helper", "task", "main_fn")
PHRASINGS = (
    "Write a Python function `{sig}` that returns {text}.",
    "Implement `{sig}` in Python. It should return {text}.",
    "Define a Python function `{sig}` which returns {text}.",
)


def draw(rng: random.Random) -> Draft:
    """One code task."""
    t = rng.choice(TEMPLATES)
    k = rng.choice(t.ks)
    name = rng.choice(FUNCTION_NAMES)
    sig = f"{name}({t.args})"
    prompt = rng.choice(PHRASINGS).format(sig=sig, text=t.text.format(k=k))
    code = f"def {sig}:\n    return {t.body.format(k=k)}\n"
    function = f"{t.name}|{k}|{name}"
    case_rng = random.Random(function)
    cases = [t.inputs(case_rng) for _ in range(4)]
    tests = "".join(f"assert {name}({', '.join(map(repr, args))}) == {t.fn(k, args)!r}\n" for args in cases)
    return Draft(key=prompt, split_key=function, prompt=prompt, answer=code, solution=f"```python\n{code}```",
                 tests=tests, entry_point=name)


def code_tasks(split: str, n: int, seed: int = 0, val_fraction: float = 0.1) -> list[dict]:
    """`n` code task records of `split` ('train'|'val'), deterministic for `seed`."""
    return sample("code", draw, split, n, seed, val_fraction)
