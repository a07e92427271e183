"""bench.py's side-by-side rows for issue 23, each this code against what it replaced on the same inputs: decode
with gathered weights (2 gloo ranks), the stop-string check, the update's padding, the group prefill and the LFPC
round prefill; and the helpers bench.py shares (timing, random-weight models).

    python bench.py --quick     # runs them all; this module is also the decode row's torchrun worker
"""

import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from types import SimpleNamespace

import torch
import torch.distributed as dist

from config import RolloutConfig
from family import QWEN2_5_VL
from generation import StopAtPattern, continue_batch, generate_turn, prompt_batch, shared_prompt_batch
from grpo import grpo_update, micro_batches
from model import gathered, load_policy, shard_model
from prompts import TOOL_PROMPTS
from rollout import append_sampled, append_user_turn, cut_crop, mgpo_rollout, start_groups
from demo.synthetic import synthetic_samples
from demo.tiny import DEMO_MIN_BOX_SIDE, TINY_TEXT, TINY_VISION, resolve_model_path

FACTOR = QWEN2_5_VL.factor  # pixels per side of one visual token: a budget of g tokens is g * FACTOR ** 2 pixels

LARGE_TEXT = dict(TINY_TEXT, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                         "mrope_section": [8, 12, 12]})
QWEN_VOCAB = 151_936
# the update's loss options in every row (train_mgpo.py's defaults)
UPDATE_DEFAULTS = dict(ppo_epochs=1, clip_eps_low=0.2, clip_eps_high=0.2, clip_ratio_c=3.0, kl_coef=0.0,
                       kl_clamp=10.0, tis_cap=0.0, loss_agg="token_mean", max_grad_norm=1.0,
                       gradient_checkpointing=False, temperature=1.0)


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


def random_qwen(text, vocab, **ids):
    """A Qwen2.5-VL of random weights (seed 0) with the tiny vision tower and language model `text`."""
    model_class = QWEN2_5_VL.model_class
    config = model_class.config_class(vision_config=dict(TINY_VISION, out_hidden_size=text["hidden_size"]),
                                      text_config=dict(text, vocab_size=vocab), **ids)
    torch.manual_seed(0)
    return model_class(config).eval()


def ms_per_token(model, input_ids, new_tokens):
    """Milliseconds per decoded token of `generate` forced to `new_tokens`: (time of 1 + n tokens - time of 1) / n,
    after a warm-up, so that the prefill does not count."""
    def run(n):
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True, top_k=0,
                           max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
        return time.perf_counter() - start
    run(1)
    return 1000 * (run(1 + new_tokens) - run(1)) / new_tokens


def decode_worker(large, new_tokens):
    """One of 2 gloo ranks: ms/token of the same decode unsharded (each rank a whole copy), FSDP2-sharded (every
    decode step all-gathers every layer) and sharded inside model.gathered (gathered once); rank 0 prints JSON."""
    dist.init_process_group("gloo")
    text, vocab = (LARGE_TEXT, QWEN_VOCAB) if large == "1" else (TINY_TEXT, 2048)
    model = random_qwen(text, vocab, image_token_id=vocab - 1, video_token_id=vocab - 2,
                        vision_start_token_id=vocab - 3, vision_end_token_id=vocab - 4)
    input_ids = torch.randint(0, vocab - 8, (4, 32), generator=torch.Generator().manual_seed(0))
    row = {"unsharded_ms": ms_per_token(copy.deepcopy(model), input_ids, int(new_tokens))}
    shard_model(model, torch.float32)
    row["sharded_ms"] = ms_per_token(model, input_ids, int(new_tokens))
    with gathered(model):
        row["gathered_ms"] = ms_per_token(model, input_ids, int(new_tokens))
    if dist.get_rank() == 0:
        print(json.dumps(row), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def decode_row(large, new_tokens):
    """Item 1 side by side: decode ms/token on 2 CPU gloo ranks (a torchrun subprocess), gathered vs sharded vs
    unsharded; the target is gathered <= 1.1 x unsharded."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           "1" if large else "0", str(new_tokens)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    root = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run(cmd, capture_output=True, text=True, env={**env, "PYTHONPATH": root}, cwd=root)
    if done.returncode != 0:
        raise RuntimeError(f"decode worker failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    return {"model": "large" if large else "tiny", "new_tokens": new_tokens, **row,
            "gathered_vs_unsharded": row["gathered_ms"] / row["unsharded_ms"],
            "sharded_vs_unsharded": row["sharded_ms"] / row["unsharded_ms"]}


def stop_check_row(policy, rows, steps, repeats):
    """Item 4: the stop-string check's cost per decode step over `rows` rows (StopAtPattern alone, one host transfer
    per step) next to a decode step of the same rows with no stop string."""
    model, tokenizer, _ = policy
    input_ids = torch.randint(0, len(tokenizer) - 8, (rows, 32), generator=torch.Generator().manual_seed(0))

    def check():
        stop = StopAtPattern(tokenizer, 32, r"(?!)")  # never matches: every row is decoded and searched each step
        for _ in range(steps):
            stop(input_ids, None)

    check_ms = 1000 * median_seconds(check, repeats, torch.device("cpu")) / steps
    decode_ms = ms_per_token(model, input_ids, steps)
    return {"rows": rows, "stop_check_ms_per_step": check_ms, "decode_ms_per_token": decode_ms,
            "stop_check_share": check_ms / decode_ms}


def padded_tokens(lengths, minis):
    """Tokens the update's forwards run: each micro-batch is rows x its longest row. E.g. lengths [5, 9, 3, 8] in
    [[[0, 1], [2, 3]]] -> 2 x 9 + 2 x 8 = 34 (25 real: padding 26%)."""
    return sum(len(micro) * max(lengths[i] for i in micro) for mini in minis for micro in mini)


def demo_trajectories(prompts, num_generations):
    """MGPO trajectories of the committed demo base (tiny-base) on synthetic samples, at train_mgpo.py's demo
    settings (pixel budgets of its image processor, 64 + 16 new tokens, its minimum box side)."""
    model, tokenizer, image_processor = load_policy(resolve_model_path("tiny-base", tempfile.mkdtemp()),
                                                    torch.device("cpu"), torch.float32)
    pixels = image_processor.size["longest_edge"]
    rcfg = RolloutConfig(global_max_pixels=pixels, crop_max_pixels=pixels, min_pixels=image_processor.size[
        "shortest_edge"], min_box_side=DEMO_MIN_BOX_SIDE, max_new_tokens_turn1=64, max_new_tokens_turn2=16)
    torch.manual_seed(0)
    trajs = mgpo_rollout(model, tokenizer, image_processor, synthetic_samples(prompts, seed=3), num_generations, rcfg)
    return (model, tokenizer, image_processor), trajs


def padding_row(policy, trajs, micro_batch_size, repeats):
    """Item 5: padding share of the update's tokens and update tokens/s, micro-batches of `micro_batch_size`
    trajectories as sampled against packed by length within the padded size a fixed micro-batch may reach
    (micro_batch_size x the longest trajectory: the same peak memory). One mini-batch of all of `trajs`."""
    lengths = [len(t.input_ids) for t in trajs]
    budget = micro_batch_size * max(lengths)
    row = {"trajectories": len(trajs), "micro_batch_size": micro_batch_size, "max_tokens_per_micro_batch": budget,
           "mean_length": sum(lengths) / len(lengths), "min_length": min(lengths), "max_length": max(lengths)}
    model, tokenizer, _ = policy
    for name, max_tokens in (("fixed", 0), ("budget", budget)):
        minis = micro_batches(lengths, len(trajs), micro_batch_size, max_tokens)
        row[f"{name}_micro_batches"] = len(minis[0])
        row[f"{name}_padding"] = 1 - sum(lengths) / padded_tokens(lengths, minis)
        rcfg = SimpleNamespace(**UPDATE_DEFAULTS, mini_batch_size=len(trajs), micro_batch_size=micro_batch_size,
                               max_tokens_per_micro_batch=max_tokens)
        trained = copy.deepcopy(model)
        optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-7)
        advantages = torch.linspace(-1, 1, len(trajs))
        seconds = median_seconds(lambda: grpo_update(trained, optimizer, trajs, advantages, tokenizer, rcfg,
                                                     torch.device("cpu"), torch.float32), repeats, torch.device("cpu"))
        row[f"{name}_update_tokens_per_s"] = sum(lengths) / seconds
    return row


def square_samples(prompts, global_tokens, seed):
    """Synthetic samples whose originals are exactly as large as a budget of `global_tokens` visual tokens."""
    side = round(global_tokens ** 0.5) * FACTOR
    return [replace(s, image=s.image.resize((side, side))) for s in synthetic_samples(prompts, seed=seed)]


def group_prefill_row(policy, prompts, num_generations, global_tokens, repeats):
    """Item 2: the first turn's prefill (and its first sampled token) of `prompts` x G rows, each distinct prompt
    prefilled once and its cache expanded to its G rows (`shared_prompt_batch`) against every row prefilled by
    generate (`prompt_batch`, as before)."""
    model, tokenizer, image_processor = policy
    rcfg = SimpleNamespace(global_max_pixels=global_tokens * FACTOR ** 2, min_pixels=FACTOR ** 2)
    trajs, _ = start_groups(square_samples(prompts, global_tokens, 11), tokenizer, image_processor, QWEN2_5_VL,
                            num_generations, rcfg, TOOL_PROMPTS.system, lambda s: s.question)
    seconds = {name: median_seconds(lambda: generate_turn(model, tokenizer, make(model, tokenizer, trajs), 1),
                                    repeats, next(model.parameters()).device)
               for name, make in (("shared", shared_prompt_batch), ("per_row", prompt_batch))}
    return {"prompts": prompts, "num_generations": num_generations, "prompt_tokens": len(trajs[0].input_ids),
            "shared_s": seconds["shared"], "per_row_s": seconds["per_row"],
            "shared_vs_per_row": seconds["shared"] / seconds["per_row"], "target": 1.3 / num_generations}


def lfpc_round_row(policy, prompts, global_tokens, crop_tokens, rounds, repeats):
    """Item 3: the prefill of LFPC round `rounds` (after `rounds` - 1 crops, and its first sampled token),
    continuing from the last round's cache (`continue_batch`: the closing of the turn, the tool response and its
    crop) against re-encoding every conversation (`prompt_batch`, as before), with the tokens each feeds."""
    model, tokenizer, image_processor = policy
    cfg = SimpleNamespace(global_max_pixels=global_tokens * FACTOR ** 2, crop_max_pixels=crop_tokens * FACTOR ** 2,
                          min_pixels=FACTOR ** 2, probe="none")
    samples = square_samples(prompts, global_tokens, 13)
    trajs, originals = start_groups(samples, tokenizer, image_processor, QWEN2_5_VL, 1, cfg, TOOL_PROMPTS.system,
                                    lambda s: s.question)
    batch = shared_prompt_batch(model, tokenizer, trajs)
    for _ in range(rounds - 1):  # a few sampled tokens, then a crop of the top-left quarter of the view
        outs, turn = generate_turn(model, tokenizer, batch, 4)
        for traj, original, (sampled, logprobs) in zip(trajs, originals, outs):
            append_sampled(traj, sampled, logprobs, tokenizer)
            crop = cut_crop(traj, original, [0, 0, traj.input_size[0] // 2, traj.input_size[1] // 2], cfg)
            parts = [TOOL_PROMPTS.crop_before, crop, TOOL_PROMPTS.crop_after]
            append_user_turn(traj, tokenizer, image_processor, parts)
        batch = continue_batch(model, tokenizer, trajs, turn)
    caches = [replace(turn, past_key_values=copy.deepcopy(turn.past_key_values)) for _ in range(repeats)]
    device = next(model.parameters()).device
    continued_s = median_seconds(lambda: generate_turn(model, tokenizer, continue_batch(
        model, tokenizer, trajs, caches.pop()), 1), repeats, device)
    reencoded_s = median_seconds(lambda: generate_turn(model, tokenizer, prompt_batch(model, tokenizer, trajs), 1),
                                 repeats, device)
    conversation = batch["input_ids"].shape[1]
    new = conversation - turn.past_key_values.get_seq_length()
    patches = [sum(t.pixel_values[k].shape[0] for t in trajs) for k in range(rounds)]
    return {"prompts": prompts, "round": rounds, "conversation_tokens": conversation, "new_tokens": new,
            "new_token_share": new / conversation, "new_patch_share": patches[-1] / sum(patches),
            "continued_s": continued_s, "reencoded_s": reencoded_s, "continued_vs_reencoded": continued_s / reencoded_s}



if __name__ == "__main__":  # one rank of decode_row
    decode_worker(*sys.argv[1:])
