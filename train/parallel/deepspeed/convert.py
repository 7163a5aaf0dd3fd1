"""A distributed checkpoint of either engine as a one-process moeforge checkpoint, for export and `init=`.

    python -m train.parallel.deepspeed.convert <run>/checkpoints/step-<N> <out root>

Runs under engine=deepspeed and engine=fsdp both write `moeforge-dcp-v1` (train.parallel.checkpoint), so
each resumes the other's; this turns one into `moeforge-checkpoint-v1` (<out root>/step-<N>: safetensors
weights and optimizer state, the run's config and data position), which `moeforge export` makes a Hugging
Face directory of and a one-process run starts from. No process group: every rank's shards are read from
the files (expert stacks reassembled from their per-expert entries).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch.distributed.checkpoint as dcp

from model import ModelConfig, Transformer
from model.errors import MoeforgeError
from optim import OptimConfig, build_optimizer
from train import checkpoint
from train.parallel.checkpoint import module_state, read

KEPT_STATE = ("data", "guard", "rollbacks")


def to_single_process(src: Path, root: Path, config: dict | None = None) -> Path:
    """Write `<root>/step-<N>` (moeforge-checkpoint-v1) from the distributed checkpoint `src`; `config`
    (with `model` and `optim`) stands in for the run config a training stage records in the manifest."""
    meta, saved = read(src)
    config = config or meta.get("config")
    if not config:
        raise MoeforgeError(f"{src} records no run config (not written by a training stage?); cannot build "
                            "its model")
    model = Transformer(ModelConfig.from_dict(config["model"]))
    optimizer = None
    if any(k.startswith("optim.") for k in saved):
        optimizer, _ = build_optimizer(model, OptimConfig.from_dict(config["optim"]))
    state = module_state([model], optimizer, create=saved if optimizer is not None else None)
    missing = sorted(k for k in state if k not in saved)
    if missing:
        raise MoeforgeError(f"{src} lacks {missing[:5]} (not a checkpoint of the model in its config?)")
    dcp.load(state, checkpoint_id=str(src), no_dist=True)  # in place into the model and optimizer
    kept = {k: meta[k] for k in KEPT_STATE if k in meta}
    return checkpoint.save(root, meta["step"], model, optimizer, state=kept, config=config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.parallel.deepspeed.convert",
                                     description="a distributed checkpoint as a one-process one")
    parser.add_argument("checkpoint", type=Path, help="<run>/checkpoints/step-<N> (moeforge-dcp-v1)")
    parser.add_argument("out", type=Path, help="root to write step-<N> (moeforge-checkpoint-v1) under")
    args = parser.parse_args(argv)
    try:
        print(to_single_process(args.checkpoint, args.out))
    except MoeforgeError as e:
        parser.exit(1, f"moeforge: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
