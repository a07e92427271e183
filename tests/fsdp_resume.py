"""Checkpoint and resume under torchrun with FSDP2 (CPU, gloo): model and optimizer state survive exactly.

    torchrun --nproc_per_node 2 tests/fsdp_resume.py TINY_DIR BATCH.pt OUT_DIR

Run A: update on the batch, save checkpoint-1 (each rank writes its shards), update again. Run B: load checkpoint-1
sharded, resume model and optimizer from the shards, update again. Rank 0 prints the largest weight difference
between A and B after the second update (0 expected), and writes OUT_DIR/saved.pt: A's full weights and AdamW state
at checkpoint-1, gathered by all-gather, for tests/test_sharded.py to compare with a 1-process resume.
"""

import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

from checkpoint import checkpoint_dir, resume, save_checkpoint
from grpo import grpo_update
from model import full_state_dict, load_policy
from tests.fsdp_update import UPDATE, trajectories


def policy(path, lr):
    shard = dist.is_initialized()  # tests/test_reliability.py resumes on one process too
    model, tokenizer, image_processor = load_policy(path, torch.device("cpu"), torch.float32, shard=shard)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    return SimpleNamespace(model=model, tokenizer=tokenizer, image_processor=image_processor, optimizer=optimizer)


def update(ctx, trajs, advantages):
    grpo_update(ctx.model, ctx.optimizer, trajs, advantages, ctx.tokenizer, SimpleNamespace(**UPDATE),
                torch.device("cpu"), torch.float32)


def full_training_state(ctx):
    """(weights, AdamW state) as full tensors: on rank 0 under torchrun, the model's own on a single process."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return full_state_dict(ctx.model), get_optimizer_state_dict(ctx.model, ctx.optimizer, options=options)


def main(tiny_dir, batch_file, out_dir):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    batch = torch.load(batch_file, weights_only=True)
    share = len(batch["input_ids"]) // world
    mine = slice(rank * share, (rank + 1) * share)
    trajs, adv = trajectories(batch)[mine], batch["advantages"][mine]
    cfg = SimpleNamespace(output_dir=out_dir, save_total_limit=0)
    a = policy(tiny_dir, 1e-3)
    update(a, trajs, adv)
    save_checkpoint(a, cfg, 1)
    saved = full_training_state(a)
    if rank == 0:  # now: AdamW's `step` in it is the live tensor, which the next update increments
        torch.save(saved, os.path.join(out_dir, "saved.pt"))
    update(a, trajs, -adv)
    b = policy(checkpoint_dir(out_dir, 1), 1e-3)
    assert resume(b, checkpoint_dir(out_dir, 1)) == 1
    update(b, trajs, -adv)
    wa, wb = full_state_dict(a.model), full_state_dict(b.model)
    if rank == 0:
        print(f"max weight difference {max((wa[k] - wb[k]).abs().max().item() for k in wa)}", flush=True)
    dist.barrier()  # teardown together: gloo aborted rank 0 once when it left before rank 1 (CI, 2 cores)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
