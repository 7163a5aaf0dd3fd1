"""Teachers on their own ranks (`distill.teacher_ranks`): under torchrun, the teacher models live on
dedicated ranks and the one student rank asks them, over torch.distributed point-to-point messages (gloo
on CPU, NCCL on CUDA), for what the loss needs.

Domains (sorted) are dealt to the teacher ranks in turn. Per micro-batch the student sends its own
sampled ids and the response positions; the teacher rank runs its frozen teacher and streams back its
log-probabilities over the full vocabulary, [chunk_rows, chunk_vocab] blocks in row-block then vocabulary
order: exactly the chunks `Teacher.source` gives locally, so the loss and the student's gradients are
those of a single process. The student never receives a teacher's tokens, only its scores of the
student's. Messages (student -> teacher): a header [op, domain, B, L, T]; for LOGPROBS then ids [B, L]
and positions [B, T]. SCORES asks for the held-out score of the rank's teachers on every domain; STOP
ends the teacher rank's loop.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from distill.losses import DistillLossConfig, RowSource
from distill.streaming import Chunk, spans
from model.errors import ConfigError, MoeforgeError

log = logging.getLogger(__name__)

STOP, SCORES, LOGPROBS = 0, 1, 2
HEADER = 5
TIMEOUT_S = 4 * 3600.0  # a teacher rank waits this long for the student's next request (held-out evals)


@dataclass(frozen=True)
class Placement:
    """Who runs what: the student's rank and, per domain, the rank that hosts its teacher."""

    rank: int
    student: int
    teachers: dict[str, int]

    @property
    def is_student(self) -> bool:
        return self.rank == self.student

    def domains_of(self, rank: int) -> list[str]:
        return [d for d, r in self.teachers.items() if r == rank]

    def teacher_ranks(self) -> list[int]:
        return sorted(set(self.teachers.values()))


def placement(teacher_ranks: list[int], domains: list[str], rank: int, world: int) -> Placement | None:
    """The layout of `distill.teacher_ranks` in a world of `world` processes (None: teachers local)."""
    key = "distill.teacher_ranks"
    if not teacher_ranks:
        if world > 1:
            raise ConfigError(key, f"{world} processes but no teacher ranks: the distill stage trains one "
                                   "student process; give the others the teachers (e.g. [1])")
        return None
    if world < 2:
        raise ConfigError(key, f"{teacher_ranks} needs the teachers' ranks to exist: launch with torchrun "
                               f"(launcher=torchrun launcher.nproc_per_node={len(teacher_ranks) + 1})")
    if max(teacher_ranks) >= world:
        raise ConfigError(key, f"{teacher_ranks}: rank {max(teacher_ranks)} does not exist in a world of "
                               f"{world}")
    students = [r for r in range(world) if r not in teacher_ranks]
    if len(students) != 1:
        raise ConfigError(key, f"{teacher_ranks} leaves {len(students)} student ranks in a world of {world}; "
                               "the distill stage trains one student process")
    if len(teacher_ranks) > len(domains):
        raise ConfigError(key, f"{len(teacher_ranks)} teacher ranks for {len(domains)} teachers: at most one "
                               "rank per teacher")
    ranks = list(teacher_ranks)
    return Placement(rank, students[0], {d: ranks[i % len(ranks)] for i, d in enumerate(sorted(domains))})


def comm_device() -> torch.device:
    """Where point-to-point buffers live: the CPU for gloo, the current GPU for NCCL."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _send(x: torch.Tensor, dst: int) -> None:
    dist.send(x.to(comm_device()).contiguous(), dst)


def _recv(shape, dtype: torch.dtype, src: int) -> torch.Tensor:
    buf = torch.empty(shape, dtype=dtype, device=comm_device())
    dist.recv(buf, src)
    return buf


def _send_json(obj, dst: int) -> None:
    data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
    _send(torch.tensor([data.numel()]), dst)
    _send(data, dst)


def _recv_json(src: int):
    (n,) = _recv((1,), torch.int64, src).tolist()
    return json.loads(bytes(_recv((n,), torch.uint8, src).cpu().tolist()).decode())


class RemoteTeacher:
    """The student rank's handle on domain `name`'s teacher on rank `rank`: same `source` as `Teacher`."""

    def __init__(self, name: str, path: Path, rank: int, index: int, vocab: int):
        self.name, self.path, self.rank, self.index, self.vocab_size = name, Path(path), rank, index, vocab

    def source(self, ids_BS: torch.Tensor, pos_BT: torch.Tensor, cfg: DistillLossConfig) -> RowSource:
        """Send the request now; the returned row source receives the teacher's log-prob chunks of the
        flattened positions, consecutive row blocks of `cfg.chunk_rows` in order."""
        (b, length), t = ids_BS.shape, pos_BT.shape[1]
        _send(torch.tensor([LOGPROBS, self.index, b, length, t]), self.rank)
        _send(ids_BS.long(), self.rank)
        _send(pos_BT.long(), self.rank)
        n, state = b * t, {"next": 0}

        def rows(i: int, j: int) -> Iterator[Chunk]:
            if i != state["next"] or j != min(i + cfg.chunk_rows, n):
                raise MoeforgeError(f"remote teacher {self.name}: rows [{i}, {j}) requested, the stream "
                                    f"is at row {state['next']} in blocks of {cfg.chunk_rows} of {n}")
            state["next"] = j
            for v0, v1 in spans(self.vocab_size, cfg.chunk_vocab):
                yield v0, v1, _recv((j - i, v1 - v0), torch.float32, self.rank)

        return rows


class TeacherRanks:
    """The student rank's link to the teacher ranks: a remote teacher per domain, the score matrix."""

    def __init__(self, plan: Placement, paths: dict[str, Path], vocab: int):
        self.plan = plan
        domains = sorted(paths)
        self.teachers = {d: RemoteTeacher(d, paths[d], plan.teachers[d], domains.index(d), vocab)
                         for d in domains}

    def scores(self) -> dict[str, dict[str, float]]:
        """{teacher: {domain: held-out accuracy}}, each teacher scored on its own rank."""
        out: dict[str, dict[str, float]] = {}
        for r in self.plan.teacher_ranks():
            _send(torch.tensor([SCORES, 0, 0, 0, 0]), r)
            out.update(_recv_json(r))
        return out



def stop_teachers(plan: Placement) -> None:
    """End every teacher rank's loop (the student's run is over, or failed)."""
    for r in plan.teacher_ranks():
        _send(torch.tensor([STOP, 0, 0, 0, 0]), r)


def serve(plan: Placement, teachers: dict, cfg: DistillLossConfig,
          scores: Callable[[], dict[str, dict[str, float]]]) -> int:
    """A teacher rank's loop: answer the student's requests until STOP; returns how many were served.
    `teachers` are this rank's (`Teacher` objects by domain); `scores()` scores them on every domain."""
    domains = sorted(plan.teachers)
    served = 0
    while True:
        op, index, b, length, t = _recv((HEADER,), torch.int64, plan.student).tolist()
        if op == STOP:
            return served
        served += 1
        if op == SCORES:
            _send_json(scores(), plan.student)
            continue
        if op != LOGPROBS:
            raise MoeforgeError(f"teacher rank {plan.rank}: unknown request {op} from the student")
        domain = domains[index]
        if domain not in teachers:
            raise MoeforgeError(f"teacher rank {plan.rank}: asked for {domain!r}, hosts {sorted(teachers)}")
        ids = _recv((b, length), torch.int64, plan.student)
        pos = _recv((b, t), torch.int64, plan.student)
        source = teachers[domain].source(ids, pos, cfg)
        n = b * t
        for i in range(0, n, cfg.chunk_rows):
            for _, _, lp in source(i, min(i + cfg.chunk_rows, n)):
                _send(lp, plan.student)
