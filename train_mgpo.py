"""MGPO training: batch -> two-turn rollout -> answer reward -> group advantages -> GRPO update -> log -> checkpoint.

    python train_mgpo.py                                   # tiny model, synthetic task, CPU
    torchrun --nproc_per_node 8 train_mgpo.py --model /path/to/Qwen2.5-VL-7B-Instruct --data train.jsonl

Every option is a field of `Config` below or of `loop.TrainConfig` (`--help` lists them all with their defaults).
"""

from dataclasses import dataclass

from transformers.utils import logging as hf_logging

from config import opt, parse_config
from crop import box_area_ratio, coverage, iou
from loop import TrainConfig, load_training_samples, recipe_for, setup, train_loop
from rewards import accuracy_reward, mgpo_format_ok
from rollout import direct_rollout, mgpo_rollout
from tiny import COMMITTED, DEMO_MIN_BOX_SIDE


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
    single_turn: bool = opt(False, "the GRPO baseline: answer from the global view, no box and no crop")


def mgpo_metrics(trajs, rewards):
    """{name: (sum, count)} over this rank's trajectories. An invalid box scores IoU and coverage 0, so their means
    show grounding and box validity together."""
    valid = [t for t in trajs if t.box_valid]
    with_gt = [t for t in trajs if t.sample.boxes]
    return {
        "accuracy": (sum(r > 0 for r in rewards), len(trajs)),
        "format_ok": (sum(mgpo_format_ok(*t.texts[:2]) for t in trajs), len(trajs)),
        "valid_box_ratio": (len(valid), len(trajs)),
        "iou": (sum(iou(t.box_original, t.sample.boxes[0]) for t in with_gt if t.box_valid), len(with_gt)),
        "coverage": (sum(coverage(t.box_original, t.sample.boxes[0]) for t in with_gt if t.box_valid), len(with_gt)),
        "box_area_ratio": (sum(box_area_ratio(t.box_original, t.original_size) for t in valid), len(valid)),
        "response_tokens": (sum(sum(t.loss_mask) for t in trajs), len(trajs)),
    }


def single_turn_metrics(trajs, rewards):
    return {"accuracy": (sum(r > 0 for r in rewards), len(trajs)),
            "response_tokens": (sum(sum(t.loss_mask) for t in trajs), len(trajs))}


def single_turn_step(ctx, cfg, prompts):
    """The paper's GRPO baseline: the same reward, answered from the global view alone (no box, no crop)."""
    trajs = direct_rollout(ctx.model, ctx.tokenizer, ctx.image_processor, prompts, cfg.num_generations, cfg,
                           cfg.max_new_tokens_turn2, do_sample=True)
    rewards = [accuracy_reward(t.texts[-1], t.sample.answer, t.sample.options) for t in trajs]
    return trajs, rewards, single_turn_metrics(trajs, rewards)


def mgpo_step(ctx, cfg, prompts):
    trajs = mgpo_rollout(ctx.model, ctx.tokenizer, ctx.image_processor, prompts, cfg.num_generations, cfg)
    rewards = [accuracy_reward(t.texts[-1], t.sample.answer, t.sample.options) for t in trajs]
    return trajs, rewards, mgpo_metrics(trajs, rewards)


def train(cfg):
    if cfg.model != "tiny" and cfg.model not in COMMITTED and cfg.learning_rate > 1e-5:
        print(f"note: --learning_rate {cfg.learning_rate:g} is the tiny demo's; MGPO used 1e-6 for Qwen2.5-VL-7B")
    ctx = setup(cfg)
    samples = load_training_samples(cfg, ctx.rank)
    if cfg.single_turn:
        train_loop(ctx, cfg, samples, single_turn_step, "single-turn grpo", "direct")
    else:
        train_loop(ctx, cfg, samples, mgpo_step, "mgpo", "mgpo")


if __name__ == "__main__":
    hf_logging.disable_progress_bar()  # one bar per training step is enough
    train(parse_config(Config, description=__doc__, default_recipe=lambda args: recipe_for("mgpo", args.model)))
