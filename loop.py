"""What both training scripts share: the GRPO run options, start-up checks, distributed setup, the step loop with
its logging and checkpoints, and the update-and-measure half of a step.

A recipe (train_mgpo.py, train_lfpc.py) supplies its config subclass and a `rollout_fn(ctx, cfg, prompts)` that
returns (trajectories, rewards, metrics); everything after the rewards is the same GRPO step:

    setup(cfg) -> ctx                        model, tokenizer, image processor, optimizer, rank, device
    train_loop(ctx, cfg, samples, rollout_fn)
        per step: rollout_fn -> group advantages -> grpo_update -> metrics.jsonl -> checkpoint-N/
"""

import json
import os
import random
import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from checkpoint import latest_checkpoint, remove_partial, resume, save_checkpoint
from config import opt
from data import batches, load_samples, shard
from distributed import all_reduce_sum, setup_distributed
from grpo import group_advantages, grpo_update
from memory import CONFIGS, load_model_config, startup_summary
from model import default_device, gathered, load_policy
from report import held_out, load_before, write_report
from tiny import resolve_model_path


@dataclass
class TrainConfig:
    model: str = opt("tiny", "'tiny', 'tiny-base', 'tiny-tool-base' or a local Qwen2.5-VL checkpoint")
    data: str = opt("synthetic", "'synthetic' or a JSONL of samples (DESIGN.md)")
    num_synthetic: int = opt(256, "samples generated for --data synthetic")
    output_dir: str = opt("out/run", "where checkpoints, metrics.jsonl and reports go")
    max_steps: int = opt(10, "GRPO steps (rollout batches)")
    batch_size: int = opt(4, "prompts per step, over all ranks")
    num_generations: int = opt(4, "rollouts per prompt (the GRPO group)")
    learning_rate: float = opt(1e-6, "AdamW learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    seed: int = opt(0, "data order and sampling (each rank adds its rank)")
    temperature: float = opt(1.0, "sampling temperature of the rollouts (and of the log-probs trained on)")
    global_max_pixels: int = opt(0, "pixel budget of the global view; 0: the checkpoint's image processor's")
    crop_max_pixels: int = opt(0, "pixel budget of each crop; 0: same as the global view's")
    mini_batch_size: int = opt(0, "trajectories per optimizer step per rank; 0: the whole rollout batch")
    micro_batch_size: int = opt(4, "trajectories per forward/backward per rank")
    ppo_epochs: int = opt(1, "passes over each rollout batch")
    min_box_side: int = opt(28, "a box is valid when both sides are over this many model-input pixels (MGPO: 28)")
    rollout_batch_size: int = opt(0, "at most N trajectories per generate call on each rank; 0: all in one call")
    gradient_checkpointing: bool = opt(False, "recompute decoder layers and vision blocks in backward (saves memory)")
    freeze_vision_tower: bool = opt(False, "train the language model only (verl's name)")
    attn_implementation: str = opt("sdpa", "passed to from_pretrained: 'sdpa', 'eager' or 'flash_attention_2'")
    clip_eps_low: float = opt(0.2, "PPO clip: the ratio is clipped below at 1 - clip_eps_low")
    clip_eps_high: float = opt(0.2, "PPO clip: the ratio is clipped above at 1 + clip_eps_high")
    clip_ratio_c: float = opt(3.0, "dual clip: a negative advantage's token loss is at most -A * c (verl's 3; 0: off)")
    kl_coef: float = opt(0.0, "k3 KL to the initial policy; the reference is only built when > 0")
    kl_clamp: float = opt(10.0, "cap on each token's k3 KL, as verl's low_var_kl (0: no cap)")
    tis_cap: float = opt(0.0, "truncated importance sampling: weight tokens by min(p_train / p_rollout, C); 0: off")
    loss_agg: str = opt("token_mean", "'token_mean' over the global batch, or 'seq_mean'")
    scale_by_std: bool = opt(True, "False: Dr.GRPO advantages (no division by the group std)")
    max_grad_norm: float = opt(1.0, "gradient norm clip per optimizer step")
    save_steps: int = opt(0, "save a checkpoint every N steps (0: only at the end)")
    save_total_limit: int = opt(0, "keep only the newest N checkpoints (0: keep all)")
    resume: bool = opt(False, "continue from the newest complete checkpoint in output_dir")
    max_nonfinite_steps: int = opt(3, "stop after this many steps in a row whose update was non-finite")
    skip_bad_samples: bool = opt(False, "skip (and count) unusable samples instead of stopping before training")
    eval_samples: int = opt(0, "held-out questions answered before and after training (report.py); 0: none")
    eval_data: str = opt("", "their benchmark file; '': the synthetic held-out split (--data synthetic)")
    eval_batch_size: int = opt(16, "held-out questions per generate call")
    eval_pictures: int = opt(4, "trajectory pictures of the first N held-out questions, before and after")


RECIPES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")


def check_config(cfg, world_size, extra=()):
    """Stop at start-up, naming the flag, when a value cannot work. `extra`: the recipe's own (ok, message)."""
    per_rank_trajs = cfg.batch_size // max(world_size, 1) * cfg.num_generations
    checks = [
        (cfg.num_generations >= 2, "--num_generations must be >= 2 (group advantages need a group)"),
        (cfg.batch_size % world_size == 0, f"--batch_size {cfg.batch_size} is not divisible by {world_size} ranks"),
        (cfg.max_steps >= 1, "--max_steps must be >= 1"),
        (cfg.micro_batch_size >= 1, "--micro_batch_size must be >= 1"),
        (cfg.rollout_batch_size >= 0, "--rollout_batch_size must be >= 0 (0: all of a rank's rollouts at once)"),
        (cfg.mini_batch_size == 0 or per_rank_trajs % cfg.mini_batch_size == 0,
         f"--mini_batch_size {cfg.mini_batch_size} must divide the {per_rank_trajs} trajectories per rank"),
        ((cfg.mini_batch_size or per_rank_trajs) % cfg.micro_batch_size == 0,
         f"--micro_batch_size {cfg.micro_batch_size} must divide the mini-batch "
         f"({cfg.mini_batch_size or per_rank_trajs} trajectories per rank)"),
        (cfg.loss_agg in ("token_mean", "seq_mean"), f"--loss_agg {cfg.loss_agg!r}: use token_mean or seq_mean"),
        (cfg.clip_ratio_c == 0 or cfg.clip_ratio_c > 1, f"--clip_ratio_c {cfg.clip_ratio_c} must be > 1 (or 0: off)"),
        (cfg.kl_clamp >= 0 and cfg.tis_cap >= 0, "--kl_clamp and --tis_cap must be >= 0 (0: off)"),
        (cfg.temperature > 0, "--temperature must be > 0"),
        (cfg.global_max_pixels == 0 or cfg.global_max_pixels >= 28 * 28,
         "--global_max_pixels must be >= 784 (one visual token) or 0"),
        (cfg.crop_max_pixels == 0 or cfg.crop_max_pixels >= 28 * 28,
         "--crop_max_pixels must be >= 784 (one visual token) or 0"),
        (cfg.save_steps >= 0 and cfg.save_total_limit >= 0, "--save_steps and --save_total_limit must be >= 0"),
        (cfg.max_nonfinite_steps >= 1, "--max_nonfinite_steps must be >= 1"),
        (cfg.eval_samples >= 0 and cfg.eval_samples % world_size == 0,
         f"--eval_samples {cfg.eval_samples} must be >= 0 and divisible by {world_size} ranks"),
        (cfg.eval_batch_size >= 1, "--eval_batch_size must be >= 1"),
        (cfg.eval_samples == 0 or cfg.eval_data or cfg.data == "synthetic",
         "--eval_samples needs --eval_data (a benchmark file) when --data is not synthetic"),
        *extra,
    ]
    for ok, message in checks:
        if not ok:
            raise SystemExit(f"error: {message}")


def recipe_for(name, model):
    """recipes/<name>_qwen2_5_vl_<size>.yaml when `model` is a local checkpoint of the shape of
    configs/qwen2_5_vl_<size>.json (so that a plain `--model <7B dir>` runs at the papers' settings); '' for
    anything else (the tiny demo models). E.g. recipe_for("mgpo", "/ckpt/Qwen2.5-VL-7B-Instruct") ->
    "recipes/mgpo_qwen2_5_vl_7b.yaml". A known size without a recipe for `name` stops, naming what to pass."""
    if not os.path.isfile(os.path.join(model, "config.json")):
        return ""
    text = load_model_config(model).text_config
    for file in sorted(os.listdir(CONFIGS)):
        known = load_model_config(os.path.join(CONFIGS, file)).text_config
        if (known.hidden_size, known.num_hidden_layers) == (text.hidden_size, text.num_hidden_layers):
            recipe = os.path.join(RECIPES, f"{name}_{file.removesuffix('.json')}.yaml")
            if not os.path.isfile(recipe):
                raise SystemExit(f"error: --model {model!r} has the shape of {file}, and {recipe} does not exist: "
                                 f"pass --config (a recipe file) with the run's settings")
            return recipe
    return ""


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fill_budgets(cfg, image_processor):
    """Resolve the 0 (= checkpoint default) pixel budgets from the image processor."""
    cfg.min_pixels = image_processor.size["shortest_edge"]
    cfg.global_max_pixels = cfg.global_max_pixels or image_processor.size["longest_edge"]
    cfg.crop_max_pixels = cfg.crop_max_pixels or cfg.global_max_pixels


def setup(cfg, extra_checks=()):
    """Everything a run needs before its first step, as one namespace."""
    rank, world_size = setup_distributed()
    check_config(cfg, world_size, extra_checks)
    device, dtype = default_device()
    seed_everything(cfg.seed + rank)  # ranks sample different continuations
    os.makedirs(cfg.output_dir, exist_ok=True)
    remove_partial(cfg.output_dir)
    resume_from = latest_checkpoint(cfg.output_dir) if cfg.resume else None
    if cfg.resume and resume_from is None:
        raise SystemExit(f"error: --resume: no complete checkpoint in --output_dir {cfg.output_dir}")
    path = resolve_model_path(cfg.model, cfg.output_dir)
    sharded = dist.is_initialized()  # rank 0 reads, every rank receives only its shards (model.load_sharded)
    model, tokenizer, image_processor = load_policy(resume_from or path, device, dtype, cfg.attn_implementation,
                                                    shard=sharded)
    fill_budgets(cfg, image_processor)
    if rank == 0:
        print(startup_summary(cfg, path, world_size))
    ref_model = load_policy(path, device, dtype, cfg.attn_implementation, shard=sharded,
                            frozen=True)[0] if cfg.kl_coef > 0 else None
    if cfg.gradient_checkpointing:
        if model.config.text_config.attention_dropout:  # the update then runs in training mode (grpo_update)
            raise SystemExit("error: --gradient_checkpointing needs attention_dropout 0 in the model config")
        model.activation_checkpointing_enable({"use_reentrant": False})  # every decoder layer and vision block
    if cfg.freeze_vision_tower:
        model.model.visual.requires_grad_(False)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    cfg.mini_batch_size = cfg.mini_batch_size or cfg.batch_size // world_size * cfg.num_generations
    ctx = SimpleNamespace(rank=rank, world_size=world_size, device=device, dtype=dtype, model=model,
                          ref_model=ref_model, tokenizer=tokenizer, image_processor=image_processor,
                          optimizer=optimizer, start_step=0)
    if resume_from:
        ctx.start_step = resume(ctx, resume_from)
        if rank == 0:
            print(f"resuming from {resume_from} (step {ctx.start_step})")
    return ctx


def load_training_samples(cfg, rank):
    """The run's samples. A bad one stops the run here, before any training, naming its file and line; with
    --skip_bad_samples it is left out, and the count and the first reasons are printed."""
    skipped = [] if cfg.skip_bad_samples else None
    samples = load_samples(cfg.data, cfg.num_synthetic, cfg.seed, skipped)
    if skipped and rank == 0:
        print(f"skipped {len(skipped)} bad sample(s) of {cfg.data}; first reasons:")
        for reason in skipped[:5]:
            print(f"  {reason}")
    return samples


def reduce_metrics(sums_counts):
    """Global means over ranks of {name: (sum, count)}; a metric with no items anywhere is left out."""
    out = {}
    for name, (total, count) in sums_counts.items():
        count = all_reduce_sum(count)
        if count > 0:
            out[name] = all_reduce_sum(total) / count
    return out


def train_loop(ctx, cfg, samples, rollout_fn, desc, eval_mode):
    """The step loop: this rank's shard of `samples`, one GRPO step per batch, metrics and checkpoints; with
    --eval_samples, the held-out report (eval.py's `eval_mode`) before the first step and after the last."""
    stream = batches(shard(samples, ctx.rank, ctx.world_size), cfg.batch_size // ctx.world_size, cfg.seed + ctx.rank)
    for _ in range(ctx.start_step):  # the data position: batches already trained on
        next(stream)
    log = open_metrics_log(cfg, ctx) if ctx.rank == 0 else None
    if ctx.rank == 0:
        print(json.dumps(asdict(cfg)))
    if cfg.eval_samples and ctx.start_step == 0:
        held_out(ctx, cfg, eval_mode, "before")
    nonfinite_in_a_row = 0
    for step in tqdm(range(ctx.start_step + 1, cfg.max_steps + 1), disable=ctx.rank != 0, desc=desc):
        metrics = train_step(ctx, cfg, next(stream), rollout_fn)
        nonfinite_in_a_row = nonfinite_in_a_row + 1 if metrics["skipped_updates"] else 0
        if ctx.rank == 0:
            row = {"step": step, **metrics}
            log.write(json.dumps(row) + "\n")
            log.flush()
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        if nonfinite_in_a_row >= cfg.max_nonfinite_steps:
            raise SystemExit(f"error: {nonfinite_in_a_row} steps in a row had a non-finite loss or gradient norm "
                             f"(--max_nonfinite_steps {cfg.max_nonfinite_steps}); the last checkpoint in "
                             f"{cfg.output_dir} is intact")
        if step == cfg.max_steps or (cfg.save_steps and step % cfg.save_steps == 0):
            save_checkpoint(ctx, cfg, step)
    if cfg.eval_samples:
        after = held_out(ctx, cfg, eval_mode, "after")
        if ctx.rank == 0:
            write_report(cfg, load_before(cfg.output_dir), after, cfg.max_steps, f"{desc} on {cfg.data}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def open_metrics_log(cfg, ctx):
    """metrics.jsonl for appending. Rows after the step this run starts from are dropped: on resume those of the
    run that died before its next checkpoint (the steps are trained again); on a fresh run, all of them."""
    path = os.path.join(cfg.output_dir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            rows = [line for line in f if line.strip() and json.loads(line)["step"] <= ctx.start_step]
        with open(path, "w") as f:
            f.writelines(rows)
    return open(path, "a")


def train_step(ctx, cfg, prompts, rollout_fn):
    """Rollout and rewards (the recipe's), then group advantages and the GRPO update; metrics over all ranks."""
    start = time.time()
    ctx.model.eval()
    with gathered(ctx.model):  # the weights all-gathered once, not at every decoded token
        trajs, rewards, metrics = rollout_fn(ctx, cfg, prompts)
    rollout_seconds = time.time() - start
    advantages = group_advantages(rewards, cfg.num_generations, cfg.scale_by_std)
    update_start = time.time()
    stats = grpo_update(ctx.model, ctx.optimizer, trajs, advantages, ctx.tokenizer, cfg, ctx.device, ctx.dtype,
                        ctx.ref_model)
    update_seconds = time.time() - update_start
    metrics = reduce_metrics({"reward": (sum(rewards), len(rewards)), **metrics,
                              **{k: (stats[k], 1) for k in ("loss", "clip_frac", "kl", "grad_norm",
                                                            "rollout_logprob_diff", "rollout_kl")}})
    sampled = all_reduce_sum(sum(sum(t.loss_mask) for t in trajs))
    total = all_reduce_sum(sum(len(t.input_ids) for t in trajs))
    metrics.update({"skipped_updates": stats["skipped"], "seconds": time.time() - start,
                    "rollout_tokens_per_s": sampled / rollout_seconds,
                    "update_tokens_per_s": total * cfg.ppo_epochs / update_seconds})
    return metrics
