"""GRPO pieces against hand-computed values, and the update's normalisation across micro-batches."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from grpo import (accumulate, batch_logprobs, gather_logprobs, group_advantages, grpo_update, policy_loss,
                  sequence_logprobs, training_batch)
from rollout import forbidden_token_ids
from tests.helpers import ADVANTAGES, small_rollout

UPDATE = dict(mini_batch_size=8, micro_batch_size=8, ppo_epochs=1, clip_eps_low=0.2, clip_eps_high=0.2, kl_coef=0.0,
              loss_agg="token_mean", max_grad_norm=1.0, temperature=1.0)


def test_group_advantages_by_hand():
    # group 1: rewards 1, 0, 0 -> mean 1/3, unbiased std sqrt(1/3); group 2: all equal -> 0
    adv = group_advantages([1.0, 0.0, 0.0, 1.0, 1.0, 1.0], group_size=3, eps=1e-6)
    s = math.sqrt(1 / 3) + 1e-6
    assert torch.allclose(adv, torch.tensor([(2 / 3) / s, (-1 / 3) / s, (-1 / 3) / s, 0.0, 0.0, 0.0]))
    dr = group_advantages([1.0, 0.0, 0.0, 1.0, 1.0, 1.0], group_size=3, scale_by_std=False)
    assert torch.allclose(dr, torch.tensor([2 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0]))


def test_policy_loss_by_hand():
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1, 1.5]]))
    loss, clipped, kl = policy_loss(new, old, torch.tensor([1.0]), 0.2, 0.2)
    # A=1: -min(r, clip(r)) -> ratio 1.5 clipped to 1.2; 0.5 unclipped (min picks 0.5); 1.1 inside the range
    assert torch.allclose(loss, torch.tensor([[-1.2, -0.5, -1.1, -1.2]]))
    assert clipped.tolist() == [[1.0, 0.0, 0.0, 1.0]]
    loss, clipped, _ = policy_loss(new, old, torch.tensor([-2.0]), 0.2, 0.3)
    # A=-2: -min(-2r, -2 clip(r)) = 2 max(r, clip(r)): 1.5 -> 3.0; 0.5 -> clipped to 0.8 -> 1.6; 1.1 -> 2.2
    assert torch.allclose(loss, torch.tensor([[3.0, 1.6, 2.2, 3.0]]))
    assert clipped.tolist() == [[0.0, 1.0, 0.0, 0.0]]
    ref = torch.log(torch.tensor([[1.0, 1.0, 1.0, 3.0]]))
    _, _, kl = policy_loss(new, old, torch.tensor([1.0]), 0.2, 0.2, ref_logprobs=ref, kl_coef=0.1)
    x = torch.tensor([[1 / 1.5, 1 / 0.5, 1 / 1.1, 3 / 1.5]])  # p_ref / p
    assert torch.allclose(kl, x - torch.log(x) - 1)


def test_gather_logprobs_matches_a_masked_softmax():
    torch.manual_seed(0)
    hidden, weight = torch.randn(7, 5), torch.randn(11, 5)
    logits = hidden @ weight.T
    targets = torch.tensor([0, 1, 2, 3, 4, 5, 10])
    forbidden = [6, 9]
    allowed = [i for i in range(11) if i not in forbidden]
    probs = torch.softmax(logits[:, allowed].double(), -1)
    expected = torch.log(probs[torch.arange(7), torch.tensor([allowed.index(t) for t in targets.tolist()])])
    got = gather_logprobs(hidden, weight, targets, forbidden, chunk_elements=33)  # 3 rows of 11
    assert torch.allclose(got.double(), expected, atol=1e-6)
    halved = gather_logprobs(hidden, weight, targets, forbidden, temperature=0.5)
    assert torch.allclose(halved, torch.log_softmax(logits[:, allowed] / 0.5, -1)[
        torch.arange(7), torch.tensor([allowed.index(t) for t in targets.tolist()])], atol=1e-6)


def test_chunked_head_gives_the_full_logits_values_and_gradients(policy, rollout_batch):
    """sequence_logprobs (lm_head chunk by chunk from the hidden states, recomputed in backward) against the
    model's own full logits with one fp32 log-softmax: same log-probs and same parameter gradients."""
    model, tokenizer, _ = policy
    model = copy.deepcopy(model)
    forbidden = forbidden_token_ids(tokenizer)
    batch, mask = training_batch(rollout_batch[0], tokenizer, model.config.image_token_id, torch.device("cpu"),
                                 torch.float32)
    weights = torch.linspace(-1, 1, mask.numel()).view(mask.shape) * mask

    def grads(logprobs):
        model.zero_grad(set_to_none=True)
        (logprobs * weights).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    logits = model(**batch, use_cache=False).logits[:, :-1].float()
    logits[..., forbidden] = -math.inf
    full = torch.zeros(mask.shape)
    full[:, 1:] = logits.log_softmax(-1).gather(2, batch["input_ids"][:, 1:, None]).squeeze(2)
    full = torch.where(mask > 0, full, 0.0)
    expected = grads(full)
    chunked = sequence_logprobs(model, batch, mask, forbidden)
    got = grads(chunked)
    assert (chunked - full).abs().max() < 1e-5
    assert got.keys() == expected.keys() and "model.language_model.embed_tokens.weight" in got  # = lm_head (tied)
    assert max((got[n] - expected[n]).abs().max().item() for n in got) < 1e-5


@pytest.fixture(scope="module")
def rollout_batch(policy):
    return small_rollout(policy, seed=1, sample_seed=5), torch.tensor(ADVANTAGES)


def updated(policy, trajs, advantages, optimizer=torch.optim.AdamW, **overrides):
    model, tokenizer, _ = policy
    model = copy.deepcopy(model)
    optimizer = optimizer(model.parameters(), lr=1e-3)
    stats = grpo_update(model, optimizer, trajs, advantages, tokenizer, SimpleNamespace(**{**UPDATE, **overrides}),
                        torch.device("cpu"), torch.float32)
    return model, stats


def test_first_ratio_is_one_and_loss_is_minus_the_token_weighted_advantage(policy, rollout_batch):
    trajs, adv = rollout_batch
    _, stats = updated(policy, trajs, adv)
    # ratio = 1 everywhere on the first step, so loss = -sum_i A_i * n_i / sum_i n_i (token-mean)
    n = torch.tensor([sum(t.loss_mask) for t in trajs], dtype=torch.float32)
    assert stats["clip_frac"] == 0.0
    assert stats["loss"] == pytest.approx(-(adv * n).sum().item() / n.sum().item(), abs=1e-6)
    _, stats = updated(policy, trajs, adv, loss_agg="seq_mean")
    assert stats["loss"] == pytest.approx(-adv.mean().item(), abs=1e-6)


def test_micro_batches_accumulate_to_the_full_batch_gradient(policy, rollout_batch):
    trajs, adv = rollout_batch
    # SGD: weights move by lr * gradient, so this compares gradients (see tests/fsdp_update.py on Adam)
    full, _ = updated(policy, trajs, adv, torch.optim.SGD, micro_batch_size=8)
    micro, _ = updated(policy, trajs, adv, torch.optim.SGD, micro_batch_size=2)
    for (name, a), b in zip(full.named_parameters(), micro.parameters()):
        assert torch.allclose(a, b, atol=1e-9), name
    moved = max((a - b).abs().max().item() for a, b in zip(full.parameters(), policy[0].parameters()))
    assert moved > 1e-6  # the update did change the weights


def test_later_mini_batches_see_true_ratios(policy, rollout_batch):
    trajs, adv = rollout_batch
    _, stats = updated(policy, trajs, adv, mini_batch_size=2, micro_batch_size=2, ppo_epochs=2)
    assert stats["clip_frac"] > 0.0  # lr 1e-3 moves the policy past the clip range within the batch


def test_non_finite_gradient_skips_the_step(policy, rollout_batch):
    trajs, adv = rollout_batch
    model, stats = updated(policy, trajs, torch.full_like(adv, float("nan")))
    assert stats["skipped"] == 1
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), policy[0].parameters()))


def test_skipping_the_old_logprob_forward_changes_no_gradient(policy, rollout_batch):
    """With one step per batch, old log-probs are the current ones detached: the same gradient as computing
    them in a separate no-grad forward."""
    trajs, adv = rollout_batch
    model, tokenizer, _ = policy
    model = copy.deepcopy(model)
    cfg = SimpleNamespace(**{**UPDATE, "micro_batch_size": 4})
    grads = []
    for old in (batch_logprobs(model, trajs, tokenizer, cfg, torch.device("cpu"), torch.float32), None):
        accumulate(model, trajs, adv, old, None, [0, 1], tokenizer, cfg, torch.device("cpu"), torch.float32,
                   forbidden_token_ids(tokenizer))
        grads.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad(set_to_none=True)
    assert max((a - b).abs().max().item() for a, b in zip(*grads)) < 1e-7
    assert max(g.abs().max().item() for g in grads[0]) > 1e-4
