"""Layout validation (must-show 4), stage split, Muon ownership and launcher environments; no processes."""

from __future__ import annotations

import pytest

from model import ModelConfig
from model.errors import ConfigError, MoeforgeError
from optim.distributed import assign_owners
from train.parallel.env import collective, detect_env
from train.parallel.layout import resolve_layout
from train.parallel.pipeline import split_layers


def tiny(**over) -> ModelConfig:
    base = dict(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, head_dim=16,
                q_lora_rank=16, o_groups=1, o_lora_rank=16, index_n_heads=1, index_head_dim=16,
                index_topk=2, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                layer_types=["sliding_attention"] * 4, mlp_layer_types=["moe"] * 4)
    return ModelConfig.from_dict({**base, **over})


@pytest.mark.parametrize("parallel, world, key, words", [
    ({"pp": 2}, 3, "parallel.pp", "not divisible"),
    ({"dp": 3}, 4, "parallel.dp", "must equal the world size"),
    ({"ep": 3}, 4, "parallel.ep", "must divide parallel.dp=4"),
    ({"ep": 8}, 8, "parallel.ep", "only 4 experts"),
    ({"pp": 8, "microbatches": 8}, 8, "parallel.pp", "only 4 layers"),
    ({"pp": 4, "pp_schedule": "zbv", "microbatches": 4}, 4, "parallel.pp", "8 pipeline stages"),
    ({"pp": 2, "microbatches": 1}, 2, "parallel.microbatches", ">= parallel.pp"),
    ({"pp": 2, "pp_schedule": "zbv", "microbatches": 2}, 4, "parallel.pp_schedule", "FSDP"),
    ({"pp_schedule": "nope"}, 1, "parallel.pp_schedule", "must be one of"),
])
def test_impossible_layouts_fail_before_any_process_group(parallel, world, key, words):
    with pytest.raises(ConfigError) as e:
        resolve_layout(parallel, world, tiny())
    assert e.value.key == key and words in str(e.value)


def test_microbatches_must_divide_the_batch():
    with pytest.raises(ConfigError, match="trainer.batch_size=6"):
        resolve_layout({"pp": 2, "microbatches": 4}, 2, tiny(), batch_size=6)


def test_layout_fills_dp_and_places_stages():
    layout = resolve_layout({"pp": 2, "ep": 2, "microbatches": 2}, 8, tiny())
    assert (layout.dp, layout.edp, layout.n_stages) == (4, 2, 2)
    loop = resolve_layout({"pp": 2, "pp_schedule": "interleaved_1f1b", "microbatches": 2}, 2, tiny())
    assert [loop.stage_ids(r) for r in range(2)] == [[0, 2], [1, 3]]
    v = resolve_layout({"pp": 2, "pp_schedule": "dualpipev", "microbatches": 2}, 2, tiny())
    assert [v.stage_ids(r) for r in range(2)] == [[0, 3], [1, 2]]
    assert not v.fsdp and resolve_layout({}, 1, tiny()).fsdp


def test_split_layers_is_contiguous_and_balanced():
    for n, s in [(4, 4), (5, 2), (43, 8), (7, 3)]:
        ranges = split_layers(n, s)
        assert [i for r in ranges for i in r] == list(range(n))
        sizes = [len(r) for r in ranges]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_muon_owners_balance_by_size():
    sizes = [100, 90, 10, 10, 10, 5, 80]
    owners = assign_owners(sizes, 3)
    loads = [sum(s for s, o in zip(sizes, owners) if o == r) for r in range(3)]
    assert max(loads) <= 110 and sorted(set(owners)) == [0, 1, 2]
    assert assign_owners([7], 4) == [0]


def test_rank_and_world_from_torchrun_or_slurm():
    slurm = detect_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"})
    assert (slurm.rank, slurm.world, slurm.local_rank, slurm.source) == (5, 8, 1, "slurm")
    torchrun = detect_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "SLURM_PROCID": "0"})
    assert (torchrun.rank, torchrun.world, torchrun.source) == (3, 4, "torchrun")
    assert detect_env({}).world == 1


def test_a_failed_collective_names_rank_and_operation():
    expected = r"rank 0: collective 'all_to_all_single\(ep\)' failed or timed out"
    with pytest.raises(MoeforgeError, match=expected):
        with collective("all_to_all_single(ep)"):
            raise RuntimeError("[gloo] Timed out waiting 600000ms for recv operation to complete")
