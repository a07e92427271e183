"""MGPO training: batch -> two-turn rollout -> answer reward -> group advantages -> GRPO update -> log -> checkpoint.

    python train_mgpo.py                                   # tiny model, synthetic task, CPU
    torchrun --nproc_per_node 8 train_mgpo.py --model /path/to/Qwen2.5-VL-7B-Instruct --data train.jsonl
    python train_mgpo.py --direct true                     # the baseline: GRPO on direct answers, no box, no crop

Every option is a field of `Config` below or of `config.TrainConfig` (`--help` lists them all with their defaults).
The step loop is `train` at the bottom; training.py holds the setup and bookkeeping it calls.
"""

import time
from dataclasses import dataclass, replace

from transformers.utils import logging as hf_logging

from checkpoint import save_checkpoint
from config import TrainConfig, opt, parse_config, recipe_for
from crop import box_metrics
from demo.tiny import COMMITTED, DEMO_MIN_BOX_SIDE, TINY_NAMES
from distributed import teardown_distributed
from grpo import group_advantages, grpo_update
from model import gathered
from report import held_out, report_after
from rewards import mgpo_format_ok, mgpo_reward
from rollout import direct_rollout, mgpo_rollout
from training import (batch_stream, count_nonfinite, load_training_samples, log_step, open_metrics_log,
                      save_due, setup, step_metrics, steps)


@dataclass
class Config(TrainConfig):
    # The defaults run the CPU demo (README, Quick start): the committed tiny base on the synthetic task, with a
    # held-out report before and after. For a real model pass MGPO's values (README, On GPU nodes).
    model: str = opt("tiny-base", "'tiny-base' (the demo's committed base), 'tiny', 'tiny-tool-base' or a local "
                                       "Qwen2.5-VL checkpoint")
    output_dir: str = opt("out/mgpo", "where checkpoints, metrics.jsonl and reports go")
    max_steps: int = opt(200, "GRPO steps (rollout batches)")
    batch_size: int = opt(8, "prompts per step, over all ranks (MGPO: 512)")
    num_generations: int = opt(8, "rollouts per prompt, the GRPO group (MGPO: 8)")
    learning_rate: float = opt(1e-4, "the demo's; MGPO used 1e-6 for Qwen2.5-VL-7B")
    micro_batch_size: int = opt(16, "trajectories per forward/backward per rank")
    eval_samples: int = opt(64, "held-out questions answered before and after training; 0: none")
    max_new_tokens_turn1: int = opt(64, "the box turn (the tiny base writes 40-58 tokens)")
    max_new_tokens_turn2: int = opt(16, "the answer turn")
    min_box_side: int = opt(DEMO_MIN_BOX_SIDE, "the demo's (tiny.py says why); real runs use MGPO's 28 (recipes)")
    direct: bool = opt(False, "the baseline: GRPO on direct answers from the global view, no box and no crop")


def mgpo_metrics(trajs, rewards):
    """{name: (sum, count)} over this rank's trajectories. An invalid box scores IoU and coverage 0, so their means
    show grounding and box validity together; IoU with the best-matching ground-truth box, coverage of the first
    (smallest) one (crop.box_metrics)."""
    valid = [t for t in trajs if t.box_valid]
    scored = [box_metrics(t.box_original, t.sample.boxes, t.original_size) for t in valid]
    grounded = [m for m in scored if m[0] is not None]  # valid boxes of samples with ground-truth boxes
    with_gt = sum(bool(t.sample.boxes) for t in trajs)
    return {
        "accuracy": (sum(r > 0 for r in rewards), len(trajs)),
        "format_ok": (sum(mgpo_format_ok(*t.texts[:2]) for t in trajs), len(trajs)),
        "valid_box_ratio": (len(valid), len(trajs)),
        "iou": (sum(m[0] for m in grounded), with_gt),
        "coverage": (sum(m[1] for m in grounded), with_gt),
        "box_area_ratio": (sum(m[2] for m in scored), len(valid)),
        "response_tokens": (sum(sum(t.loss_mask) for t in trajs), len(trajs)),
    }


def direct_metrics(trajs, rewards):
    return {"accuracy": (sum(r > 0 for r in rewards), len(trajs)),
            "response_tokens": (sum(sum(t.loss_mask) for t in trajs), len(trajs))}


def rollout(ctx, cfg, prompts):
    """MGPO's two turns, or with --direct the baseline's one answer from the global view (no box, no crop)."""
    if cfg.direct:
        return direct_rollout(ctx.model, ctx.tokenizer, ctx.image_processor, prompts, cfg.num_generations,
                              replace(ctx.rollout, max_new_tokens=cfg.max_new_tokens_turn2))
    return mgpo_rollout(ctx.model, ctx.tokenizer, ctx.image_processor, prompts, cfg.num_generations, ctx.rollout)


def train(cfg):
    if cfg.model not in TINY_NAMES and cfg.model not in COMMITTED and cfg.learning_rate > 1e-5:
        print(f"note: --learning_rate {cfg.learning_rate:g} is the tiny demo's; MGPO used 1e-6 for Qwen2.5-VL-7B")
    ctx = setup(cfg)
    mode, metrics_fn = ("direct", direct_metrics) if cfg.direct else ("mgpo", mgpo_metrics)  # eval.py's modes
    stream = batch_stream(ctx, cfg, load_training_samples(cfg, ctx.rank))
    log = open_metrics_log(cfg, ctx)
    if cfg.eval_samples and ctx.start_step == 0:
        held_out(ctx, cfg, mode, "before")
    nonfinite = 0
    for step in steps(ctx, cfg, mode):
        start = time.time()
        ctx.model.eval()
        with gathered(ctx.model):  # the weights all-gathered once, not at every decoded token
            trajs = rollout(ctx, cfg, next(stream))
        rewards = [mgpo_reward(t, cfg) for t in trajs]  # the direct baseline's too
        advantages = group_advantages(rewards, cfg.num_generations, cfg.scale_by_std)
        update_start = time.time()
        stats = grpo_update(ctx.model, ctx.optimizer, trajs, advantages, ctx.tokenizer, cfg, ctx.device, ctx.dtype,
                            ctx.ref_model)
        metrics = step_metrics(cfg, trajs, rewards, stats, metrics_fn(trajs, rewards), start, update_start)
        log_step(log, step, metrics)
        nonfinite = count_nonfinite(cfg, metrics, nonfinite)
        if save_due(cfg, step):
            save_checkpoint(ctx, cfg, step)
    if cfg.eval_samples:
        report_after(ctx, cfg, mode, f"{mode} on {cfg.data}")
    teardown_distributed()


if __name__ == "__main__":
    hf_logging.disable_progress_bar()  # one bar per training step is enough
    train(parse_config(Config, description=__doc__, default_recipe=lambda args: recipe_for("mgpo", args.model)))
