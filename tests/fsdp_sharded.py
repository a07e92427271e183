"""Sharded loading and gather-once generation under torchrun with FSDP2 (CPU, gloo).

    torchrun --nproc_per_node 2 tests/fsdp_sharded.py TINY_DIR

Each rank prints one line `result {json}` that tests/test_sharded.py checks:
- the sharded load (rank 0 reads, rank 1 builds on meta and receives its shards) against a plain `from_pretrained`
  on the same rank: every parameter (gathered) and every buffer, a forward's logits, greedy generate's tokens;
  the same for the frozen bf16 KL reference;
- the all-gathers (`dist.all_gather_single`, FSDP2's collective) of a greedy generate, plain and inside
  `model.gathered`, where rank 0's rows stop after 2 tokens and rank 1's run on (tests/fsdp_generate.py).
"""

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from transformers import Qwen2_5_VLForConditionalGeneration

import generation
import rollout
from family import QWEN2_5_VL
from model import full_state_dict, gathered, load_policy
from demo.synthetic import synthetic_samples
from tests.fsdp_generate import StopEarlyOnRankZero

ALL_GATHERS = {"n": 0}
ALL_GATHER = dist.all_gather_single


def counting_all_gather(*args, **kwargs):
    ALL_GATHERS["n"] += 1
    return ALL_GATHER(*args, **kwargs)


def differences(state, expected):
    """Names whose tensors differ (or are missing), comparing in fp32."""
    return sorted(k for k in expected if k not in state or not torch.equal(state[k].float(), expected[k].float()))


def prompts(model, tokenizer, image_processor):
    sample = synthetic_samples(1, seed=dist.get_rank())[0]
    traj, _ = rollout.start_trajectory(sample, tokenizer, image_processor, QWEN2_5_VL, "system", "question",
                                       112 * 112, 784)
    return generation.prompt_batch(model, tokenizer, [rollout.fork(traj) for _ in range(2)])


def greedy(model, tokenizer, batch, max_new_tokens=12):
    outs, _ = generation.generate_turn(model, tokenizer, batch, max_new_tokens, stop_pattern=generation.JSON_BLOCK_END,
                                    do_sample=False)
    return [ids for ids, _ in outs]


def check_load(tiny_dir, dtype, frozen):
    """The sharded model against a plain from_pretrained in `dtype` on this rank."""
    plain = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir, dtype=dtype)
    model, tokenizer, image_processor = load_policy(tiny_dir, torch.device("cpu"), dtype, shard=True, frozen=frozen)
    gathered_state = full_state_dict(model)  # rank 0 only
    params = differences(gathered_state, plain.state_dict()) if dist.get_rank() == 0 else []
    buffers = differences(dict(model.named_buffers()), dict(plain.named_buffers()))
    local = sum(p.to_local().numel() for p in model.parameters())
    batch = prompts(model, tokenizer, image_processor)
    with torch.no_grad():
        logits = (model(**batch).logits - plain(**batch).logits).abs().max().item()
    return model, tokenizer, image_processor, {
        "param_diffs": params, "buffer_diffs": buffers, "buffers": len(dict(model.named_buffers())),
        "local_share": local / sum(p.numel() for p in plain.parameters()), "logits_diff": logits,
        "generate_equal": greedy(model, tokenizer, batch) == greedy(plain, tokenizer, batch),
        "trainable": any(p.requires_grad for p in model.parameters()),
        "dtypes": sorted({str(p.dtype) for p in model.parameters()})}


def count_generate(model, tokenizer, batch, gather_once):
    """(all-gathers on entering `gathered`, all-gathers while generating, tokens)."""
    ALL_GATHERS["n"] = 0
    if not gather_once:
        return 0, *count(lambda: greedy(model, tokenizer, batch))
    with gathered(model):
        entry = ALL_GATHERS["n"]
        during, tokens = count(lambda: greedy(model, tokenizer, batch))
    return entry, during, tokens


def count(fn):
    before = ALL_GATHERS["n"]
    out = fn()
    return ALL_GATHERS["n"] - before, out


def main(tiny_dir):
    dist.init_process_group("gloo")
    dist.all_gather_single = counting_all_gather  # FSDP2 calls it through the module: count every call
    _, _, _, reference = check_load(tiny_dir, torch.bfloat16, frozen=True)
    model, tokenizer, image_processor, policy = check_load(tiny_dir, torch.float32, frozen=False)
    generation.StopAtPattern = StopEarlyOnRankZero
    batch = prompts(model, tokenizer, image_processor)
    with torch.no_grad():
        before = model(**batch).logits
    _, sharded, tokens = count_generate(model, tokenizer, batch, gather_once=False)
    entry, during, tokens_gathered = count_generate(model, tokenizer, batch, gather_once=True)
    resharded = all(isinstance(p, DTensor) for p in model.parameters())
    with torch.no_grad():
        forward_after, after = count(lambda: model(**batch).logits)
        second_forward, _ = count(lambda: model(**batch))
    result = {"policy": policy, "reference": reference,
              "units": sum(isinstance(m, FSDPModule) for m in model.modules()),
              "lengths": [len(t) for t in tokens], "sharded_all_gathers": sharded, "entry_all_gathers": entry,
              "gathered_all_gathers": during, "same_tokens": tokens == tokens_gathered, "resharded": resharded,
              "forward_all_gathers_after": forward_after, "forward_after_equal": torch.equal(before, after),
              "second_forward_all_gathers": second_forward}
    print(f"rank {dist.get_rank()} result {json.dumps(result)}", flush=True)
    dist.barrier()  # teardown together: gloo aborted rank 0 once when it left before rank 1 (CI, 2 cores)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
