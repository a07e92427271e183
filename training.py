"""What both training scripts call (this module never calls back into a recipe): the run's setup (distributed,
model, optimizer, resume), its training data stream, the metrics of a step over all ranks, and the metrics log.
The step loop itself is in each script (train_mgpo.py, train_lfpc.py):

    ctx = setup(cfg)                                   model, tokenizer, image processor, optimizer, rank, ...
    for step in steps(ctx, cfg):
        rollout -> rewards -> grpo.group_advantages -> grpo.grpo_update -> step_metrics -> log_step
        -> checkpoint.save_checkpoint
    teardown_distributed()                             (distributed.py)
"""

import json
import os
import random
import time
from dataclasses import asdict, replace
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from checkpoint import latest_checkpoint, remove_partial, resume
from config import check_config, rollout_config
from data import batches, load_samples, shard
from distributed import all_reduce_sum, setup_distributed
from family import family_of
from memory import startup_summary
from model import default_device, load_policy
from demo.tiny import resolve_model_path


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup(cfg, extra_checks=()):
    """Everything a run needs before its first step, as one namespace; `cfg` is read, never changed. ctx.rollout
    is the RolloutConfig of the run (its pixel budgets resolved from the checkpoint's image processor)."""
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
                                                    shard=sharded, thinking=cfg.thinking)
    rollout = rollout_config(cfg, image_processor)
    if rank == 0:  # the summary shows the resolved budgets
        print(startup_summary(replace(cfg, global_max_pixels=rollout.global_max_pixels,
                                      crop_max_pixels=rollout.crop_max_pixels), path, world_size))
        print(json.dumps(asdict(cfg)))
    ref_model = load_policy(path, device, dtype, cfg.attn_implementation, shard=sharded,
                            frozen=True)[0] if cfg.kl_coef > 0 else None
    if cfg.gradient_checkpointing:
        if model.config.text_config.attention_dropout:  # the update then runs in training mode (grpo_update)
            raise SystemExit("error: --gradient_checkpointing needs attention_dropout 0 in the model config")
        model.activation_checkpointing_enable({"use_reentrant": False})  # every decoder layer and vision block
    if cfg.freeze_vision_tower:
        family_of(model.config).vision_tower(model).requires_grad_(False)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    ctx = SimpleNamespace(rank=rank, world_size=world_size, device=device, dtype=dtype, model=model,
                          ref_model=ref_model, tokenizer=tokenizer, image_processor=image_processor,
                          optimizer=optimizer, rollout=rollout, start_step=0)
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


def batch_stream(ctx, cfg, samples):
    """This rank's prompts, batch after batch, from the data position of ctx.start_step (a resumed run skips the
    batches already trained on)."""
    stream = batches(shard(samples, ctx.rank, ctx.world_size), cfg.batch_size // ctx.world_size, cfg.seed + ctx.rank)
    for _ in range(ctx.start_step):
        next(stream)
    return stream


def steps(ctx, cfg, desc):
    """The step numbers still to run, start_step + 1 .. max_steps, with a progress bar on rank 0."""
    return tqdm(range(ctx.start_step + 1, cfg.max_steps + 1), disable=ctx.rank != 0, desc=desc)


def reduce_metrics(sums_counts):
    """Global means over ranks of {name: (sum, count)}; a metric with no items anywhere is left out."""
    out = {}
    for name, (total, count) in sums_counts.items():
        count = all_reduce_sum(count)
        if count > 0:
            out[name] = all_reduce_sum(total) / count
    return out


def step_metrics(cfg, trajs, rewards, stats, recipe_metrics, start, update_start):
    """One step's metrics over all ranks: the mean reward, the recipe's {name: (sum, count)}, the update's stats,
    and the timings (`start`: the step's, `update_start`: grpo_update's, both time.time())."""
    update_seconds = time.time() - update_start
    metrics = reduce_metrics({"reward": (sum(rewards), len(rewards)), **recipe_metrics,
                              **{k: (stats[k], 1) for k in ("loss", "clip_frac", "kl", "grad_norm",
                                                            "rollout_logprob_diff", "rollout_kl")}})
    sampled = all_reduce_sum(sum(sum(t.loss_mask) for t in trajs))
    total = all_reduce_sum(sum(len(t.input_ids) for t in trajs))
    metrics.update({"skipped_updates": stats["skipped"], "seconds": time.time() - start,
                    "rollout_tokens_per_s": sampled / (update_start - start),
                    "update_tokens_per_s": total * cfg.ppo_epochs / update_seconds})
    return metrics


def open_metrics_log(cfg, ctx):
    """metrics.jsonl for appending on rank 0 (None elsewhere). Rows after the step this run starts from are
    dropped: on resume those of the run that died before its next checkpoint (the steps are trained again); on a
    fresh run, all of them."""
    if ctx.rank != 0:
        return None
    path = os.path.join(cfg.output_dir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            rows = [line for line in f if line.strip() and json.loads(line)["step"] <= ctx.start_step]
        with open(path, "w") as f:
            f.writelines(rows)
    return open(path, "a")


def log_step(log, step, metrics):
    """One row of metrics.jsonl, and the same on the progress bar's line (rank 0: `log` is None elsewhere)."""
    if log is None:
        return
    row = {"step": step, **metrics}
    log.write(json.dumps(row) + "\n")
    log.flush()
    tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))


def count_nonfinite(cfg, metrics, in_a_row):
    """Steps in a row whose update was non-finite (skipped), this one included; stops the run at
    --max_nonfinite_steps. Every rank sees the same global gradient norm, so every rank stops together."""
    in_a_row = in_a_row + 1 if metrics["skipped_updates"] else 0
    if in_a_row >= cfg.max_nonfinite_steps:
        raise SystemExit(f"error: {in_a_row} steps in a row had a non-finite loss or gradient norm "
                         f"(--max_nonfinite_steps {cfg.max_nonfinite_steps}); the last checkpoint in "
                         f"{cfg.output_dir} is intact")
    return in_a_row


def save_due(cfg, step):
    """A checkpoint after the last step and every --save_steps steps."""
    return step == cfg.max_steps or (cfg.save_steps and step % cfg.save_steps == 0)


