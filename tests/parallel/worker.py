"""torchrun worker for tests/parallel: several layouts per launch, each compared with one process.

    torchrun --nproc-per-node N tests/parallel/worker.py OUT.json CKPT_DIR LAYOUT [LAYOUT ...]

LAYOUT is `dp2`, `ep2`, `pp2:gpipe`, `dp2xep2` (dp = 2 x 2), `pp2xdp2:1f1b`, ..., optionally with
`@save` (write a checkpoint to CKPT_DIR after step SAVE_AT) or `@resume` (load CKPT_DIR, then run the
remaining steps). Rank 0 computes the single-process reference (the training loop's loss and clipping on
the whole global batch) and writes, per layout, the loss and gradient norm of every step run to OUT.json.
"""

from __future__ import annotations

import faulthandler
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from model import ModelConfig, Transformer
from model.errors import MoeforgeError
from optim import OptimConfig, RoutingBiasUpdater, build_optimizer
from optim.distributed import build_distributed_optimizer, needs_gather
from train.losses import IGNORE, cross_entropy, lm_and_mtp_loss
from train.parallel import checkpoint
from train.parallel.env import init_distributed
from train.parallel.layout import resolve_layout
from train.parallel.mesh import build_mesh
from train.parallel.parallelize import parallelize

STEPS, SAVE_AT, ROWS, SEQ, MTP_WEIGHT, CLIP = 3, 1, 8, 16, 0.3, 1.0
HANG_S = 300
MODEL = dict(
    vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, head_dim=32,
    partial_rotary_factor=0.25, q_lora_rank=32, o_groups=2, o_lora_rank=32, sliding_window=8,
    layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                 "sliding_attention"],
    mlp_layer_types=["hash_moe", "moe", "moe", "moe"],
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
    index_n_heads=2, index_head_dim=16, index_topk=4, n_routed_experts=8, num_experts_per_tok=2,
    moe_intermediate_size=32, num_nextn_predict_layers=1, max_position_embeddings=256, hc_sinkhorn_iters=5,
    indexer_loss_coef=0.0,  # a per-batch mean (model.indexer_loss): no exact split over ranks, see report
    rope_parameters={"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 64,
                     "beta_fast": 32, "beta_slow": 1},
)
OPTIM = OptimConfig(lr=3e-3, ns_dtype="fp32", bias_update_speed=0.01)


def model_config() -> ModelConfig:
    return ModelConfig.from_dict(MODEL)


def new_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(model_config())


def global_batch(step: int) -> dict[str, torch.Tensor]:
    """Packed rows with two documents each: labels are next tokens inside a document, -100 elsewhere."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(2, MODEL["vocab_size"], (ROWS, SEQ), generator=g)
    cut = torch.randint(3, SEQ - 3, (ROWS, 1), generator=g)
    doc = (torch.arange(SEQ).unsqueeze(0) >= cut).long() + 10 * torch.arange(ROWS).unsqueeze(1)
    labels = torch.full_like(ids, IGNORE)
    same = doc[:, 1:] == doc[:, :-1]
    labels[:, :-1] = torch.where(same, ids[:, 1:], IGNORE)
    return {"input_ids": ids, "doc_ids": doc, "labels": labels}


def reference(model=None, opt=None, first: int = 0) -> list[dict]:
    """One process, whole global batch: the training loop's step (grad_accum=1); from step `first` when
    `model` and `opt` come from a checkpoint of it (the steps before are None)."""
    model = new_model() if model is None else model
    opt = build_optimizer(model, OPTIM)[0] if opt is None else opt
    updater = RoutingBiasUpdater(model, OPTIM.bias_update_speed)
    out_steps = [None] * first
    for step in range(first, STEPS):
        b = global_batch(step)
        out = model(b["input_ids"], b["doc_ids"])
        lm, mtp = lm_and_mtp_loss(out.logits, out.mtp_logits, b["labels"], b["doc_ids"])
        (lm + MTP_WEIGHT * mtp + out.balance_loss + out.indexer_loss).backward()
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], CLIP)
        opt.step()
        updater.update(out.expert_loads)
        opt.zero_grad(set_to_none=True)
        out_steps.append({"loss": lm.item(), "grad_norm": norm.item(),
                          "balance_loss": out.balance_loss.item()})
    b = global_batch(STEPS)
    with torch.no_grad():
        out_steps[-1]["eval"] = cross_entropy(model(b["input_ids"], b["doc_ids"]).logits, b["labels"]).item()
    return out_steps


def parse(spec: str) -> dict:
    axes, _, schedule = spec.partition(":")
    cfg = {"pp_schedule": schedule or "1f1b"}
    for axis in axes.split("x"):
        cfg[axis[:2]] = int(axis[2:])
    if cfg.get("pp", 1) > 1:
        cfg["microbatches"] = 4 if schedule in ("interleaved_1f1b", "zero_bubble", "zbv", "dualpipev") else 2
    return cfg


def layout_mesh(spec: str):
    """(mesh, action) of a layout spec such as `dp2xep2@save` (validated against this world)."""
    world = dist.get_world_size()
    spec, _, action = spec.partition("@")
    cfg = parse(spec)
    if "dp" in cfg:  # `dp2xep2`: experts carved out of data parallelism, dp = 2 x 2
        cfg["dp"] *= cfg.get("ep", 1)
    cfg.setdefault("dp", world // cfg.get("pp", 1))
    layout = resolve_layout(cfg, world, model_config(), batch_size=ROWS // cfg["dp"])
    return build_mesh(layout), action


def run_layout(spec: str, ckpt: str) -> list[dict]:
    pmesh, action = layout_mesh(spec)
    pm = parallelize(new_model(), pmesh, bias_update_speed=OPTIM.bias_update_speed)
    opt = build_distributed_optimizer(pm.modules, OPTIM)
    return train(pm, opt, action, lambda: checkpoint.save(Path(ckpt), pm, opt, {"step": SAVE_AT}),
                 lambda: checkpoint.load(Path(ckpt), pm, opt)["step"])


def train(pm, opt, action: str, save, load) -> list[dict]:
    """STEPS steps of the global batches (after `load()` for action `resume`; `save()` after step SAVE_AT
    for action `save`); per step the loss and gradient norm, and the eval loss after the last."""
    pmesh = pm.pmesh
    rows = ROWS // pmesh.layout.dp
    out_steps, first = [], 0
    if action == "resume":
        first = load()
        out_steps = [None] * first
    for step in range(first, STEPS):
        b = global_batch(step)
        local = {k: v[pmesh.dp_rank * rows : (pmesh.dp_rank + 1) * rows] for k, v in b.items()}
        res = pm.forward_backward([local], MTP_WEIGHT)
        norm = pm.clip_grad_norm_(CLIP)
        opt.step()
        pm.update_biases(res["expert_loads"])
        opt.zero_grad(set_to_none=True)
        out_steps.append({"loss": res["parts"]["loss"], "grad_norm": norm,
                          "balance_loss": res["parts"].get("balance_loss")})
        if action == "save" and step + 1 == SAVE_AT:
            save()
    b = global_batch(STEPS)
    out_steps[-1]["eval"] = pm.eval_loss({k: v[pmesh.dp_rank * rows : (pmesh.dp_rank + 1) * rows]
                                          for k, v in b.items()})[0]
    return out_steps


def muon_checks() -> dict:
    """Plain Muon refuses FSDP shards; distributed Muon gathers 2-D shards and keeps expert stacks local."""
    world = dist.get_world_size()
    pmesh = build_mesh(resolve_layout({"dp": world}, world, model_config()))
    pm = parallelize(new_model(), pmesh)
    try:
        build_optimizer(pm.modules[0], OPTIM)
        refused = ""
    except MoeforgeError as e:
        refused = str(e)
    params = dict(pm.modules[0].named_parameters())
    return {"plain_refuses": "sees only a shard" in refused,
            "gathers_2d": needs_gather(params["layers.1.attn.wq_a.weight"], "wq_a"),
            "experts_local": not needs_gather(params["layers.1.ffn.experts.w1"], "w1")}


def main() -> None:
    out_path, ckpt, specs = sys.argv[1], sys.argv[2], sys.argv[3:]
    faulthandler.dump_traceback_later(HANG_S, exit=True)  # a hang prints every thread's stack and exits
    init_distributed("cpu", timeout_s=HANG_S)
    torch.set_num_threads(1)
    ref = [reference()] if dist.get_rank() == 0 else [None]
    dist.broadcast_object_list(ref, src=0)
    results = {"reference": ref[0]}
    for spec in specs:
        results[spec] = muon_checks() if spec == "muon" else run_layout(spec, ckpt)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
