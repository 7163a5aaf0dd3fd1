"""The closing report of a plan: each step's key metrics, the exported model and the generation."""

from __future__ import annotations

import re
from pathlib import Path

from launch.markers import read_marker
from launch.plan import Plan

MAX_METRICS = 4
KEY = re.compile(r"^(final_|accuracy_|student_score|total_params|active_params|max_logit_diff|new_tokens)")


def format_report(plan: Plan) -> str:
    """A short text report built from the steps' markers (also written to <run dir>/report.txt)."""
    lines = [f"moeforge {plan.name}: {plan.run_dir}"]
    extras: list[str] = []
    for step in plan.steps:
        marker = read_marker(Path(step.run_dir))
        if marker is None:
            lines.append(f"  {step.name:<14} {step.stage:<10} not finished")
            continue
        metrics = ", ".join(_fmt(k, v) for k, v in key_metrics(marker.get("metrics") or {}))
        secs = f"{marker['seconds']:.0f}s" if isinstance(marker.get("seconds"), int | float) else ""
        lines.append(f"  {step.name:<14} {step.stage:<10} {secs:>6}  {metrics or '-'}")
        summary = marker.get("summary") or {}
        if step.stage == "export" and marker.get("checkpoint"):
            extras.append(f"  exported model: {marker['checkpoint']}")
        if "completion" in summary:
            extras.append(f"  generation: {summary.get('prompt', '')!r} -> {summary['completion']!r}")
    text = "\n".join(lines + extras) + "\n"
    (Path(plan.run_dir) / "report.txt").write_text(text)
    return text


def key_metrics(metrics: dict) -> list[tuple[str, float]]:
    """Up to MAX_METRICS scalar metrics, the outcome ones (final losses, accuracies, scores) first."""
    scalars = [(k, v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)]
    first = [kv for kv in scalars if KEY.search(kv[0])]
    return (first + [kv for kv in scalars if kv not in first])[:MAX_METRICS]


def _fmt(k: str, v) -> str:
    return f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
