"""GRPO in plain PyTorch: group advantages, per-token log-probs, the clipped policy loss (+ optional KL), the update.

One update over a rollout batch:

    old_logprobs = logprobs(policy, batch)               once, no grad: true ratios across several mini-batches
                                                          (skipped when there is one step per batch: ratio = 1)
    for each mini-batch:                                  one optimizer step each
        for each micro-batch:                             gradient accumulation
            ratio = exp(logprobs - old_logprobs)
            loss  = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)  [+ kl_coef * k3(ref, policy)]
            (sum over sampled tokens) / (tokens in the global mini-batch / world_size) -> backward
        clip grad norm, AdamW step (skipped on a non-finite norm)

Under FSDP2 gradients are averaged over ranks, so dividing each rank's token sum by global_tokens / world_size
gives the exact token-mean over the global mini-batch.
"""

import math

import torch
from torch.utils.checkpoint import checkpoint

from distributed import all_reduce_sum, world
from rollout import collate, forbidden_token_ids


def group_advantages(rewards, group_size, scale_by_std=True, eps=1e-6):
    """(r - mean of its group) / (std of its group + eps); `scale_by_std=False` is Dr.GRPO.

    rewards [B * G] with groups contiguous. E.g. rewards [1, 0, 0, 1] and G=2 -> means [0.5, 0.5],
    unbiased stds [0.7071, 0.7071] -> advantages [0.7071, -0.7071, -0.7071, 0.7071]."""
    r = torch.as_tensor(rewards, dtype=torch.float32).view(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (r.std(dim=1, keepdim=True) + eps)
    return centred.view(-1)


def gather_logprobs(hidden, weight, targets, forbidden, temperature=1.0, chunk_elements=2**24):
    """log p(target) per position from the last hidden states and the lm_head weight, in fp32, a few rows at a time
    (about `chunk_elements` logits, 64 MiB of fp32). Each chunk's logits are recomputed in backward (activation
    checkpointing), so neither the forward nor the backward ever holds the [N, V] logits of the whole batch.
    Forbidden ids get -inf logits, as in generation, so these are the sampling log-probs.

    hidden [N, H], weight [V, H], targets [N] -> [N]. With V = 151,936 a chunk is 110 rows."""
    rows = max(1, chunk_elements // weight.shape[0])
    forbidden = torch.as_tensor(forbidden, dtype=torch.long, device=hidden.device)
    # no randomness inside a chunk: skip saving and restoring the RNG state for each of them
    out = [checkpoint(chunk_logprobs, hidden[start:start + rows], weight, targets[start:start + rows], forbidden,
                      temperature, use_reentrant=False, preserve_rng_state=False)
           for start in range(0, hidden.shape[0], rows)]
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def chunk_logprobs(hidden, weight, targets, forbidden, temperature):
    """One chunk of gather_logprobs: lm_head, fp32 log-softmax over the allowed ids, the targets' entries."""
    logits = torch.nn.functional.linear(hidden, weight).float() / temperature
    logits[:, forbidden] = -math.inf
    return logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)


def training_batch(trajs, tokenizer, image_token_id, device, dtype):
    """Right-padded batch of whole conversations, plus loss_mask aligned with the predicted tokens."""
    batch = collate([t.input_ids for t in trajs], [t.pixel_values for t in trajs],
                    [t.image_grid_thw for t in trajs], tokenizer.pad_token_id, image_token_id, left_pad=False,
                    device=device, dtype=dtype)
    width = batch["input_ids"].shape[1]
    loss_mask = torch.zeros((len(trajs), width), dtype=torch.float32)
    for i, t in enumerate(trajs):
        loss_mask[i, :len(t.loss_mask)] = torch.tensor(t.loss_mask, dtype=torch.float32)
    return batch, loss_mask.to(device)


def sequence_logprobs(model, batch, loss_mask, forbidden, temperature=1.0):
    """Per-token log-probs [B, L] of the batch's own tokens under `model` (0 where loss_mask is 0).

    Only positions from the first one that predicts a sampled token onwards are scored; position t's hidden state
    scores token t+1. The model's own forward runs (so that FSDP2 gathers the root's parameters and reduces their
    gradients) but computes no logits: it returns the final-norm hidden states, and `gather_logprobs` applies the
    lm_head chunk by chunk."""
    first = int(loss_mask.any(0).nonzero()[0])  # first column with a sampled token in any row
    # keep the logits of no position; `output_hidden_states=-1` records only the last (after the final norm)
    no_logits = torch.zeros(0, dtype=torch.long, device=batch["input_ids"].device)
    hidden = model(**batch, use_cache=False, output_hidden_states=-1, logits_to_keep=no_logits).hidden_states[-1]
    hidden = hidden[:, first - 1:-1]  # predicts columns first..L-1
    targets = batch["input_ids"][:, first:]
    # Under FSDP2 the root (which holds lm_head, tied to the embeddings) stays unsharded from its forward until its
    # gradients are reduced after backward: this weight is the gathered one, and its gradient reaches FSDP.
    lp = gather_logprobs(hidden.reshape(-1, hidden.shape[-1]), model.lm_head.weight, targets.reshape(-1), forbidden,
                         temperature)
    out = torch.zeros(loss_mask.shape, dtype=torch.float32, device=lp.device)
    out[:, first:] = lp.view(targets.shape)
    return torch.where(loss_mask > 0, out, 0.0)  # not `out * mask`: unsampled image tokens score -inf


def policy_loss(logprobs, old_logprobs, advantages, clip_eps_low, clip_eps_high, ref_logprobs=None, kl_coef=0.0):
    """Per-token clipped surrogate (+ k3 KL) [B, L]; the caller weights and sums it. Returns (loss, clipped, kl).

    logprobs/old_logprobs [B, L], advantages [B]. With ratio 1.5, A = 1, eps 0.2: loss -min(1.5, 1.2) = -1.2
    (clipped); with A = -1: -min(-1.5, -1.2) = 1.5 (not clipped)."""
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_eps_low, 1 + clip_eps_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(loss)
    if kl_coef > 0:
        log_r = ref_logprobs - logprobs
        kl = torch.exp(log_r) - log_r - 1  # k3: unbiased, always >= 0
        loss = loss + kl_coef * kl
    return loss, (clipped < unclipped).float(), kl


def split(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


@torch.no_grad()
def batch_logprobs(model, trajs, tokenizer, cfg, device, dtype):
    """Log-probs [B, L] per micro-batch, no grad: the old policy's (or the reference's) for a rollout batch."""
    forbidden = forbidden_token_ids(tokenizer)
    out = []
    for micro in split(trajs, cfg.micro_batch_size):
        batch, mask = training_batch(micro, tokenizer, model.config.image_token_id, device, dtype)
        out.append(sequence_logprobs(model, batch, mask, forbidden, cfg.temperature).cpu())
    return out


def set_grad_sync(model, enabled):
    """Skip the FSDP reduce-scatter on all but the last micro-batch of an accumulation."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)


def grpo_update(model, optimizer, trajs, advantages, tokenizer, cfg, device, dtype, ref_model=None):
    """Optimizer steps over `trajs` (this rank's share of the batch). Returns averaged metrics.

    cfg needs: mini_batch_size, micro_batch_size (in trajectories per rank), ppo_epochs, clip_eps_low/high,
    kl_coef, loss_agg ('token_mean' | 'seq_mean'), max_grad_norm, temperature."""
    model.eval()  # no dropout: the ratio must be exactly 1 before the first step
    micro_index = list(range(math.ceil(len(trajs) / cfg.micro_batch_size)))
    per_mini = cfg.mini_batch_size // cfg.micro_batch_size
    # With one optimizer step per rollout batch the old policy *is* the current one: the ratio is exactly 1 and
    # its gradient is that of the log-probs, so the extra no-grad forward is skipped (old = logprobs.detach()).
    single_step = cfg.ppo_epochs == 1 and per_mini >= len(micro_index)
    old = None if single_step else batch_logprobs(model, trajs, tokenizer, cfg, device, dtype)
    ref = batch_logprobs(ref_model, trajs, tokenizer, cfg, device, dtype) if cfg.kl_coef > 0 else None
    forbidden = forbidden_token_ids(tokenizer)
    totals = {"loss": 0.0, "clip_frac": 0.0, "kl": 0.0, "grad_norm": 0.0, "tokens": 0.0, "skipped": 0}
    steps = 0
    for _ in range(cfg.ppo_epochs):
        for mini in split(micro_index, per_mini):
            step = accumulate(model, trajs, advantages, old, ref, mini, tokenizer, cfg, device, dtype, forbidden)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            if torch.isfinite(grad_norm):  # the norm is global, so every rank takes the same branch
                optimizer.step()
            else:
                totals["skipped"] += 1
            optimizer.zero_grad(set_to_none=True)
            for k in ("loss", "clip_frac", "kl", "tokens"):
                totals[k] += step[k]
            totals["grad_norm"] += grad_norm.item()
            steps += 1
    return {k: (v / steps if k not in ("skipped", "tokens") else v) for k, v in totals.items()}


def accumulate(model, trajs, advantages, old, ref, micros, tokenizer, cfg, device, dtype, forbidden):
    """Forward/backward over the micro-batches of one mini-batch; gradients hold the global loss mean."""
    size = cfg.micro_batch_size
    masks = [torch.tensor([sum(t.loss_mask) for t in trajs[i * size:(i + 1) * size]]) for i in micros]
    if cfg.loss_agg == "token_mean":
        denom = all_reduce_sum(sum(m.sum().item() for m in masks)) / world()
    else:  # seq_mean: each sequence's token-mean, averaged over the global mini-batch's sequences
        denom = all_reduce_sum(sum(len(m) for m in masks)) / world()
    stats = {"loss": 0.0, "clip_frac": 0.0, "kl": 0.0, "tokens": 0.0}
    for j, i in enumerate(micros):
        set_grad_sync(model, j == len(micros) - 1)
        micro = trajs[i * size:(i + 1) * size]
        batch, mask = training_batch(micro, tokenizer, model.config.image_token_id, device, dtype)
        weight = mask if cfg.loss_agg == "token_mean" else mask / mask.sum(1, keepdim=True).clamp(min=1)
        logprobs = sequence_logprobs(model, batch, mask, forbidden, cfg.temperature)
        old_logprobs = logprobs.detach() if old is None else old[i].to(device)
        loss, clipped, kl = policy_loss(logprobs, old_logprobs, advantages[i * size:(i + 1) * size].to(device),
                                        cfg.clip_eps_low, cfg.clip_eps_high,
                                        None if ref is None else ref[i].to(device), cfg.kl_coef)
        loss = (loss * weight).sum() / denom
        loss.backward()
        stats["loss"] += loss.item()
        stats["clip_frac"] += (clipped * mask).sum().item()
        stats["kl"] += (kl * mask).sum().item()
        stats["tokens"] += mask.sum().item()
    set_grad_sync(model, True)
    stats["clip_frac"] /= max(stats["tokens"], 1)
    stats["kl"] /= max(stats["tokens"], 1)
    return stats
