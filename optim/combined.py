"""One optimizer object over several (Muon + AdamW), with a name-keyed flat state for checkpoints."""

from __future__ import annotations

from collections.abc import Callable

import torch

from model.errors import MoeforgeError

FLAT_FORMAT = "moeforge-optim-v1"
# Group options that describe this run's implementation, not training state: never taken from a checkpoint.
RUNTIME_OPTIONS = {"params", "names", "fused", "foreach", "capturable", "differentiable"}


def _jsonable(v):
    if isinstance(v, tuple | list):
        return [_jsonable(x) for x in v]
    if isinstance(v, torch.Tensor):
        return v.item()
    return v


def _like(saved, current):
    """Give a JSON-loaded value back the container type of the current one (lists -> tuples)."""
    if isinstance(current, tuple) and isinstance(saved, list):
        if len(saved) != len(current):
            return tuple(saved)
        return tuple(_like(s, c) for s, c in zip(saved, current))
    return saved


class CombinedOptimizer:
    """Steps several torch optimizers as one: the training loop and LR schedule see a single optimizer.

    Every param group holds `names` (the parameters' model names), `label` (unique per group) and
    `base_lr` (the peak LR the schedule multiplies).
    """

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]):
        self.optimizers = {k: o for k, o in optimizers.items() if o is not None}
        labels = [g["label"] for g in self.param_groups]
        if len(set(labels)) != len(labels):
            raise MoeforgeError(f"optimizer param group labels must be unique, got {labels}")

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers.values() for g in o.param_groups]

    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for o in self.optimizers.values():
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers.values():
            o.zero_grad(set_to_none=set_to_none)

    def set_lr_factor(self, factor: float) -> None:
        """Set every group's lr to base_lr * factor (what an LR schedule calls each step)."""
        for g in self.param_groups:
            g["lr"] = g["base_lr"] * factor

    def state_dict(self) -> dict:
        return {k: o.state_dict() for k, o in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.optimizers):
            raise MoeforgeError(
                f"optimizer state has {sorted(state)}, this run has {sorted(self.optimizers)}"
            )
        for k, o in self.optimizers.items():
            o.load_state_dict(state[k])

    def flat_state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors keyed '<optimizer>/<param name>/<state key>', JSON-able metadata); safetensors-ready."""
        tensors, scalars, groups = {}, {}, {}
        for k, o in self.optimizers.items():
            groups[k] = []
            for g in o.param_groups:
                opts = {key: _jsonable(v) for key, v in g.items() if key not in ("params", "names")}
                groups[k].append({"options": opts, "names": list(g["names"])})
                for p, name in zip(g["params"], g["names"]):
                    for sk, sv in o.state.get(p, {}).items():
                        key = f"{k}/{name}/{sk}"
                        if isinstance(sv, torch.Tensor):
                            tensors[key] = sv.detach().contiguous().clone()
                        else:
                            scalars[key] = sv
        return tensors, {"format": FLAT_FORMAT, "groups": groups, "scalars": scalars}

    def load_flat_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict, strict: bool = True) -> None:
        """Inverse of flat_state_dict, matched by parameter name and group label (not by position).

        strict: state for a parameter this run does not have (in that optimizer) is an error.
        """
        if meta.get("format") != FLAT_FORMAT:
            raise MoeforgeError(f"optimizer state format {meta.get('format')!r}, expected {FLAT_FORMAT!r}")
        entries: dict[str, dict] = {}
        for key, v in [*tensors.items(), *meta.get("scalars", {}).items()]:
            param_key, state_key = key.rsplit("/", 1)
            entries.setdefault(param_key, {})[state_key] = v
        known = {f"{k}/{n}" for k, o in self.optimizers.items() for g in o.param_groups for n in g["names"]}
        unknown = sorted(set(entries) - known)
        if strict and unknown:
            raise MoeforgeError(f"optimizer checkpoint has state for parameters this run does not optimise "
                                f"that way: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
        for k, o in self.optimizers.items():
            saved = {g["options"]["label"]: g["options"] for g in meta["groups"].get(k, [])}
            o.load_state_dict(_torch_state_dict(k, o, entries, saved))


def _torch_state_dict(key: str, opt: torch.optim.Optimizer, entries: dict, saved: dict) -> dict:
    """torch's index-keyed state_dict for `opt`, built from name-keyed entries and label-keyed options."""
    sd: dict = {"state": {}, "param_groups": []}
    idx = 0
    for g in opt.param_groups:
        opts = {k: v for k, v in g.items() if k != "params"}
        for k, v in saved.get(g["label"], {}).items():
            if k not in RUNTIME_OPTIONS:
                opts[k] = _like(v, g.get(k))
        opts["params"] = list(range(idx, idx + len(g["params"])))
        sd["param_groups"].append(opts)
        for name in g["names"]:
            if f"{key}/{name}" in entries:
                sd["state"][idx] = dict(entries[f"{key}/{name}"])
            idx += 1
    return sd
