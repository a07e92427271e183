"""GRPO in plain PyTorch: group advantages, per-token log-probs, the clipped policy loss (+ optional KL), the update.

One update over a rollout batch:

    old_logprobs = logprobs(policy, batch)               once, no grad: true ratios across several mini-batches
                                                          (skipped when there is one step per batch: ratio = 1)
    for each mini-batch:                                  one optimizer step each
        for each micro-batch:                             gradient accumulation (micro_batch_size trajectories, or
                                                          by length within max_tokens_per_micro_batch)
            ratio = exp(clamp(logprobs - old_logprobs, -20, 20))
            pg    = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
            pg    = min(pg, -A * clip_ratio_c)   where A < 0             dual clip (0: off)
            w     = min(exp(old_logprobs - rollout_logprobs), tis_cap)   truncated importance sampling, detached
                                                                         (1 when tis_cap is 0)
            loss  = w * pg [+ kl_coef * min(k3(ref, policy), kl_clamp)]
            (sum over sampled tokens) / (tokens in the global mini-batch / world_size) -> backward
        clip grad norm, AdamW step (skipped on a non-finite norm)

Under FSDP2 every backward reduce-scatters and gradients are averaged over ranks, so dividing each rank's token sum
by global_tokens / world_size gives the exact token-mean over the global mini-batch. Every rank runs as many
forward/backward passes per mini-batch as the rank with the most micro-batches (a rank with fewer adds passes of
zero weight): a rank that skipped one would leave the others waiting in its all-gather or reduce-scatter.

`rollout_logprobs` are those of the sampler (`generate`); `old_logprobs` those of the training forward with the
same weights. In fp32 they agree to ~1e-6; in bf16 they do not, and w corrects the gradient for sampling from the
rollout's distribution (verl's and TRL's truncated importance sampling). The mean |difference| and the k3 KL
between the two are logged every step.
"""

import math

import torch
from torch.utils.checkpoint import checkpoint

from distributed import all_reduce_sum, max_over_ranks, world
from family import family_of
from generation import collate, forbidden_token_ids

# verl's bound on a log-ratio before exp: e^20 = 4.9e8 keeps every ratio, and its gradient, finite (fp32 and bf16
# overflow past e^88; an inf ratio times A = 0 is NaN)
LOG_RATIO_CLAMP = 20.0


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
    return batch, padded([t.loss_mask for t in trajs], batch["input_ids"].shape[1], device)


def padded(rows, width, device):
    """Per-token lists (or 1-D tensors) as one fp32 [len(rows), width] tensor, each row right-padded with 0."""
    out = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.as_tensor(row, dtype=torch.float32)
    return out.to(device)


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
    weight = family_of(model.config).lm_head(model).weight
    lp = gather_logprobs(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), forbidden, temperature)
    out = torch.zeros(loss_mask.shape, dtype=torch.float32, device=lp.device)
    out[:, first:] = lp.view(targets.shape)
    return torch.where(loss_mask > 0, out, 0.0)  # not `out * mask`: unsampled image tokens score -inf


def k3(log_r, clamp=0.0):
    """Schulman's k3 estimate of KL(q || p) from a token sampled from q, log_r = log p - log q:
    exp(log_r) - log_r - 1, unbiased and never negative. log_r is first clamped to +-20 (as verl does); `clamp` > 0
    caps the result (verl's 10), which also zeroes the gradient of a token past it.

    E.g. log_r = log 2: 2 - 0.6931 - 1 = 0.3069. A gap of 25: e^20 - 21 = 4.9e8 (e^25 - 26 = 7.2e10 unclamped),
    10 with clamp 10."""
    log_r = log_r.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    kl = torch.exp(log_r) - log_r - 1
    return kl.clamp(max=clamp) if clamp > 0 else kl


def policy_loss(logprobs, old_logprobs, advantages, clip_eps_low, clip_eps_high, clip_ratio_c=0.0,
                ref_logprobs=None, kl_coef=0.0, kl_clamp=0.0, tis_weights=None):
    """Per-token clipped surrogate (+ k3 KL) [B, L]; the caller weights and sums it. Returns (loss, clipped, kl).

    logprobs/old_logprobs/ref_logprobs/tis_weights [B, L], advantages [B]. Worked numbers, eps 0.2:
    - ratio 1.5, A = 1: -min(1.5, 1.2) = -1.2 (clipped); A = -1: -min(-1.5, -1.2) = 1.5 (not clipped).
    - dual clip (clip_ratio_c = c > 1) bounds a negative advantage's loss by -A * c: ratio 5, A = -1, c = 3:
      min(max(5, 1.2), 3) = 3 (5 without it), and no gradient.
    - the log-ratio is clamped to +-20: a ratio e^30 counts as e^20 = 4.9e8 (an unbounded exp overflows to inf).
    - tis_weights w (detached) multiply the surrogate, not the KL: w = 1.5, ratio 1, A = 1 -> -1.5.
    - KL: policy log-prob log 0.5, reference log 1: k3 = 2 - log 2 - 1 = 0.3069; kl_clamp caps it (`k3`)."""
    ratio = torch.exp((logprobs - old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_eps_low, 1 + clip_eps_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    if clip_ratio_c > 0:
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * clip_ratio_c), loss)
    if tis_weights is not None:
        loss = loss * tis_weights
    kl = torch.zeros_like(loss)
    if kl_coef > 0:
        kl = k3(ref_logprobs - logprobs, kl_clamp)
        loss = loss + kl_coef * kl
    return loss, (clipped < unclipped).float(), kl


def split(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


def micro_batches(lengths, mini_batch_size, micro_batch_size, max_tokens=0):
    """Trajectory indices of each micro-batch of each mini-batch: [[micro, ...] per mini-batch]. A mini-batch is
    `mini_batch_size` consecutive trajectories (as sampled: whole groups).

    max_tokens 0: micro-batches of `micro_batch_size` consecutive trajectories. max_tokens N > 0: the mini-batch's
    trajectories longest first, each micro-batch as many as keep its padded size (rows x its longest row) <= N; a
    trajectory longer than N is a micro-batch of its own. E.g. lengths [5, 9, 3, 8], N = 16: longest first 9, 8, 5,
    3 -> [[[1], [3, 0], [2]]] (2 x 9 > 16: 9 alone; 2 x 8 = 16: 8 and 5; 3 x 8 > 16: 3 alone), 28 padded tokens
    for 25, where micro-batches of 2 as sampled pad [5, 9] and [3, 8] to 34."""
    minis = split(list(range(len(lengths))), mini_batch_size)
    if max_tokens == 0:
        return [split(mini, micro_batch_size) for mini in minis]
    packed = []
    for mini in minis:
        micros = []
        for i in sorted(mini, key=lambda i: -lengths[i]):  # stable: equal lengths stay in sampled order
            if micros and (len(micros[-1]) + 1) * lengths[micros[-1][0]] <= max_tokens:
                micros[-1].append(i)
            else:
                micros.append([i])
        packed.append(micros)
    return packed


def in_step_over_ranks(minis):
    """Each mini-batch's micro-batches followed by None (a pass of zero weight) up to the most micro-batches any
    rank has for it: under FSDP2 each forward all-gathers and each backward reduce-scatters, so every rank must run
    as many passes. E.g. rank 0 [[[0, 1]]] and rank 1 [[[3], [2]]] -> rank 0 [[[0, 1], None]]."""
    return [mini + [None] * (int(max_over_ranks(len(mini))) - len(mini)) for mini in minis]


def spare_of(trajs, micros):
    """[the shortest trajectory of `micros`]: what a pass of zero weight runs (in_step_over_ranks), the cheapest real
    input that goes through every FSDP unit (each trajectory has an image). E.g. lengths [900, 40, 300], micros
    [[0], [2, 1], None] -> [1]."""
    return [min((i for micro in micros if micro is not None for i in micro), key=lambda i: len(trajs[i].input_ids))]


def micro_inputs(trajs, micro, spare, tokenizer, model, device, dtype):
    """(trajectories, batch, loss_mask) of a micro-batch; a None micro-batch runs the `spare` indices instead."""
    chosen = [trajs[i] for i in (spare if micro is None else micro)]
    return (chosen, *training_batch(chosen, tokenizer, model.config.image_token_id, device, dtype))


@torch.no_grad()
def batch_logprobs(model, trajs, tokenizer, cfg, device, dtype, micros=None):
    """Log-probs [B, L] per micro-batch, no grad: the old policy's (or the reference's) for a rollout batch.
    `micros`: trajectory indices per micro-batch (None: a pass whose result is dropped, see in_step_over_ranks);
    by default micro_batch_size consecutive trajectories."""
    micros = micros or split(list(range(len(trajs))), cfg.micro_batch_size)
    forbidden = forbidden_token_ids(model, tokenizer)
    spare = spare_of(trajs, micros)
    out = []
    for micro in micros:
        _, batch, mask = micro_inputs(trajs, micro, spare, tokenizer, model, device, dtype)
        logprobs = sequence_logprobs(model, batch, mask, forbidden, cfg.temperature).cpu()
        out.append(None if micro is None else logprobs)
    return out


def by_trajectory(trajs, micros, logprobs):
    """{trajectory index: its log-probs [its length]} from batch_logprobs' per-micro-batch [B, L]."""
    return {i: row[:len(trajs[i].input_ids)] for micro, rows in zip(micros, logprobs) if micro is not None
            for i, row in zip(micro, rows)}


def grpo_update(model, optimizer, trajs, advantages, tokenizer, cfg, device, dtype, ref_model=None):
    """Optimizer steps over `trajs` (this rank's share of the batch). Returns averaged metrics.

    cfg needs: mini_batch_size (0: all of `trajs`), micro_batch_size (in trajectories per rank),
    max_tokens_per_micro_batch (0: off), ppo_epochs, clip_eps_low/high, clip_ratio_c, kl_coef, kl_clamp, tis_cap,
    loss_agg ('token_mean' | 'seq_mean'), max_grad_norm, temperature, gradient_checkpointing."""
    # HF checkpoints layers only in training mode. Qwen2.5-VL has no dropout (attention_dropout 0, checked at
    # start-up), so the mode changes nothing else: the ratio is still exactly 1 before the first step.
    model.train(cfg.gradient_checkpointing)
    minis = in_step_over_ranks(micro_batches([len(t.input_ids) for t in trajs], cfg.mini_batch_size or len(trajs),
                                             cfg.micro_batch_size, cfg.max_tokens_per_micro_batch))
    micros = [micro for mini in minis for micro in mini]
    # With one optimizer step per rollout batch the old policy *is* the current one: the ratio is exactly 1 and
    # its gradient is that of the log-probs, so the extra no-grad forward is skipped (old = logprobs.detach()).
    single_step = cfg.ppo_epochs == 1 and len(minis) == 1
    scored = lambda m: by_trajectory(trajs, micros, batch_logprobs(m, trajs, tokenizer, cfg, device, dtype, micros))
    old = None if single_step else scored(model)
    ref = scored(ref_model) if cfg.kl_coef > 0 else None
    forbidden = forbidden_token_ids(model, tokenizer)
    averaged = ("loss", "clip_frac", "kl", "rollout_logprob_diff", "rollout_kl")
    totals = {**dict.fromkeys(averaged, 0.0), "grad_norm": 0.0, "tokens": 0.0, "skipped": 0}
    steps = 0
    for _ in range(cfg.ppo_epochs):
        for mini in minis:
            step = accumulate(model, trajs, advantages, old, ref, mini, tokenizer, cfg, device, dtype, forbidden)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            if torch.isfinite(grad_norm):  # the norm is global, so every rank takes the same branch
                optimizer.step()
            else:
                totals["skipped"] += 1
            optimizer.zero_grad(set_to_none=True)
            for k in (*averaged, "tokens"):
                totals[k] += step[k]
            totals["grad_norm"] += grad_norm.item()
            steps += 1
    model.eval()
    return {k: (v / steps if k not in ("skipped", "tokens") else v) for k, v in totals.items()}


def accumulate(model, trajs, advantages, old, ref, micros, tokenizer, cfg, device, dtype, forbidden):
    """Forward/backward over the micro-batches of one mini-batch; gradients hold the global loss mean.

    micros: trajectory indices per micro-batch, None for a pass of zero weight (in_step_over_ranks); old/ref:
    {trajectory index: log-probs} or None. Under FSDP2 every backward reduce-scatters, and FSDP2 adds the result to
    the sharded gradients: a rank never holds more than its shard (1/world of the fp32 gradients). Skipping that
    sync on all but the last micro-batch would keep unsharded fp32 gradients of the whole model on every rank,
    33 GB at 7B."""
    live = [i for micro in micros if micro is not None for i in micro]
    spare = spare_of(trajs, micros)
    if cfg.loss_agg == "token_mean":
        denom = all_reduce_sum(sum(sum(trajs[i].loss_mask) for i in live)) / world()
    else:  # seq_mean: each sequence's token-mean, averaged over the global mini-batch's sequences
        denom = all_reduce_sum(len(live)) / world()
    stats = dict.fromkeys(("loss", "clip_frac", "kl", "rollout_logprob_diff", "rollout_kl", "tokens"), 0.0)
    for micro in micros:
        # a pass of zero weight runs a real trajectory through every unit, so that its all-gathers and
        # reduce-scatters are those of the other ranks' passes
        chosen, batch, mask = micro_inputs(trajs, micro, spare, tokenizer, model, device, dtype)
        rows = spare if micro is None else micro
        weight = mask if cfg.loss_agg == "token_mean" else mask / mask.sum(1, keepdim=True).clamp(min=1)
        logprobs = sequence_logprobs(model, batch, mask, forbidden, cfg.temperature)
        old_logprobs = logprobs.detach() if old is None else padded([old[i] for i in rows], mask.shape[1], device)
        # log p_train - log p_rollout of each sampled token, same weights (0 elsewhere: both are 0 there)
        drift = old_logprobs - padded([t.rollout_logprobs for t in chosen], mask.shape[1], device)
        loss, clipped, kl = policy_loss(logprobs, old_logprobs, advantages[rows].to(device),
                                        cfg.clip_eps_low, cfg.clip_eps_high, cfg.clip_ratio_c,
                                        None if ref is None else padded([ref[i] for i in rows], mask.shape[1], device),
                                        cfg.kl_coef, cfg.kl_clamp,
                                        drift.exp().clamp(max=cfg.tis_cap) if cfg.tis_cap > 0 else None)
        loss = (loss * weight).sum() / denom
        if micro is None:
            (loss * 0).backward()
            continue
        loss.backward()
        stats["loss"] += loss.item()
        stats["clip_frac"] += (clipped * mask).sum().item()
        stats["kl"] += (kl * mask).sum().item()
        stats["rollout_logprob_diff"] += drift.abs().sum().item()
        stats["rollout_kl"] += k3(drift).sum().item()  # KL(rollout || training) from the rollout's samples
        stats["tokens"] += mask.sum().item()
    for k in ("clip_frac", "kl", "rollout_logprob_diff", "rollout_kl"):
        stats[k] /= max(stats["tokens"], 1)
    return stats
