"""Data parallelism on ``torch.distributed``, as started by ``torchrun``.

Every rank builds the same global batch from (seed, step) and keeps its own shard, so a run on W
processes takes the same optimiser steps as one process with the whole batch. Backend: gloo on the
CPU, nccl on CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class Dist:
    """Where this process stands: its rank among ``world`` processes and its device."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``; CUDA ranks use their local GPU
    (``local_rank``, by default torchrun's LOCAL_RANK)."""
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name} asked for CUDA, but no CUDA device is available; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


def setup(device_name: str) -> Dist:
    """Join the process group torchrun described in the environment (or run alone)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world == 1:
        return Dist(device=device)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), device=device)


def teardown(ctx: Dist, completed: bool = True) -> None:
    """Leave the process group. After a completed run the ranks first wait for each other (rank 0 may
    still be writing the run's last files), so that none leaves while another still talks to it; after
    an error they leave at once (a rank that failed alone never reaches a barrier, and torchrun stops
    the others)."""
    if ctx.enabled and dist.is_initialized():
        if completed:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(values: dict[str, float], ctx: Dist) -> dict[str, float]:
    """Sum a dict of numbers over all ranks."""
    if not ctx.enabled:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def shard(batch: Any, index: int, parts: int) -> Any:
    """Part ``index`` of ``parts`` equal slices along the first axis of every tensor in ``batch``."""
    if isinstance(batch, Tensor):
        size = batch.shape[0] // parts
        return batch[index * size:(index + 1) * size]
    if isinstance(batch, (tuple, list)):
        return type(batch)(shard(b, index, parts) for b in batch)
    if isinstance(batch, dict):
        return {k: shard(v, index, parts) for k, v in batch.items()}
    return batch
