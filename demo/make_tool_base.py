"""The LFPC demo's base: tiny-base (make_base.py) with its tool-call template trained further.

    python -m demo.make_tool_base            # writes demo/checkpoints/tiny-tool-base (committed; ~12 minutes, 1 thread)
    python train_lfpc.py --stage 1 --model tiny-tool-base ...    # README, "LFPC on the demo"

tiny-base saw the tool template in a quarter of its format conversations, and sampled at temperature 1 its tool
calls are mostly malformed: 0.79 of its tool episodes end without a valid crop, 0.02 crop the red frame, and LFPC
stage I from it never finds the frame (README). Here it gets `steps` more steps of supervised training on
conversations in the tool template alone, made exactly as make_base's phase 2 makes them (turn 1 names one of
make_base.PLACES at random, whatever the question asks, and boxes it; turn 2 reads the crop), on images neither
base phase used. No pointing examples: the tool base still has no trained sense of where to look.

Measured (64 held-out questions, 256 for the sampled line): greedy, the tool turn 1 names a half 64 times in 64
("right half" 61); sampled at temperature 1, 0.48 of the tool episodes end without a valid crop and 0.05 crop the
frame. Pointing examples in the tool template added here (1200, 800 steps) made the greedy turn 1 name the red
frame 23 times in 32: no longer a base.
"""

import random
from dataclasses import dataclass, replace

import torch

from demo import make_base
from config import opt, parse_config
from model import load_policy, save_policy
from demo.tiny import TINY_BASE, TINY_TOOL_BASE, check_prompt_fingerprint, write_prompt_fingerprint


@dataclass
class Config:
    base: str = opt(TINY_BASE, "demo/checkpoints/tiny-base")
    output_dir: str = opt(TINY_TOOL_BASE, "demo/checkpoints/tiny-tool-base")
    seed: int = opt(0, "the conversations' and batches' random streams (seed + 5, seed + 6)")
    data_seed: int = opt(4247, "synthetic images: make_base's data_seed + 5, unused by the base")
    num_images: int = opt(800, "each gives make_base's convs_per_image (2) tool conversations")
    steps: int = opt(600, "optimizer steps")
    batch_size: int = opt(16, "conversations per step")
    learning_rate: float = opt(3e-4, "learning rate")
    warmup_steps: int = opt(30, "linear warm-up steps")
    num_threads: int = opt(1, "torch threads; 1 is fastest on a small shared CPU")


def make_tool_base(cfg, log=print):
    check_prompt_fingerprint(cfg.base, "demo.make_base")  # a stale tiny-base would hand on its stale tokenizer
    torch.manual_seed(cfg.seed)
    sft_cfg = replace(make_base.Config(), tool_fraction=1.0, direct_fraction=0.0, num_images=cfg.num_images,
                      data_seed=cfg.data_seed, warmup_steps=cfg.warmup_steps)
    model, tokenizer, image_processor = load_policy(cfg.base, torch.device("cpu"), torch.float32)
    convs, hits = make_base.make_conversations(sft_cfg, tokenizer, image_processor, random.Random(cfg.seed + 5))
    log(f"{len(convs)} tool-template conversations, {hits} of them boxing the red frame (the target)")
    make_base.sft(sft_cfg, model.requires_grad_(True), tokenizer, image_processor, convs, random.Random(cfg.seed + 6),
                  cfg.steps, cfg.batch_size, cfg.learning_rate, log, name="tool template ")
    save_policy(model, tokenizer, image_processor, cfg.output_dir)
    write_prompt_fingerprint(cfg.output_dir)
    log(f"saved {cfg.output_dir}")
    return cfg.output_dir


if __name__ == "__main__":
    config = parse_config(Config, description=__doc__)
    torch.set_num_threads(config.num_threads)
    make_tool_base(config)
