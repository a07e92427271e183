"""The held-out report of a training run: the same questions answered greedily before the first step and after the
last (eval.py's protocol and metrics), as a table, plus the curves of metrics.jsonl and a few trajectory pictures.

    out/mgpo/held_out_before.json   metrics of the starting policy (kept, so a resumed run still has its "before")
    out/mgpo/held_out_after.json    metrics of the final policy
    out/mgpo/report.md              the before/after table
    out/mgpo/curves.png             reward, accuracy, IoU and coverage per step (Pillow)
    out/mgpo/pictures/{before,after}/NNNN.png   the first --eval_pictures questions, box and crop drawn
"""

import json
import os
from dataclasses import replace

from benchmarks import read_benchmark
from curves import draw_curves
from demo.synthetic import synthetic_samples
from eval import HELD_OUT_SEED, answer_all, gather, metrics
from model import gathered
from pictures import save_picture

# (metrics key, column title) of the table; eval.metrics computes every one of them
COLUMNS = [("accuracy", "accuracy"), ("crop_iou", "IoU"), ("crop_coverage", "coverage"),
           ("valid_box_ratio", "valid boxes"), ("crop_area_ratio", "box area"), ("crops_per_question", "crops")]
CURVES = ("reward", "accuracy", "iou", "coverage", "crop_iou", "crop_coverage")  # those a recipe logs


def held_out_questions(cfg):
    """The synthetic held-out split (a seed no training run uses) or the --eval_data benchmark."""
    if cfg.eval_data:
        return read_benchmark(cfg.eval_data)[:cfg.eval_samples]
    return synthetic_samples(cfg.eval_samples, HELD_OUT_SEED)  # config.check_config: --data is synthetic


def held_out(ctx, cfg, mode, when):
    """Metrics of the current policy on the held-out questions (eval.py's `mode`), saved as held_out_{when}.json:
    the run's rollout options (ctx.rollout) decoded greedily, without a probe; a direct answer gets the answer
    turn's budget (max_new_tokens_turn2). Every rank answers its strided share in equally many batches, whatever
    the number of questions (`eval.rank_share`): the sharded model's generate is collective."""
    rcfg = replace(ctx.rollout, temperature=1.0, do_sample=False, probe="none",
                   max_new_tokens=ctx.rollout.max_new_tokens_turn2 if mode == "direct" else 0)
    questions = held_out_questions(cfg)
    vis_dir = os.path.join(cfg.output_dir, "pictures", when)
    ctx.model.eval()
    with gathered(ctx.model):  # the weights all-gathered once, not at every decoded token
        records = gather(answer_all((ctx.model, ctx.tokenizer, ctx.image_processor), questions, mode, rcfg,
                                    cfg.eval_batch_size, ctx.rank, ctx.world_size, vis_dir, cfg.eval_pictures))
    result = metrics(records)
    if ctx.rank == 0:
        with open(os.path.join(cfg.output_dir, f"held_out_{when}.json"), "w") as f:
            json.dump(result, f, indent=1)
    return result


def table(rows, title):
    """A markdown table: one row per (name, metrics), the columns of COLUMNS ('-' where a metric is None)."""
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    lines = [f"| {title} | " + " | ".join(name for _, name in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(fmt(m.get(key)) for key, _ in COLUMNS) + " |" for name, m in rows]
    return "\n".join(lines)


def read_metrics_log(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def running_mean(values, window):
    """Mean of the last `window` values at each point, skipping missing ones: [1, None, 3] with 2 -> [1, 1, 3]."""
    out = []
    for i in range(len(values)):
        recent = [v for v in values[max(0, i - window + 1):i + 1] if v is not None]
        out.append(sum(recent) / len(recent) if recent else None)
    return out


def write_curves(output_dir, title, window=10):
    """curves.png: each metric as its running mean over `window` steps (one step's 64 rollouts are noisy)."""
    rows = read_metrics_log(output_dir)
    series = {name: running_mean([row.get(name) for row in rows], window) for name in CURVES
              if any(name in row for row in rows)}
    save_picture(draw_curves(series, [row["step"] for row in rows], f"{title} ({window}-step means)"),
                 os.path.join(output_dir, "curves.png"))


def write_report(cfg, before, after, last_step, title):
    """report.md with the before/after table, curves.png; prints the table."""
    rows = ([("before (step 0)", before)] if before else []) + [(f"after (step {last_step})", after)]
    text = table(rows, f"held-out, {after['questions']} questions, greedy")
    with open(os.path.join(cfg.output_dir, "report.md"), "w") as f:
        f.write(f"# {title}\n\n{text}\n")
    write_curves(cfg.output_dir, title)
    print(text)


def report_after(ctx, cfg, mode, title):
    """The held-out metrics after the last step, and on rank 0 report.md with the "before" ones (held_out_before.json,
    kept across resumes) and curves.png."""
    after = held_out(ctx, cfg, mode, "after")
    if ctx.rank == 0:
        write_report(cfg, load_before(cfg.output_dir), after, cfg.max_steps, title)


def load_before(output_dir):
    path = os.path.join(output_dir, "held_out_before.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)
