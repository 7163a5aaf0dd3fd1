"""The closing report of a plan: each step's key metrics, the exported model and the generation."""

from __future__ import annotations

from pathlib import Path

from launch.markers import read_marker
from launch.plan import Plan

MAX_METRICS = 4


def format_report(plan: Plan) -> str:
    """A short text report built from the steps' markers (also written to <run dir>/report.txt)."""
    lines = [f"moeforge {plan.name}: {plan.run_dir}"]
    extras: list[str] = []
    for step in plan.steps:
        marker = read_marker(Path(step.run_dir))
        if marker is None:
            lines.append(f"  {step.name:<14} {step.stage:<10} not finished")
            continue
        metrics = ", ".join(_fmt(k, v) for k, v in list(_scalars(marker.get("metrics") or {}))[:MAX_METRICS])
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


def _scalars(metrics: dict):
    for k, v in metrics.items():
        if isinstance(v, int | float) and not isinstance(v, bool):
            yield k, v


def _fmt(k: str, v) -> str:
    return f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
