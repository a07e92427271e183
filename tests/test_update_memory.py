"""The update's memory options on one process, set up as a run sets them up (training.setup): activation checkpointing
(really active, and the same update) and a frozen vision tower. The 2-rank versions, and the sharded gradients
during accumulation, are in tests/test_fsdp.py (tests/fsdp_update.py)."""

import pytest
import torch

from config import parse_config
from grpo import grpo_update
from training import setup
from tests.fsdp_update import count_mlp_forwards, forwards_per_layer
from tests.helpers import ADVANTAGES, TINY_MGPO, small_rollout
from train_mgpo import Config


@pytest.fixture(scope="module")
def trajs(policy):
    return small_rollout(policy, seed=1, sample_seed=5)


def run_setup(tiny_path, tmp_path, *flags):
    """(ctx, cfg) of a run on the tiny model; one mini-batch of all 8 trajectories, micro-batches of 4."""
    cfg = parse_config(Config, TINY_MGPO + ["--model", tiny_path, "--output_dir", str(tmp_path), *flags])
    ctx = setup(cfg)
    cfg.mini_batch_size = 8
    return ctx, cfg


def saved_bytes(fn):
    """Bytes of the tensors autograd saves for backward while `fn` runs (activation checkpointing saves its own
    inputs through its own hooks, which take the place of these inside a checkpointed layer)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def test_checkpointed_update_equals_the_plain_one(tiny_path, tmp_path, trajs):
    """Every decoder layer and vision block recomputes in backward (its MLP runs twice per micro-batch), fewer
    activations are saved, and the weights after one SGD step are those of the plain update."""
    models, measured = [], []
    for flag in ("false", "true"):
        ctx, cfg = run_setup(tiny_path, tmp_path / flag, "--gradient_checkpointing", flag)
        calls = count_mlp_forwards(ctx.model)
        optimizer = torch.optim.SGD(ctx.model.parameters(), lr=1.0)  # weights move by exactly the gradient
        stats = {}
        size = saved_bytes(lambda: stats.update(grpo_update(ctx.model, optimizer, trajs, torch.tensor(ADVANTAGES),
                                                            ctx.tokenizer, cfg, ctx.device, ctx.dtype)))
        assert not ctx.model.training  # back in eval mode for the next rollout
        assert stats["clip_frac"] == 0.0  # training mode changed no log-prob: the ratio is exactly 1
        models.append(ctx.model)
        measured.append((forwards_per_layer(ctx.model, calls, len(trajs) // cfg.micro_batch_size), size))
    (plain_calls, plain_bytes), (checkpointed_calls, checkpointed_bytes) = measured
    assert plain_calls == {"decoder": 1.0, "vision": 1.0} and checkpointed_calls == {"decoder": 2.0, "vision": 2.0}
    assert checkpointed_bytes < plain_bytes / 2, (plain_bytes, checkpointed_bytes)
    plain, checkpointed = models
    assert max((a - b).abs().max().item() for a, b in zip(plain.parameters(), checkpointed.parameters())) < 1e-6
    initial = run_setup(tiny_path, tmp_path / "initial")[0].model
    assert max((a - b).abs().max().item() for a, b in zip(plain.parameters(), initial.parameters())) > 1e-4


def test_frozen_vision_tower_does_not_move(tiny_path, tmp_path, trajs):
    ctx, cfg = run_setup(tiny_path, tmp_path, "--freeze_vision_tower", "true", "--learning_rate", "1e-3")
    vision = dict(ctx.model.model.visual.named_parameters())
    before = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
    trained = {id(p) for group in ctx.optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for n, p in ctx.model.named_parameters() if "visual" not in n}
    grpo_update(ctx.model, ctx.optimizer, trajs, torch.tensor(ADVANTAGES), ctx.tokenizer, cfg, ctx.device, ctx.dtype)
    after = dict(ctx.model.named_parameters())
    assert all(torch.equal(after[f"model.visual.{n}"], before[f"model.visual.{n}"]) for n in vision)
    assert all(p.grad is None and not p.requires_grad for p in vision.values())  # not even computed
    assert max((after[n] - before[n]).abs().max().item() for n in after if "visual" not in n) > 1e-4
