"""Collectives over ranks that are plain values on a single process, so the same code runs with and without
torchrun. Tensors go to the GPU for nccl, stay on the CPU for gloo."""

import os

import torch
import torch.distributed as dist


def setup_distributed():
    """(rank, world_size); initialises the process group under torchrun (nccl on CUDA, gloo on CPU), even for one
    process, so that `torchrun --nproc_per_node 1` gets FSDP's fp32 master weights with bf16 compute."""
    if "RANK" in os.environ and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # FSDP and nccl use the current device
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def _reduce(value, op):
    t = torch.tensor(float(value), dtype=torch.float64)
    if dist.is_initialized():
        t = t.to("cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t, op=op)
    return t.item()


def all_reduce_sum(value):
    """The sum of a number over ranks."""
    return _reduce(value, dist.ReduceOp.SUM)


def any_rank(flag):
    """True if `flag` is true on any rank: under FSDP a rank with nothing left to generate must still join every
    `generate` the others run."""
    return _reduce(bool(flag), dist.ReduceOp.MAX) > 0
