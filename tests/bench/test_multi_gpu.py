"""bench/multi_gpu.py over gloo on the CPU: the layouts' losses and gradient norms against the one-process run
on the same global batch, and its layout grammar."""

import json

import pytest

from bench.multi_gpu import main, parse_layout
from train.parallel.layout import Layout


def test_layouts_match_the_single_process_run(tmp_path):
    out = tmp_path / "multi.json"
    main(["--device", "cpu", "--model", "v4-tiny", "--precision", "fp32", "--layouts", "ep2,pp2",
          "--steps", "2", "--seq-len", "32", "--batch-size", "2", "--microbatches", "2", "--out", str(out)])
    rows = {r["layout"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"single (2 x 2 rows)", "ep2", "single (2 x 1 rows)", "pp2"}
    for name in ("ep2", "pp2"):
        assert rows[name]["status"] == "ok" and rows[name]["steps"] == 2, rows[name]
        assert rows[name]["max_rel_loss"] < 1e-4 and rows[name]["gpus"] == 2, rows[name]
        # the last step was profiled on every rank (trainer.profile): expert dispatch shows as all-to-all,
        # pipeline transfers as point-to-point, each as a share of the step
        assert [r["profiled_steps"] for r in rows[name]["profile"]] == [[2], [2]], rows[name]["profile"]
    assert rows["ep2"]["all_to_all_share"] > 0 and rows["ep2"]["p2p_share"] == 0, rows["ep2"]
    # (pp2's ep=1 dispatch still calls all_to_all_single, on a group of one)
    assert rows["pp2"]["p2p_share"] > 10 * rows["pp2"]["all_to_all_share"], rows["pp2"]
    for name in ("ep2", "pp2"):
        assert 0 < rows[name]["other_collective_share"] < 1 and rows[name]["bubble_share"] < 1, rows[name]


def test_layout_grammar():
    assert parse_layout("ep4xpp2:zbv", 4) == Layout(8, pp=2, dp=4, ep=4, pp_schedule="zbv", microbatches=4)
    assert parse_layout("dp2xep2", 4) == Layout(2, dp=2, ep=2)  # microbatches only for pipelines
    for bad in ("tp2", "ep0", "dp2xdp2", "dp3xep2", "pp2:nope"):
        with pytest.raises(SystemExit):
            parse_layout(bad)
