"""The run's report: per domain, held-out counts of the own teacher, the best other teacher and the student
before and after, with the ratios and KLs, from metrics records and the teacher score matrix."""

from distill.report import domain_metrics, write_report


def test_report_counts_before_after_and_the_other_teacher(tmp_path):
    records = [{"step": 0, "student_score/math": 8 / 64, "student_score/code": 0.25},
               {"step": 1, "kl/math": 0.5, "kl/code": 0.4},
               {"step": 2, "kl/math": 0.2, "kl/code": 0.1, "student_score/math": 24 / 64,
                "student_score/code": 0.5}]
    matrix = {"math": {"math": 25 / 64, "code": 0.0}, "code": {"math": 1 / 64, "code": 0.75}}
    doms = domain_metrics(records, {"math": "m", "code": "c"}, {"math": 1.0, "code": 2.0}, matrix,
                          {"math": 64, "code": 32})
    m = doms["math"]
    assert (m["student_score_before"], m["student_score"], m["teacher_score"]) == (8 / 64, 24 / 64, 25 / 64)
    assert m["other_teacher_score"] == 1 / 64 and m["kl_first"] == 0.5 and m["kl_final"] == 0.2
    assert m["student_over_teacher_before"] == 8 / 25 and m["student_over_teacher"] == 24 / 25
    lines = write_report(tmp_path, doms, 2, "reverse_kl").read_text().splitlines()
    row = next(line for line in lines if line.startswith("| math |"))
    assert row == ("| math | 25/64 (0.391) | 1/64 (0.016) | 8/64 (0.125) | 24/64 (0.375) | 0.320 | 0.960 | "
                   "0.500 | 0.200 |")
    code = next(line for line in lines if line.startswith("| code |"))
    assert code.startswith("| code | 24/32 (0.750) | 0/32 (0.000) | 8/32 (0.250) | 16/32 (0.500) |")
    assert "| math | 0/32 (0.000) | 25/64 (0.391) |" in lines  # the matrix: the math teacher on each domain
