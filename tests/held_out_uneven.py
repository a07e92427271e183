"""report.held_out on an FSDP2-sharded model, as in training, with 9 questions on 2 ranks (torchrun, CPU, gloo).

    torchrun --nproc_per_node 2 tests/held_out_uneven.py MODEL_DIR OUT_DIR

Rank 0 has 5 questions (2 batches of 4), rank 1 has 4 (1 batch): each sharded generate is collective, so rank 1
must answer a stand-in in a second batch or rank 0 waits forever; in tool mode rank 1 also joins rank 0's second
round with a stand-in (generation.chunks). Runs the modes direct, mgpo and tool in turn; each writes
OUT_DIR/MODE/held_out_after.json.
"""

import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist

from config import RolloutConfig
from distributed import setup_distributed
from model import load_policy
from report import held_out

MODES = ("direct", "mgpo", "tool")


def held_out_config(output_dir):
    """A training config's held-out fields: 9 synthetic questions, 4 per batch."""
    return SimpleNamespace(eval_data="", eval_samples=9, eval_batch_size=4, eval_pictures=0, output_dir=output_dir)


def held_out_rollout(image_processor):
    """A run's rollout options (training.setup's ctx.rollout) with short turns. The CPU demo's base (tiny-base)
    writes a tool call of 55 tokens for question 0 and of 56 for the others, so at 56 tokens per episode only
    question 0 (rank 0) goes on to a second round: the ranks run different numbers of rounds."""
    size = image_processor.size
    return RolloutConfig(global_max_pixels=size["longest_edge"], crop_max_pixels=size["longest_edge"],
                         min_pixels=size["shortest_edge"], min_box_side=28, max_new_tokens_turn1=12,
                         max_new_tokens_turn2=8, max_turns=5, max_response_tokens=56, max_new_tokens_per_turn=96)


def main(model_dir, out_dir):
    rank, world_size = setup_distributed()
    model, tokenizer, image_processor = load_policy(model_dir, torch.device("cpu"), torch.float32, shard=True)
    ctx = SimpleNamespace(rank=rank, world_size=world_size, model=model, tokenizer=tokenizer,
                          image_processor=image_processor, rollout=held_out_rollout(image_processor))
    for mode in MODES:
        output_dir = os.path.join(out_dir, mode)
        os.makedirs(output_dir, exist_ok=True)
        held_out(ctx, held_out_config(output_dir), mode, "after")
    dist.barrier()  # teardown together (see fsdp_generate.py)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
