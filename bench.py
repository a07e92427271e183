"""Measured speed and memory of rollouts and updates, as ratios against plain HF `generate` and a plain
forward/backward/step of the same model on the same tokens. Each figure is the median of `--repeats` runs.

    python bench.py --quick          # the tiny model, < 3 minutes on 2 CPU cores
    python bench.py                  # + a larger config (hidden 512, 8 layers, vocab 151,936) and the scaling table

CPU by default, CUDA (bf16) when present. Prints a table and writes `bench.json`.
"""

import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from types import SimpleNamespace

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.utils import logging as hf_logging

from config import opt, parse_config
from data import synthetic_samples
from grpo import gather_logprobs, grpo_update, training_batch
from model import default_device, load_policy
from rollout import MGPO_PROMPTS, collate, generate_for, mgpo_grounding_turn, mgpo_rollout, start_groups
from tiny import TINY_TEXT, TINY_VISION, build_tiny

LARGE_TEXT = dict(TINY_TEXT, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                         "mrope_section": [8, 12, 12]})
QWEN_VOCAB = 151_936


@dataclass
class Config:
    quick: bool = opt(False, "tiny model only, no scaling table")
    repeats: int = opt(3, "runs per figure (the median is reported)")
    prompts: int = opt(4, "prompts per rollout batch")
    num_generations: int = opt(4, "rollouts per prompt")
    max_new_tokens_turn1: int = opt(32, "MGPO turn 1 (the box)")
    max_new_tokens_turn2: int = opt(32, "MGPO turn 2 (the answer)")
    global_tokens: int = opt(64, "visual tokens of the global view (x 28*28 pixels)")
    logprob_tokens: int = opt(2048, "tokens of the log-prob memory comparison (8 x 4096 on CUDA)")
    output: str = opt("bench.json", "where the figures are written (JSON)")


def median_seconds(fn, repeats, device):
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def large_policy(tiny_dir, device, dtype):
    """The tiny checkpoint's tokenizer and image processor with a bigger language model and Qwen's real vocabulary
    size, random weights (built from a config: nothing is downloaded)."""
    _, tokenizer, image_processor = load_policy(tiny_dir, device, dtype)
    tiny = Qwen2_5_VLConfig.from_pretrained(tiny_dir)
    config = Qwen2_5_VLConfig(vision_config=dict(TINY_VISION, out_hidden_size=512),
                              text_config=dict(LARGE_TEXT, vocab_size=QWEN_VOCAB,
                                               bos_token_id=tiny.text_config.bos_token_id,
                                               eos_token_id=tiny.text_config.eos_token_id,
                                               pad_token_id=tiny.text_config.pad_token_id),
                              image_token_id=tiny.image_token_id, video_token_id=tiny.video_token_id,
                              vision_start_token_id=tiny.vision_start_token_id,
                              vision_end_token_id=tiny.vision_end_token_id)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).to(device, dtype).eval()
    return model, tokenizer, image_processor


def rollout_cfg(cfg, global_tokens):
    pixels = global_tokens * 28 * 28
    return SimpleNamespace(global_max_pixels=pixels, crop_max_pixels=pixels, min_pixels=28 * 28,
                           max_new_tokens_turn1=cfg.max_new_tokens_turn1, max_new_tokens_turn2=cfg.max_new_tokens_turn2,
                           temperature=1.0, rollout_batch_size=0, min_box_side=28,
                           micro_batch_size=min(4, cfg.prompts * cfg.num_generations),
                           mini_batch_size=cfg.prompts * cfg.num_generations,
                           ppo_epochs=1, clip_eps_low=0.2, clip_eps_high=0.2, clip_ratio_c=3.0, kl_coef=0.0,
                           kl_clamp=10.0, tis_cap=0.0, loss_agg="token_mean", max_grad_norm=1.0,
                           gradient_checkpointing=False)


def plain_generate(model, tokenizer, trajs, new_tokens):
    """HF generate on the same turn-1 inputs, forced to produce `new_tokens` per row: the baseline."""
    batch = collate([t.input_ids for t in trajs], [t.pixel_values for t in trajs], [t.image_grid_thw for t in trajs],
                    tokenizer.pad_token_id, model.config.image_token_id, left_pad=True,
                    device=next(model.parameters()).device, dtype=model.dtype)
    with torch.no_grad():
        model.generate(**batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id)


def bench_rollout(policy, cfg, rcfg, device):
    """(rollout seconds, plain generate seconds, turn-2 prefill seconds, sampled tokens per row)."""
    model, tokenizer, image_processor = policy
    side = round(rcfg.global_max_pixels ** 0.5)  # originals exactly as large as the budget: g visual tokens
    samples = [replace(s, image=s.image.resize((side, side))) for s in synthetic_samples(cfg.prompts, seed=7)]
    rollout = lambda: mgpo_rollout(model, tokenizer, image_processor, samples, cfg.num_generations, rcfg)
    trajs = rollout()
    tokens = round(sum(sum(t.loss_mask) for t in trajs) / len(trajs))
    first, _ = start_groups(samples, tokenizer, image_processor, cfg.num_generations, rcfg, MGPO_PROMPTS.system,
                            lambda s: MGPO_PROMPTS.turn1.format(question=s.question))  # the rollout's turn-1 inputs
    rollout_s = median_seconds(rollout, cfg.repeats, device)
    plain_s = median_seconds(lambda: plain_generate(model, tokenizer, first, tokens), cfg.repeats, device)
    # turn 2's prefill as the rollout runs it: the crops' features and a forward over the new columns on turn 1's
    # cache (which it extends: a fresh copy each run), and the one token it samples
    after_turn1, turn1 = mgpo_grounding_turn(model, tokenizer, image_processor, samples, cfg.num_generations, rcfg)
    caches = [replace(turn1, past_key_values=copy.deepcopy(turn1.past_key_values)) for _ in range(cfg.repeats)]
    prefill_s = median_seconds(lambda: generate_for(model, tokenizer, after_turn1, 1, rcfg, after=caches.pop()),
                               cfg.repeats, device)
    return rollout_s, plain_s, prefill_s, tokens, trajs


def bench_update(policy, trajs, rcfg, device, dtype, repeats):
    """(GRPO update tokens/s, plain forward+backward+step tokens/s) on the same trajectories."""
    model, tokenizer, _ = policy
    tokens = sum(len(t.input_ids) for t in trajs)
    advantages = torch.linspace(-1, 1, len(trajs))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-7)
    grpo_s = median_seconds(lambda: grpo_update(model, optimizer, trajs, advantages, tokenizer, rcfg, device, dtype),
                            repeats, device)

    def plain():
        for i in range(0, len(trajs), rcfg.micro_batch_size):
            batch, mask = training_batch(trajs[i:i + rcfg.micro_batch_size], tokenizer, model.config.image_token_id,
                                         device, dtype)
            labels = batch["input_ids"].masked_fill(mask == 0, -100)
            model(**batch, labels=labels, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    plain_s = median_seconds(plain, repeats, device)
    return tokens / grpo_s, tokens / plain_s


def logprob_peak_bytes(method, tokens, vocab, device):
    """Peak memory of log p(target) for `tokens` positions from hidden states [tokens, 512] and an lm_head
    [vocab, 512]: 'naive' materialises the logits and their full fp32 log-softmax, 'ours' is grpo.gather_logprobs
    (the head applied chunk by chunk), as in the GRPO update; 'none' only makes the inputs."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(tokens, 512, device=device), torch.randn(vocab, 512, device=device).mul_(0.02)
    targets = torch.randint(0, vocab, (tokens,), device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the model's compute dtype
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    if method == "naive":
        (hidden @ weight.T).float().log_softmax(-1).gather(1, targets[:, None])
    elif method == "ours":
        gather_logprobs(hidden, weight, targets, [])
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() - base
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def logprob_memory_ratio(cfg, device):
    """ours / naive peak memory; on CPU each method runs in its own process (peak RSS)."""
    if device.type == "cuda":
        naive = logprob_peak_bytes("naive", cfg.logprob_tokens, QWEN_VOCAB, device)
        ours = logprob_peak_bytes("ours", cfg.logprob_tokens, QWEN_VOCAB, device)
        return ours / naive, naive, ours
    peaks = {}
    for method in ("naive", "ours", "none"):
        out = subprocess.run([sys.executable, __file__, "--_logprob_worker", method, str(cfg.logprob_tokens)],
                             capture_output=True, text=True, check=True)
        peaks[method] = int(out.stdout.split()[-1])
    naive, ours = peaks["naive"] - peaks["none"], peaks["ours"] - peaks["none"]
    if naive <= 0:
        raise RuntimeError(f"could not measure the naive log-prob's memory (peak RSS {peaks}); try more --logprob_tokens")
    return ours / naive, naive, ours


def logprob_worker(method, tokens):
    print(logprob_peak_bytes(method, int(tokens), QWEN_VOCAB, torch.device("cpu")))


def measure(name, policy, cfg, device, dtype, global_tokens=None, num_generations=None):
    cfg = SimpleNamespace(**{**vars(cfg), "num_generations": num_generations or cfg.num_generations})
    rcfg = rollout_cfg(cfg, global_tokens or cfg.global_tokens)
    rollout_s, plain_s, prefill_s, tokens, trajs = bench_rollout(policy, cfg, rcfg, device)
    grpo_tps, plain_tps = bench_update(policy, trajs, rcfg, device, dtype, cfg.repeats)
    return {"model": name, "global_tokens": global_tokens or cfg.global_tokens, "num_generations": cfg.num_generations,
            "sampled_tokens_per_row": tokens, "rollout_s": rollout_s, "plain_generate_s": plain_s,
            "rollout_overhead": rollout_s / plain_s, "turn2_prefill_share": prefill_s / rollout_s,
            "update_tokens_per_s": grpo_tps, "plain_tokens_per_s": plain_tps, "update_throughput": grpo_tps / plain_tps}


def main(cfg):
    device, dtype = default_device()
    ratio, naive, ours = logprob_memory_ratio(cfg, device)
    memory = {"tokens": cfg.logprob_tokens, "vocab": QWEN_VOCAB, "naive_bytes": naive, "ours_bytes": ours,
              "ratio": ratio}
    print(f"log-prob peak memory, {cfg.logprob_tokens} tokens x {QWEN_VOCAB} vocab: ours {ours / 2**20:.0f} MiB, "
          f"naive {naive / 2**20:.0f} MiB, ratio {ratio:.2f}")
    tiny_dir = build_tiny(os.path.join(tempfile.mkdtemp(), "tiny"))
    runs = [("tiny", {})]
    if not cfg.quick:
        runs += [("large", {})] + [("tiny", {"global_tokens": g}) for g in (256, 1024, 4096)]
        runs += [("tiny", {"num_generations": n}) for n in (8, 16)]
    print_header(device, dtype)
    rows = []
    for name, scale in runs:
        # a fresh policy per row: the update rows change the weights
        policy = large_policy(tiny_dir, device, dtype) if name == "large" else load_policy(tiny_dir, device, dtype)
        rows.append(measure(name, policy, cfg, device, dtype, **scale))
        print_row(rows[-1])
    with open(cfg.output, "w") as f:
        json.dump({"device": str(device), "dtype": str(dtype), "rows": rows, "logprob_memory": memory}, f, indent=1)


KEYS = ["model", "global_tokens", "num_generations", "sampled_tokens_per_row", "rollout_overhead",
        "turn2_prefill_share", "update_throughput", "rollout_s", "update_tokens_per_s"]


def print_header(device, dtype):
    print(f"device {device} ({dtype})")
    print("| " + " | ".join(KEYS) + " |\n" + "|---" * len(KEYS) + "|", flush=True)


def print_row(row):
    print("| " + " | ".join(f"{row[k]:.3g}" if isinstance(row[k], float) else str(row[k]) for k in KEYS) + " |",
          flush=True)


if __name__ == "__main__":
    hf_logging.disable_progress_bar()
    if len(sys.argv) == 4 and sys.argv[1] == "--_logprob_worker":
        logprob_worker(sys.argv[2], sys.argv[3])
    else:
        main(parse_config(Config, description=__doc__))
