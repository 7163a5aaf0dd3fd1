"""The grpo stage: mechanics (checkpoints, metrics, PNG, exact resume, reference KL, router replay), the
direction of one update, and must-show 1 (SFT then GRPO raises held-out accuracy: seed 0 in every run, seed 1
opt-in, see below)."""

import json
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from launch.compose import CONFIG_DIR, compose_stage
from launch.stages import get_stage
from model.errors import ConfigError
from rl import grpo
from rl.rewards import score_batch
from rl.rollout import SamplingConfig, evaluate_tasks, generate, task_prompt, token_logprobs
from train import checkpoint, sft
from train.config import validate

SMALL_MODEL = ["model.vocab_size=512", "model.num_hidden_layers=2", "model.num_nextn_predict_layers=0",
               "model.layer_types=[sliding_attention,compressed_sparse_attention]",
               "model.mlp_layer_types=[hash_moe,moe]"]


def domain_override(name: str) -> str:
    """`domain=<name>` where the root config lists the domain group, else `+domain=<name>`."""
    defaults = OmegaConf.load(CONFIG_DIR / "config.yaml").get("defaults", [])
    listed = any(isinstance(d, dict) and any(k.split()[-1] == "domain" for k in d) for d in defaults)
    return f"{'' if listed else '+'}domain={name}"


def compose(stage: str, run_dir, *overrides: str):
    domain = [] if any(o.lstrip("+").startswith("domain=") for o in overrides) else [domain_override("math")]
    return compose_stage(get_stage(stage), [
        f"stage={stage}", *domain, f"hydra.run.dir={run_dir}", *SMALL_MODEL,
        f"data.cache_dir={run_dir.parent / 'cache'}", "data.max_bytes=300000",
        "logger.progress=false", "logger.wandb.mode=disabled", "trainer.spike.enabled=false",
        *overrides])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine oversubscribed threads cost far more than they give."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sft_checkpoint(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("grpo")
    cfg, run_dir = compose("sft", root / "sft", "domain.n_train=100", "domain.n_val=8", "trainer.max_steps=4",
                           "trainer.seq_len=96", "trainer.batch_size=4", "trainer.eval_every=0",
                           "optim.warmup_steps=1")
    return root, sft.run(cfg, run_dir)["checkpoint"]


def small_grpo(root, name, init, *overrides):
    return compose("grpo", root / name, f"init={init}", "domain.n_train=50", "domain.n_val=4",
                   "grpo.group_size=2", "grpo.prompts_per_step=2", "grpo.max_new_tokens=6",
                   "grpo.micro_batch=3",
                   "grpo.dynamic_sampling=false", "grpo.format_reward=0.5", "trainer.eval_every=0",
                   "optim.warmup_steps=0", "optim.lr=1e-3", *overrides)


def assert_reward_curve(run_dir):
    """The stage wrote reward_curve.png: a decodable PNG with something drawn on it."""
    import matplotlib.image

    png = run_dir / "reward_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(png)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100 and pixels[..., :3].std() > 0.05


def test_grpo_stage_writes_its_outputs_and_resumes_exactly(sft_checkpoint):
    root, init = sft_checkpoint
    cfg, run_dir = small_grpo(root, "g", init, "trainer.max_steps=3", "checkpoint.every=2", "grpo.beta=0.1",
                              "grpo.epochs=2", "grpo.router_replay=true")
    summary = grpo.run(cfg, run_dir)
    m = summary["metrics"]
    assert summary["stage"] == "grpo" and m["steps"] == 3 and m["n_val"] == 4
    assert 0 <= m["accuracy_before"] <= 1 and 0 <= m["accuracy_after"] <= 1
    assert_reward_curve(run_dir)
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    for key in ("reward_mean", "reward_std", "accuracy", "kl_ref", "clip_frac_high", "response_len",
                "entropy", "logp_mismatch", "grad_norm"):
        assert all(r[key] is not None for r in records[1:]), key
    assert all(r["logp_mismatch"] < 1e-3 for r in records[1:])  # rollout log-probs = training pass's
    final = run_dir / "checkpoints" / "step-3"
    assert summary["checkpoint"] == str(final)

    final.rename(run_dir / "checkpoints" / "first")
    cfg, _ = small_grpo(root, "g", init, "trainer.max_steps=3", "checkpoint.every=2", "grpo.beta=0.1",
                        "grpo.epochs=2", "grpo.router_replay=true")
    again = grpo.run(cfg, run_dir)
    assert again["metrics"]["accuracy_before"] == m["accuracy_before"]  # kept in the checkpoint
    a, b = (load_file(p / "model.safetensors") for p in (final, run_dir / "checkpoints" / "first"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_one_update_follows_the_advantages(sft_checkpoint):
    root, init = sft_checkpoint
    cfg, run_dir = small_grpo(root, "dir", init, "trainer.max_steps=1", "optim.name=adamw", "optim.lr=3e-3",
                              "optim.weight_decay=0.0", "grpo.clip_high=10.0",
                              "grpo.loss_agg=seq_mean_token_mean")
    state = grpo.GRPORun(validate(cfg), run_dir)
    state.start()
    roll, _ = state.rollout(state.train_tasks[:2])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])  # prompt 0's responses up, prompt 1's down
    with torch.no_grad():
        before = token_logprobs(state.model, roll)[0].sum(1)
    metrics = state.optimise(roll, adv)
    with torch.no_grad():
        after = token_logprobs(state.model, roll)[0].sum(1)
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-3)
    assert ((after - before) * adv > 0).all(), (before, after)


def test_dynamic_sampling_refills_with_new_prompts_up_to_the_cap(sft_checkpoint):
    root, init = sft_checkpoint
    cfg, run_dir = small_grpo(root, "ds", init, "trainer.max_steps=1", "grpo.dynamic_sampling=true",
                              "grpo.max_refill_rounds=2", "grpo.prompts_per_step=3")
    state = grpo.GRPORun(validate(cfg), run_dir)
    state.start()
    seen = []
    rollout = state.rollout
    state.rollout = lambda tasks, gen=None: seen.append([t["id"] for t in tasks]) or rollout(tasks, gen)
    rec = state.train_step()
    rounds = rec["sampling_rounds"]
    assert 1 <= rounds <= 3 and len(seen) == rounds and all(1 <= len(ids) <= 3 for ids in seen)
    assert len({i for ids in seen for i in ids}) == sum(map(len, seen))  # refill rounds draw new prompts
    assert seen[0] == [t["id"] for t in grpo.step_prompts(state.train_tasks, 3, state.t.seed, 0)]
    informative = rec["groups_sampled"] - rec["groups_dropped"]
    assert rec["groups_sampled"] == sum(map(len, seen)) and rec["groups_trained"] == min(3, informative)
    assert rounds == 3 or rec["groups_trained"] == 3  # stopped early only when the batch was full
    assert 0 <= rec["groups_refilled"] <= rec["groups_trained"]
    assert rec["kept_fraction"] == pytest.approx(informative / rec["groups_sampled"])


def test_sampled_evaluation_is_the_mean_over_seeded_samples(sft_checkpoint, monkeypatch):
    import rl.rewards

    root, init = sft_checkpoint
    cfg, run_dir = small_grpo(root, "ev", init, "trainer.max_steps=1", "grpo.eval_temperature=1.0",
                              "grpo.eval_samples=3", "grpo.format_reward=0.0")
    state = grpo.GRPORun(validate(cfg), run_dir)
    state.start()
    scored = []
    monkeypatch.setattr(rl.rewards, "score_batch", lambda t, r: scored.append((t, r)) or score_batch(t, r))
    got = state.evaluate(seed=5)
    assert got == state.evaluate(seed=5) and got["n"] == 4 and scored[0] == scored[1]
    rows = [t for t in state.val_tasks for _ in range(3)]
    roll = generate(state.model, [task_prompt(t, state.tok) for t in rows],
                    SamplingConfig(max_new_tokens=6, temperature=1.0), torch.Generator().manual_seed(5))
    assert scored[0] == (rows, roll.texts(state.tok))  # the same seeded samples, 3 per held-out task
    assert len(set(roll.texts(state.tok))) > 4  # sampled, not greedy
    scores = score_batch(rows, roll.texts(state.tok))
    assert got["accuracy"] == sum(s["correct"] for s in scores) / 12
    assert got["format_rate"] == sum(s["format_ok"] for s in scores) / 12


def test_grpo_needs_a_starting_checkpoint(tmp_path):
    cfg, run_dir = compose("grpo", tmp_path / "g", "trainer.max_steps=1")
    with pytest.raises(ConfigError, match="init"):
        grpo.run(cfg, run_dir)




# Must-show 1 per domain: (domain keys, SFT keys, GRPO keys). The SFT stops where the format is learnt and the
# held-out score has headroom. math: two-digit problems with a one-digit operand and no carries, so that a
# held-out problem (never trained on, in any wording) is a new combination of digit facts seen in training.
# The math SFT sees the first 500 of the 2000 training tasks (411 of their 997 facts): GRPO then practises
# facts the SFT did not memorise, which is what carries over to held-out ones (SFT on all 2000: seed 1 gained
# only 0.346 -> 0.379). GRPO runs AdamW at 5e-4 for math and 3e-4 for code (code at 5e-4 loses its format
# within 12 steps; math at 1e-3 loses held-out accuracy within 4), with dynamic sampling and refill (math:
# only about 1 group in 3 has mixed rewards). Every suite run takes seed 0; the opt-in test adds seed 1.
# Shorter GRPO is not robust: math at 20 steps went 0.340 -> 0.391 (seed 0, bar 0.053), code at 20 steps
# 0.389 -> 0.434 (seed 1, bar 0.088); the policy still moves by about 0.04 between checkpoints there.
MATH_TASKS = ["domain.options.difficulty=2", "domain.options.carries=false", "domain.options.max_b=9"]
LEARNING = {
    "math": (MATH_TASKS, ["domain.n_train=500", "trainer.max_steps=300", "trainer.seq_len=128"],
             ["trainer.max_steps=40", "optim.lr=5e-4"]),
    "code": ([], ["trainer.max_steps=90", "trainer.seq_len=256"], ["trainer.max_steps=30", "optim.lr=3e-4"]),
}
CI_SEED, MORE_SEEDS = 0, (1,)
EVAL_SEEDS = 3  # the SFT model's held-out score under this many sampling seeds gives the noise


def greedy_accuracy(state) -> float:
    return evaluate_tasks(state.model, state.tok, state.val_tasks, max_new_tokens=state.g.max_new_tokens,
                          batch_size=state.g.eval_batch, system=state.domain.system)["accuracy"]


def assert_grpo_raises_held_out_accuracy(tmp_path, name: str, seed: int, recipe: tuple, greedy: bool = True):
    """A fresh small V4 learns the format by SFT; GRPO then raises the held-out accuracy (the mean over 4
    samples at the rollout temperature on each of 128 tasks never seen in training) by at least 0.05 and by
    at least 3x the spread of the SFT model's score over sampling seeds. Greedy is printed when asked."""
    domain_keys, sft_keys, grpo_keys = recipe
    common = [domain_override(name), "domain.n_train=2000", "domain.n_val=128", *domain_keys,
              f"trainer.seed={seed}", "trainer.eval_every=0", "checkpoint.every=0"]
    cfg, run_dir = compose("sft", tmp_path / "sft", *common, *sft_keys, "trainer.batch_size=8",
                           "optim.lr=3e-3", "optim.warmup_steps=5")
    init = sft.run(cfg, run_dir)["checkpoint"]
    rl_keys = [f"init={init}", *common, "grpo.group_size=8", "grpo.prompts_per_step=16", "grpo.epochs=2",
               "grpo.temperature=1.0", "grpo.eval_temperature=1.0", "grpo.eval_samples=4", "optim.name=adamw",
               "optim.warmup_steps=0", *grpo_keys]
    cfg, run_dir = compose("grpo", tmp_path / "grpo", *rl_keys)
    summary = grpo.run(cfg, run_dir)
    m = summary["metrics"]
    assert_reward_curve(run_dir)

    probe_cfg, probe_dir = compose("grpo", tmp_path / "probe", *rl_keys)
    probe = grpo.GRPORun(validate(probe_cfg), probe_dir)
    probe.start()  # the SFT model: its score under other sampling seeds (the noise), and greedy
    other_seeds = range(seed + 1, seed + EVAL_SEEDS)
    sft_scores = [m["accuracy_before"], *(probe.evaluate(seed=s)["accuracy"] for s in other_seeds)]
    spread = max(sft_scores) - min(sft_scores)
    line = ""
    if greedy:
        scores = [greedy_accuracy(probe)]
        checkpoint.load(Path(summary["checkpoint"]), probe.model)
        scores.append(greedy_accuracy(probe))
        line = f"; greedy {scores[0]:.3f} -> {scores[1]:.3f}"
    print(f"\n{name} seed {seed}: held-out accuracy on {m['n_val']} tasks x 4 samples: SFT "
          f"{m['accuracy_before']:.3f} (sampling seeds: {' '.join(f'{x:.3f}' for x in sft_scores)}) -> GRPO "
          f"{m['accuracy_after']:.3f} after {m['steps']} steps{line}")
    assert m["n_val"] == 128
    assert m["accuracy_after"] >= m["accuracy_before"] + max(0.05, 3 * spread), (m, sft_scores)


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("name", sorted(LEARNING))
def test_sft_then_grpo_raises_held_out_accuracy(tmp_path, name):
    """Must-show 1 in every suite run, seed 0 (one core of a loaded 2-core machine: math 367 s, code 472 s)"""
    assert_grpo_raises_held_out_accuracy(tmp_path, name, CI_SEED, LEARNING[name], greedy=False)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MOEFORGE_LEARNING_TESTS") != "1",
                    reason="7 to 10 minutes per domain and seed on one core; set MOEFORGE_LEARNING_TESTS=1")
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("seed", MORE_SEEDS)
@pytest.mark.parametrize("name", sorted(LEARNING))
def test_sft_then_grpo_raises_held_out_accuracy_other_seeds(tmp_path, name, seed):
    """Must-show 1 for more seeds (opt-in), greedy accuracy printed too."""
    assert_grpo_raises_held_out_accuracy(tmp_path, name, seed, LEARNING[name])
