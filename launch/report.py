"""The closing report of a plan: each step's time and key results, the exported model and the generation."""

from __future__ import annotations

from pathlib import Path

from launch.headlines import headline
from launch.markers import read_marker
from launch.plan import Plan
from launch.progress import duration

MAX_COMPLETION = 200  # characters of a generated completion shown


def format_report(plan: Plan, elapsed: float | None = None) -> str:
    """A short text report built from the steps' markers (also written to <run dir>/report.txt);
    ``elapsed``: the wall time of the command that ran the plan this time."""
    width = max(len(s.name) for s in plan.steps)
    lines = [f"moeforge {plan.name}: {plan.run_dir}"]
    extras: list[str] = []
    total = cpu = 0.0
    for step in plan.steps:
        marker = read_marker(Path(step.run_dir))
        if marker is None:
            lines.append(f"  {step.name:<{width}}  {step.stage:<8}  {'':>6}  not finished")
            continue
        seconds = marker.get("seconds")
        total += seconds if isinstance(seconds, int | float) else 0.0
        cpu += marker.get("cpu_seconds") or 0.0
        took = duration(seconds) if isinstance(seconds, int | float) else ""
        summary = marker.get("summary") or {}
        first, *more = headline(step.stage, summary, marker.get("metrics") or {}).splitlines()
        lines.append(f"  {step.name:<{width}}  {step.stage:<8}  {took:>6}  {first}")
        lines += [" " * (width + 22) + line for line in more]
        if step.stage == "export" and marker.get("checkpoint"):
            extras.append(f"  exported model: {marker['checkpoint']}")
        if "completion" in summary:
            text = summary["completion"]
            shown = text if len(text) <= MAX_COMPLETION else text[:MAX_COMPLETION] + "..."
            extras.append(f"  generation: {_one_line(summary.get('prompt', ''))} -> {_one_line(shown)}")
    timing = f"  step times add up to {duration(total)}" + (f" (CPU {duration(cpu)})" if cpu else "")
    if elapsed is not None:
        timing += f"; this command ran {duration(elapsed)}"
    text = "\n".join(lines + [timing] + extras) + "\n"
    (Path(plan.run_dir) / "report.txt").write_text(text)
    return text


def _one_line(text: str) -> str:
    """``text`` in double quotes on one line (line breaks shown as \\n, other characters as they are)."""
    return '"' + text.replace("\n", "\\n") + '"'
