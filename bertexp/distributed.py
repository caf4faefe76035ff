"""Data-parallel plumbing for `torchrun`: process group set-up, who writes, and cross-rank sums.

One process (no torchrun) is world size 1 and every helper here is a no-op, so the training loop reads the
same either way.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

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
    # a gloo group for numbers the CPU already has (a step's token and mask counts): exchanged without
    # waiting for the GPU, whose queue a NCCL collective would have to reach first. None: the default group.
    cpu_group: object = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def sum(self, values) -> list[float]:
        """Element-wise sum over all ranks of a few numbers: a list of floats, or a 1-D tensor on the training
        device, which is reduced where it is and read back once (one sync)."""
        t = values if torch.is_tensor(values) else torch.tensor(values, dtype=torch.float64)
        if not self.enabled:
            return t.tolist() if torch.is_tensor(values) else list(values)
        t = t.to(self.device, torch.float64)
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
    cpu_group = dist.new_group(backend="gloo") if "nccl" in str(backend) else None
    return Dist(rank, world, local_rank, reduce_device(backend, device, local_rank), cpu_group)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def reduce_device(backend: str, device: torch.device, local_rank: int) -> torch.device:
    """The device a backend reduces tensors on: this rank's GPU for NCCL, the CPU for gloo."""
    if "nccl" in str(backend):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """Before the process group exists (config composition, logging set-up): rank from torchrun's env."""
    return int(os.environ.get("RANK", "0")) == 0
