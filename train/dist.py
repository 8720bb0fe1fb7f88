"""The distributed context: one process (CPU/GPU), or torchrun ranks under FSDP2 (gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    mesh: object = None  # a DeviceMesh when running under FSDP2
    group: object = None  # process group for the all-reduces (None: single process)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, *xs: float | Tensor) -> list[float]:
        """Sum scalars over ranks (float64 on the wire), with one device-to-host copy for all of them."""
        t = torch.stack([torch.as_tensor(x, dtype=torch.float64, device=self.device).reshape(()) for x in xs])
        if self.group is not None:
            dist.all_reduce(t, group=self.group)
        return t.tolist()

    def gather(self, x: Tensor) -> Tensor:
        """Concatenate a 1-D tensor over ranks."""
        if self.group is None:
            return x
        parts = [None] * self.world
        dist.all_gather_object(parts, x.cpu())
        return torch.cat(parts).to(x.device)

    def main_first(self, fn):
        """Run ``fn`` on rank 0 first (e.g. a cached warm-up), then on the others."""
        if self.world > 1 and not self.main:
            dist.barrier()
        out = fn()
        if self.world > 1 and self.main:
            dist.barrier()
        return out

    def close(self) -> None:
        if self.group is not None:
            dist.barrier()
            dist.destroy_process_group()


def setup_dist() -> Dist:
    if "LOCAL_RANK" not in os.environ and not torch.cuda.is_available():
        return Dist()
    from torch.distributed.device_mesh import init_device_mesh

    if "LOCAL_RANK" not in os.environ:  # one GPU without torchrun: a 1-process group, so FSDP2 + bf16 apply
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    local = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    return Dist(dist.get_rank(), dist.get_world_size(), device, mesh, dist.group.WORLD)
