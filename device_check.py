"""A device check for a machine with one GPU: three MGPO steps of a random Qwen2.5-VL with 7B's widths and fewer
layers, bf16 FSDP2 in one process, with the peak memory of each phase next to memory.py's prediction, the update's
MFU and the decode speed. Under 8 minutes on one H100/H200.

    python device_check.py                        # GPU: 7B widths, 4 decoder layers, 4 vision blocks
    python device_check.py --small                # CPU: tiny widths, the same code path (tests/test_memory.py)

Measured peaks are allocator-level (torch.cuda.max_memory_allocated, reset between phases; on a CPU, torch's
MemTracker, a dispatch mode that follows every tensor storage), so they are compared with the prediction without its
CUDA context and allocator slack lines. The prediction uses the run's own text lengths (the ledger's default is a
generous 512 tokens of prompt text) and assumes every turn samples its maximum, which a random model does.
MFU = 6 * (language-model parameters * tokens + vision parameters * patches) / update time / --peak_tflops.
"""

import argparse
import os
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
from PIL import Image
from torch.distributed._tools.mem_tracker import MemTracker

import memory
from config import rollout_config
from data import Sample
from family import family_of
from grpo import group_advantages, grpo_update
from model import gathered, shard_model
from prompts import MGPO_PROMPTS
from rewards import mgpo_reward
from rollout import generate_for, mgpo_rollout, start_groups
from demo.tiny import build_tiny_tokenizer
from train_mgpo import Config

# (text widths, vision widths, run shape) of the two modes; the image side fills the pixel budget exactly
SHAPES = {
    "gpu": dict(text=dict(num_hidden_layers=4), vision=dict(depth=4, fullatt_block_indexes=[3]),
                side=(1120, 896), batch_size=4, num_generations=4, rollout_batch_size=8, micro_batch_size=4,
                max_new_tokens=384),
    "small": dict(text=dict(num_hidden_layers=2, hidden_size=256, intermediate_size=704, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=1024), mrope_section=[8, 12, 12],
                  vision=dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=256,
                              fullatt_block_indexes=[1]),
                  side=(448, 448), batch_size=2, num_generations=2, rollout_batch_size=4, micro_batch_size=2,
                  max_new_tokens=16),
}


def model_config(mode, tokenizer):
    """configs/qwen2_5_vl_7b.json with the mode's changes (fewer layers; tiny widths for --small), and the vision
    token ids of `tokenizer` (the tiny one: its ids differ from Qwen's)."""
    config = memory.load_model_config(os.path.join(memory.CONFIGS, "qwen2_5_vl_7b.json"))
    family = family_of(config)
    for name, token in [("image_token_id", family.image_pad), ("video_token_id", family.video_pad),
                        ("vision_start_token_id", family.vision_start), ("vision_end_token_id", family.vision_end)]:
        setattr(config, name, tokenizer.convert_tokens_to_ids(token))
    config.text_config.update(SHAPES[mode]["text"])
    config.vision_config.update(SHAPES[mode]["vision"])
    if "mrope_section" in SHAPES[mode]:  # sums to half the head dimension
        config.text_config.rope_parameters["mrope_section"] = SHAPES[mode]["mrope_section"]
    return config


def init_process_group(device):
    """A one-rank process group, unless torchrun made one, so that the model is FSDP2-sharded as in training."""
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


class StepTracker(MemTracker):
    """torch's MemTracker without its per-module snapshots, which refuse a module that runs twice in a row (as in
    generate); the totals and their peak are kept at every operator as before."""

    def _pre_fw_hook(self, module, inputs):
        pass

    def _post_fw_hook(self, module, inputs, outputs):
        pass

    def _pre_bw_hook(self, module, args):
        pass

    def _post_bw_hook(self, module, args):
        pass


class Peaks:
    """Peak bytes allocated since the last `reset`: CUDA's allocator statistics, or a MemTracker on a CPU."""

    def __init__(self, device, model, optimizer):
        self.cuda = device.type == "cuda"
        self.tracker = None if self.cuda else StepTracker()
        if self.tracker:
            self.tracker.track_external(model, optimizer)

    def __enter__(self):
        if self.tracker:
            self.tracker.__enter__()
        return self

    def __exit__(self, *exc):
        if self.tracker:
            self.tracker.__exit__(*exc)

    def reset(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:  # MemTracker has no public reset: restart its peak from the current total
            self.tracker._peak_mem_snap = self.tracker.get_tracker_snapshot("current")
            self.tracker._peak_mem = {dev: snap["Total"] for dev, snap in self.tracker._peak_mem_snap.items()}

    def peak(self):
        if self.cuda:
            return torch.cuda.max_memory_allocated()
        return max(snap["Total"] for snap in self.tracker.get_tracker_snapshot("peak").values())


def run_config(mode, gradient_checkpointing):
    s = SHAPES[mode]
    pixels = s["side"][0] * s["side"][1]
    return Config(model="random", batch_size=s["batch_size"], num_generations=s["num_generations"],
                  rollout_batch_size=s["rollout_batch_size"], micro_batch_size=s["micro_batch_size"],
                  mini_batch_size=0, global_max_pixels=pixels, crop_max_pixels=pixels,
                  max_new_tokens_turn1=s["max_new_tokens"], max_new_tokens_turn2=s["max_new_tokens"],
                  gradient_checkpointing=gradient_checkpointing, eval_samples=0, learning_rate=1e-6)


def samples(mode, n, seed):
    """Noise images of exactly the pixel budget (a random model's turn-1 box is invalid, so turn 2 shows the global
    view again: two full-budget images per trajectory, the ledger's worst case)."""
    g = torch.Generator().manual_seed(seed)
    w, h = SHAPES[mode]["side"]
    return [Sample(f"check-{i}", Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8)
                                                 .numpy()), "What is in the image?", ["a", "b", "c", "d"], "A", None)
            for i in range(n)]


def text_tokens(traj):
    """(prompt text, later-turn text) tokens of an MGPO trajectory: all that is neither sampled nor visual."""
    first_sampled = traj.loss_mask.index(1)
    visual = [traj.family.tokens_per_image(g) for g in traj.image_grid_thw]
    prompt = first_sampled - visual[0]
    return prompt, len(traj.input_ids) - sum(traj.loss_mask) - sum(visual) - prompt


def decode_ms_per_token(ctx, cfg, prompts, new_tokens):
    """Milliseconds per decoded token of one generate call of `rollout_batch_size` rows with gathered weights:
    (time for 1 + new_tokens tokens - time for 1) / new_tokens, so prefill and vision do not count (after a
    warm-up call)."""
    trajs, _ = start_groups(prompts, ctx.tokenizer, ctx.image_processor, family_of(ctx.model.config),
                            cfg.num_generations, ctx.rollout, MGPO_PROMPTS.system,
                            lambda s: MGPO_PROMPTS.turn1.format(question=s.question))
    trajs = trajs[:cfg.rollout_batch_size]
    seconds = []
    with gathered(ctx.model):
        for n in (1, 1, 1 + new_tokens):
            start = time.time()
            generate_for(ctx.model, ctx.tokenizer, trajs, n, ctx.rollout)
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.time() - start)
    return 1000 * (seconds[2] - seconds[1]) / new_tokens


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny widths on the CPU (the test runs this)")
    parser.add_argument("--steps", type=int, default=3, help="MGPO steps")
    parser.add_argument("--gradient_checkpointing", default="true", choices=("true", "false"))
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H100/H200: 989)")
    parser.add_argument("--tolerance", type=float, default=0.2, help="exit 1 when a phase is off by more than this")
    args = parser.parse_args(argv)
    mode = "small" if args.small else "gpu"
    device = torch.device("cuda", 0) if torch.cuda.is_available() and not args.small else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_process_group(device)
    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    config = model_config(mode, tokenizer)
    family = family_of(config)
    cfg = run_config(mode, args.gradient_checkpointing == "true")
    with torch.device(device):
        model = family.model_class._from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    model = shard_model(model.eval(), torch.bfloat16)  # fp32 master weights, bf16 compute: training's setup
    processor = family.image_processor_class(min_pixels=family.factor ** 2, max_pixels=cfg.global_max_pixels)
    ctx = SimpleNamespace(device=device, model=model, tokenizer=tokenizer, image_processor=processor,
                          rollout=rollout_config(cfg, processor))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate)
    measured = {"rollout": 0, "update": 0}
    peaks = Peaks(device, model, optimizer)
    update_seconds, update_tokens, update_patches = 0.0, 0, 0
    with peaks:
        for step in range(args.steps):  # train_mgpo.py's step, with the peak of each phase
            trajs = None  # the last step's trajectories: host memory on a GPU machine
            model.eval()
            with gathered(model):
                peaks.reset()
                trajs = mgpo_rollout(model, tokenizer, processor, samples(mode, cfg.batch_size, step),
                                     cfg.num_generations, ctx.rollout)
                measured["rollout"] = max(measured["rollout"], peaks.peak())
                peaks.reset()
            rewards = [mgpo_reward(t, cfg) for t in trajs]
            advantages = group_advantages(rewards, cfg.num_generations, cfg.scale_by_std)
            start = time.time()
            grpo_update(model, optimizer, trajs, advantages, tokenizer, cfg, device, torch.bfloat16)
            seconds = time.time() - start
            measured["update"] = max(measured["update"], peaks.peak())
            if step > 0:  # the first step warms up kernels and allocates the optimizer state
                update_seconds += seconds
                update_tokens += sum(len(t.input_ids) for t in trajs)
                update_patches += sum(int(t.image_grid_thw.prod(-1).sum()) for t in trajs)
    prompt_text, turn_text = text_tokens(trajs[0])
    predicted = memory.predict(cfg, config, 1, text_tokens=(prompt_text, turn_text))
    overhead = {"CUDA context", "allocator slack"}
    phases = {"rollout": max(("rollout: prefill", "rollout: decode"),
                             key=lambda p: memory.total(predicted[p])), "update": "update"}
    counts = memory.parameter_counts(config)
    flops = 6 * ((counts["total"] - counts["vision"]) * update_tokens + counts["vision"] * update_patches)
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; {mode} shape: "
          f"{config.text_config.num_hidden_layers} layers of {config.text_config.hidden_size}, "
          f"{config.vision_config.depth} vision blocks of {config.vision_config.hidden_size}, "
          f"{counts['total'] / 1e9:.3f}B parameters; {len(trajs)} trajectories of "
          f"{sum(len(t.input_ids) for t in trajs) / len(trajs):.0f} tokens "
          f"({sum(sum(t.loss_mask) for t in trajs) / len(trajs):.0f} sampled); "
          f"gradient checkpointing {cfg.gradient_checkpointing}")
    if device.type == "cpu":  # host and device are one memory here: the trajectories' own pixel tensors count
        host = sum(p.nbytes for t in trajs for p in t.pixel_values)
        for lines in predicted.values():
            lines["trajectories' pixel values (host memory on a GPU)"] = host
    print(memory.format_table({"predicted": predicted}, 0, unit=2 ** 20 if args.small else memory.GiB))
    ok = True
    for name, phase in phases.items():
        want = sum(v for k, v in predicted[phase].items() if k not in overhead)
        ratio = measured[name] / want
        ok &= abs(ratio - 1) <= args.tolerance
        print(f"peak {name:8} measured {measured[name] / 2**20:10.1f} MiB  predicted {want / 2**20:10.1f} MiB "
              f"({phase}, without context and slack)  ratio {ratio:.2f}")
    if update_seconds > 0:
        print(f"update MFU {flops / update_seconds / (args.peak_tflops * 1e12):.3f} "
              f"({update_tokens / update_seconds:.0f} tokens/s, peak {args.peak_tflops:g} TFLOPS)")
    ms = decode_ms_per_token(ctx, cfg, samples(mode, cfg.batch_size, 99), 16 if args.small else 64)
    print(f"decode {ms:.1f} ms per step of {cfg.rollout_batch_size} rows ({ms / cfg.rollout_batch_size:.2f} ms/token)")
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
