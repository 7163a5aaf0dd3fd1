"""Math and code rewards on hand-written responses."""

import threading

import pytest

from model.errors import MoeforgeError
from rl.rewards import (
    boxed_answers,
    code_format_ok,
    last_boxed,
    math_format_ok,
    score,
    score_batch,
)
from rl.sandbox import SandboxLimits

MATH = {"id": "m", "domain": "math", "prompt": "6*7?", "answer": "42", "tests": "", "entry_point": ""}
CODE = {
    "id": "c", "domain": "code", "prompt": "add", "answer": "def add(a, b):\n    return a + b\n",
    "tests": "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n", "entry_point": "add",
}
LIMITS = SandboxLimits(wall_s=5, cpu_s=3)


def test_boxed_extraction_is_brace_matched_and_takes_the_last():
    text = r"first \boxed{1} then \boxed{\frac{a}{b^{2}}} and \boxed{unclosed"
    assert boxed_answers(text) == ["1", r"\frac{a}{b^{2}}"]
    assert last_boxed(text) == r"\frac{a}{b^{2}}"
    assert last_boxed("nothing here") is None


@pytest.mark.parametrize(
    "response, correct",
    [
        (r"The answer is \boxed{42}.", True),
        (r"So $\boxed{42.0}$", True),
        (r"\boxed{\frac{84}{2}}", True),
        (r"\boxed{41}", False),
        (r"guess \boxed{41}, no wait: \boxed{42}", True),
        ("42", False),
    ],
)
def test_math_answers(response, correct):
    out = score(MATH, response)
    assert out["correct"] is correct and out["reward"] == (1.0 if correct else 0.0)


def test_math_gold_in_latex_and_symbolic_answers():
    half = dict(MATH, answer=r"\frac{1}{2}")
    assert score(half, r"\boxed{0.5}")["correct"]
    assert score(half, r"\boxed{\dfrac{2}{4}}")["correct"]
    assert not score(half, r"\boxed{0.25}")["correct"]
    assert score(dict(MATH, answer="x^2+1"), r"\boxed{1+x^{2}}")["correct"]


def test_math_works_off_the_main_thread():
    out = []
    t = threading.Thread(target=lambda: out.append(score(MATH, r"\boxed{42}")))
    t.start()
    t.join()
    assert out[0]["correct"]


def test_format_rewards():
    assert math_format_ok(r"so \boxed{3}")
    assert not math_format_ok(r"\boxed{3} or \boxed{4}")
    assert not math_format_ok(r"\boxed{}")
    assert not math_format_ok("3")
    assert code_format_ok("Here:\n```python\nx = 1\n```\n")
    assert not code_format_ok("```python\nx = 1\n```\n```python\ny = 2\n```")
    assert not code_format_ok("```\nx = 1\n```")
    assert not code_format_ok("```python\nx = 1\n```\nand ```bash\nls\n```")


def test_code_rewards():
    good = "Sure.\n```python\ndef add(a, b):\n    return a + b\n```\n"
    wrong = "```python\ndef add(a, b):\n    return a - b\n```"
    out = score(CODE, good, LIMITS)
    assert out == {"reward": 1.0, "correct": True, "format_ok": True, "detail": "ok"}
    assert score(CODE, wrong, LIMITS)["reward"] == 0.0
    assert score(CODE, "def add(a, b): return a + b", LIMITS)["format_ok"] is False
    hang = "```python\ndef add(a, b):\n    while True:\n        pass\n```"
    assert score(CODE, hang, SandboxLimits(wall_s=2, cpu_s=1))["reward"] == 0.0


def test_score_batch_mixes_domains_in_order():
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    bad = "```python\ndef add(a, b):\n    return 0\n```"
    tasks = [CODE, MATH, CODE, MATH]
    out = score_batch(tasks, [good, r"\boxed{42}", bad, r"\boxed{7}"], LIMITS, max_workers=2)
    assert [o["reward"] for o in out] == [1.0, 1.0, 0.0, 0.0]


def test_score_batch_scores_repeats_once_and_equals_one_by_one(monkeypatch):
    import rl.rewards

    good = "```python\ndef add(a, b):\n    return a + b\n```"
    bad = "```python\ndef add(a, b):\n    return 0\n```"
    other = dict(CODE, id="c2", tests="assert add(2, 2) == 0\n")  # same response, other tests: scored apart
    tasks = [CODE, CODE, MATH, CODE, MATH, other, CODE]
    responses = [good, bad, r"\boxed{42}", good, r"\boxed{42}", bad, bad]
    runs = []
    real = rl.rewards.run_python
    monkeypatch.setattr(rl.rewards, "run_python", lambda code, lim=None: runs.append(code) or real(code, lim))
    out = score_batch(tasks, responses, LIMITS)
    assert len(runs) == 3  # good and bad for CODE, bad for `other`
    assert out == [score(t, r, LIMITS) for t, r in zip(tasks, responses)]
    assert [o["correct"] for o in out] == [True, False, True, True, True, True, False]
    out[0]["reward"] = -1.0
    assert out[3]["reward"] == 1.0  # every row has its own dict


def test_unknown_domain_and_bad_gold_are_user_errors():
    with pytest.raises(MoeforgeError, match="domain"):
        score(dict(MATH, domain="chess"), "x")
    with pytest.raises(MoeforgeError, match="answer"):
        score(dict(MATH, answer=""), r"\boxed{1}")
    with pytest.raises(MoeforgeError):
        score_batch([MATH], [])
