"""GRPO updates under torchrun with FSDP2 on CPU (gloo); rank 0 writes the updated full state dicts.

    torchrun --nproc_per_node 2 tests/fsdp_update.py TINY_DIR BATCH.pt OUT_DIR [MAX_TOKENS]

Each rank takes its contiguous share of the batch's trajectories (whole groups), as train_mgpo.py does, and runs
the same update twice from the loaded weights: plain (OUT_DIR/plain.safetensors) and with activation checkpointing
(OUT_DIR/checkpointed.safetensors). Each rank prints what it measured:

    rank 0 gradients after micro-batch 1 of 2: sharded 41234 of shard 41234, unsharded 0 (parameters 82468)
    rank 0 without gradient sync: sharded 0, unsharded 82468
    rank 0 mlp forwards per micro-batch, plain: decoder 1.0 vision 1.0
    rank 0 mlp forwards per micro-batch, checkpointed: decoder 2.0 vision 2.0

With MAX_TOKENS it runs the BUDGET_RUNS updates instead, micro-batches packed by length within MAX_TOKENS padded
tokens (OUT_DIR/budget-token_mean.safetensors, OUT_DIR/budget-seq_mean.safetensors), and prints
`rank 0 budget-token_mean packed 1 passes 2`: micro-batches packed, forward/backward passes run per epoch.

Run by tests/test_fsdp.py, which compares the weights with a single-process update on the whole batch.
"""

import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.fsdp import FSDPModule

import grpo
from grpo import accumulate, grpo_update
from family import family_of
from model import full_state_dict, load_policy, shard_model
from generation import forbidden_token_ids

UPDATE = dict(mini_batch_size=4, micro_batch_size=2, max_tokens_per_micro_batch=0, ppo_epochs=1,
              clip_eps_low=0.2, clip_eps_high=0.2, clip_ratio_c=3.0, kl_coef=0.0, kl_clamp=10.0, tis_cap=0.0,
              loss_agg="token_mean", max_grad_norm=1.0, temperature=1.0, gradient_checkpointing=False)
LEARNING_RATE = 1.0
# the token-budget runs: one step (token-mean), and two epochs (old log-probs from no-grad forwards) of seq-mean
BUDGET_RUNS = {"budget-token_mean": dict(loss_agg="token_mean"),
               "budget-seq_mean": dict(loss_agg="seq_mean", ppo_epochs=2)}


def layers(model):
    """{'decoder': its decoder layer class, 'vision': its vision block class}: the model family's FSDP units."""
    return dict(zip(("decoder", "vision"), family_of(model.config).fsdp_units))


def make_optimizer(params):
    """SGD, so that the weights move by exactly lr * (clipped) gradient: Adam divides by sqrt(v), which turns
    float-order noise on near-zero gradients into steps of +-lr and would compare noise, not the gradient math."""
    return torch.optim.SGD(params, lr=LEARNING_RATE)


def trajectories(batch):
    return [SimpleNamespace(input_ids=i, loss_mask=m, rollout_logprobs=r, pixel_values=p, image_grid_thw=g)
            for i, m, r, p, g in zip(batch["input_ids"], batch["loss_mask"], batch["rollout_logprobs"],
                                     batch["pixel_values"], batch["grids"])]


def held_gradients(model):
    """(elements of this rank's sharded gradients, elements of unsharded gradients held, elements of its shards).
    FSDP2 keeps an unsharded gradient that it has not reduce-scattered on the unsharded parameter (or, when it
    upcasts, in `unsharded_accumulated_grad`)."""
    sharded = sum(p.grad.to_local().numel() for p in model.parameters() if p.grad is not None)
    shards = sum(p.to_local().numel() for p in model.parameters())
    unsharded = 0
    for module in model.modules():
        group = module._get_fsdp_state()._fsdp_param_group if isinstance(module, FSDPModule) else None
        for param in group.fsdp_params if group else []:
            held = [param.unsharded_accumulated_grad, getattr(param, "_unsharded_param", None)]
            held[1] = held[1].grad if held[1] is not None else None
            unsharded += sum(g.numel() for g in held if g is not None)
    return sharded, unsharded, shards


def count_mlp_forwards(model):
    """{'decoder': [n], 'vision': [n]}: calls of the MLPs inside decoder layers and vision blocks. The layers'
    own hooks sit outside the checkpoint (transformers checkpoints `forward`), so a recompute shows only inside;
    and a recompute stops at the layer's last saved tensor, inside the MLP, so it is counted on entry."""
    calls = {"decoder": [0], "vision": [0]}
    for module in model.modules():
        for kind, layer in layers(model).items():
            if isinstance(module, layer):
                module.mlp.register_forward_pre_hook(lambda *_, c=calls[kind]: c.__setitem__(0, c[0] + 1))
    return calls


def forwards_per_layer(model, calls, micro_batches):
    """{'decoder': x, 'vision': y}: MLP calls per layer per micro-batch (1 plain, 2 with checkpointing)."""
    counts = {kind: sum(isinstance(m, layer) for m in model.modules()) for kind, layer in layers(model).items()}
    return {kind: calls[kind][0] / micro_batches / counts[kind] for kind in calls}


def sharded_policy(tiny_dir):
    model, tokenizer, _ = load_policy(tiny_dir, torch.device("cpu"), torch.float32)
    return shard_model(model, torch.float32), tokenizer


def measure_gradients(tiny_dir, trajs, adv, rank):
    """Gradients held after micro-batch 1 of 2: with every micro-batch reduce-scattered (grpo.accumulate), and
    with FSDP2's sync switched off, the accumulation trick this code no longer uses."""
    model, tokenizer = sharded_policy(tiny_dir)
    params = sum(p.numel() for p in model.parameters())
    seen = []
    forward = grpo.sequence_logprobs

    def probe(*args, **kwargs):  # called before each micro-batch's forward
        seen.append(held_gradients(model))
        return forward(*args, **kwargs)

    grpo.sequence_logprobs = probe
    grpo_update(model, make_optimizer(model.parameters()), trajs, adv, tokenizer, SimpleNamespace(**UPDATE),
                torch.device("cpu"), torch.float32)
    sharded, unsharded, shards = seen[1]
    print(f"rank {rank} gradients after micro-batch 1 of 2: sharded {sharded} of shard {shards}, "
          f"unsharded {unsharded} (parameters {params})")
    seen.clear()
    model.set_requires_gradient_sync(False)
    accumulate(model, trajs, adv, None, None, [[0, 1], [2, 3]], tokenizer, SimpleNamespace(**UPDATE),
               torch.device("cpu"), torch.float32, forbidden_token_ids(model, tokenizer))
    grpo.sequence_logprobs = forward
    sharded, unsharded, _ = seen[1]
    print(f"rank {rank} without gradient sync: sharded {sharded}, unsharded {unsharded}")


def updated_state(tiny_dir, trajs, adv, rank, checkpointed):
    model, tokenizer = sharded_policy(tiny_dir)
    if checkpointed:
        model.activation_checkpointing_enable({"use_reentrant": False})
    calls = count_mlp_forwards(model)
    cfg = SimpleNamespace(**{**UPDATE, "gradient_checkpointing": checkpointed})
    grpo_update(model, make_optimizer(model.parameters()), trajs, adv, tokenizer, cfg, torch.device("cpu"),
                torch.float32)
    per_layer = forwards_per_layer(model, calls, len(trajs) // cfg.micro_batch_size)
    print(f"rank {rank} mlp forwards per micro-batch, {'checkpointed' if checkpointed else 'plain'}: "
          f"decoder {per_layer['decoder']} vision {per_layer['vision']}")
    return full_state_dict(model)


def budget_states(tiny_dir, trajs, adv, rank, max_tokens):
    """{name: full state dict} of updates with micro-batches by token budget, one per BUDGET_RUNS entry; prints
    this rank's packed micro-batches and the passes (forwards with gradient) it ran, e.g.
    `rank 0 packed 1 passes 2` when the other rank packed 2."""
    states = {}
    for name, overrides in BUDGET_RUNS.items():
        model, tokenizer = sharded_policy(tiny_dir)
        cfg = SimpleNamespace(**{**UPDATE, **overrides, "max_tokens_per_micro_batch": max_tokens})
        passes = [0]
        forward = grpo.sequence_logprobs

        def counted(*args, **kwargs):
            passes[0] += torch.is_grad_enabled()
            return forward(*args, **kwargs)

        grpo.sequence_logprobs = counted
        grpo_update(model, make_optimizer(model.parameters()), trajs, adv, tokenizer, cfg, torch.device("cpu"),
                    torch.float32)
        grpo.sequence_logprobs = forward
        [packed] = grpo.micro_batches([len(t.input_ids) for t in trajs], cfg.mini_batch_size, 1, max_tokens)
        print(f"rank {rank} {name} packed {len(packed)} passes {passes[0] // cfg.ppo_epochs}", flush=True)
        states[name] = full_state_dict(model)
    return states


def main(tiny_dir, batch_file, out_dir, max_tokens=None):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    batch = torch.load(batch_file, weights_only=True)
    trajs, adv = trajectories(batch), batch["advantages"]
    share = len(trajs) // world
    mine = slice(rank * share, (rank + 1) * share)
    if max_tokens is None:
        measure_gradients(tiny_dir, trajs[mine], adv[mine], rank)
        states = {"checkpointed" if checkpointed else "plain":
                  updated_state(tiny_dir, trajs[mine], adv[mine], rank, checkpointed) for checkpointed in (False, True)}
    else:
        states = budget_states(tiny_dir, trajs[mine], adv[mine], rank, int(max_tokens))
    if rank == 0:
        for name, state in states.items():
            save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(out_dir, f"{name}.safetensors"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
