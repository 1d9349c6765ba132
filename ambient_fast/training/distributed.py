"""torch.distributed set-up under torchrun (NCCL on GPUs, gloo on CPU); single process otherwise."""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def init_world(device: str = "auto") -> "tuple[World, torch.device]":
    """Join the process group torchrun describes (if any) and pick this rank's device.

    `device`: 'auto' (this rank's GPU if there is one, else CPU), 'cpu', 'cuda' or 'cuda:N'.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    elif device == "cuda":
        device = f"cuda:{local_rank}"
    torch_device = torch.device(device)
    if torch_device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {device} asked for CUDA, but torch sees no GPU; use --device cpu")
        torch.cuda.set_device(torch_device)
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch_device.type == "cuda" else "gloo")
    return World(rank, size, local_rank), torch_device


def close_world() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
