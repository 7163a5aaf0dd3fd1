"""engine=deepspeed pieces that need no process group: option checks, the DeepSpeed config, ZeRO partition
layouts, the optimizer on flat partitions against moeforge's Muon and torch's AdamW, the launcher command."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir

from launch.deepspeed_launcher import deepspeed_argv, render
from launch.launcher import LauncherConfig, launcher_config
from launch.procs import REPO_ROOT
from model.errors import ConfigError, MoeforgeError
from optim.muon import Muon
from optim.newton_schulz import hybrid_schedule
from train.config import validate
from train.parallel.deepspeed.flat import (
    FlatLayout,
    Piece,
    contiguous_layout,
    gather_whole,
    per_param_layout,
    scatter_pieces,
)
from train.parallel.deepspeed.optimizer import ADAMW, MUON, ZeroOptimizer, adamw_step
from train.parallel.deepspeed.options import (
    MAX_BUCKET,
    MIN_BUCKET,
    OFFLOAD_MAX_BUCKET,
    ZeroOptions,
    check_engine,
    ds_config,
)
from train.parallel.deepspeed.placement import buffers_to


@pytest.mark.parametrize("parallel, key, words", [
    ({"engine": "megatron"}, "parallel.engine", "must be one of fsdp, deepspeed"),
    ({"zero_stage": 2}, "parallel.zero_stage", "belong to parallel.engine=deepspeed"),
    ({"offload_optimizer": "cpu"}, "parallel.offload_optimizer", "needs parallel.engine=deepspeed"),
    ({"engine": "deepspeed", "zero_stage": 0}, "parallel.zero_stage", "must be 1, 2 or 3"),
    ({"engine": "deepspeed", "zero_stage": 2, "offload_param": "cpu"}, "parallel.offload_param",
     "zero_stage=3"),
    ({"engine": "deepspeed", "zero_stage": 3, "offload_optimizer": "nvme"}, "parallel.offload_optimizer",
     "none, cpu"),
    ({"engine": "deepspeed", "zero_stage": 1, "pp": 2}, "parallel.pp", "needs parallel.engine=fsdp"),
])
def test_engine_options_fail_naming_the_key(parallel, key, words):
    with pytest.raises(ConfigError) as e:
        check_engine(parallel)
    assert e.value.key == key and words in str(e.value)


def test_config_groups_compose_and_validate():
    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base=None):
        cfg = validate(compose("config", overrides=["parallel=zero3-offload"]))
        p = cfg.parallel
        got = (p.engine, p.zero_stage, p.offload_optimizer, p.offload_param)
        assert got == ("deepspeed", 3, "cpu", "cpu")
        with pytest.raises(ConfigError, match="parallel.offload_param"):
            validate(compose("config", overrides=["parallel=zero2", "parallel.offload_param=cpu"]))


def test_deepspeed_config_is_zero_only():
    cfg = ds_config(ZeroOptions(3, "cpu", "cpu"), micro_batch=4, dp=2, n_params=3_000_000)
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu"
    assert zero["offload_param"]["device"] == "cpu" and zero["stage3_param_persistence_threshold"] == 3000
    assert cfg["gradient_clipping"] == 0.0 and cfg["zero_force_ds_cpu_optimizer"] is False
    assert cfg["train_batch_size"] == 8 and "optimizer" not in cfg
    assert "offload_param" not in ds_config(ZeroOptions(2, "cpu"), 1, 1, 10)["zero_optimization"]


def test_offload_keeps_the_device_buckets_small():
    """With offload the device is short: ZeRO's preallocated gradient bucket is capped (2 GB fp32 at the
    2.9 B-parameter bench model otherwise); without offload buckets follow the model size to the maximum."""
    big = 3_000_000_000
    for opts in (ZeroOptions(3, "cpu", "cpu"), ZeroOptions(3, "cpu"), ZeroOptions(2, "cpu")):
        zero = ds_config(opts, 1, 1, big)["zero_optimization"]
        assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == OFFLOAD_MAX_BUCKET, opts
    assert ds_config(ZeroOptions(3), 1, 1, big)["zero_optimization"]["reduce_bucket_size"] == MAX_BUCKET
    assert ds_config(ZeroOptions(3, "cpu", "cpu"), 1, 1, 10)["zero_optimization"]["reduce_bucket_size"] \
        == MIN_BUCKET


def test_buffers_move_without_the_parameters():
    """ZeRO-3 placement moves only the buffers whole (the meta device stands for the GPU here)."""
    model = torch.nn.BatchNorm1d(4)
    buffers_to(model, torch.device("meta"))
    assert {b.device.type for b in model.buffers()} == {"meta"}
    assert {p.device.type for p in model.parameters()} == {"cpu"}


SHAPES = [torch.Size((3, 4)), torch.Size((5,)), torch.Size((2, 2, 3))]


def _reassemble(layout: FlatLayout, flats: list[torch.Tensor]) -> list[torch.Tensor]:
    whole = [torch.full((layout.numel(i),), float("nan")) for i in range(len(layout.names))]
    for rank, pieces in enumerate(layout.pieces):
        for p in pieces:
            src = flats[rank][p.part_off : p.part_off + p.length]
            whole[p.index][p.param_off : p.param_off + p.length] = src
    return [w.view(s) for w, s in zip(whole, layout.shapes)]


def test_zero12_layout_slices_the_group_buffer():
    params = [torch.randn(s) for s in SHAPES]
    offsets = [0, 14, 20]  # alignment padding after the first and the second parameter
    buffer = torch.zeros(33)
    for p, off in zip(params, offsets):
        buffer[off : off + p.numel()] = p.reshape(-1)
    layout = contiguous_layout(["a", "b", "c"], SHAPES, offsets, 11, world=3, rank=1)
    assert layout.mine() == [Piece(0, 0, 11, 1), Piece(1, 3, 0, 5), Piece(2, 9, 0, 2)]
    assert layout.gaps() == [(1, 2), (8, 1)]  # the padding after the first and the second parameter
    for got, want in zip(_reassemble(layout, list(buffer.split(11))), params):
        assert torch.equal(got, want)


def test_zero3_layout_slices_every_parameter():
    params = [torch.randn(s) for s in SHAPES]
    world = 3
    flats = [torch.cat([torch.nn.functional.pad(p.reshape(-1), (0, -p.numel() % world)).chunk(world)[r]
                        for p in params]) for r in range(world)]
    layout = per_param_layout(["a", "b", "c"], SHAPES, world, rank=2)
    assert layout.partition_numel == flats[2].numel() == 4 + 2 + 4
    for got, want in zip(_reassemble(layout, flats), params):
        assert torch.equal(got, want)


def test_a_layout_that_misses_elements_is_refused():
    with pytest.raises(MoeforgeError, match="does not cover"):
        FlatLayout(["a"], [torch.Size((4,))], 4, [[Piece(0, 0, 0, 3)]], rank=0)


def test_gather_and_scatter_round_trip_on_one_rank():
    layout = contiguous_layout(["a", "b", "c"], SHAPES, [0, 12, 17], 30, world=1, rank=0)
    flat = torch.randn(30)
    owners = layout.owners([0, 1, 2])
    whole = gather_whole(layout, flat, owners)
    assert [tuple(whole[i].shape) for i in range(3)] == [tuple(s) for s in SHAPES]
    out = torch.zeros(30)
    scatter_pieces(layout, whole, owners, out)
    assert torch.equal(out[:29], flat[:29]) and out[29] == 0  # the padding element is nobody's


def test_adamw_step_is_torchs_adamw():
    torch.manual_seed(0)
    p = torch.randn(40)
    ref = torch.nn.Parameter(p.clone())
    opt = torch.optim.AdamW([ref], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    group, state = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}, {}
    for _ in range(5):
        g = torch.randn(40)
        ref.grad = g.clone()
        opt.step()
        adamw_step(p, g, state, group)
    torch.testing.assert_close(p, ref.detach(), rtol=1e-6, atol=1e-7)
    assert float(state["step"]) == 5


def _flat_like_deepspeed(zero: ZeroOptimizer) -> list[torch.Tensor]:
    """What ZeRO does on one rank: each group's parameters become one flat fp32 partition."""
    flats = []
    for group in zero.param_groups:
        members = group["params"]
        flat = torch.cat([p.detach().reshape(-1) for p in members]).requires_grad_()
        offsets = [sum(p.numel() for p in members[:k]) for k in range(len(members))]
        layout = contiguous_layout(group["names"], [p.shape for p in members], offsets, flat.numel(), 1, 0)
        zero.layouts[id(flat)] = layout
        group["params"] = [flat]
        flats.append(flat)
    return flats


def test_zero_optimizer_steps_muon_and_adamw_like_moeforges_optimizers():
    torch.manual_seed(0)
    params = {"fn": torch.randn(8, 6), "experts": torch.randn(3, 4, 6), "norm": torch.randn(6)}
    coeffs = hybrid_schedule()
    muon_opts = dict(kind=MUON, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True, update_rms=0.18,
                     ns_coeffs=coeffs, ns_dtype="fp32")
    groups = [{"params": [params["fn"]], "names": ["fn"], "label": "muon", "row_splits": (2, 2, 4),
               **muon_opts},
              {"params": [params["experts"]], "names": ["experts"], "label": "muon/e", "row_splits": None,
               **muon_opts},
              {"params": [params["norm"]], "names": ["norm"], "label": ADAMW, "kind": ADAMW, "lr": 0.02,
               "weight_decay": 0.1, "betas": (0.9, 0.95), "eps": 1e-8}]
    ref = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    muon = Muon([{"params": [ref["fn"]], "row_splits": (2, 2, 4)}, {"params": [ref["experts"]]}], lr=0.02,
                weight_decay=0.1, momentum=0.95, update_rms=0.18, ns_coeffs=coeffs, ns_dtype="fp32",
                batched=False)  # the per-matrix reference
    adamw = torch.optim.AdamW([ref["norm"]], lr=0.02, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    zero = ZeroOptimizer(groups, torch.device("cpu"))
    flats = _flat_like_deepspeed(zero)
    for step in range(3):
        grads = {k: torch.randn(v.shape) for k, v in params.items()}
        zero.clip_coef = 0.5 if step == 1 else 1.0
        zero.skip = step == 2  # a step the spike guard skipped changes nothing
        for flat, name in zip(flats, ["fn", "experts", "norm"]):
            flat.grad = grads[name].reshape(-1).clone()
        zero.step()
        if step < 2:
            for k, p in ref.items():
                p.grad = grads[k] * zero.clip_coef
            muon.step()
            adamw.step()
    for flat, name in zip(flats, ["fn", "experts", "norm"]):
        torch.testing.assert_close(flat.detach().view(params[name].shape), ref[name].detach(), rtol=1e-5,
                                   atol=1e-6)


def test_zero_optimizer_refuses_an_unknown_partition():
    zero = ZeroOptimizer([{"params": [torch.randn(2, 2)], "names": ["w"], "label": "muon", "kind": MUON,
                           "lr": 0.1, "weight_decay": 0.0, "momentum": 0.9, "nesterov": True,
                           "update_rms": 0.2, "ns_coeffs": hybrid_schedule(), "ns_dtype": "fp32",
                           "row_splits": None}], torch.device("cpu"))
    flat = torch.zeros(4, requires_grad=True)
    flat.grad = torch.ones(4)
    zero.param_groups[0]["params"] = [flat]
    with pytest.raises(MoeforgeError, match="layout it does not know"):
        zero.step()


def test_deepspeed_launcher_command(tmp_path):
    local = tmp_path / "local"
    local.write_text("# this machine\nlocalhost slots=2\n")
    lc = LauncherConfig(name="deepspeed", nproc_per_node=2, hostfile=str(local), rdzv_port=29600)
    argv = deepspeed_argv("train.pretrain", ["parallel=zero3", "hydra.run.dir=/r"], lc)
    assert render(argv) == (f"deepspeed --hostfile {local} --num_nodes 1 --master_addr 127.0.0.1 "
                            "--no_ssh_check --num_gpus 2 --master_port 29600 --no_local_rank --module "
                            "train.pretrain parallel=zero3 hydra.run.dir=/r")
    cluster = tmp_path / "cluster"
    cluster.write_text("node-a slots=8\nnode-b slots=8\nnode-c slots=4\n")
    lc = LauncherConfig(name="deepspeed", nproc_per_node=8, nodes=2, hostfile=str(cluster))
    text = render(deepspeed_argv("train.pretrain", [], lc))
    assert text.startswith(f"deepspeed --hostfile {cluster} --num_nodes 2 --num_gpus 8 ")
    assert "master_addr" not in text  # DeepSpeed asks the first host for it over ssh


@pytest.mark.parametrize("hostfile, nodes, nproc, key, words", [
    (None, 2, 1, "launcher.hostfile", "needs a hostfile"),
    ("missing", 1, 1, "launcher.hostfile", "does not exist"),
    ("node-a slots=eight", 1, 1, "launcher.hostfile", "expected '<host> slots=<n>'"),
    ("node-a slots=8", 2, 8, "launcher.nodes", "lists 1 hosts"),
    ("node-a slots=8\nnode-b slots=4", 2, 8, "launcher.nproc_per_node", "node-b (slots=4)"),
])
def test_deepspeed_launcher_refuses_what_cannot_start(tmp_path, hostfile, nodes, nproc, key, words):
    path = None
    if hostfile is not None:
        path = tmp_path / "hosts"
        if hostfile != "missing":
            path.write_text(hostfile + "\n")
    lc = LauncherConfig(name="deepspeed", nodes=nodes, nproc_per_node=nproc,
                        hostfile=str(path) if path else None)
    with pytest.raises(ConfigError) as e:
        deepspeed_argv("train.pretrain", [], lc)
    assert e.value.key == key and words in str(e.value)


def test_launcher_deepspeed_may_span_nodes():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"launcher": {"name": "deepspeed", "nodes": 2, "hostfile": "hosts"}})
    assert launcher_config(cfg).world_size == 2
    with pytest.raises(ConfigError, match="launcher.nodes"):
        launcher_config(OmegaConf.create({"launcher": {"name": "torchrun", "nodes": 2}}))


def test_the_callers_autocast_is_entered_again_inside_the_engine_module():
    """DeepSpeed's engine turns a CUDA autocast off around its module; `DictOutput` re-enters the caller's
    state: with autocast off outside, the module still runs in bf16 when told the caller had it on."""
    from model import Transformer
    from tests.model.v4_test_helpers import small_model_config
    from train.parallel.deepspeed.engine import DictOutput

    model = Transformer(small_model_config(["sliding_attention"]))
    ids = torch.randint(0, 97, (1, 9))
    wrapped = DictOutput(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(ids, None).logits
    with torch.autocast("cpu", enabled=False):
        got = wrapped(ids, None, autocast=("cpu", True, torch.bfloat16))["logits"]
        plain = wrapped(ids, None, autocast=("cpu", False, torch.bfloat16))["logits"]
    assert want.dtype == got.dtype == torch.bfloat16 and plain.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)
