"""Evaluation on high-resolution VQA benchmarks, with a stated protocol.

    python eval.py --model tiny --data synthetic --mode mgpo
    torchrun --nproc_per_node 8 eval.py --model out/mgpo/checkpoint-100 --data hr_bench_8k.tsv --mode tool \
        --global_max_pixels 802816 --probe noise

`--data`: a V* Bench folder, an HR-Bench TSV, an MME-RealWorld JSON, our JSONL, or `synthetic` (the held-out
split). `--mode`: `direct` (one turn, no crop), `mgpo` (the two-turn template) or `tool` (the LFPC tool loop).
Decoding is greedy; `--temperature T` samples instead (one draw per question, seeded by `--seed`), which shows
what RL will explore from: a base whose greedy answer never crops the target may do so in a quarter of its samples.

The protocol, printed with every result:
- options are shuffled per question with a fixed seed (`--no_shuffle` reproduces unshuffled reports); HR-Bench is
  not shuffled: it asks each question once per rotation of its options, `cycle_category` being the rotation index
  that every question asked in that rotation shares (benchmarks.read_hrbench), and its accuracy is the mean over
  rotations of each rotation's accuracy (`accuracy`);
- the global view is resized under `--global_max_pixels` and every crop, cut from the original, under
  `--crop_max_pixels` (the LFPC paper's 1,024 vs 16,384 visual-token comparison is one flag);
- a crop's IoU is with its best-matching ground-truth box and its coverage is of the first (smallest) box, as
  in training and as LFPC's grounding reward (`crop.box_metrics`; V* has one box per target, not nested boxes);
- each run also splits the questions by their first crop's coverage of the ground truth (`by_first_crop`:
  covers > 0.9, partial, misses, no crop) with the share and accuracy of each: whether answers follow the crop;
- `--probe gt|noise` runs the same questions twice, without and with the probe (the predicted crop replaced by
  the ground-truth box's crop, or by noise of the same size), and reports the accuracy change.
"""

import json
import os
import random
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers.utils import logging as hf_logging

from answers import answer_matches
from benchmarks import read_benchmark
from chat import THINKING
from config import opt, parse_config, rollout_config
from crop import box_metrics
from data import LETTERS, load_image
from distributed import setup_distributed, teardown_distributed
from family import family_of
from model import default_device, load_policy
from pictures import save_picture, trajectory_picture
from prompts import DIRECT_PROMPT, DIRECT_SYSTEM, prompts_for
from rewards import COVERAGE_THRESHOLD, accuracy_reward, tool_accuracy_reward
from rollout import direct_rollout, mgpo_rollout, tool_rollout, visual_tokens
from demo.synthetic import synthetic_samples
from demo.tiny import resolve_model_path

MODES = ("direct", "mgpo", "tool")
PROBES = ("none", "gt", "noise")
HELD_OUT_SEED = 1_000_003  # the synthetic held-out split: a seed no training run uses by default


@dataclass
class Config:
    model: str = opt("tiny", "'tiny', 'tiny-base', 'tiny-tool-base' or a local checkpoint directory")
    data: str = opt("synthetic", "benchmark path (V* folder, HR-Bench .tsv, MME-RealWorld .json, .jsonl)")
    num_synthetic: int = opt(32, "questions of the synthetic held-out split")
    mode: str = opt("mgpo", "direct | mgpo | tool")
    output_dir: str = opt("out/eval", "where results.json, results.md and pictures go")
    seed: int = opt(0, "option shuffling, and torch's seed for --temperature sampling")
    no_shuffle: bool = opt(False, "keep the benchmark's option order")
    probe: str = opt("none", "none | gt | noise (crop-reliance probes; runs with and without)")
    save_vis: int = opt(0, "pictures of the first N questions")
    limit: int = opt(0, "evaluate only the first N questions (0: all)")
    batch_size: int = opt(8, "questions per generate call")
    rollout_batch_size: int = opt(0, "at most N trajectories per generate call (chunks of a batch); 0: all")
    global_max_pixels: int = opt(0, "0: the checkpoint's image processor's max_pixels")
    crop_max_pixels: int = opt(0, "0: same as the global view's")
    min_box_side: int = opt(28, "a box is valid when both sides are over this many model-input pixels (MGPO: 28)")
    max_new_tokens: int = opt(64, "direct mode")
    max_new_tokens_turn1: int = opt(64, "mgpo mode")
    max_new_tokens_turn2: int = opt(64, "mgpo mode: the answer turn")
    max_turns: int = opt(5, "tool mode")
    max_response_tokens: int = opt(2048, "tool mode: sampled tokens per episode, all turns together")
    max_new_tokens_per_turn: int = opt(96, "tool mode: per assistant turn")
    temperature: float = opt(0.0, "0: greedy; > 0: sampled at this temperature")
    thinking: str = opt("template", "Qwen3.5's enable_thinking: template (as shipped), on or off")


def check_config(cfg):
    for ok, message in [(cfg.mode in MODES, f"--mode {cfg.mode!r}: use one of {', '.join(MODES)}"),
                        (cfg.probe in PROBES, f"--probe {cfg.probe!r}: use one of {', '.join(PROBES)}"),
                        (cfg.probe == "none" or cfg.mode != "direct", "--probe needs --mode mgpo or tool (crops)"),
                        (cfg.batch_size >= 1, "--batch_size must be >= 1"),
                        (cfg.thinking in THINKING, f"--thinking {cfg.thinking!r}: use one of {', '.join(THINKING)}"),
                        (cfg.temperature >= 0, f"--temperature {cfg.temperature}: use 0 (greedy) or more")]:
        if not ok:
            raise SystemExit(f"error: {message}")


# ---------------------------------------------------------------------------------------------------------------
# The protocol.

def shuffle_options(sample, seed):
    """The sample with its options in a seeded per-question order; the answer letter follows its option.
    E.g. options [a, b, c], answer 'A', order [2, 0, 1] -> options [c, a, b], answer 'B'."""
    order = list(range(len(sample.options)))
    random.Random(f"{seed}-{sample.id}").shuffle(order)
    correct = LETTERS.index(sample.answer)
    return replace(sample, options=[sample.options[i] for i in order], answer=LETTERS[order.index(correct)])


def protocol_samples(samples, cfg):
    """The questions as asked: shuffled unless --no_shuffle or HR-Bench (whose rows are its rotations)."""
    out = []
    for s in samples:
        shuffle = s.options and not cfg.no_shuffle and s.meta.get("benchmark") != "hrbench"
        out.append(shuffle_options(s, cfg.seed) if shuffle else s)
    return out[:cfg.limit] if cfg.limit else out


def load_questions(cfg):
    if cfg.data == "synthetic":
        return synthetic_samples(cfg.num_synthetic, HELD_OUT_SEED)
    return read_benchmark(cfg.data)


def prompt_wording(mode, family):
    """The exact template strings of a mode, in the frame of the model's `family`, printed with the results."""
    prompts = prompts_for(family)
    return {"direct": {"system": DIRECT_SYSTEM, "user": DIRECT_PROMPT},
            "mgpo": asdict(prompts.mgpo), "tool": asdict(prompts.tool)}[mode]


# ---------------------------------------------------------------------------------------------------------------
# Answering and scoring.

def run_batch(policy, samples, mode, rcfg):
    """One answer per sample in `mode`, with the rollout options `rcfg` (a config.RolloutConfig)."""
    model, tokenizer, image_processor = policy
    if mode == "direct":
        return direct_rollout(model, tokenizer, image_processor, samples, 1, rcfg)
    if mode == "mgpo":
        return mgpo_rollout(model, tokenizer, image_processor, samples, 1, rcfg)
    return tool_rollout(model, tokenizer, image_processor, samples, 1, rcfg)


def is_correct(traj, mode):
    s, text = traj.sample, traj.texts[-1]
    if mode == "direct":
        return answer_matches(text.strip(), s.answer, s.options) or accuracy_reward(text, s.answer, s.options) > 0
    if mode == "mgpo":
        return accuracy_reward(text, s.answer, s.options) > 0
    return tool_accuracy_reward(text, s.answer, s.options) > 0


def record(traj, mode, seconds):
    """One question's result: correctness, each crop against the ground truth (crop.box_metrics), cost."""
    s = traj.sample
    scored = [box_metrics(box, s.boxes, traj.original_size) for box in traj.crop_boxes]
    return {"id": s.id, "group": s.meta.get("group", "all"), "cycle": s.meta.get("cycle_category"),
            "answer": s.answer, "correct": is_correct(traj, mode), "text": traj.texts[-1],
            "crops": len(traj.crop_boxes), "valid_box": traj.box_valid if mode == "mgpo" else None,
            "tool_calls": traj.tool_calls, "has_boxes": bool(s.boxes),
            "iou": [m[0] for m in scored if s.boxes], "coverage": [m[1] for m in scored if s.boxes],
            "area": [m[2] for m in scored],
            "visual_tokens": visual_tokens(traj), "seconds": seconds}


def rank_share(count, rank, world_size):
    """(the questions this rank answers, how many of them it records): its strided share of `count` questions,
    then its last one (question 0 if it has none) again up to ceil(count / world_size), so that every rank runs
    the same batches, none empty. On an FSDP-sharded model (report.held_out during training) each generate is
    collective: a rank with a batch fewer would leave the others waiting in it forever.
    E.g. 9 questions on 2 ranks: rank 0 ([0, 2, 4, 6, 8], 5), rank 1 ([1, 3, 5, 7, 7], 4)."""
    mine = list(range(rank, count, world_size))
    stand_ins = -(-count // world_size) - len(mine)
    return mine + [mine[-1] if mine else 0] * stand_ins, len(mine)


def answer_all(policy, samples, mode, rcfg, batch_size, rank, world_size, vis_dir, save_vis=0):
    """The records of this rank's share of the questions (`rank_share`: no question dropped or counted twice),
    `batch_size` questions per rollout; pictures of the first `save_vis` questions in `vis_dir`."""
    share, recorded = rank_share(len(samples), rank, world_size)
    records = []
    for start in tqdm(range(0, len(share), batch_size), disable=rank != 0, desc=f"eval {rcfg.probe}"):
        index = share[start:start + batch_size]
        began = time.time()
        trajs = run_batch(policy, [samples[i] for i in index], mode, rcfg)
        seconds = (time.time() - began) / len(trajs)
        for _, i, traj in zip(range(start, recorded), index, trajs):  # stops before the stand-ins
            records.append({"index": i, **record(traj, mode, seconds)})
            if i < save_vis:
                verdict = f"{'correct' if records[-1]['correct'] else 'wrong'} (answer {traj.sample.answer})"
                save_picture(trajectory_picture(traj, load_image(traj.sample), verdict),
                             os.path.join(vis_dir, f"{i:04d}.png"))
    return records


def gather(records):
    """Every rank's records on every rank, in question order."""
    if dist.is_initialized():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, records)
        records = [r for part in parts for r in part]
    return sorted(records, key=lambda r: r["index"])


# ---------------------------------------------------------------------------------------------------------------
# Metrics and reports.

def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def accuracy(records):
    """Mean correctness; HR-Bench rows are first averaged within their rotation group (cycle_category)."""
    groups = {}
    for r in records:
        groups.setdefault(r["cycle"] if r["cycle"] is not None else r["id"], []).append(float(r["correct"]))
    return mean([mean(g) for g in groups.values()])


def metrics(records):
    crops = [v for r in records for v in r["iou"]]
    return {"questions": len(records), "accuracy": accuracy(records),
            "per_group": {g: accuracy([r for r in records if r["group"] == g])
                          for g in sorted({r["group"] for r in records})},
            "crop_iou": mean(crops), "crop_coverage": mean([v for r in records for v in r["coverage"]]),
            "crop_area_ratio": mean([v for r in records for v in r["area"]]),
            "valid_box_ratio": mean([None if r["valid_box"] is None else float(r["valid_box"]) for r in records]),
            "crops_per_question": mean([r["crops"] for r in records]),
            "visual_tokens_per_question": mean([r["visual_tokens"] for r in records]),
            "seconds_per_question": mean([r["seconds"] for r in records]),
            "answered_correctly": sum(r["correct"] for r in records),
            "by_first_crop": by_first_crop(records)}


def first_crop_class(record):
    """'covers' (past LFPC's coverage gate), 'partial', 'misses' or 'no crop', from the first crop's best coverage."""
    if not record["coverage"]:
        return "no crop"
    first = record["coverage"][0]
    return "covers" if first > COVERAGE_THRESHOLD else "partial" if first > 0 else "misses"


def by_first_crop(records):
    """{class: {"share", "accuracy"}} over the questions with ground-truth boxes (shares None without any).
    E.g. four questions whose first crops cover 1.0 (right), 0.95 (wrong), 0.0 (wrong) and none (right): covers
    share 0.5 accuracy 0.5, misses share 0.25 accuracy 0, no crop share 0.25 accuracy 1, partial share 0 accuracy
    None."""
    scored = [r for r in records if r["has_boxes"]]
    out = {}
    for name in ("covers", "partial", "misses", "no crop"):
        mine = [r for r in scored if first_crop_class(r) == name]
        out[name] = {"share": len(mine) / len(scored) if scored else None,
                     "accuracy": mean([float(r["correct"]) for r in mine])}
    return out


def markdown(runs):
    """One row per run (unprobed, probed) and one column per metric; per-group accuracies after."""
    keys = ["questions", "accuracy", "crop_iou", "crop_coverage", "crop_area_ratio", "valid_box_ratio",
            "crops_per_question", "visual_tokens_per_question", "seconds_per_question"]
    fmt = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
    lines = ["| run | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(fmt(m[k]) for k in keys) + " |" for name, m in runs.items()
              if isinstance(m, dict)]
    for name, m in runs.items():
        if isinstance(m, dict):
            lines.append(f"\n{name} per group: " + ", ".join(f"{g} {fmt(a)}" for g, a in m["per_group"].items()))
            lines.append(f"{name} by first crop (share, accuracy): " + ", ".join(
                f"{c} {fmt(v['share'])}, {fmt(v['accuracy'])}" for c, v in m["by_first_crop"].items()))
        else:
            lines.append(f"\n{name}: {fmt(m)}")
    return "\n".join(lines)


def evaluate(cfg):
    check_config(cfg)
    rank, world_size = setup_distributed()
    device, dtype = default_device()
    os.makedirs(cfg.output_dir, exist_ok=True)
    policy = load_policy(resolve_model_path(cfg.model, cfg.output_dir), device, dtype, thinking=cfg.thinking)
    policy[0].to(dtype)  # evaluation never trains: every rank holds the whole model in the compute dtype
    rcfg = rollout_config(cfg, policy[2], do_sample=cfg.temperature > 0, probe="none")
    torch.manual_seed(cfg.seed)
    samples = protocol_samples(load_questions(cfg), cfg)
    if cfg.probe == "gt" and any(not s.boxes for s in samples):
        raise SystemExit(f"error: --probe gt needs ground-truth boxes on every question of --data {cfg.data}")
    runs, all_records = {}, {}
    for probe in ["none"] + ([cfg.probe] if cfg.probe != "none" else []):
        vis_dir = os.path.join(cfg.output_dir, "vis" if probe == "none" else f"vis_probe_{probe}")
        records = gather(answer_all(policy, samples, cfg.mode, replace(rcfg, probe=probe), cfg.batch_size, rank,
                                    world_size, vis_dir, cfg.save_vis))
        name = "unprobed" if probe == "none" else f"probe_{probe}"
        runs[name], all_records[name] = metrics(records), records
    if cfg.probe != "none":
        runs[f"accuracy_change_{cfg.probe}"] = runs[f"probe_{cfg.probe}"]["accuracy"] - runs["unprobed"]["accuracy"]
    if rank == 0:
        write_results(cfg, rcfg, family_of(policy[0].config), runs, all_records)
    teardown_distributed()
    return runs


def write_results(cfg, rcfg, family, runs, records):
    protocol = {"mode": cfg.mode, "data": cfg.data, "shuffled_options": not cfg.no_shuffle, "seed": cfg.seed,
                "global_max_pixels": rcfg.global_max_pixels, "crop_max_pixels": rcfg.crop_max_pixels,
                "decoding": f"sampled, temperature {cfg.temperature}" if rcfg.do_sample else "greedy",
                "prompts": prompt_wording(cfg.mode, family)}
    with open(os.path.join(cfg.output_dir, "results.json"), "w") as f:
        json.dump({"protocol": protocol, "config": asdict(cfg), "runs": runs, "records": records}, f, indent=1)
    table = markdown(runs)
    with open(os.path.join(cfg.output_dir, "results.md"), "w") as f:
        f.write(f"# {cfg.mode} on {cfg.data}\n\nprotocol: {json.dumps(protocol)}\n\n{table}\n")
    print(json.dumps(protocol, indent=1))
    print(table)


if __name__ == "__main__":
    hf_logging.disable_progress_bar()
    evaluate(parse_config(Config, description=__doc__))
