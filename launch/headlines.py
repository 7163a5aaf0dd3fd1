"""One line per finished step for a pipeline's report: the outcome of its stage in words and numbers."""

from __future__ import annotations

import re
from collections.abc import Callable

MAX_METRICS = 4
KEY = re.compile(r"^(final_|accuracy_|student_score|total_params|active_params|max_logit_diff|new_tokens)")


def headline(stage: str, summary: dict, metrics: dict) -> str:
    """The step's key results (one or more lines); stages without their own show up to MAX_METRICS scalar
    metrics."""
    try:
        text = HEADLINES[stage](summary, metrics) if stage in HEADLINES else None
    except (KeyError, TypeError, ValueError):  # a summary without the usual numbers (an older stage)
        text = None
    return text or ", ".join(f"{k}={_num(v)}" for k, v in key_metrics(metrics)) or "-"


def key_metrics(metrics: dict) -> list[tuple[str, float]]:
    """Up to MAX_METRICS scalar metrics, the outcome ones (final losses, accuracies, scores) first."""
    scalars = [(k, v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)]
    first = [kv for kv in scalars if KEY.search(kv[0])]
    return (first + [kv for kv in scalars if kv not in first])[:MAX_METRICS]


def _num(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _arrow(a, b, fmt: Callable[[float], str]) -> str:
    return f"{fmt(a)} -> {fmt(b)}" if a is not None else fmt(b)


def _loss(v: float) -> str:
    return f"{v:.3f}"


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def score_name(domain: str) -> str:
    """What a held-out score is called in a domain: code tasks pass their tests, math answers are right."""
    return "pass rate" if domain == "code" else "accuracy"


def _pretrain(summary: dict, m: dict) -> str:
    line = f"val loss {_arrow(m['first_val_loss'], m['final_val_loss'], _loss)}"
    return line + f", train loss {_arrow(m['first_loss'], m['final_loss'], _loss)} ({m['steps']} steps)"


def _sft(summary: dict, m: dict) -> str:
    domain = summary.get("domain", "")
    return (f"{domain} val loss {_arrow(m['first_val_loss'], m['final_val_loss'], _loss)}, "
            f"train loss {_arrow(m['first_loss'], m['final_loss'], _loss)} ({m['steps']} steps)").strip()


def _grpo(summary: dict, m: dict) -> str:
    domain = summary.get("domain", "")
    line = (f"{domain} held-out {score_name(domain)} {_pct(m['accuracy_before'])} -> "
            f"{_pct(m['accuracy_after'])} (n={m['n_val']}, {m['steps']} steps)")
    if m.get("reward_first") is not None:
        line += f", reward {m['reward_first']:.2f} -> {m['reward_last']:.2f}"
    return line.strip()


def _distill(summary: dict, m: dict) -> str:
    parts = []
    for d, x in sorted(m["domains"].items()):
        student = _arrow(x.get("student_score_before"), x["student_score"], _pct)
        line = f"{d} {score_name(d)}: student {student} vs teacher {_pct(x['teacher_score'])}"
        if x.get("kl_final") is not None:
            line += f", KL to the teacher {_arrow(x.get('kl_first'), x['kl_final'], _loss)}"
        parts.append(line)
    return "\n".join(parts)


def _export(summary: dict, m: dict) -> str:
    line = f"{m['params'] / 1e6:.2f}M parameters"
    if m.get("max_logit_diff") is not None:
        line += f", transformers' logits within {m['max_logit_diff']:.1e} of the checkpoint's"
    return line


def _generate(summary: dict, m: dict) -> str:
    return f"{m['new_tokens']} new tokens through transformers in {m['seconds']:.1f}s"


HEADLINES: dict[str, Callable[[dict, dict], str]] = {
    "pretrain": _pretrain, "sft": _sft, "grpo": _grpo, "distill": _distill, "export": _export,
    "generate": _generate,
}
