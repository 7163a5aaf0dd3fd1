"""What a distillation run reports: per-domain numbers from metrics.jsonl and the teacher score matrix, as
summary metrics, a markdown table (report.md) and a KL curve (kl_curve.png)."""

from __future__ import annotations

from pathlib import Path

REPORT_FILE = "report.md"
PLOT_FILE = "kl_curve.png"


def _first_last(records: list[dict], key: str) -> tuple[float | None, float | None]:
    vals = [r[key] for r in records if r.get(key) is not None]
    return (vals[0], vals[-1]) if vals else (None, None)


def domain_metrics(records: list[dict], teachers: dict[str, str], weights: dict[str, float],
                   matrix: dict[str, dict[str, float]], n_val: dict[str, int]) -> dict[str, dict]:
    """Per domain: its teacher, weight, held-out size, KL first/last, student held-out score before/after,
    the teacher's score on its own domain, every teacher's score on this domain (the best other teacher's
    too), and student / own teacher before and after."""
    out = {}
    for d in sorted(teachers):
        kl_first, kl_final = _first_last(records, f"kl/{d}")
        before, after = _first_last(records, f"student_score/{d}")
        own = matrix[d][d]
        others = [matrix[n][d] for n in matrix if n != d]
        out[d] = {"teacher": teachers[d], "weight": weights[d], "n_val": n_val[d], "kl_first": kl_first,
                  "kl_final": kl_final, "student_score_before": before, "student_score": after,
                  "teacher_score": own, "other_teacher_score": max(others) if others else None,
                  "teacher_scores": {n: matrix[n][d] for n in sorted(matrix)},
                  "student_over_teacher_before": (before / own) if own and before is not None else None,
                  "student_over_teacher": (after / own) if own and after is not None else None}
    return out


def headline(domains: dict[str, dict]) -> dict[str, float | None]:
    """The flat numbers a pipeline report shows first: student and own-teacher score per domain."""
    out = {}
    for d, m in domains.items():
        out[f"student_score/{d}"], out[f"teacher_score/{d}"] = m["student_score"], m["teacher_score"]
    return out


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _count(x, n: int) -> str:
    """A held-out accuracy as `correct/n (accuracy)`."""
    return "-" if x is None else f"{round(x * n)}/{n} ({x:.3f})"


def write_report(run_dir: Path, domains: dict[str, dict], steps: int, kind: str) -> Path:
    """report.md: one row per domain (held-out counts: correct / prompts), the teachers' score matrix
    beneath."""
    lines = [f"# distill: {steps} steps, loss {kind}", "",
             "| domain | own teacher | best other teacher | student before | student after | "
             "student / teacher before | after | KL first | KL last |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for d, m in domains.items():
        counts = [_count(m[k], m["n_val"]) for k in ("teacher_score", "other_teacher_score",
                                                      "student_score_before", "student_score")]
        ratios = [_fmt(m[k]) for k in ("student_over_teacher_before", "student_over_teacher", "kl_first",
                                       "kl_final")]
        lines.append(f"| {d} | " + " | ".join(counts + ratios) + " |")
    names = sorted(domains)
    lines += ["", "Held-out score of each teacher (rows) on each domain (columns):", "",
              "| teacher | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(_count(domains[d]["teacher_scores"][n], domains[d]["n_val"])
                                               for d in names) + " |")
    path = Path(run_dir) / REPORT_FILE
    path.write_text("\n".join(lines) + "\n")
    return path


def kl_curve(records: list[dict], domains: list[str], out_png: Path) -> Path:
    """Per-domain divergence against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for d in domains:
        pts = [(r["step"], r[f"kl/{d}"]) for r in records if r.get(f"kl/{d}") is not None]
        if pts:
            ax.plot(*zip(*pts), "-", label=f"kl/{d}", linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("divergence to the teacher (nats / token)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return Path(out_png)
