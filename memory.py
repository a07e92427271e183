"""Predicted peak GPU memory of one GRPO step, per GPU: an analytic ledger of named lines, runnable on a laptop.

    python memory.py --config recipes/mgpo_qwen2_5_vl_7b.yaml --nproc_per_node 8 --gpu_gib 80
    python memory.py --config recipes/lfpc_stage1_qwen2_5_vl_7b.yaml --as_of before   # today's code, for contrast

A step has three peaks: the rollout's worst prefill (vision tower and language-model prefill of one generate call),
the rollout's decode (the KV cache at its longest) and the update (one micro-batch's forward and backward). Every
phase also holds what lives the whole run: the fp32 shard of the weights, AdamW's two moments, the KL reference,
CUDA's context and the allocator's slack. The exit status is 1 when a phase does not fit in --gpu_gib.

The rollout as it runs (rollout.py): a chunk's first prompts are prefilled once per distinct prompt (a group's G
rollouts share one: `generation.shared_prompt_batch`), then the cache is expanded to the chunk's rows; every later
turn (MGPO's turn 2, each LFPC round) continues from the last turn's cache and prefills only the new user turn and
its crop. So the prefill's activations scale with the new tokens, the KV cache with the whole conversation, per row.
A family whose cache is recurrent (Qwen3.5, `Family.recurrent_cache`) still shares the first prompt, but each later
turn re-encodes the whole conversation for every row (`generation.continues_from_cache`).
The update's micro-batch is micro_batch_size x the longest trajectory, or at most --max_tokens_per_micro_batch
padded tokens (one trajectory longer than that is a micro-batch of its own).

Sizes are worst cases: every turn samples its maximum, every image fills its pixel budget. Worked example,
Qwen2.5-VL-7B (P = 8.29B parameters, 28 layers, hidden 3,584, 4 KV heads of 128), MGPO on 8 GPUs:

    fp32 shard      P * 4 / 8                                   = 3.86 GiB
    AdamW state     2 * P * 4 / 8                               = 7.72 GiB
    gathered model  P * 2 (bf16, once per rollout)              = 15.4 GiB
    KV cache        2 (K, V) * 28 layers * 4 * 128 * 2 B = 56 KiB per token; 32 rows of a 19,520-token
                    trajectory (1,280 + 1,280 visual tokens, two 8,192-token turns, 576 of text) = 33.3 GiB
    activations     (update, checkpointed) per token: 28 layer inputs of 3,584 * 2 B, plus one layer
                    recomputed in backward: 225,912 B (20 H + 8 I + ... bytes, counted: `memory_sizes.lm_token_bytes`)

LFPC (16,384-token global view, five 4,096-token crops, 2,048 sampled, 39,744 tokens): a row's KV cache is
39,744 * 56 KiB = 2.1 GiB (x 29/28 for the growing layer), and round 6 prefills only 64 + 4,096 new tokens.

Qwen3.5-27B (P = 27.36B, 64 layers, hidden 5,120: 16 full-attention layers with 4 KV heads of 256, 48 Gated DeltaNet
layers with 16 key and 48 value heads of 128), MGPO's 19,520-token trajectory (32-px visual tokens: the same 1,280):

    KV cache        2 * 16 layers * 4 * 256 * 2 B = 64 KiB per token; 19,520 tokens = 1.19 GiB per row
    linear state    48 layers * (conv (2 * 2,048 + 6,144) * 4 * 2 B + recurrent 48 * 128 * 128 * 4 B (fp32))
                    = 148 MiB per row, whatever its length
    activations     per token: 365,016 B per full-attention layer, 775,979 B per Gated DeltaNet layer (torch
                    fallback; `memory_sizes.layer_token_bytes`)

Patching (14 or 16-px patches, 2 x 2 merge) comes from the family (`family.family_of`), head_dim and the layer kinds
from the config. Qwen2.5-VL's and Qwen3.5's layer activations were counted; Qwen3-VL's use Qwen2.5-VL's formula.

The per-token and per-patch activation sizes were counted with `saved_tensors_hooks` at three widths, and the ledger
is checked against peaks measured in real CPU runs (tests/test_memory.py, device_check.py --small).
"""

import argparse
import json
import os
import re
import sys
from types import SimpleNamespace

import torch

from family import family_of
from memory_sizes import (inference_patch_bytes, inference_token_bytes, kv_token_bytes, layer_kinds, layer_token_bytes,
                          linear_state_bytes, patch_values, patches_per_token, vision_patch_bytes,
                          visual_tokens_per_image)

GiB = 2 ** 30
CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
PROCESSOR_MAX_PIXELS = 12_845_056  # Qwen2.5-VL's preprocessor_config.json: what a budget of 0 resolves to
PROMPT_TEXT_TOKENS = 512           # system prompt, question and chat markup of the first user turn (LFPC's tool
TURN_TEXT_TOKENS = 64              # schema is ~300); a later user turn's text and markup
CUDA_CONTEXT = 1 * GiB             # not in torch's allocator statistics, but on the GPU
ALLOCATOR_SLACK = 2 * GiB          # fragmentation of the caching allocator
LOGIT_CHUNK = 2 ** 24              # grpo.gather_logprobs' logits per chunk


def load_model_config(path):
    """The model config of a config.json (configs/qwen2_5_vl_7b.json, or a checkpoint directory's), of the class
    of its family (`family.family_of` its model_type: the family model class's config_class)."""
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise SystemExit(f"error: --model_config {path!r}: no such file (see {CONFIGS})")
    with open(path) as f:
        model_type = json.load(f).get("model_type")
    return family_of(SimpleNamespace(model_type=model_type)).model_class.config_class.from_json_file(path)


def parameter_counts(config):
    """{total, root, layer, vision, vision_block, visual_root}: numbers of parameters of the real-shaped model,
    built on the meta device (no memory). `root` is what FSDP's root unit holds: embeddings, lm_head, final norm;
    `layer` the largest decoder layer (Qwen3.5's kinds differ)."""
    family = family_of(config)
    with torch.device("meta"):
        model = family.model_class._from_config(config)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    visual, lm = family.vision_tower(model), family.language_model(model)
    return {"total": count(model), "layer": max(count(layer) for layer in lm.layers), "vision": count(visual),
            "vision_block": count(visual.blocks[0]),
            "visual_root": count(visual) - sum(count(b) for b in visual.blocks),
            "root": count(model) - count(visual) - sum(count(layer) for layer in lm.layers)}


def trajectory_calls(cfg, family, text_tokens=(PROMPT_TEXT_TOKENS, TURN_TEXT_TOKENS), shared=True, continued=True):
    """A whole trajectory's shape and its generate calls' (each call's worst case), from the recipe's budgets.

    Returns {tokens: a whole trajectory, patches: its vision patches, shortest: the shortest trajectory (its first
    prompt and one token), calls: [{cached: KV columns before the call, new: tokens it prefills, new_patches:
    patches it encodes, shared: whether its prompt is a group's first, prefilled once for the group}]}.
    The first call prefills the first prompt (`shared`: once per group, then the cache is expanded to its rows).
    `continued`: MGPO's turn 2 and each LFPC round continue from the last turn's cache; the worst of them, the
    last, prefills one user turn and crop on all that came before. Not continued (a recurrent cache, Qwen3.5, or
    LFPC before issue 23): that call re-encodes the whole conversation for every row. `text_tokens`: (text of the
    first user turn with the system prompt, text of each later user turn). Images count in `family`'s patches."""
    prompt_text, turn_text = text_tokens
    per_token = patches_per_token(family)
    g = visual_tokens_per_image(cfg.global_max_pixels or PROCESSOR_MAX_PIXELS, family)
    c = visual_tokens_per_image(cfg.crop_max_pixels or cfg.global_max_pixels or PROCESSOR_MAX_PIXELS, family)
    first = dict(cached=0, new=prompt_text + g, new_patches=per_token * g, shared=shared)
    if hasattr(cfg, "max_new_tokens_turn1"):  # MGPO: global view, turn 1, crop, turn 2
        turn1 = prompt_text + g + cfg.max_new_tokens_turn1
        tokens, visual = turn1 + turn_text + c + cfg.max_new_tokens_turn2, g + c
        before_last = turn1  # the last call's conversation before its new user turn
    else:  # LFPC: the global view, up to max_turns crops, max_response_tokens sampled over all turns
        visual = g + cfg.max_turns * c
        tokens = prompt_text + cfg.max_turns * turn_text + visual + cfg.max_response_tokens
        before_last = tokens - turn_text - c
    last = dict(cached=before_last, new=turn_text + c, new_patches=per_token * c, shared=False) if continued else \
        dict(cached=0, new=before_last + turn_text + c, new_patches=per_token * visual, shared=False)
    return dict(tokens=tokens, patches=per_token * visual, shortest=prompt_text + g + 1, calls=[first, last])


def chunk_rows(cfg, per_rank, after=True):
    """(rows of a generate call, distinct first prompts among them). `rollout.chunks` holds whole groups when
    rollout_batch_size >= G, else a slice of a group (or of two, when G is not a multiple of it). E.g. G 16:
    size 16 -> (16, 1); 20 -> (16, 1); 40 -> (32, 2); 4 -> (4, 1); 6 -> (6, 2)."""
    size, group = min(cfg.rollout_batch_size or per_rank, per_rank) if after else per_rank, cfg.num_generations
    if size >= group:
        return size // group * group, size // group
    return size, 1 if group % size == 0 else 2


def prefill_lines(call, rows, distinct, t, v, family, dtype_bytes):
    """A generate call's prefill: the cache so far and the new columns' (and a hybrid's fixed state per row), the
    pixels, the vision tower's or the language model's activations (whichever is larger), the first sampled token's
    logits. A shared first prompt is prefilled for its `distinct` prompts only; its cache is expanded to the `rows`
    afterwards (the decode's)."""
    n = distinct if call["shared"] else rows
    vision = n * call["new_patches"] * inference_patch_bytes(v)
    prefill = n * call["new"] * (inference_token_bytes(t) + t.hidden_size * dtype_bytes) \
        + n * call["new"] * (call["cached"] + call["new"])  # sdpa's boolean mask of a left-padded batch
    cache = n * (call["cached"] + call["new"]) * kv_token_bytes(t, dtype_bytes) + n * linear_state_bytes(t, dtype_bytes)
    return {"KV cache (before the call and its prefill)": cache,
            "pixel tensors (bf16)": n * call["new_patches"] * patch_values(family) * dtype_bytes,
            "activations (the larger of vision tower, LM prefill)": max(vision, prefill),
            "sampling logits (fp32)": rows * t.vocab_size * 4 * 5}  # cast, suppressed, log-softmax, softmax, sample


def predict(cfg, model_config, world_size, as_of="after", dtype_bytes=2,
            text_tokens=(PROMPT_TEXT_TOKENS, TURN_TEXT_TOKENS)):
    """{phase: {line: bytes}} per GPU for one step of `cfg` (a config.TrainConfig of either recipe).

    as_of="before": the code before issue 22 (all of a rank's trajectories in one generate call on the sharded model,
    every row's prompt prefilled, LFPC's rounds re-encoded, unsharded gradient accumulation, no activation
    checkpointing); "after": today's rollout (chunks, the weights gathered once, a group's prompt prefilled once,
    every turn continued from the cache unless the family's cache is recurrent), sharded gradients, cfg's
    checkpointing and micro-batches."""
    t, v, family = model_config.text_config, model_config.vision_config, family_of(model_config)
    n = parameter_counts(model_config)
    trained = n["total"] - (n["vision"] if cfg.freeze_vision_tower else 0)
    after = as_of == "after"
    ckpt = cfg.gradient_checkpointing and after
    rows, distinct = chunk_rows(cfg, cfg.batch_size // world_size * cfg.num_generations, after)
    # before issue 23 only MGPO's turn 2 continued from the cache; a recurrent cache never continues
    continued = not family.recurrent_cache and (after or hasattr(cfg, "max_new_tokens_turn1"))
    shape = trajectory_calls(cfg, family, text_tokens, shared=after, continued=continued)
    always = {
        "fp32 shard of the weights": n["total"] * 4 / world_size,
        "AdamW state (2 moments, fp32, sharded)": 2 * trained * 4 / world_size,
        "KL reference (bf16, sharded)": n["total"] * 2 / world_size if cfg.kl_coef > 0 else 0,
        "CUDA context": CUDA_CONTEXT,
        "allocator slack": ALLOCATOR_SLACK,
    }
    # after: model.gathered, the whole model in bf16 for the rollout (no all-gather per decoded token); before:
    # FSDP's root stays gathered, and each decode step gathers a layer while prefetching the next
    gathered = n["total"] if after else n["root"] + n["visual_root"] + 2 * n["layer"]
    weights = {"bf16 weights gathered for generate": gathered * dtype_bytes}
    calls = [prefill_lines(call, rows, distinct if after else rows, t, v, family, dtype_bytes)
             for call in shape["calls"]]
    prefill = max(calls, key=total)
    decode_phase = {**always, **weights,
                    # DynamicCache grows by concatenation: one full-attention layer is copied at each step
                    "KV cache (whole trajectories)": rows * shape["tokens"] * kv_token_bytes(t, dtype_bytes)
                    * (1 + 1 / layer_kinds(t).count("full_attention")) + rows * linear_state_bytes(t, dtype_bytes),
                    "pixel tensors (bf16)": max(lines["pixel tensors (bf16)"] for lines in calls),
                    "sampling logits (fp32)": prefill["sampling logits (fp32)"]}
    return {"rollout: prefill": {**always, **weights, **prefill}, "rollout: decode": decode_phase,
            "update": {**always, **update_lines(cfg, model_config, n, trained, world_size, shape, ckpt, after,
                                                dtype_bytes)}}


def micro_batch_shape(cfg, shape, family, after=True):
    """(tokens, vision patches) of the update's largest micro-batch, padded. With max_tokens_per_micro_batch N:
    at most N padded tokens, or one trajectory longer than N alone; at most N // shortest trajectories, and 4
    patches per visual token. E.g. LFPC, N 40,960: trajectories of 16,897 to 39,744 tokens -> at most 2 rows, 40,960
    tokens and 163,840 patches."""
    budget = cfg.max_tokens_per_micro_batch if after else 0
    if budget == 0:
        return cfg.micro_batch_size * shape["tokens"], cfg.micro_batch_size * shape["patches"]
    tokens = max(budget, shape["tokens"])
    return tokens, min(max(1, budget // shape["shortest"]) * shape["patches"], patches_per_token(family) * tokens)


def update_lines(cfg, model_config, n, trained, world_size, shape, ckpt, after, dtype_bytes):
    """The update's own lines: gradients, the gathered units, one micro-batch's activations and logits."""
    t, v, family = model_config.text_config, model_config.vision_config, family_of(model_config)
    tokens, patches = micro_batch_shape(cfg, shape, family, after)
    patches *= not cfg.freeze_vision_tower
    layers, blocks, per_layer = t.num_hidden_layers, v.depth, layer_token_bytes(t)
    largest = max(tokens * max(per_layer), patches * vision_patch_bytes(v))
    if ckpt:  # each layer keeps its input; backward recomputes one layer or block at a time
        saved = tokens * layers * t.hidden_size * dtype_bytes + patches * blocks * v.hidden_size * dtype_bytes
        working = largest
    else:
        saved = tokens * sum(per_layer) + patches * blocks * vision_patch_bytes(v)
        working = 0
    # backward of one layer: gradients of its activations, about the size of what it saved
    working += largest
    rows = min(tokens, max(1, LOGIT_CHUNK // t.vocab_size))
    return {
        "gradients (fp32)": trained * 4 / world_size if after else trained * 4 * (1 + 1 / world_size),
        "gathered root, 2 layers (bf16) and their gradients":
            (n["root"] + 2 * n["layer"]) * dtype_bytes + t.vocab_size * t.hidden_size * dtype_bytes
            + n["layer"] * (dtype_bytes + 4),
        "activations (saved)": saved,
        "activations (backward of one layer or block)": working,
        # the final hidden states and their gradient, and one chunk's fp32 logits, log-softmax and gradient
        "logits chunks": 2 * tokens * t.hidden_size * dtype_bytes + 3 * rows * t.vocab_size * 4,
        "pixel tensors (bf16)": patches * patch_values(family) * dtype_bytes,
    }


def total(lines):
    return sum(lines.values())


def format_table(columns, gpu_gib, unit=GiB):
    """Each phase's lines in `unit` (GiB), one column per `as_of`, and each phase's total against the GPU."""
    names = list(columns)
    out = [f"{'':58}" + "".join(f"{name:>10}" for name in names)]
    for phase in columns[names[-1]]:
        out.append(phase)
        lines = dict.fromkeys(k for c in columns.values() for k in c[phase])
        for line in lines:
            out.append(f"  {line:56}" + "".join(f"{columns[c][phase].get(line, 0) / unit:10.1f}" for c in names))
        totals = [total(columns[c][phase]) / unit for c in names]
        verdict = ("  fits" if totals[-1] * unit <= gpu_gib * GiB else "  DOES NOT FIT") if gpu_gib else ""
        out.append(f"  {'total':56}" + "".join(f"{x:10.1f}" for x in totals) + verdict)
    return "\n".join(out)


def startup_summary(cfg, checkpoint, world_size, gpu_gib=80):
    """What a run prints at start-up: the resolved pixel budgets, visual tokens per image, and the predicted peak
    memory per GPU of each phase (the ledger above, for this checkpoint's shape)."""
    model_config = load_model_config(checkpoint)
    prediction, family = predict(cfg, model_config, world_size), family_of(model_config)
    phases = ", ".join(f"{phase} {total(lines) / GiB:.1f}" for phase, lines in prediction.items())
    global_tokens = visual_tokens_per_image(cfg.global_max_pixels, family)
    crop_tokens = visual_tokens_per_image(cfg.crop_max_pixels, family)
    return (f"pixel budgets: global view {cfg.global_max_pixels} ({global_tokens} visual tokens), each crop "
            f"{cfg.crop_max_pixels} ({crop_tokens})\n"
            f"predicted peak GiB per GPU (memory.py, {world_size} ranks, worst case): {phases}")


def peak_gib(prediction):
    return max(total(lines) for lines in prediction.values()) / GiB


def model_config_path(recipe_path):
    """configs/<family>_<size>.json from a recipe named like mgpo_qwen2_5_vl_7b.yaml or mgpo_qwen3_vl_8b.yaml."""
    match = re.search(r"(qwen2_5_vl|qwen3_vl|qwen3_5)_(\d+b)", os.path.basename(recipe_path))
    if not match:
        raise SystemExit(f"error: --config {recipe_path!r}: cannot tell the model size from the name; "
                         f"pass --model_config configs/qwen2_5_vl_7b.json")
    return os.path.join(CONFIGS, f"{match.group(1)}_{match.group(2)}.json")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a recipe file (recipes/*.yaml)")
    parser.add_argument("--recipe", choices=("mgpo", "lfpc"), default="",
                        help="which script's options; default: the recipe file name's first word")
    parser.add_argument("--model_config", default="", help="a config.json; default: configs/ by the recipe's name")
    parser.add_argument("--nproc_per_node", type=int, default=8, help="GPUs (world size)")
    parser.add_argument("--gpu_gib", type=float, default=80, help="memory of one GPU")
    parser.add_argument("--as_of", choices=("before", "after", "both"), default="both",
                        help="the code before issue 22, after it, or both columns")
    args, overrides = parser.parse_known_args(argv)
    recipe = args.recipe or os.path.basename(args.config).split("_")[0]
    if recipe not in ("mgpo", "lfpc"):
        raise SystemExit(f"error: --config {args.config!r}: name it mgpo_* or lfpc_*, or pass --recipe")
    # a command-line tool: the recipes' Config classes live in the training scripts (which import nothing from here)
    from config import parse_config
    from train_lfpc import Config as LFPCConfig
    from train_mgpo import Config as MGPOConfig
    cfg = parse_config(MGPOConfig if recipe == "mgpo" else LFPCConfig, ["--config", args.config, *overrides])
    model_config = load_model_config(args.model_config or model_config_path(args.config))
    as_of = ["before", "after"] if args.as_of == "both" else [args.as_of]
    columns = {a: predict(cfg, model_config, args.nproc_per_node, a) for a in as_of}
    family = family_of(model_config)
    shape = trajectory_calls(cfg, family)
    per_rank = cfg.batch_size // args.nproc_per_node * cfg.num_generations
    global_tokens = visual_tokens_per_image(cfg.global_max_pixels or PROCESSOR_MAX_PIXELS, family)
    crop_tokens = visual_tokens_per_image(cfg.crop_max_pixels or cfg.global_max_pixels or PROCESSOR_MAX_PIXELS, family)
    rows, distinct = chunk_rows(cfg, per_rank)
    print(f"{args.config} on {args.nproc_per_node} x {args.gpu_gib:g} GiB: {per_rank} trajectories per rank of up to "
          f"{shape['tokens']:,} tokens and {shape['patches']:,} vision patches; visual tokens per image: global "
          f"{global_tokens:,}, crop {crop_tokens:,}; generate calls of {rows} rows ({distinct} first prompts)"
          f"\n(GiB per GPU)")
    print(format_table(columns, args.gpu_gib))
    return 0 if peak_gib(columns[as_of[-1]]) <= args.gpu_gib else 1


if __name__ == "__main__":
    sys.exit(main())
