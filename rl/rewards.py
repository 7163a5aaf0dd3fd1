"""Verifiable rewards: math answers checked with math-verify, code run against its tests in the sandbox.

Every scorer returns ``{"reward": float, "correct": bool, "format_ok": bool, "detail": str}``; ``reward`` is
1.0 for a correct answer and 0.0 otherwise (format is reported separately, callers may shape with it).
"""

from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor

from model.errors import MoeforgeError
from rl.sandbox import SandboxLimits, run_python

_BOXED = re.compile(r"\\boxed\s*\{")
_FENCE = re.compile(r"```[ \t]*python[ \t]*\n(.*?)```", re.DOTALL)
_ANY_FENCE = re.compile(r"```")
MATH_TIMEOUT_S = 5


def boxed_answers(text: str) -> list[str]:
    """Contents of every ``\\boxed{...}`` in ``text`` (brace-matched, so nested braces survive)."""
    out = []
    for m in _BOXED.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append(text[m.end() : i - 1].strip())
    return out


def last_boxed(text: str) -> str | None:
    """The final ``\\boxed{}`` answer, or None."""
    found = boxed_answers(text)
    return found[-1] if found else None


def python_blocks(text: str) -> list[str]:
    """Bodies of the fenced ```python blocks of ``text``."""
    return _FENCE.findall(text)


def math_format_ok(response: str) -> bool:
    """Exactly one complete, non-empty ``\\boxed{}``."""
    found = boxed_answers(response)
    return len(found) == 1 and len(_BOXED.findall(response)) == 1 and bool(found[0])


def code_format_ok(response: str) -> bool:
    """Exactly one fenced block, and it is a non-empty ```python block."""
    blocks = python_blocks(response)
    return len(blocks) == 1 and len(_ANY_FENCE.findall(response)) == 2 and bool(blocks[0].strip())


def _math_verify_equal(gold: str, answer: str) -> tuple[bool, str]:
    from math_verify import parse, verify

    # signal.alarm only works in the main thread: elsewhere run without math-verify's own timeout
    t = MATH_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    gold_parsed = parse(f"${gold}$", parsing_timeout=t) or parse(gold, parsing_timeout=t)
    pred_parsed = parse(f"${answer}$", parsing_timeout=t)
    if not gold_parsed:
        raise MoeforgeError(f"task answer {gold!r} cannot be parsed by math-verify: fix the task's 'answer'")
    if not pred_parsed:
        return False, f"unparseable answer {answer!r}"
    ok = verify(gold_parsed, pred_parsed, timeout_seconds=t)
    return bool(ok), f"answer {answer!r} vs gold {gold!r}"


def score_math(task: dict, response: str) -> dict:
    """Reward 1.0 when the last boxed answer equals ``task['answer']`` (42 = 42.0 = \\frac{84}{2})."""
    fmt = math_format_ok(response)
    answer = last_boxed(response)
    if answer is None:
        return _result(False, fmt, "no \\boxed{} answer")
    correct, detail = _math_verify_equal(str(task["answer"]), answer)
    return _result(correct, fmt, detail)


def code_program(task: dict, response: str) -> str | None:
    """The program the sandbox runs: the response's python block, then the task's tests."""
    blocks = python_blocks(response)
    if len(blocks) != 1:
        return None
    return f"{blocks[0]}\n\n{task['tests']}\n"


def score_code(task: dict, response: str, limits: SandboxLimits | None = None) -> dict:
    """Reward 1.0 when the single python block passes every assert of ``task['tests']`` in the sandbox."""
    program = code_program(task, response)
    if program is None:
        return _result(False, False, "need exactly one ```python block")
    run = run_python(program, limits)
    return _result(run.passed, code_format_ok(response), run.reason)


def _result(correct: bool, fmt: bool, detail: str) -> dict:
    return {"reward": 1.0 if correct else 0.0, "correct": correct, "format_ok": fmt, "detail": detail}


def score(task: dict, response: str, limits: SandboxLimits | None = None) -> dict:
    """Score one response by ``task['domain']`` (``math`` or ``code``)."""
    domain = task.get("domain")
    if domain == "math":
        return score_math(task, response)
    if domain == "code":
        return score_code(task, response, limits)
    raise MoeforgeError(f"task {task.get('id')!r}: no reward for domain {domain!r} (known: math, code)")


def score_batch(
    tasks: list[dict], responses: list[str], limits: SandboxLimits | None = None, max_workers: int = 4
) -> list[dict]:
    """Score many responses: math in this thread (so math-verify keeps its timeouts), code in parallel.

    Identical responses to the same task (same domain, answer and tests) are scored once: a group of G
    samples often repeats itself, and every code candidate costs a sandboxed process."""
    if len(tasks) != len(responses):
        raise MoeforgeError(f"score_batch: {len(tasks)} tasks but {len(responses)} responses")
    first: dict[tuple, int] = {}
    for i, (task, resp) in enumerate(zip(tasks, responses)):
        first.setdefault((task.get("domain"), task.get("answer"), task.get("tests"), resp), i)
    unique = sorted(first.values())
    scored: dict[int, dict] = {}
    code_jobs = []
    for i in unique:
        if tasks[i].get("domain") == "code":
            code_jobs.append(i)
        else:
            scored[i] = score(tasks[i], responses[i], limits)
    if code_jobs:
        with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(code_jobs)))) as pool:
            futures = {i: pool.submit(score_code, tasks[i], responses[i], limits) for i in code_jobs}
            for i, fut in futures.items():
                scored[i] = fut.result()
    return [dict(scored[first[(t.get("domain"), t.get("answer"), t.get("tests"), r)]])
            for t, r in zip(tasks, responses)]
