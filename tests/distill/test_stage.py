"""The distill stage: the objective against hand-computed KLs, frozen chunked teachers, the prompt sampler,
config errors, and (must-show) SFT experts distilled into one student that keeps >= 90% of each teacher's
held-out score, with an exact resume."""

import json
import math
import shutil

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from data.build import build_tokenizer
from data.config import DataConfig
from data.sft import task_conversations
from data.tasks import load_tasks
from data.tokenizer import tokenizer_hash
from distill.config import DistillConfig
from distill.losses import divergence
from distill.objective import distill_objective
from distill.prompts import PromptSampler
from distill.stage import build, run
from distill.teacher import Teacher
from launch.compose import compose_stage
from launch.stages import get_stage
from model import ModelConfig, Transformer
from model.errors import ConfigError
from rl.rollout import SamplingConfig, generate
from train import checkpoint, rng
from train.sft import run as sft_run

# Two sliding-attention layers (hash + learned MoE) whose window covers the whole sequence, so copying a
# function name from the prompt is learnable in a few hundred SFT steps.
MODEL = ["model.vocab_size=512", "model.hidden_size=64", "model.num_hidden_layers=2",
         "model.num_attention_heads=2", "model.head_dim=32", "model.q_lora_rank=32", "model.o_lora_rank=32",
         "model.moe_intermediate_size=64", "model.num_nextn_predict_layers=0", "model.sliding_window=128",
         "model.layer_types=[sliding_attention,sliding_attention]", "model.mlp_layer_types=[hash_moe,moe]"]
QUIET = ["logger.progress=false", "logger.wandb.mode=disabled", "trainer.spike.enabled=false",
         "trainer.log_every=50"]
SFT_STEPS = 300
STUDENT_SFT_STEPS = 300
DISTILL_STEPS = 20


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one intra-op thread is faster (and immune to a busy machine's other jobs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------- the objective
def softmax(z):
    e = [math.exp(x - max(z)) for x in z]
    return [x / sum(e) for x in e]


def hand_reverse_kl(s_row, t_row):
    p, q = softmax(s_row), softmax(t_row)
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q))


def test_loss_is_the_hand_computed_full_vocabulary_reverse_kl_and_only_the_student_gets_gradients():
    g = torch.Generator().manual_seed(0)
    student = (torch.randn(2, 3, 5, generator=g) * 2).requires_grad_(True)
    hidden = torch.randn(2, 3, 4, generator=g).requires_grad_(True)  # the teacher's side, made to track
    head_w = torch.randn(5, 4, generator=g).requires_grad_(True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    tokens = torch.randint(0, 5, (2, 3), generator=g)
    cfg = DistillConfig(chunk_rows=2).validate()

    loss, metrics = distill_objective(student, hidden, lambda h: h @ head_w.T, tokens, mask, cfg)
    t_logits = (hidden @ head_w.T).tolist()
    kls = [hand_reverse_kl(student[b, t].tolist(), t_logits[b][t]) for b, t in ((0, 0), (0, 1), (1, 0))]
    assert loss.item() == pytest.approx(sum(kls) / 3, rel=1e-5)  # mean over the three response tokens
    assert metrics["kl"].item() == pytest.approx(sum(kls) / 3, rel=1e-5)
    loss.backward()
    assert student.grad is not None and student.grad[0, :2].abs().sum() > 0
    assert student.grad[0, 2].abs().sum() == 0 and student.grad[1, 1:].abs().sum() == 0  # masked out
    assert hidden.grad is None and head_w.grad is None  # nothing flows into the teacher

    # sequence reduction: per sequence, then over sequences
    seq_cfg = DistillConfig(reduction="sequence").validate()
    loss_seq, _ = distill_objective(student, hidden, lambda h: h @ head_w.T, tokens, mask, seq_cfg)
    assert loss_seq.item() == pytest.approx(((kls[0] + kls[1]) / 2 + kls[2]) / 2, rel=1e-5)


def test_sampled_token_estimator_is_a_log_ratio_reward():
    g = torch.Generator().manual_seed(1)
    student = torch.randn(1, 4, 6, generator=g).requires_grad_(True)
    t_logits = torch.randn(1, 4, 6, generator=g)
    tokens = torch.randint(0, 6, (1, 4), generator=g)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    cfg = DistillConfig(kind="sampled").validate()
    loss, metrics = distill_objective(student, t_logits, lambda h: h, tokens, mask, cfg)
    ls, lt = student.log_softmax(-1), t_logits.log_softmax(-1)
    lp_s = ls.gather(-1, tokens[..., None]).squeeze(-1)
    lp_t = lt.gather(-1, tokens[..., None]).squeeze(-1)
    reward = -(lp_s - lp_t).detach()
    want = -(reward * lp_s * mask).sum() / mask.sum()  # REINFORCE with the per-token log-ratio, discount 0
    (g_got,) = torch.autograd.grad(loss, student, retain_graph=True)
    (g_want,) = torch.autograd.grad(want, student)
    assert torch.allclose(g_got, g_want, atol=1e-6)
    full = divergence(student.detach(), t_logits)  # the reported KL is still the full-vocabulary one
    assert metrics["kl"].item() == pytest.approx(((full * mask).sum() / 3).item(), rel=1e-5)
    assert metrics["sampled_reverse_kl"].item() == pytest.approx((-reward * mask).sum().item() / 3, rel=1e-5)


# ---------------------------------------------------------------------------------------------- components
def tiny_model_config() -> ModelConfig:
    cfg, _ = compose("sft", "unused", "+domain=math")
    return ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))


def test_teacher_is_frozen_and_its_chunked_head_equals_its_logits(tmp_path):
    cfg = tiny_model_config()
    rng.seed_all(3)
    model = Transformer(cfg)
    path = checkpoint.save(tmp_path, 0, model, None, config={"model": cfg.to_dict()})
    teacher = Teacher("math", path, torch.device("cpu"))
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    full = teacher.model(ids, with_mtp=False).logits  # the plain reference: the whole forward
    hidden = teacher.hidden(ids)
    assert hidden.shape == (2, 9, cfg.hidden_size)
    chunked = torch.cat([teacher.head(hidden.view(-1, cfg.hidden_size)[i:i + 5]) for i in range(0, 18, 5)])
    assert torch.allclose(chunked.view_as(full), full, atol=1e-5)
    assert isinstance(teacher.model.head, torch.nn.Linear)  # the head is back after the hidden pass


def test_prompt_sampler_balances_domains_and_resumes():
    pools = {"math": [{"id": f"m{i}", "domain": "math"} for i in range(5)],
             "code": [{"id": f"c{i}", "domain": "code"} for i in range(3)]}
    a = PromptSampler(pools, per_domain=2, seed=7)
    batches = [a.next_batch() for _ in range(6)]
    assert all([t["domain"] for t in b] == ["code", "code", "math", "math"] for b in batches)
    seen_code = [t["id"] for b in batches[:3] for t in b if t["domain"] == "code"]
    assert sorted(seen_code) == sorted(["c0", "c1", "c2"] * 2)  # every task once per pass
    b = PromptSampler(pools, per_domain=2, seed=7)
    b.load_state_dict({"steps": 4})
    assert b.next_batch() == batches[4] and a.state_dict() == {"steps": 6}
    other_seeds = [PromptSampler(pools, 2, seed=s).batch_at(0) for s in range(8, 12)]
    assert any(o != batches[0] for o in other_seeds)  # the seed decides the order


# ---------------------------------------------------------------------------------------------- the stage
def compose(stage: str, run_dir, *overrides: str):
    cfg, rd = compose_stage(get_stage(stage), [f"stage={stage}", f"hydra.run.dir={run_dir}", *MODEL, *QUIET,
                                               *overrides])
    return cfg, rd


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random-init checkpoint with the tokenizer trained on the built-in corpus, and a maker of more."""
    root = tmp_path_factory.mktemp("distill")
    data = [f"data.cache_dir={root / 'cache'}", "data.max_bytes=300000"]
    cfg, _ = compose("sft", root / "base", "+domain=math", *data)
    tok = build_tokenizer(DataConfig.from_dict(cfg.data), 512)
    model_dict = OmegaConf.to_container(cfg.model, resolve=True)

    def random_checkpoint(name: str, seed: int, **model_extra):
        rng.seed_all(seed)
        values = {**model_dict, **model_extra}
        return checkpoint.save(root / name, 0, Transformer(ModelConfig.from_dict(values)), None,
                               config={"model": values}, tokenizer_hash=tokenizer_hash(tok),
                               extra_files={"tokenizer.json": tok.to_str()})

    return root, data, random_checkpoint("base", 0), random_checkpoint


def sft(root, data, init, name: str, steps: int, *overrides: str) -> str:
    cfg, rd = compose("sft", root / name, f"init={init}", *data, f"trainer.max_steps={steps}",
                      "trainer.seq_len=128", "trainer.batch_size=8", "trainer.eval_every=0",
                      "checkpoint.every=0", "optim.lr=3e-3", "optim.warmup_steps=10", "domain.n_val=16",
                      *overrides)
    return sft_run(cfg, rd)["checkpoint"]


@pytest.fixture(scope="module")
def experts(base):
    """From one random base: a math expert and a code expert (SFT on their domain), and the student: the
    base after an SFT of the same length on both domains' conversations (a generalist)."""
    root, data, start, _ = base
    teachers = {d: sft(root, data, start, f"sft-{d}", SFT_STEPS, f"+domain={d}") for d in ("math", "code")}
    mixed = root / "mixed.jsonl"
    convs = task_conversations(load_tasks("math", "train", 1000, 0) + load_tasks("code", "train", 1000, 0))
    mixed.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    student = sft(root, data, start, "sft-mixed", STUDENT_SFT_STEPS, "+domain=math",
                  "sft.source=conversations", "data=files", f"data.path={mixed}")
    return root, student, teachers


def distill_overrides(student, teachers, *extra):
    return ["+distill=default", f"student={student}", f"teachers.math={teachers['math']}",
            f"teachers.code={teachers['code']}", "distill.max_new_tokens=32", "optim.lr=3e-3",
            "optim.warmup_steps=5", *extra]


@pytest.mark.slow
@pytest.mark.timeout(2400)  # three 300-step SFTs come first: about 5 minutes on two idle cores
def test_distilled_student_keeps_90_percent_of_each_teacher(experts):
    root, student, teachers = experts
    cfg, rd = compose("distill", root / "distill", *distill_overrides(
        student, teachers, f"trainer.max_steps={DISTILL_STEPS}", "trainer.eval_every=0",
        "checkpoint.every=0", "distill.prompts_per_domain=16", "optim.lr=3e-4", "optim.warmup_steps=1"))
    summary = run(cfg, rd)
    doms = summary["metrics"]["domains"]
    print((rd / "report.md").read_text())
    records = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    for own, other in (("math", "code"), ("code", "math")):
        m = doms[own]
        assert m["teacher_score"] >= 0.05, m  # the expert solves part of its held-out domain
        assert m["teacher_scores"][other] <= 0.5 * m["teacher_score"], m  # the other expert clearly worse
        assert m["student_score"] >= 0.9 * m["teacher_score"], m  # the one student keeps >= 90% of both
        kl = [r[f"kl/{own}"] for r in records if f"kl/{own}" in r]
        assert sum(kl[-5:]) < sum(kl[:5]), kl  # the divergence to the domain's teacher falls
    rows = [line for line in (rd / "report.md").read_text().splitlines() if line.startswith("| math |")]
    assert summary["stage"] == "distill" and len(rows) == 2  # the domain's row and its teacher's row
    assert summary["checkpoint"] == str(rd / "checkpoints" / f"step-{DISTILL_STEPS}")
    assert (rd / "kl_curve.png").stat().st_size > 0
    assert json.loads((rd / "summary.json").read_text())["metrics"]["domains"]["code"] == doms["code"]


def test_resume_is_exact(base):
    root, _, student, random_checkpoint = base
    teachers = {"math": random_checkpoint("t-math", 1), "code": random_checkpoint("t-code", 2)}
    over = distill_overrides(student, teachers, "trainer.max_steps=3", "optim.warmup_steps=1",
                             "trainer.eval_every=0",
                             "checkpoint.every=2", "checkpoint.keep=3", "distill.n_val=4",
                             "distill.prompts_per_domain=2")
    cfg, rd = compose("distill", root / "resume", *over)
    run(cfg, rd)
    final = rd / "checkpoints" / "step-3"
    final.rename(rd / "checkpoints" / "gone")
    again = run(*compose("distill", root / "resume", *over))
    assert again["metrics"]["steps"] == 3
    steps = [json.loads(x)["step"] for x in (rd / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]
    resumed, original = (load_file(p / "model.safetensors") for p in (final, rd / "checkpoints" / "gone"))
    assert all(torch.equal(resumed[k], original[k]) for k in original)
    shutil.rmtree(rd)


def student_grads(trainer, roll, domains):
    trainer.model.zero_grad(set_to_none=True)
    loss, parts, _ = trainer.backward(roll, domains)
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.model.zero_grad(set_to_none=True)
    return loss, parts, grads


def test_teacher_weights_and_micro_batches_combine_exactly(base):
    """loss = sum_d w_d * loss_d, whatever the micro-batch size; the teachers' weights never move and the
    step's samples are the student's own."""
    root, _, _, random_checkpoint = base
    student = random_checkpoint("s-no-aux", 0, balance_loss_alpha=0.0)  # the distillation loss only
    teachers = {"math": random_checkpoint("t-math", 1), "code": random_checkpoint("t-code", 2)}

    def trainer_with(*extra):
        cfg, rd = compose("distill", root / "weights", *distill_overrides(student, teachers, *extra),
                          "distill.prompts_per_domain=3", "distill.max_new_tokens=6", "distill.n_val=2",
                          "trainer.spike.enabled=false")
        t = build(cfg, rd)
        t.start()
        return t

    whole = trainer_with("+distill.weights.math=2.0", "+distill.weights.code=0.5")
    tasks = whole.data.train.next_batch()
    roll = whole.sample(tasks, 0)
    ref = generate(whole.model, roll.prompts, SamplingConfig(max_new_tokens=6),
                   torch.Generator().manual_seed(0))
    assert torch.equal(roll.tokens, ref.tokens)  # the student's own samples (seed * 1_000_003 + step = 0)
    domains = [t["domain"] for t in tasks]
    loss, parts, grads = student_grads(whole, roll, domains)
    split = trainer_with("distill.micro_batch=1")  # unit weights, one sequence per forward
    per_domain = {d: student_grads(split, roll, [x if x == d else "none" for x in domains])
                  for d in ("math", "code")}
    assert loss == pytest.approx(2.0 * per_domain["math"][0] + 0.5 * per_domain["code"][0], rel=1e-5)
    assert parts["kl/math"] == pytest.approx(per_domain["math"][1]["kl/math"], rel=1e-5)
    for name, g in grads.items():
        want = 2.0 * per_domain["math"][2].get(name, 0) + 0.5 * per_domain["code"][2].get(name, 0)
        assert torch.allclose(g, torch.as_tensor(want), atol=1e-6), name
    before = {n: p.clone() for n, p in whole.teachers["math"].model.named_parameters()}
    whole.train_step()
    assert all(torch.equal(p, before[n]) for n, p in whole.teachers["math"].model.named_parameters())
    shutil.rmtree(root / "weights")


def test_config_errors_name_the_key(base, tmp_path):
    root, _, base, random_checkpoint = base
    teachers = {"math": random_checkpoint("t-math", 1), "code": random_checkpoint("t-code", 2)}
    cases = [
        (["distill.kind=kl"], "distill.kind"),
        ([f"teachers.math={tmp_path / 'nowhere'}"], "teachers.math"),
        (["+distill.weights.chem=1.0"], "distill.weights.chem"),
        (["distill.prompts_per_domain=0"], "distill.prompts_per_domain"),
    ]
    for extra, key in cases:
        cfg, rd = compose("distill", tmp_path / "bad", *distill_overrides(base, teachers, *extra))
        with pytest.raises(ConfigError, match=key):
            run(cfg, rd)
    cfg, rd = compose("distill", tmp_path / "bad", "+distill=default", f"teachers.math={teachers['math']}")
    with pytest.raises(ConfigError, match="student"):
        run(cfg, rd)
    cfg, rd = compose("distill", tmp_path / "bad", "+distill=default", f"student={base}")
    with pytest.raises(ConfigError, match="teachers"):
        run(cfg, rd)
