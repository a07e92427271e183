"""Collectives over ranks that are plain values on a single process, so the same code runs with and without
torchrun. Tensors go to the GPU for nccl, stay on the CPU for gloo."""

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

COLLECTIVE_TIMEOUT = timedelta(minutes=60)


def setup_distributed():
    """(rank, world_size); initialises the process group under torchrun (nccl on CUDA, gloo on CPU), even for one
    process, so that `torchrun --nproc_per_node 1` gets FSDP's fp32 master weights with bf16 compute."""
    if "RANK" in os.environ and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # FSDP and nccl use the current device
        # ranks wait in collectives while a checkpoint is written: rank 0's model directory (16.6 GB at 7B) and
        # all ranks' shards (99.5 GB) take ~10 minutes at 200 MB/s, NCCL's whole default timeout
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=COLLECTIVE_TIMEOUT)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def teardown_distributed():
    """The end of a run under torchrun: rank 0 may still be writing (a checkpoint, results.json), and tearing the
    group down before the others reach this point can abort gloo."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


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


def max_over_ranks(value):
    """The largest value of a number over ranks: e.g. the most generate calls any rank has to make, which every
    rank of a sharded model must then join."""
    return _reduce(value, dist.ReduceOp.MAX)


def is_sharded(model):
    """Whether `model` is FSDP2-sharded: then its every forward is collective (each rank gathers each layer from all
    ranks), so all ranks must run the same generate calls step for step. An unsharded model under torchrun (eval.py
    holds a whole copy per rank) generates alone: no collective at all."""
    return isinstance(model, FSDPModule)
