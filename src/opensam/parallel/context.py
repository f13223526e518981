"""The process's compute runtime: its device, its precision and its place in a torchrun job.

Stages call :func:`init_runtime` once with ``params.runtime``; library code reads
:func:`current_runtime` (a CPU, fp32, single-process runtime until then, which is what tests get).
Under ``torchrun`` (``WORLD_SIZE`` > 1) :func:`init_runtime` joins the process group: NCCL on
CUDA devices, gloo on the CPU. Rank r of a job with ``LOCAL_RANK`` l uses ``cuda:l``.

Precision: autocast runs on CUDA only (``auto`` = bf16 where supported, else fp16 with a
GradScaler); the CPU always runs in fp32. The mask aggregation and the loss stay in fp32.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from opensam.config import RuntimeParams
from opensam.errors import InputError, quote
from opensam.runtime import atomic_path

log = logging.getLogger(__name__)

T = TypeVar("T")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# per-image stages keep ranks apart for as long as their slices take (SAM: hours)
PROCESS_GROUP_TIMEOUT = datetime.timedelta(hours=12)


@dataclass(frozen=True)
class Runtime:
    """Where and how this process computes. ``precision`` is resolved (fp32 | bf16 | fp16)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes shared outputs, checkpoints and metrics."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The autocast dtype, None in fp32."""
        return AMP_DTYPES.get(self.precision)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """``torch.autocast`` in bf16 / fp16 on CUDA; a no-op context in fp32."""
        dtype = self.amp_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A GradScaler, enabled only for fp16 (bf16 and fp32 need none)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` on this device (asynchronous from pinned memory on CUDA)."""
        return tensor.to(self.device, non_blocking=self.cuda)


_CURRENT: list[Runtime] = [Runtime()]


def current_runtime() -> Runtime:
    """The runtime :func:`init_runtime` set (CPU, fp32, one process before that)."""
    return _CURRENT[0]


def set_runtime(runtime: Runtime) -> Runtime:
    """Make ``runtime`` current (tests); returns the previous one."""
    previous, _CURRENT[0] = _CURRENT[0], runtime
    return previous


def resolve_device(name: str, local_rank: int = 0, where: str = "runtime.device") -> torch.device:
    """``auto`` → ``cuda:<local_rank>`` when CUDA is available, else cpu; ``cuda`` →
    ``cuda:<local_rank>``; ``cuda:N`` and ``cpu`` as given."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    kind, _, index = name.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise InputError(f"{where}: expected auto, cpu, cuda or cuda:N, got {quote(name)}")
    if not torch.cuda.is_available():
        raise InputError(f"{where}: {name} requested but CUDA is not available")
    device = torch.device("cuda", int(index) if index else local_rank)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise InputError(f"{where}: {device} but only {torch.cuda.device_count()} GPU(s)")
    return device


def resolve_precision(name: str, device: torch.device, where: str = "runtime.precision") -> str:
    """fp32 | bf16 | fp16 for ``name`` on ``device``: always fp32 on the CPU; ``auto`` on CUDA
    is bf16 where supported, else fp16."""
    if name not in PRECISIONS:
        raise InputError(f"{where}: expected one of {', '.join(PRECISIONS)}, got {quote(name)}")
    if device.type != "cuda":
        if name in AMP_DTYPES:
            log.info("%s: %s asked for, but the CPU runs in fp32", where, name)
        return "fp32"
    if name == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return name


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip().isdigit() else default


def init_runtime(params: RuntimeParams) -> Runtime:
    """Resolve ``params`` for this process, join the torchrun job if there is one, and make
    the result current. Also sets cudnn.benchmark on CUDA (the inputs have fixed sizes); the
    CPU threads are split between local ranks by :func:`opensam.runtime.seed_everything`."""
    if params.nproc < 1:
        raise InputError(f"runtime.nproc: must be >= 1, got {params.nproc}")
    world, rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    device = resolve_device(params.device, local_rank)
    precision = resolve_precision(params.precision, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=PROCESS_GROUP_TIMEOUT)
        atexit.register(_shutdown)
        log.info("rank %d of %d (%s, %s)", rank, world, backend, device)
    runtime = Runtime(device, precision, rank, world, local_rank)
    set_runtime(runtime)
    quiet = world == 1 and device.type == "cpu"  # the default: stderr stays as it was
    (log.debug if quiet else log.info)("runtime: %s, %s, %d process(es)", device, precision, world)
    return runtime


def _shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(runtime: Runtime | None = None) -> None:
    """Wait for every rank (a no-op in one process)."""
    if (runtime or current_runtime()).distributed:
        dist.barrier()


def all_gather_objects(obj: T, runtime: Runtime | None = None) -> list[T]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank (``[obj]`` alone)."""
    rt = runtime or current_runtime()
    if not rt.distributed:
        return [obj]
    out: list[Any] = [None] * rt.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, runtime: Runtime | None = None) -> T:
    """Rank 0's ``obj`` on every rank."""
    rt = runtime or current_runtime()
    if not rt.distributed:
        return obj
    box: list[Any] = [obj if rt.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[no-any-return]


def all_reduce_sum(tensor: torch.Tensor, runtime: Runtime | None = None) -> torch.Tensor:
    """The sum over ranks of ``tensor`` (in place, and returned)."""
    if (runtime or current_runtime()).distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


@contextlib.contextmanager
def main_output(final: str | Path, runtime: Runtime | None = None) -> Iterator[Path]:
    """:func:`opensam.runtime.atomic_path` on rank 0; on the other ranks the same temporary
    path (rank 0's, broadcast: every rank enters this together), untouched (they write shards
    beside it that rank 0 merges into it)."""
    rt = runtime or current_runtime()
    if rt.is_main:
        with atomic_path(final) as tmp:
            if rt.distributed:  # temporaries are per process: the others learn rank 0's
                broadcast_object(str(tmp), rt)
            yield tmp
    else:
        yield Path(broadcast_object("", rt))
