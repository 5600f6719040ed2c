"""Process-group plumbing shared by ``sample_ddp`` and ``train_ddp`` (PyTorch's own stack only).

Under ``torchrun`` (``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT`` in
the environment) ``init_distributed`` joins the process group: NCCL when CUDA is available, gloo
otherwise; each rank takes the GPU ``LOCAL_RANK``. Started as a plain ``python`` process it runs as
world size 1 without a process group, and every collective here becomes a no-op.

``derive_seed(base, *keys)`` turns a base seed and integer keys (a global sample index, a step, a
position in the global batch) into a 63-bit seed through NumPy's ``SeedSequence``: the randomness of
a sample depends on what it is, never on which rank or batch computes it.

``run_main`` is the skeleton of a torchrun entry point (``latteflow.evaluation.sample_ddp``,
``latteflow.training.ddp``): parse, join the group, run, leave the group, one error line and status 2
for bad input; ``MainParser`` is the parser whose errors are that one line.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["DistEnv", "MainParser", "all_gather_objects", "barrier", "broadcast_object", "derive_seed",
           "init_distributed", "run_main", "shutdown_distributed"]


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: ``rank`` of ``world_size``, its ``device``, and whether
    ``init_distributed`` created the process group (then ``shutdown_distributed`` destroys it)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized() and self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an int, got {value!r}") from None


def init_distributed(device: Optional[str] = None, timeout_s: float = 1800.0) -> DistEnv:
    """Joins (or reuses) the default process group and picks this rank's device.

    ``device``: ``None`` (CUDA ``LOCAL_RANK`` when available, else CPU), ``"cpu"`` or ``"cuda"``.
    Backend: NCCL for CUDA, gloo for CPU. An already initialised group (tests, a caller's own setup)
    is used as it is."""
    if device not in (None, "cpu", "cuda"):
        raise ValueError(f"device must be None, 'cpu' or 'cuda', got {device!r}")
    use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device='cuda' but CUDA is not available")
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK", rank)
        owns = False
    else:
        world = _env_int("WORLD_SIZE", 1)
        rank = _env_int("RANK", 0)
        local_rank = _env_int("LOCAL_RANK", rank)
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"RANK={rank} and WORLD_SIZE={world} are inconsistent")
        owns = False
        if world > 1:
            if not dist.is_available():
                raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
            backend = "nccl" if use_cuda else "gloo"
            kwargs = {}
            if use_cuda:
                torch.cuda.set_device(local_rank)
                kwargs["device_id"] = torch.device("cuda", local_rank)
            dist.init_process_group(backend=backend, init_method="env://", timeout=timedelta(seconds=timeout_s),
                                    **kwargs)
            owns = True
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev, owns_group=owns)


def shutdown_distributed(env: DistEnv) -> None:
    """Destroys the process group if ``init_distributed`` created it."""
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        if env.device.type == "cuda":
            dist.barrier(device_ids=[env.device.index])
        else:
            dist.barrier()


def all_gather_objects(env: DistEnv, obj: Any) -> List[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` without a process group)."""
    if not env.distributed:
        return [obj]
    out: List[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(env: DistEnv, obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def derive_seed(base: int, *keys: int) -> int:
    """A 63-bit seed that depends only on ``base`` and ``keys`` (non-negative ints)."""
    values = (base, *keys)
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"seed keys must be non-negative ints, got {values!r} (position {i})")
    hi, lo = np.random.SeedSequence([int(v) for v in values]).generate_state(2, dtype=np.uint32)
    return ((int(hi) << 32) | int(lo)) & ((1 << 63) - 1)


class MainParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line, ``<prog>: error: <message>``, with exit status 2
    (no usage dump)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def run_main(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]],
             body: Callable[[argparse.Namespace, DistEnv], Optional[str]]) -> int:
    """Runs a torchrun entry point: parses ``argv``, joins the process group on ``args.device``, runs
    ``body(args, env)`` and leaves the group again whatever happens. A ValueError, TypeError or
    FileNotFoundError (bad input) prints one ``<prog>: error: ...`` line on stderr and returns 2;
    otherwise rank 0 prints the summary line ``body`` returns (None: nothing) and 0 is returned."""
    args = parser.parse_args(argv)
    env = None
    try:
        env = init_distributed(args.device)
        summary = body(args, env)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    finally:
        if env is not None:
            shutdown_distributed(env)
    if env.is_main and summary:
        print(summary)
    return 0
