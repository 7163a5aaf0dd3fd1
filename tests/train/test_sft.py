"""The sft stage on a small V4: assistant-only loss learns the domain's solutions, init hand-off, resume."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from launch.compose import CONFIG_DIR, compose_stage
from launch.stages import get_stage
from model.errors import ConfigError
from train.sft import run

SMALL_MODEL = ["model.vocab_size=512", "model.num_hidden_layers=2", "model.num_nextn_predict_layers=0",
               "model.layer_types=[sliding_attention,compressed_sparse_attention]",
               "model.mlp_layer_types=[hash_moe,moe]"]


def domain_override(name: str) -> str:
    """`domain=<name>` where the root config lists the domain group, else `+domain=<name>`."""
    defaults = OmegaConf.load(CONFIG_DIR / "config.yaml").get("defaults", [])
    listed = any(isinstance(d, dict) and any(k.split()[-1] == "domain" for k in d) for d in defaults)
    return f"{'' if listed else '+'}domain={name}"


def compose(tmp_path, run_name: str, *overrides: str):
    cfg, run_dir = compose_stage(get_stage("sft"), [
        "stage=sft", domain_override("math"), f"hydra.run.dir={tmp_path / run_name}", *SMALL_MODEL,
        f"data.cache_dir={tmp_path / 'cache'}", "data.max_bytes=300000", "domain.n_train=200",
        "domain.n_val=16",
        "trainer.seq_len=96", "trainer.batch_size=4", "trainer.eval_batches=2", "trainer.log_every=1",
        "trainer.spike.enabled=false", "optim.lr=3e-3", "optim.warmup_steps=2", "logger.progress=false",
        "logger.wandb.mode=disabled", *overrides])
    return cfg, run_dir


def test_sft_learns_resumes_and_hands_off(tmp_path):
    cfg, run_dir = compose(tmp_path, "sft", "trainer.max_steps=12", "trainer.eval_every=0",
                           "checkpoint.every=8")
    summary = run(cfg, run_dir)
    m = summary["metrics"]
    assert summary["stage"] == "sft" and summary["domain"] == "math" and m["steps"] == 12
    assert m["final_val_loss"] < 0.7 * m["first_val_loss"], m  # held-out assistant-token loss drops
    assert (run_dir / "loss_curve.png").stat().st_size > 0
    final = run_dir / "checkpoints" / "step-12"
    assert summary["checkpoint"] == str(final) and (final / "tokenizer.json").is_file()

    # resume=auto continues the same run from its newest checkpoint
    (run_dir / "checkpoints" / "step-12").rename(run_dir / "checkpoints" / "gone")
    cfg, _ = compose(tmp_path, "sft", "trainer.max_steps=12", "trainer.eval_every=0", "checkpoint.every=8")
    again = run(cfg, run_dir)
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(13)) and again["metrics"]["steps"] == 12
    resumed, original = (load_file(p / "model.safetensors") for p in (final, final.parent / "gone"))
    assert all(torch.equal(resumed[k], original[k]) for k in original)  # exact resume

    # init= starts a new run from those weights, with that checkpoint's tokenizer
    cfg, run_dir2 = compose(tmp_path, "sft2", f"init={final.parent / 'gone'}", "trainer.max_steps=1",
                            "trainer.eval_every=0", "optim.lr=1e-9", "optim.warmup_steps=0",
                            "data.max_bytes=200000")
    second = run(cfg, run_dir2)
    assert second["metrics"]["first_val_loss"] == pytest.approx(m["final_val_loss"], rel=1e-4)
    assert (run_dir2 / "checkpoints" / "step-1" / "tokenizer.json").read_text() == (
        final.parent / "gone" / "tokenizer.json").read_text()


def test_sft_config_errors_name_the_key(tmp_path):
    cfg, run_dir = compose(tmp_path, "bad", "sft.source=webtext")
    with pytest.raises(ConfigError, match="sft.source"):
        run(cfg, run_dir)
    cfg, run_dir = compose(tmp_path, "bad2", "domain.n_val=0")
    with pytest.raises(ConfigError, match="domain.n_val"):
        run(cfg, run_dir)
