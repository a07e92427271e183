"""LFPC training: the free multi-turn cropping tool, in two stages.

    python train_lfpc.py                                   # stage 1, tiny model, synthetic task, CPU
    torchrun --nproc_per_node 8 train_lfpc.py --stage 1 --model /path/to/Qwen2.5-VL-7B-Instruct --data train.jsonl
    torchrun --nproc_per_node 8 train_lfpc.py --stage 2 --model out/lfpc/checkpoint-80 --data boxes.jsonl

Stage 1 (learn to focus): offline resolution selection first gives every sample the coarsest global view whose
answer still differs from the full-resolution one (the information gap; cached in `--resolution_cache`), then
GRPO with reward 0.8*acc + 0.2*format + 1.2*tool. Stage 2 (learn to crop precisely): data with nested
ground-truth boxes, the stage-1 reward plus `grounding_weight` * the grounding reward of one crop.

Every choice the paper leaves open is a field of `Config` below, with its default and why. The step loop is `train`
at the bottom; training.py holds the setup and bookkeeping it calls.
"""

import json
import os
import time
from dataclasses import dataclass

import torch.distributed as dist
from transformers.utils import logging as hf_logging

from answers import extract_choice, normalize_answer, unboxed
from checkpoint import save_checkpoint
from config import TrainConfig, opt, parse_config, recipe_for
from crop import box_metrics
from demo.tiny import DEMO_MIN_BOX_SIDE
from distributed import teardown_distributed
from grpo import group_advantages, grpo_update
from model import gathered
from report import held_out, report_after
from resolution import UNCHANGED, apply_resolutions, format_report, level_report, select_resolutions
from rewards import (COVERAGE_THRESHOLD, crop_grounding, lfpc_format_reward, lfpc_stage1_reward, lfpc_stage2_reward,
                     tool_accuracy_reward)
from rollout import direct_answers, tool_rollout, visual_tokens
from training import (batch_stream, count_nonfinite, load_training_samples, log_step, open_metrics_log,
                      save_due, setup, step_metrics, steps)

STAGE_LEARNING_RATES = {1: 1e-6, 2: 5e-7}  # the paper's Table 12


@dataclass
class Config(TrainConfig):
    stage: int = opt(1, "1: information-gap training; 2: adds the grounding reward")
    output_dir: str = opt("out/lfpc", "where checkpoints, metrics.jsonl and reports go")
    learning_rate: float = opt(0.0, "0: the stage's rate from the paper, 1e-6 (stage 1) or 5e-7 (stage 2)")
    min_box_side: int = opt(DEMO_MIN_BOX_SIDE, "the demo's (tiny.py says why); real runs use MGPO's 28 (recipes)")
    max_turns: int = opt(5, "tool calls executed per episode; the model then gets one more turn")
    max_response_tokens: int = opt(2048, "sampled tokens per episode, all turns together")
    max_new_tokens_per_turn: int = opt(96, "per assistant turn; small for the CPU demo, raise for real models")
    # stage-1 reward: acc_weight*acc + format_weight*format + tool_weight*tool (paper: 0.8, 0.2, 1.2)
    acc_weight: float = opt(0.8, "stage-1 reward weight of answer accuracy (paper: 0.8)")
    format_weight: float = opt(0.2, "stage-1 reward weight of the format (paper: 0.2)")
    tool_weight: float = opt(1.2, "stage-1 reward weight of the tool bonus (paper: 1.2)")
    max_answer_chars: int = opt(64, "a longer <answer> is a format error (the paper gives no number)")
    # stage-2 grounding reward (paper section 4.2); weight and iou_weight are not given in the paper
    grounding_weight: float = opt(1.0, "r = stage-1 reward + grounding_weight * r_geo")
    iou_weight: float = opt(0.5, "r_geo = iou_weight * r_iou + (1 - iou_weight) * r_l1")
    coverage_threshold: float = opt(COVERAGE_THRESHOLD, "0.9: r_iou only past this coverage of the smallest box")
    grounding_crop: str = opt("last", "which crop is scored: 'last' valid crop, or 'best' (highest r_geo)")
    # offline resolution selection (the information gap, stage 1; stage 2 only with --info_gap_stage2 true)
    resolution_factor: float = opt(2.0, "each ladder level divides both sides by this")
    resolution_floor_pixels: int = opt(224 * 224, "the ladder stops before a level with fewer pixels")
    resolution_unchanged: str = opt("floor", "samples whose answer never changes: 'floor' (coarsest) or 'original'")
    resolution_cache: str = opt("", "JSONL cache of the selection; '': <output_dir>/resolution.jsonl")
    resolution_max_new_tokens: int = opt(16, "greedy direct answers are an option letter or a short phrase")
    info_gap_stage2: bool = opt(False, "the paper's stage 2 data has no resolution selection")

    def __post_init__(self):  # part of parsing: the config is never changed afterwards
        self.learning_rate = self.learning_rate or STAGE_LEARNING_RATES.get(self.stage, 0.0)


def extra_checks(cfg):
    return [
        (cfg.stage in (1, 2), f"--stage {cfg.stage}: use 1 or 2"),
        (cfg.max_turns >= 0, "--max_turns must be >= 0"),
        (cfg.max_response_tokens >= 1 and cfg.max_new_tokens_per_turn >= 1,
         "--max_response_tokens and --max_new_tokens_per_turn must be >= 1"),
        (0.0 <= cfg.iou_weight <= 1.0, f"--iou_weight {cfg.iou_weight} must be in [0, 1]"),
        (cfg.grounding_crop in ("last", "best"), f"--grounding_crop {cfg.grounding_crop!r}: use last or best"),
        (cfg.resolution_factor > 1.0, f"--resolution_factor {cfg.resolution_factor} must be > 1"),
        (cfg.resolution_unchanged in UNCHANGED, f"--resolution_unchanged {cfg.resolution_unchanged!r}: use "
                                                f"{' or '.join(UNCHANGED)}"),
    ]


def normalised_answer(text, sample):
    """The answer as something to compare: its option letter, or the normalised text. A `\\boxed{}` is unwrapped
    as the rewards do, so "C", "\\boxed{C}" and "\\boxed{checkerboard}" (option C's text) are one answer and
    resolution selection does not count a change of wrapping as a change of answer."""
    text = unboxed(text)
    return extract_choice(text.strip(), sample.options) or normalize_answer(text)


def information_gap(ctx, cfg, samples):
    """Offline resolution selection (cached, resumable, sharded): samples with their `global_size` set."""
    def answer_fn(items):
        texts = direct_answers(ctx.model, ctx.tokenizer, ctx.image_processor, items, ctx.rollout,
                               cfg.resolution_max_new_tokens)
        return [normalised_answer(text, sample) for text, (sample, _) in zip(texts, items)]

    cache = cfg.resolution_cache or os.path.join(cfg.output_dir, "resolution.jsonl")
    records = select_resolutions(samples, answer_fn, cache, cfg.resolution_factor, cfg.resolution_floor_pixels,
                                 cfg.resolution_unchanged, ctx.rank, ctx.world_size,
                                 dist.barrier if dist.is_initialized() else None)
    if ctx.rank == 0:
        report = level_report(records)
        print(format_report(report))
        with open(os.path.join(cfg.output_dir, "resolution_report.json"), "w") as f:
            json.dump(report, f, indent=1)
    return apply_resolutions(samples, records)


REWARDS = {1: lfpc_stage1_reward, 2: lfpc_stage2_reward}  # rewards.py: reward(traj, cfg) -> float


def reward_parts(traj, cfg):
    """What the metrics show of one episode's reward: its accuracy and format, and in stage 2 its grounding."""
    s = traj.sample
    parts = {"accuracy": tool_accuracy_reward(traj.texts[-1], s.answer, s.options),
             "format_ok": float(lfpc_format_reward(traj.texts, cfg.max_answer_chars) == 0)}
    if cfg.stage == 2:
        parts.update({f"grounding_{k}": v for k, v in crop_grounding(traj, cfg).items()})
    return parts


def lfpc_metrics(trajs, cfg):
    """{name: (sum, count)} over this rank's episodes; crop metrics over all crops made: IoU with the
    best-matching ground-truth box, coverage of the first (smallest) one (crop.box_metrics)."""
    n = len(trajs)
    parts = [reward_parts(t, cfg) for t in trajs]
    crops = [(t, box_metrics(box, t.sample.boxes, t.original_size)) for t in trajs for box in t.crop_boxes]
    with_gt = [m for t, m in crops if t.sample.boxes]
    out = {name: (sum(p[name] for p in parts), n) for name in parts[0]}
    out.update({
        "tool_calls": (sum(t.tool_calls for t in trajs), n),
        "valid_crops": (len(crops), n),
        "answered": (sum(t.end_reason == "answer" for t in trajs), n),
        "crop_iou": (sum(m[0] for m in with_gt), len(with_gt)),
        "crop_coverage": (sum(m[1] for m in with_gt), len(with_gt)),
        "crop_area_ratio": (sum(m[2] for _, m in crops), len(crops)),
        "visual_tokens": (sum(visual_tokens(t) for t in trajs), n),
        "crop_visual_tokens": (sum(visual_tokens(t, first=1) for t in trajs), n),
        "response_tokens": (sum(sum(t.loss_mask) for t in trajs), n),
    })
    return out


def train(cfg):
    ctx = setup(cfg, extra_checks(cfg))
    samples = load_training_samples(cfg, ctx.rank)
    if cfg.stage == 2:
        missing = [s.id for s in samples if not s.boxes]
        if missing:
            raise SystemExit(f"error: --stage 2 needs ground-truth boxes for every sample of --data {cfg.data}; "
                             f"{len(missing)} have none (first: {missing[0]})")
    if cfg.stage == 1 or cfg.info_gap_stage2:
        samples = information_gap(ctx, cfg, samples)
    stream = batch_stream(ctx, cfg, samples)
    log = open_metrics_log(cfg, ctx)
    if cfg.eval_samples and ctx.start_step == 0:
        held_out(ctx, cfg, "tool", "before")
    nonfinite = 0
    for step in steps(ctx, cfg, f"lfpc stage {cfg.stage}"):
        start = time.time()
        ctx.model.eval()
        with gathered(ctx.model):  # the weights all-gathered once, not at every decoded token
            trajs = tool_rollout(ctx.model, ctx.tokenizer, ctx.image_processor, next(stream), cfg.num_generations,
                                 ctx.rollout)
        rewards = [REWARDS[cfg.stage](t, cfg) for t in trajs]
        advantages = group_advantages(rewards, cfg.num_generations, cfg.scale_by_std)
        update_start = time.time()
        stats = grpo_update(ctx.model, ctx.optimizer, trajs, advantages, ctx.tokenizer, cfg, ctx.device, ctx.dtype,
                            ctx.ref_model)
        metrics = step_metrics(cfg, trajs, rewards, stats, lfpc_metrics(trajs, cfg), start, update_start)
        log_step(log, step, metrics)
        nonfinite = count_nonfinite(cfg, metrics, nonfinite)
        if save_due(cfg, step):
            save_checkpoint(ctx, cfg, step)
    if cfg.eval_samples:
        report_after(ctx, cfg, "tool", f"lfpc stage {cfg.stage} on {cfg.data}")
    teardown_distributed()


if __name__ == "__main__":
    hf_logging.disable_progress_bar()  # one bar per training step is enough
    train(parse_config(Config, description=__doc__,
                       default_recipe=lambda args: recipe_for(f"lfpc_stage{args.stage}", args.model)))
