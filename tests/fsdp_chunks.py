"""Chunked rollouts under torchrun when ranks have different amounts of work (CPU, gloo).

    torchrun --nproc_per_node 2 tests/fsdp_chunks.py TINY_DIR

With --rollout_batch_size 4 on the FSDP2-sharded model, rank 0 has 2 MGPO trajectories (1 chunk) and rank 1 has 6
(2 chunks); in the tool loop rank 0's 2 episodes end in round 1 while rank 1's 6 go on for 4 rounds of 2 chunks
(3 tool calls, then the last turn). Then the same rollouts on an unsharded copy, rank 1 running them twice and
rank 0 once, every collective refused: an unsharded model generates alone. Prints one line per part and rank; a
hang is the failure.
"""

import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist

import rollout
from model import load_policy, shard_model
from demo.synthetic import synthetic_samples

CFG = SimpleNamespace(global_max_pixels=112 * 112, crop_max_pixels=56 * 56, min_pixels=784, temperature=1.0,
                      max_new_tokens_turn1=6, max_new_tokens_turn2=3, max_turns=3, max_response_tokens=40,
                      max_new_tokens_per_turn=3, rollout_batch_size=4, min_box_side=28, do_sample=True, probe="none")
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast", "barrier")


def rollouts(policy, rank):
    """MGPO over 1 + 2 * rank samples x 2; tool episodes that call a valid box on rank 1 only (until max_turns)."""
    model, tokenizer, image_processor = policy
    mgpo = rollout.mgpo_rollout(model, tokenizer, image_processor, synthetic_samples(1 + 2 * rank, seed=rank), 2, CFG)
    rollout.parse_tool_call = lambda text: ([10, 10, 60, 60], None) if rank == 1 else None
    tool = rollout.tool_rollout(model, tokenizer, image_processor, synthetic_samples(1 + 2 * rank, seed=rank), 2, CFG)
    return [len(t.texts) for t in mgpo], [t.tool_calls for t in tool]


def refuse(*args, **kwargs):
    raise AssertionError("a collective in the rollout of an unsharded model")


def main(tiny_dir):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    policy = load_policy(tiny_dir, torch.device("cpu"), torch.float32)
    sharded = (shard_model(load_policy(tiny_dir, torch.device("cpu"), torch.float32)[0], torch.float32),
               *policy[1:])
    torch.manual_seed(rank)
    turns, calls = rollouts(sharded, rank)
    print(f"rank {rank} sharded mgpo turns {turns} tool calls {calls}", flush=True)
    saved = {name: getattr(dist, name) for name in COLLECTIVES}
    for name in COLLECTIVES:
        setattr(dist, name, refuse)
    try:
        for _ in range(1 + rank):
            turns, calls = rollouts(policy, rank)
    finally:
        for name, function in saved.items():
            setattr(dist, name, function)
    print(f"rank {rank} unsharded mgpo turns {turns} tool calls {calls}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
