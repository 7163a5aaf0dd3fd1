"""export: a training checkpoint -> a Hugging Face directory; generate: a completion through transformers."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from launch.cli import main
from launch.compose import CONFIG_DIR


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real training checkpoint (train.checkpoint) of a 2-layer V4 with a trained BPE tokenizer."""
    from data.tokenizer import tokenizer_hash, train_tokenizer
    from model import ModelConfig, Transformer
    from train.checkpoint import save

    texts = ["def add(a, b):\n    return a + b\n", "What is 3 + 4? The answer is \\boxed{7}.\n"] * 50
    tok = train_tokenizer(texts, 280)
    d = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "model" / "v4-tiny.yaml"))
    d.update(vocab_size=280, num_hidden_layers=2, mlp_layer_types=["hash_moe", "moe"],
             layer_types=["sliding_attention", "compressed_sparse_attention"])
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_dict(d))
    root = tmp_path_factory.mktemp("run") / "checkpoints"
    return save(root, 1, model, None, config={"model": d}, tokenizer_hash=tokenizer_hash(tok),
                extra_files={"tokenizer.json": tok.to_str()})


def run_cli(*args: str) -> None:
    with pytest.raises(SystemExit) as e:
        main(list(args))
    assert e.value.code == 0


@torch.no_grad()
def test_export_then_generate_through_transformers(checkpoint, tmp_path, monkeypatch, capsys):
    from transformers import AutoTokenizer

    from launch.export import load_checkpoint

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "hf"
    run_cli("export", f"checkpoint={checkpoint}", f"out={out}", f"hydra.run.dir={tmp_path}/export")
    for name in ("config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (out / name).is_file(), name
    summary = json.loads((tmp_path / "export" / "summary.json").read_text())
    assert summary["checkpoint"] == str(out) and summary["metrics"]["max_logit_diff"] < 1e-4
    assert json.loads((out / "config.json").read_text())["layer_types"][1] == "compressed_sparse_attention"

    prompt = "def add(a, b):"
    run_cli("generate", f"model={out}", f"prompt='{prompt}'", "max_new_tokens=6",
            f"hydra.run.dir={tmp_path}/gen")
    gen = json.loads((tmp_path / "gen" / "summary.json").read_text())
    assert gen["prompt"] == prompt and 1 <= gen["metrics"]["new_tokens"] <= 6
    assert prompt + gen["completion"] in capsys.readouterr().out

    # the same greedy completion from our own model on the checkpoint, token by token
    model, _ = load_checkpoint(checkpoint)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok(prompt, return_tensors="pt").input_ids
    for _ in range(gen["metrics"]["new_tokens"]):
        nxt = model(ids, with_mtp=False).logits[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    assert tok.decode(ids[0, -gen["metrics"]["new_tokens"]:], skip_special_tokens=True) == gen["completion"]


@pytest.mark.parametrize("args, message", [
    (["export", "checkpoint=/no/such/ckpt"], "checkpoint: input checkpoint /no/such/ckpt does not exist"),
    (["export"], "checkpoint: must be set"),
    (["export", "checkpoint=/x", "verify=perhaps"], "verify: Value 'perhaps' is not a valid bool"),
    (["generate", "model=/no/such/dir", "prompt=hi"], "model: input checkpoint /no/such/dir does not exist"),
    (["generate", "model=/tmp"], "prompt: must be set"),
    (["generate", "model=/tmp", "prompt=hi", "max_new_tokens=0"], "max_new_tokens: must be >= 1"),
])
def test_bad_export_and_generate_arguments(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main([*args, f"hydra.run.dir={tmp_path}/run"])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
