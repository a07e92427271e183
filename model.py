"""Loading a policy (a local checkpoint of a supported family, or a tiny offline model), FSDP2 wrapping, saving.

A policy is three things that travel together in one checkpoint directory:

    model            the family's ...ForConditionalGeneration (family.py, picked by config.json's model_type)
    tokenizer        text <-> ids, with Qwen's special tokens and chat template
    image_processor  the family's image processor (pixels -> patches; torchvision-free)

A real checkpoint and the tiny model (`tiny.py` writes it as an ordinary checkpoint directory) load through
exactly the same `from_pretrained` path. Nothing here touches the network.

Under torchrun the model is loaded sharded (`load_sharded`): rank 0 reads the checkpoint, every other rank builds
the model on the meta device, and each rank receives only its FSDP2 shards. Qwen2.5-VL-7B (8.29B parameters) on
8 GPUs: 33 GB of fp32 in rank 0's host memory and none in the others'; 4.1 GB of shards per GPU plus one tensor
in flight (at most the 2.2 GB embedding), never the whole 33 GB model on a GPU.
"""

import importlib.util
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from chat import with_thinking
from family import family_of

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


def default_device():
    """CUDA with bf16 when present, CPU fp32 otherwise: the same code path with a different device and dtype."""
    if torch.cuda.is_available():
        rank = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", rank), torch.bfloat16
    return torch.device("cpu"), torch.float32


def check_checkpoint_dir(path):
    """Stop with a clear message when `path` is not a usable checkpoint directory."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model {path!r}: not a directory (give 'tiny' or a local checkpoint directory)")
    has_weights = any(f.endswith(".safetensors") for f in os.listdir(path))
    for needed, ok in [("config.json", os.path.exists(os.path.join(path, "config.json"))),
                       ("*.safetensors weights", has_weights),
                       ("preprocessor_config.json", os.path.exists(os.path.join(path, "preprocessor_config.json")))]:
        if not ok:
            raise FileNotFoundError(f"--model {path!r}: missing {needed}")


def check_attn_implementation(name):
    """Stop with a clear message on an unknown attention kernel, or on flash_attention_2 without its package."""
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"--attn_implementation {name!r}: use one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ValueError("--attn_implementation flash_attention_2 needs the flash_attn package (pip install "
                         "flash-attn --no-build-isolation, CUDA only); use sdpa without it")


def load_policy(path, device, dtype, attn_implementation="sdpa", shard=False, frozen=False, thinking="template"):
    """(model, tokenizer, image_processor) from a local checkpoint directory; the model in eval mode on `device`.
    The classes are those of the checkpoint's family (`family.family_of` its config.json's model_type).

    Not sharded: the whole model in `dtype`. Sharded (`shard`, under torchrun): see `load_sharded`; `frozen` for
    the KL reference (no gradients, weights kept in `dtype`). `model.config.dtype` stays the checkpoint's own
    dtype (bf16 for the released Qwen checkpoints), which `save_policy` writes in. `thinking`: `chat.with_thinking`."""
    check_checkpoint_dir(path)
    check_attn_implementation(attn_implementation)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    family = family_of(config)
    saved_dtype = config.dtype or torch.float32
    if shard:
        model = load_sharded(path, family, device, dtype, attn_implementation, frozen)
    else:
        model = from_pretrained(path, family, dtype, attn_implementation).to(device)
    model.config.dtype = saved_dtype
    model.requires_grad_(not frozen)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if not tokenizer.chat_template:  # the rollout builds every turn from it (chat.encode_prompt)
        raise ValueError(f"--model {path!r}: the tokenizer has no chat template (no chat_template.jinja, no "
                         f"\"chat_template\" in tokenizer_config.json); write the base model's template (the "
                         f"\"chat_template\" of the -Instruct checkpoint's chat_template.json) to "
                         f"{os.path.join(path, 'chat_template.jinja')}")
    tokenizer.chat_template = with_thinking(tokenizer.chat_template, thinking, path)
    image_processor = family.image_processor_class.from_pretrained(path, local_files_only=True)
    return model, tokenizer, image_processor


def from_pretrained(path, family, dtype, attn_implementation):
    return family.model_class.from_pretrained(path, dtype=dtype, local_files_only=True,
                                              attn_implementation=attn_implementation)


def load_sharded(path, family, device, dtype, attn_implementation, frozen):
    """An FSDP2-sharded model whose ranks each hold only their shards; collective: call on every rank.

    Rank 0 loads the checkpoint on CPU (the one full copy in host memory). Every rank builds the model on the meta
    device, shards it (`shard_units`), allocates its shards on `device` and receives them from rank 0 one tensor at a
    time. The non-persistent buffers (the rotary `inv_freq` of the vision tower and of the language model) are not
    in the state dict and `to_empty` leaves them uninitialised: rank 0 broadcasts its own. Trained: fp32 master
    weights, compute in `dtype` (FSDP's mixed precision). Frozen: the weights themselves in `dtype`."""
    storage = dtype if frozen else torch.float32
    source = from_pretrained(path, family, storage, attn_implementation) if dist.get_rank() == 0 else None
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"):
        model = family.model_class._from_config(config, dtype=storage, attn_implementation=attn_implementation)
    shard_units(model, dtype)
    model.to_empty(device=device)
    set_model_state_dict(model, source.state_dict() if source is not None else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    persistent = set(model.state_dict())
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name not in persistent:
                if source is not None:
                    buffer.copy_(source.get_buffer(name))
                dist.broadcast(buffer, src=0)
    del source
    if os.path.exists(os.path.join(path, "generation_config.json")):  # from_pretrained reads it too
        model.generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)
    start_root(model)
    return model.eval()


def shard_units(model, dtype):
    """FSDP2 units: every decoder layer and vision block (the family's `fsdp_units`), the vision tower as a unit,
    then the root.

    The vision tower must be its own unit or `generate` mixes Tensors and DTensors in the patch embedding.
    Weights stored in fp32 compute in `dtype` with fp32 gradient reduction (bf16 on CUDA)."""
    stored = next(model.parameters()).dtype
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype != stored else None
    kwargs = {"mp_policy": mp} if mp is not None else {}
    family = family_of(model.config)
    for module in model.modules():
        if isinstance(module, family.fsdp_units):
            fully_shard(module, **kwargs)
    fully_shard(family.vision_tower(model), **kwargs)
    fully_shard(model, **kwargs)


def start_root(model):
    """generate() runs the vision tower before any forward of the root, but FSDP2 must meet the root first to set
    up its hierarchy: one text-only forward through the root does that. The root stays unsharded after a forward,
    and an optimizer built then would hold the unsharded tensors: reshard."""
    with torch.no_grad():
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=next(model.parameters()).device))
    model.reshard()


def shard_model(model, dtype):
    """FSDP2-shard a whole model already loaded on every rank (`shard_units`, then `start_root`)."""
    shard_units(model, dtype)
    start_root(model)
    return model


@contextmanager
def gathered(model):
    """Every FSDP unit of `model` all-gathered once on entry and kept whole until exit, so that `generate` decodes
    with no all-gathers (sharded, each decode step gathers every layer: ~16.6 GB per token at 7B in bf16).

    Costs the whole model in the compute dtype on every GPU while inside (16.6 GB at 7B, next to 4.1 GB of fp32
    shards). Entry and exit are the same collectives on every rank whatever it generates, so ranks that stop at
    different steps stay in step. A model that is not sharded passes through.

        with gathered(model):
            trajs, rewards, metrics = rollout_fn(ctx, cfg, prompts)
    """
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:  # one all-gather each (unshard is not recursive), the same order on every rank
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
            # FSDP's own settings: the root keeps its parameters after forward (backward needs them at once)
            unit.set_reshard_after_forward(unit is not model, recurse=False)


def full_state_dict(model):
    """The unsharded fp32 state dict on CPU: on rank 0 under torchrun (the other ranks get {}), gathered one
    tensor at a time; the model's own state on a single process."""
    if not dist.is_initialized():
        return {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_policy(model, tokenizer, image_processor, path):
    """Write a checkpoint directory that `from_pretrained` loads, in the checkpoint's own dtype
    (`model.config.dtype`: bf16 for Qwen's releases, whatever the training precision). Collective under torchrun:
    call on every rank; only rank 0 holds the gathered weights and writes."""
    state = full_state_dict(model)
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    dtype = model.config.dtype or torch.float32  # None on a model built from a config (make_base.py)
    # the tied copy (lm_head = embed_tokens in 3B and the tiny model) is left out, as from_pretrained expects
    for key in model.all_tied_weights_keys:
        state.pop(key, None)
    for key in state:  # one tensor at a time: never the whole model in both dtypes in host memory (50 GB at 7B)
        state[key] = state[key].to(dtype)
    model.save_pretrained(path, state_dict=state)
    model.config.dtype = dtype  # save_pretrained wrote the parameters' (fp32 master) dtype: write the weights'
    model.config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    image_processor.save_pretrained(path)
