"""Multi-process training under torchrun (DDP): set-up, rank checks, reductions.

`torchrun --nproc_per_node N -m pipeline train ...` starts N processes; each trains on its shard
of every batch order (DistributedSampler), gradients are averaged by DistributedDataParallel,
rank 0 alone writes files and prints, and training metrics are summed across ranks. On a CUDA
machine the process group is `cpu:gloo,cuda:nccl`: CUDA tensors (DDP's gradients) go through NCCL
and CPU tensors through gloo, so a run with `runtime.device: cpu` works there too; without CUDA it
is gloo alone (which is how the tests run it). Several machines: `torchrun --nnodes N --node_rank k
--rdzv_endpoint host:port` on each (docs/training-and-experiments.md, "Several GPUs and machines").
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def setup() -> tuple[int, int]:
    """(rank, world size); joins the process group when started by torchrun with more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:  # bind this rank's GPU before NCCL starts, so its communicator and barriers use that GPU
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
            dist.init_process_group(backend_for(cuda), device_id=device)
        else:
            dist.init_process_group(backend_for(cuda))
            if "OMP_NUM_THREADS" not in os.environ:  # else the launcher or the user chose (torchrun sets 1 per rank)
                local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))  # this machine's ranks share its cores
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    return rank(), world_size()


def backend_for(cuda: bool) -> str:
    """The process group's backend: NCCL for CUDA tensors plus gloo for CPU ones on a CUDA machine, else gloo."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def backend() -> str:
    """The process group's backend as torch names it (`gloo`, `cpu:gloo,cuda:nccl`), or "none" without a group."""
    return dist.get_backend() if dist.is_initialized() else "none"


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def reduction_device(backend: str) -> torch.device:
    """Where a collective's tensor must live: on the CPU when the group has a CPU backend (`gloo`,
    `cpu:gloo,cuda:nccl`), else on this rank's GPU (a pure `nccl` group refuses CPU tensors)."""
    parts = dict(part.split(":", 1) if ":" in part else ("any", part) for part in backend.split(","))
    if parts.get("cpu", parts.get("any")) == "gloo":
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def sum_across(values: list[float]) -> list[float]:
    """Element-wise sum of a few numbers over all ranks (identity without a process group)."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=reduction_device(dist.get_backend()))
    dist.all_reduce(t)
    return t.tolist()


def device_for(name: str) -> torch.device:
    """The rank's device: its own GPU under torchrun with CUDA, else the CPU."""
    if name != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def say(message: str) -> None:
    """print on rank 0 only."""
    if is_main():
        log.info(message)


def shard_order(order: Sequence, rank: int, world: int, drop_last: bool) -> list:
    """This rank's share of the batch order one process would train on: the same global batches, split.

    Every rank holds the one-process permutation `order` and keeps its elements rank, rank + world, ...
    With a per-rank batch of B, step i of every rank then covers elements [i*B*world, (i+1)*B*world):
    the single process's batch i at batch size B*world. DistributedSampler draws its own permutation
    (seed + epoch), which is why it is not used. With `drop_last` the order is cut to a multiple of
    `world` (the cut rows fall in the dropped last batch anyway); without it the first rows are
    repeated, as DistributedSampler does.
    """
    order = list(order)
    total = (len(order) // world if drop_last else -(-len(order) // world)) * world
    order = order[:total] if drop_last else order + order[:total - len(order)]
    return order[rank::world]
