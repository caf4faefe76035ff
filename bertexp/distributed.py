"""Data-parallel plumbing for `torchrun`: process group set-up, who writes, and cross-rank sums.

One process (no torchrun) is world size 1 and every helper here is a no-op, so the training loop reads the
same either way.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    # where cross-rank sums are reduced: the training device under NCCL, which reduces CUDA tensors only
    # ("No backend type associated with device type cpu"), the CPU under gloo
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # a gloo group for what the CPU already has (a step's token and mask counts, waiting for the caches):
    # exchanged without waiting for the GPU, whose queue a NCCL collective would have to reach first
    cpu_group: object = None
    cache_group: object = None  # a gloo group whose only collective is the first run's cache wait (CACHE_WAIT)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def sum(self, values) -> list[float]:
        """Element-wise sum over all ranks of a few numbers: a 1-D tensor of the training device's is reduced on
        the device the backend reduces on (read back once: one sync); a list of floats the CPU already has,
        on the CPU through the gloo group (no wait for the GPU)."""
        if not torch.is_tensor(values):
            if not self.enabled:
                return list(values)
            t = torch.tensor(values, dtype=torch.float64)
            dist.all_reduce(t, group=self.cpu_group)
            return t.tolist()
        if not self.enabled:
            return values.tolist()
        t = values.to(self.device, torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, values: list[float]) -> list[list[float]]:
        """Every rank's `values` (one list per rank, in rank order), exchanged on the CPU."""
        if not self.enabled:
            return [list(values)]
        t = torch.tensor(values, dtype=torch.float64)
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t, group=self.cpu_group)
        return [o.tolist() for o in out]


def setup(device: torch.device) -> Dist:
    if "WORLD_SIZE" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        # One SLURM task per GPU (hydra/launcher=submitit_slurm): submitit knows the rank, the master and the port.
        try:
            import submitit

            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        except (ImportError, RuntimeError):
            pass
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend_for(device))
    backend = dist.get_backend()
    # Numbers the CPU already has (counts, time budgets) go through gloo with the usual timeout, so a lost rank
    # stops the others in minutes; a first run's caches (vocabulary, tokens, PMI tables) can take longer, and
    # only their wait uses a group with a long one
    cpu_group = dist.new_group(backend="gloo")
    cache_group = dist.new_group(backend="gloo", timeout=CACHE_WAIT)
    return Dist(rank, world, local_rank, reduce_device(backend, device, local_rank), cpu_group, cache_group)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def reduce_device(backend: str, device: torch.device, local_rank: int) -> torch.device:
    """The device a backend reduces tensors on: this rank's GPU for NCCL, the CPU for gloo."""
    if "nccl" in str(backend):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


CACHE_WAIT = timedelta(hours=4)


@contextmanager
def local_main_first(d: Dist):
    """Run the body on this node's rank 0 first, then on its other ranks: a first run's caches (vocabulary,
    tokenising on every core, PMI tables) are built once per node rather than by every rank at once, and
    the others read them. Every rank reaches the barrier once, the builder even if it fails (the others
    then meet the same error themselves)."""
    if not d.enabled:
        yield
        return
    if d.local_rank != 0:
        dist.barrier(group=d.cache_group)
    try:
        yield
    finally:
        if d.local_rank == 0:
            dist.barrier(group=d.cache_group)


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """Before the process group exists (config composition, logging set-up): rank from torchrun's env."""
    return int(os.environ.get("RANK", "0")) == 0
