"""Training checkpoints that survive a kill at any moment, and resuming from the newest complete one.

    out/run/checkpoint-200/            complete: an HF model directory plus the trainer's state
        config.json, model.safetensors, tokenizer files, preprocessor_config.json   (from_pretrained loads it;
                                       in the checkpoint's own dtype, e.g. bf16 for Qwen, gathered to rank 0)
        dcp/                           torch.distributed.checkpoint of the fp32 model and AdamW state: each rank
            __{r}_0.distcp             writes its own shards; .metadata maps them to the full tensors, so that
            .metadata                  a run resumes exactly, on this number of ranks or another one
        rng_rank{r}.pt                 Python, NumPy and torch (CPU and CUDA) RNG states of rank r
        trainer_state.json             step (= batches consumed per rank), world size, the run's config
    out/run/.tmp-checkpoint-250/       being written; renamed to checkpoint-250 only once complete

A kill while writing leaves a `.tmp-` directory that resuming ignores (and removes), and the previous checkpoint
untouched. Old checkpoints are pruned only after the new one is complete. Nothing is unpickled: the RNG files are
read with `torch.load(weights_only=True)`, the shards by torch.distributed.checkpoint, the rest is JSON.

Qwen2.5-VL-7B on 8 GPUs: each rank writes 4.1 GB of fp32 weights and 8.3 GB of Adam moments (99.5 GB in all),
and rank 0 also the 16.6 GB bf16 model directory.
"""

import json
import os
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from distributed import world
from model import save_policy

NAME = re.compile(r"^checkpoint-(\d+)$")


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def checkpoint_dir(output_dir, step):
    return os.path.join(output_dir, f"checkpoint-{step}")


def complete_checkpoints(output_dir):
    """[(step, path)] of the complete checkpoints in `output_dir`, oldest first."""
    found = []
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        match = NAME.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.exists(os.path.join(path, "trainer_state.json")):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir):
    found = complete_checkpoints(output_dir)
    return found[-1][1] if found else None


def rng_state():
    """Every RNG a step draws from, as tensors and plain values (loadable with weights_only=True)."""
    numpy = np.random.get_state(legacy=False)
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "numpy_key": torch.from_numpy(numpy["state"]["key"].astype(np.int64)), "numpy_pos": numpy["state"]["pos"],
            "numpy_gauss": [numpy["has_gauss"], numpy["gauss"]]}


def set_rng_state(state):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    np.random.set_state({"bit_generator": "MT19937", "has_gauss": state["numpy_gauss"][0],
                         "gauss": state["numpy_gauss"][1],
                         "state": {"key": state["numpy_key"].numpy().astype(np.uint32), "pos": state["numpy_pos"]}})


def save_checkpoint(ctx, cfg, step):
    """Write checkpoint-`step` atomically (collective: every rank calls it), then prune to `save_total_limit`."""
    tmp, final = os.path.join(cfg.output_dir, f".tmp-checkpoint-{step}"), checkpoint_dir(cfg.output_dir, step)
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    save_policy(ctx.model, ctx.tokenizer, ctx.image_processor, tmp)
    dcp.save(training_state(ctx), checkpoint_id=os.path.join(tmp, "dcp"))
    torch.save(rng_state(), os.path.join(tmp, f"rng_rank{rank()}.pt"))
    if rank() == 0:
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:  # written last: it marks completeness
            json.dump({"step": step, "world_size": world(), "config": vars(cfg)}, f, indent=1)
    barrier()
    if rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        prune(cfg.output_dir, cfg.save_total_limit)
    barrier()


def training_state(ctx):
    """{"model", "optimizer"}: this rank's shards of the fp32 weights and of the AdamW state, as DTensors keyed by
    parameter name (plain tensors on a single process); what `dcp` saves, and loads into in place."""
    model, optimizer = get_state_dict(ctx.model, ctx.optimizer)
    return {"model": model, "optimizer": optimizer}


def prune(output_dir, keep):
    """Remove all but the newest `keep` complete checkpoints (keep 0: remove none)."""
    if keep > 0:
        for _, path in complete_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(path)


def resume(ctx, path):
    """Restore the fp32 weights, the optimizer and this rank's RNG states from checkpoint `path`; returns the step
    it was written at. Collective: each rank reads the slices of the shards it now holds, whatever the number of
    ranks that wrote them."""
    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    shards = training_state(ctx)
    dcp.load(shards, checkpoint_id=os.path.join(path, "dcp"))
    set_state_dict(ctx.model, ctx.optimizer, model_state_dict=shards["model"], optim_state_dict=shards["optimizer"])
    rng_file = os.path.join(path, f"rng_rank{rank()}.pt")
    if state["world_size"] == world():
        set_rng_state(torch.load(rng_file, weights_only=True))
    elif rank() == 0:
        print(f"note: {path} was written by {state['world_size']} ranks, this run has {world()}: weights, optimizer "
              f"and data position resume exactly, sampling continues from fresh seeds")
    return state["step"]


def remove_partial(output_dir):
    """Delete `.tmp-checkpoint-*` directories left by a run killed while saving."""
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        if name.startswith(".tmp-checkpoint-"):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
