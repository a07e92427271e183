"""GRPO pieces against hand-computed values, and the update's normalisation across micro-batches."""

import copy
import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

from grpo import (accumulate, batch_logprobs, by_trajectory, gather_logprobs, group_advantages, grpo_update, k3,
                  micro_batches, policy_loss, sequence_logprobs, spare_of, training_batch)
from generation import forbidden_token_ids
from tests.helpers import ADVANTAGES, small_rollout

UPDATE = dict(mini_batch_size=8, micro_batch_size=8, max_tokens_per_micro_batch=0, ppo_epochs=1,
              clip_eps_low=0.2, clip_eps_high=0.2, clip_ratio_c=0.0, kl_coef=0.0, kl_clamp=0.0, tis_cap=0.0,
              loss_agg="token_mean", max_grad_norm=1.0, temperature=1.0, gradient_checkpointing=False)


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


def test_dual_clip_bounds_the_loss_of_negative_advantages():
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[5.0, 2.0, 0.5, 5.0]]))
    for c, expected in [(3.0, [3.0, 2.0, 0.8, 3.0]),   # A=-1: min(max(r, clip(r)), c): 5 -> 3, 2 -> 2, 0.5 -> 0.8
                        (0.0, [5.0, 2.0, 0.8, 5.0])]:  # off: today's -min(-r, -clip(r))
        loss, _, _ = policy_loss(new, old, torch.tensor([-1.0]), 0.2, 0.2, clip_ratio_c=c)
        assert torch.allclose(loss, torch.tensor([expected]))
    loss, _, _ = policy_loss(new, old, torch.tensor([2.0]), 0.2, 0.2, clip_ratio_c=3.0)
    assert torch.allclose(loss, torch.tensor([[-2.4, -2.4, -1.0, -2.4]]))  # A > 0: untouched, -2 min(r, clip(r))
    new.requires_grad_(True)
    policy_loss(new, old, torch.tensor([-1.0]), 0.2, 0.2, clip_ratio_c=3.0)[0].sum().backward()
    assert torch.allclose(new.grad, torch.tensor([[0.0, 2.0, 0.0, 0.0]]))  # d(r)/d(log r) = r where unclipped


def test_log_ratio_is_clamped_before_exp():
    old = torch.zeros(1, 3)
    new = torch.tensor([[30.0, 100.0, -30.0]], requires_grad=True)
    loss, _, _ = policy_loss(new, old, torch.tensor([-1.0]), 0.2, 0.2)
    assert torch.allclose(loss, torch.tensor([[math.exp(20), math.exp(20), 0.8]]))  # e^30, e^100 -> e^20
    loss, _, _ = policy_loss(new, old, torch.tensor([0.0]), 0.2, 0.2)
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros(1, 3)) and torch.equal(new.grad, torch.zeros(1, 3))  # e^100 * 0 is NaN


def test_k3_kl_is_clamped():
    assert k3(torch.tensor(math.log(2))).item() == pytest.approx(2 - math.log(2) - 1)
    assert k3(torch.tensor(25.0), clamp=10.0).item() == 10.0  # e^25 - 26 = 7.2e10 unclamped
    assert k3(torch.tensor(25.0)).item() == pytest.approx(math.exp(20) - 21)  # only the log-ratio clamp
    assert k3(torch.tensor(-25.0), clamp=10.0).item() == 10.0  # e^-25 + 24
    policy = torch.tensor([[-25.0, math.log(0.5)]], requires_grad=True)
    ref = torch.tensor([[0.0, 0.0]])
    loss, _, kl = policy_loss(policy, policy.detach(), torch.tensor([0.0]), 0.2, 0.2, ref_logprobs=ref, kl_coef=0.5,
                              kl_clamp=10.0)
    assert torch.allclose(kl, torch.tensor([[10.0, 1 - math.log(2)]]))
    loss.sum().backward()  # k3' = 0.5 (1 - p_ref / p) = 0.5 (1 - 2) on the second token, 0 past the clamp
    assert torch.allclose(policy.grad, torch.tensor([[0.0, -0.5]]))


def test_tis_weights_multiply_the_surrogate_not_the_kl():
    logprobs = torch.log(torch.tensor([[0.5, 0.5]]))
    ref = torch.log(torch.tensor([[1.0, 1.0]]))
    w = torch.tensor([[1.5, 0.5]])
    loss, _, kl = policy_loss(logprobs, logprobs, torch.tensor([1.0]), 0.2, 0.2, ref_logprobs=ref, kl_coef=0.1,
                              tis_weights=w)
    # ratio 1, A = 1: surrogate -1 per token, times w; k3 at p_ref / p = 2: 2 - log 2 - 1
    assert torch.allclose(loss, -w + 0.1 * (1 - math.log(2)))


def with_rollout_logprobs(trajs, logprobs):
    """Copies of `trajs` whose sampler log-probs are `logprobs` [B, L] (on sampled tokens, 0 elsewhere)."""
    return [dataclasses.replace(t, rollout_logprobs=[lp if m else 0.0 for lp, m in zip(row.tolist(), t.loss_mask)])
            for t, row in zip(trajs, logprobs)]


def test_fp32_rollout_and_training_logprobs_agree(policy, rollout_batch):
    _, stats = updated(policy, *rollout_batch)
    assert 0 <= stats["rollout_logprob_diff"] < 1e-5 and 0 <= stats["rollout_kl"] < 1e-9


def test_truncated_importance_sampling_by_hand(policy, rollout_batch):
    """Rollout log-probs = training log-probs - log 2 on even and + log 2 on odd token columns: the sampler's
    probability is half (double) the trainer's, w = min(2, 1.5) = 1.5 (0.5). At ratio 1 the loss is
    -sum_i A_i sum_t w_it / N; |difference| log 2 everywhere; k3 of log_r = +-log 2: 2 - log 2 - 1, 0.5 + log 2 - 1."""
    trajs, adv = rollout_batch
    model, tokenizer, _ = policy
    [train] = batch_logprobs(model, trajs, tokenizer, SimpleNamespace(**UPDATE), torch.device("cpu"), torch.float32)
    even = (torch.arange(train.shape[1]) % 2 == 0).expand_as(train)
    perturbed = with_rollout_logprobs(trajs, torch.where(even, train - math.log(2), train + math.log(2)))
    _, stats = updated(policy, perturbed, adv, tis_cap=1.5)
    mask = torch.stack([torch.tensor(t.loss_mask + [0] * (train.shape[1] - len(t.loss_mask))) for t in trajs]) > 0
    w = torch.where(even, 1.5, 0.5) * mask
    n = mask.sum().item()
    assert stats["loss"] == pytest.approx(-(adv[:, None] * w).sum().item() / n, abs=1e-5)
    assert stats["rollout_logprob_diff"] == pytest.approx(math.log(2), abs=1e-5)
    share = (even & mask).sum().item() / n
    kl = share * (1 - math.log(2)) + (1 - share) * (math.log(2) - 0.5)
    assert stats["rollout_kl"] == pytest.approx(kl, abs=1e-5)
    _, off = updated(policy, perturbed, adv)  # tis_cap 0: no weights, the mismatch is still measured
    assert off["loss"] == pytest.approx(-(adv * mask.sum(1)).sum().item() / n, abs=1e-6)
    assert off["rollout_logprob_diff"] == pytest.approx(math.log(2), abs=1e-5)


def test_truncated_importance_sampling_equals_scaled_advantages(policy, rollout_batch):
    """A whole trajectory sampled with p_rollout = p_train / s has weight min(s, C) on every token: the update
    equals the plain one with advantage A * min(s, C) (SGD: same gradient, same step)."""
    trajs, adv = rollout_batch
    model, tokenizer, _ = policy
    [train] = batch_logprobs(model, trajs, tokenizer, SimpleNamespace(**UPDATE), torch.device("cpu"), torch.float32)
    s = torch.tensor([2.0, 0.5, 4.0, 1.0, 1.5, 1 / 3, 3.0, 1.1])
    perturbed = with_rollout_logprobs(trajs, train - torch.log(s)[:, None])
    weighted, _ = updated(policy, perturbed, adv, torch.optim.SGD, tis_cap=2.5)
    scaled, _ = updated(policy, trajs, adv * s.clamp(max=2.5), torch.optim.SGD)
    assert max((a - b).abs().max().item() for a, b in zip(weighted.parameters(), scaled.parameters())) < 1e-6
    plain, _ = updated(policy, trajs, adv, torch.optim.SGD)
    assert max((a - b).abs().max().item() for a, b in zip(weighted.parameters(), plain.parameters())) > 1e-5


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
    forbidden = forbidden_token_ids(model, tokenizer)
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


def test_micro_batches_by_token_budget_by_hand():
    # longest first 9, 8, 5, 3 within 16 padded tokens: 9 alone (2 x 9 > 16), 8 and 5 (2 x 8), 3 alone (3 x 8 > 16)
    assert micro_batches([5, 9, 3, 8], 4, 2, max_tokens=16) == [[[1], [3, 0], [2]]]
    assert micro_batches([5, 9, 3, 8], 4, 2) == [[[0, 1], [2, 3]]]  # off: micro_batch_size, as sampled
    # mini-batches keep their trajectories: [5, 9] -> 9 alone, then 5; [3, 8] -> 2 x 8 = 16
    assert micro_batches([5, 9, 3, 8], 2, 2, max_tokens=16) == [[[1], [0]], [[3, 2]]]
    # a trajectory past the budget is a micro-batch of its own; equal lengths stay in sampled order
    assert micro_batches([20, 4, 4, 4], 4, 1, max_tokens=8) == [[[0], [1, 2], [3]]]


def stopped_early(trajs):
    """Copies of `trajs` (whose last 8 tokens are all sampled) where trajectory i ends i tokens earlier."""
    cut = lambda row, i: row[:len(row) - i]
    return [dataclasses.replace(t, input_ids=cut(t.input_ids, i), loss_mask=cut(t.loss_mask, i),
                                rollout_logprobs=cut(t.rollout_logprobs, i)) for i, t in enumerate(trajs)]


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean"])
def test_token_budget_gives_the_one_micro_batch_update(policy, rollout_batch, loss_agg):
    """Micro-batches packed by length within a token budget: the same SGD step as all 8 trajectories (of 8
    different lengths) in one micro-batch (the exact global token-mean, or mean of sequence means), and the same
    logged loss."""
    trajs, adv = rollout_batch
    trajs = stopped_early(trajs)
    lengths = [len(t.input_ids) for t in trajs]
    budget = 2 * max(lengths)
    [packed] = micro_batches(lengths, 8, 8, budget)
    assert packed == [[0, 1], [2, 3], [4, 5], [6, 7]]  # longest first: trajectory 0 is the longest
    whole, whole_stats = updated(policy, trajs, adv, torch.optim.SGD, loss_agg=loss_agg)
    budgeted, stats = updated(policy, trajs, adv, torch.optim.SGD, loss_agg=loss_agg, micro_batch_size=1,
                              max_tokens_per_micro_batch=budget)
    assert max((a - b).abs().max().item() for a, b in zip(whole.parameters(), budgeted.parameters())) < 1e-6
    assert stats["loss"] == pytest.approx(whole_stats["loss"], abs=1e-6) and stats["tokens"] == whole_stats["tokens"]
    moved = max((a - b).abs().max().item() for a, b in zip(whole.parameters(), policy[0].parameters()))
    assert moved > 1e-6


def test_token_budget_with_several_steps_uses_each_trajectorys_old_logprobs(policy, rollout_batch):
    """Two mini-batches of 4, two epochs (old log-probs from a separate forward, matched to each trajectory
    whatever micro-batch it lands in): the same weights as micro-batches of 4 as sampled."""
    trajs, adv = rollout_batch
    trajs = stopped_early(trajs)
    budget = 2 * max(len(t.input_ids) for t in trajs)
    plain, _ = updated(policy, trajs, adv, torch.optim.SGD, mini_batch_size=4, micro_batch_size=4, ppo_epochs=2)
    budgeted, _ = updated(policy, trajs, adv, torch.optim.SGD, mini_batch_size=4, micro_batch_size=1, ppo_epochs=2,
                          max_tokens_per_micro_batch=budget)
    assert max((a - b).abs().max().item() for a, b in zip(plain.parameters(), budgeted.parameters())) < 1e-6


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
    micros = [[0, 1, 2, 3], [4, 5, 6, 7]]
    grads = []
    scored = batch_logprobs(model, trajs, tokenizer, cfg, torch.device("cpu"), torch.float32, micros)
    for old in (by_trajectory(trajs, micros, scored), None):
        accumulate(model, trajs, adv, old, None, micros, tokenizer, cfg, torch.device("cpu"), torch.float32,
                   forbidden_token_ids(model, tokenizer))
        grads.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad(set_to_none=True)
    assert max((a - b).abs().max().item() for a, b in zip(*grads)) < 1e-7
    assert max(g.abs().max().item() for g in grads[0]) > 1e-4


def test_loss_options_are_checked_at_start_up():
    from config import parse_config
    from config import check_config
    from train_mgpo import Config
    for argv, flag in [(["--clip_ratio_c", "0.5"], "--clip_ratio_c"), (["--tis_cap", "-1"], "--tis_cap"),
                       (["--kl_clamp", "-2"], "--kl_clamp"),
                       (["--max_tokens_per_micro_batch", "-1"], "--max_tokens_per_micro_batch")]:
        with pytest.raises(SystemExit, match=flag):
            check_config(parse_config(Config, argv), 1)
    check_config(parse_config(Config, ["--clip_ratio_c", "0", "--tis_cap", "2", "--kl_clamp", "0"]), 1)


def test_a_pass_of_zero_weight_runs_the_shortest_trajectory():
    """Packed longest first, the first micro-batch ends with a long trajectory: the spare is the shortest of all."""
    trajs = [SimpleNamespace(input_ids=[0] * n) for n in (900, 40, 300, 850)]
    assert spare_of(trajs, [[0, 3], [2, 1], None]) == [1]
    assert spare_of(trajs, [None, [3], [2]]) == [2]
