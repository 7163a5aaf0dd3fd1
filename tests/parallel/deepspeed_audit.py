"""Instrumentation for tests/parallel/deepspeed_worker.py: checks around the real engine (nothing faked).

On CPU every tensor is a host tensor, so what fails only on a GPU is checked by what the code does:

`Audit.collective_problems` (the audit is on while an engine is built and trains): every torch.distributed
collective that moeforge code issues (the caller's file is in the repository, not under tests/) must pass
tensors that (1) lie on `comm_device(group)`; (2) were not made on the host by default: a factory called from
moeforge code without a device (`torch.tensor(x)`, `torch.zeros(n)`), `.cpu()`, or an op of moeforge code
whose tensor inputs are all such, unless `.to(<device>)` placed them since (on a GPU these are host tensors,
which NCCL refuses: "No backend type associated with device type cpu"); (3) with offload, share no storage
with the engine's host-resident state (fp32 partitions, their gradients, optimizer states, ZeRO-3 parameter
slices). (1) holds trivially on CPU; (2) and (3) fail on CPU for the code a GPU run would fail on.

`Audit.build_peak`: while the engine is built, the bytes of whole model parameters that were moved to the
engine's device (`Tensor.to(device)` of a parameter's whole data: DeepSpeed's ZeRO-3 partitioning and
`nn.Module.to` both go through it) and are still whole, plus this rank's partitions kept on the device (none
with parameter offload), sampled at every such move: the device memory the build would hold on a GPU.
"""

from __future__ import annotations

import functools
import inspect
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from train.parallel.env import comm_device

REPO = str(Path(__file__).resolve().parents[2])
TESTS = str(Path(__file__).resolve().parents[1])
COLLECTIVES = ("all_reduce", "all_to_all_single", "all_gather_into_tensor", "reduce_scatter_tensor",
               "broadcast", "all_gather", "reduce_scatter", "all_to_all", "reduce", "gather", "scatter",
               "send", "recv")
FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange,
             torch.rand, torch.randn, torch.randint, torch.linspace, torch.eye}
HOST = "_audit_host"  # attribute set on tensors moeforge code made on the host by default


def _moeforge(frame) -> bool:
    name = frame.f_code.co_filename
    return name.startswith(REPO) and not name.startswith(TESTS)


def _tensors(values) -> list[torch.Tensor]:
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out.extend(_tensors(v))
    return out


def _to_device(args, kwargs):
    """The device of a `Tensor.to(...)` call, or None when it changes only the dtype."""
    for v in (kwargs.get("device"), *args[1:2]):
        if isinstance(v, torch.Tensor):
            return v.device
        if isinstance(v, (torch.device, str, int)):
            return torch.device(v)
    return None


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class Audit(TorchFunctionMode):
    """Context manager: the mode plus wrappers around torch.distributed's collectives (restored on exit)."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device
        self.build_model = None  # set while the engine is built
        self.param_offload = False
        self.moved: set[int] = set()
        self.build_peak = 0
        self.host_state = None  # () -> storages of the engine's host-resident state, set after the build
        self.checked, self.problems, self.sites = 0, [], set()
        self._saved = {}

    # ------------------------------------------------------------------ install / remove
    def __enter__(self):
        for name in COLLECTIVES:
            if hasattr(dist, name):
                self._saved[name] = getattr(dist, name)
                setattr(dist, name, self._wrap(name, self._saved[name]))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        return super().__exit__(*exc)

    # ------------------------------------------------------------------ collectives
    def _wrap(self, name: str, fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def checked(*args, **kwargs):
            caller = sys._getframe(1)
            if _moeforge(caller):
                bound = signature.bind(*args, **kwargs).arguments
                site = f"{name} from {Path(caller.f_code.co_filename).name}"
                self.sites.add(site)
                self._check(f"{site}:{caller.f_lineno}", bound.get("group"), _tensors(bound.values()))
            return fn(*args, **kwargs)

        return checked

    def _check(self, where: str, group, tensors: list[torch.Tensor]) -> None:
        self.checked += 1
        want = comm_device(group)
        host = self.host_state() if self.host_state is not None else set()
        for t in tensors:
            if t.device != want:
                self.problems.append(f"{where}: a tensor on {t.device}, the group communicates on {want}")
            if getattr(t, HOST, False):
                self.problems.append(f"{where}: a tensor made on the host without a device")
            if t.numel() and _storage(t) in host:
                self.problems.append(f"{where}: the engine's offloaded (host) state itself")

    # ------------------------------------------------------------------ the mode
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        caller = sys._getframe(1)
        if func is torch.Tensor.to:
            target = _to_device(args, kwargs)
            if target is not None:
                self._moved(args[0], target)
                if _moeforge(caller) and isinstance(out, torch.Tensor):
                    setattr(out, HOST, False)
        elif _moeforge(caller) and isinstance(out, torch.Tensor):
            inputs = _tensors(args)
            if (func in FACTORIES and kwargs.get("device") is None) or func is torch.Tensor.cpu:
                setattr(out, HOST, True)
            elif inputs and all(getattr(t, HOST, False) for t in inputs) and "device" not in kwargs:
                setattr(out, HOST, True)
        return out

    # ------------------------------------------------------------------ the build's device memory
    def _moved(self, src: torch.Tensor, target: torch.device) -> None:
        model = self.build_model
        if model is None or target.type != self.device.type or not src.numel():
            return
        for p in model.parameters():
            if p.numel() == src.numel() and _storage(p) == _storage(src) and p.numel() == _full(p):
                self.moved.add(id(p))
        self.build_peak = max(self.build_peak, self.device_bytes(model))

    def device_bytes(self, model) -> int:
        """Whole moved parameters still whole, plus the partitions kept on the device."""
        total = 0
        for p in model.parameters():
            if id(p) in self.moved and p.numel() == _full(p):
                total += p.numel() * p.element_size()
            part = getattr(p, "ds_tensor", None)
            if part is not None and not self.param_offload:
                total += part.numel() * part.element_size()
        return total


def _full(p: torch.Tensor) -> int:
    return getattr(p, "ds_numel", p.numel())


def build_bound(model, param_offload: bool) -> dict:
    """The bound of placement.py for a built ZeRO-3 model, and the whole model, in bytes."""
    params = list(model.parameters())
    largest = max(_full(p) * p.element_size() for p in params)
    parts = 0 if param_offload else sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in params)
    return {"build_bound": largest + parts, "largest_param": largest,
            "whole_model": sum(_full(p) * p.element_size() for p in params)}


def host_state(pm, param_offload: bool):
    """() -> storages of the engine's state that offload keeps in host memory."""
    def storages() -> set[int]:
        tensors = []
        for part in pm.partitions:
            tensors += [part.flat, part.flat.grad, *pm.zero.state.get(part.flat, {}).values()]
            if param_offload:
                tensors += [p.ds_tensor for p in part.params]
        return {_storage(t) for t in tensors if isinstance(t, torch.Tensor) and t.numel()}

    return storages
