import json
import operator
import re

import pytest

from data.tasks import load_tasks
from data.tasks.records import FIELDS, Draft, sample
from model.errors import ConfigError, MoeforgeError

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


@pytest.mark.parametrize("domain", ["math", "code"])
def test_deterministic_distinct_and_held_out_disjoint(domain):
    train = load_tasks(domain, "train", 150, seed=1)
    assert train == load_tasks(domain, "train", 150, seed=1)
    assert train != load_tasks(domain, "train", 150, seed=2)
    val = load_tasks(domain, "val", 20, seed=1) + load_tasks(domain, "val", 20, seed=5)
    assert len({r["id"] for r in train}) == 150
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in val}
    other_seed_train = load_tasks(domain, "train", 150, seed=9)
    assert not {r["prompt"] for r in other_seed_train} & {r["prompt"] for r in val}
    for r in train + val:
        assert tuple(r) == FIELDS and r["domain"] == domain and r["id"].startswith(domain + "-")


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_math_answers_are_correct(difficulty):
    tasks = load_tasks("math", "train", 100, seed=0, difficulty=difficulty)
    facts = set()
    for r in tasks:
        a, op, b, c = re.fullmatch(r"(\d+) ([-+*]) (\d+) = (-?\d+)\. The answer is \\boxed\{(-?\d+)\}\.",
                                   r["solution"]).groups()[:4]
        assert OPS[op](int(a), int(b)) == int(c) == int(r["answer"]) >= 0
        assert re.search(rf"\b{a}\b.*\b{b}\b", r["prompt"])
        assert r["solution"].endswith(f"\\boxed{{{r['answer']}}}.")
        assert r["tests"] == r["entry_point"] == ""
        facts.add((a, op, b))
    val = load_tasks("math", "val", 30, seed=0, difficulty=difficulty)
    val_facts = {re.match(r"(\d+) ([-+*]) (\d+)", r["solution"]).groups() for r in val}
    assert not facts & val_facts  # held out by arithmetic, not only by wording
    with pytest.raises(MoeforgeError, match="domain.difficulty"):
        load_tasks("math", "train", 5, difficulty=7)


def test_code_references_pass_their_tests():
    for r in load_tasks("code", "train", 200, seed=0) + load_tasks("code", "val", 30, seed=0):
        assert r["solution"] == f"```python\n{r['answer']}```"
        assert r["tests"].count("assert ") == 4 and r["entry_point"] in r["prompt"]
        namespace = {}
        exec(r["answer"], namespace)  # our own generated code
        exec(r["tests"], namespace)
        broken = r["answer"].replace("return ", "return None if True else ")
        namespace = {}
        exec(broken, namespace)
        with pytest.raises(AssertionError):
            exec(r["tests"], namespace)


def test_exhausted_task_space_is_an_error():
    def draw(rng):
        i = rng.randrange(10)
        return Draft(key=str(i), split_key=str(i), prompt=f"p{i}", answer=str(i), solution=str(i))

    assert len(sample("tiny", draw, "train", 10, seed=0, val_fraction=0.0)) == 10
    with pytest.raises(MoeforgeError, match="only 10 distinct tiny tasks"):
        sample("tiny", draw, "train", 11, seed=0, val_fraction=0.0)


def test_dataset_domain(tmp_path):
    rows = [{"q": f"What is {i} squared?", "a": i * i, "sol": f"\\boxed{{{i * i}}}"} for i in range(30)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    opts = {"path": str(tmp_path / "t.jsonl"), "prompt_field": "q", "answer_field": "a",
            "cache_dir": str(tmp_path / "c"), "val_fraction": 0.3}
    train, val = load_tasks("squares", "train", **opts), load_tasks("squares", "val", **opts)
    assert len(train) + len(val) == 30 and val and not {r["id"] for r in train} & {r["id"] for r in val}
    r = train[0]
    assert tuple(r) == FIELDS and r["domain"] == "squares"
    assert r["answer"] == str(int(r["prompt"].split()[2]) ** 2)
    with_sol = load_tasks("squares", "train", n=4, solution_field="sol", **opts)
    assert len(with_sol) == 4 and with_sol[0]["solution"] == f"\\boxed{{{with_sol[0]['answer']}}}"
    with pytest.raises(MoeforgeError, match="domain.answer_field: column 'nope'"):
        load_tasks("squares", "train", **{**opts, "answer_field": "nope"})
    with pytest.raises(ConfigError, match="domain.path"):
        load_tasks("squares", "train", prompt_field="q", answer_field="a")


@pytest.mark.parametrize("domain", ["math", "code"])
def test_default_domain_sizes_are_available(domain):
    """configs/domain/*.yaml ask for 2000 training and 128 held-out tasks."""
    assert len(load_tasks(domain, "train", 2000)) == 2000 and len(load_tasks(domain, "val", 128)) == 128


def digit_sum(x: int) -> int:
    return sum(map(int, str(x)))


def column_carry_reference(a: int, op: str, b: int) -> bool:
    """Each carry lowers the answer's digit sum by 9 and each borrow raises it by 9, so a column carries or
    borrows exactly when the digit sums do not combine like the numbers (ds(a)*ds(b) for long *)."""
    combine = {"+": operator.add, "-": operator.sub, "*": operator.mul}[op]
    return digit_sum(combine(a, b)) != combine(digit_sum(a), digit_sum(b))


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_carry_free_math_has_no_column_carry(difficulty):
    from data.tasks.math import carries

    assert carries(57, "+", 38) and not carries(52, "+", 37)
    assert carries(52, "-", 37) and not carries(57, "-", 32)
    assert carries(34, "*", 3) and not carries(32, "*", 3)
    assert carries(21, "*", 15) and not carries(21, "*", 14)
    for a in range(0, 130, 7):
        for b in range(0, 70, 3):
            for op in "+*" + ("-" if a >= b else ""):
                assert carries(a, op, b) == column_carry_reference(a, op, b), (a, op, b)
    tasks = load_tasks("math", "train", 200, seed=0, difficulty=difficulty, carries=False)
    assert tasks[:3] != load_tasks("math", "train", 3, seed=0, difficulty=difficulty)
    for r in tasks:
        a, op, b, c = re.match(r"(\d+) ([-+*]) (\d+) = (\d+)\.", r["solution"]).groups()
        assert OPS[op](int(a), int(b)) == int(c) and not column_carry_reference(int(a), op, int(b))
    with pytest.raises(MoeforgeError, match="domain.carries"):
        load_tasks("math", "train", 5, carries="no")


@pytest.mark.parametrize("domain", ["math", "code"])
def test_fewer_tasks_are_a_prefix_of_more(domain):
    """`n` tasks are the first `n` of any larger draw with the same seed: an SFT on domain.n_train=500 sees a
    subset of the GRPO stage's 2000 training tasks, and GRPO also practises tasks the SFT never saw."""
    many = load_tasks(domain, "train", 400, seed=0)
    assert load_tasks(domain, "train", 100, seed=0) == many[:100]
