"""HF `generate` mechanics for multi-turn rollouts: batching conversations, the sampling distribution and its
recorded log-probs, stop strings, end ids, and the KV cache kept between turns (`TurnCache`).

Everything here works on conversations as token ids (anything with `input_ids`, `pixel_values` and
`image_grid_thw`, e.g. `rollout.Trajectory`); what the recipes do with the sampled turns is in rollout.py."""

import math
import re
from dataclasses import dataclass

import torch
from transformers import DynamicCache, GenerationConfig, LogitsProcessor, StoppingCriteria

from distributed import is_sharded, max_over_ranks
from family import family_of

# ---------------------------------------------------------------------------------------------------------------
# Batching conversations for generate and for the training forward.

def collate(seqs, pixel_values, grids, pad_id, image_token_id, left_pad, device="cpu", dtype=torch.float32):
    """Pad a list of id lists into one batch; concatenate all images in batch order.

    Returns input_ids, attention_mask and mm_token_type_ids [B, L] (the last is 1 on image tokens: without it
    Qwen2.5-VL silently falls back to 1-D positions), pixel_values [sum patches, D] (None without images),
    image_grid_thw [n_images, 3].
    E.g. seqs [[5, 6], [7]] with left_pad -> input_ids [[5, 6], [pad, 7]], attention_mask [[1, 1], [0, 1]]."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left_pad else slice(0, len(s))
        ids[i, cols] = torch.tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    mm_token_type_ids = ((ids == image_token_id) & (mask == 1)).long()
    images = [p for ps in pixel_values for p in ps]
    batch = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": mm_token_type_ids,
             "pixel_values": torch.cat(images) if images else None, "image_grid_thw": torch.cat(grids)}
    batch = {k: v if v is None else v.to(device) for k, v in batch.items()}
    if images:
        batch["pixel_values"] = batch["pixel_values"].to(dtype)  # the model's compute dtype
    return batch


class SamplingLogProbs(LogitsProcessor):
    """Makes the sampling distribution and records the log-prob of each sampled token, in one place: forbidden ids
    get -inf, the logits are divided by the temperature (the training forward's `grpo.chunk_logprobs` does the
    same), and the log-softmax is both kept and returned. transformers' own processors are no-ops
    (`generation_config`), so what generate samples from is what is recorded, whatever order it runs them in.

    At step t it sees the scores for token t and the ids up to token t-1, so it stores this step's log-softmax
    and gathers the previous step's for the token just sampled; `finish` gathers the last one. It never holds
    more than one step's [batch, vocab]."""

    def __init__(self, forbidden, temperature):
        self.forbidden, self.temperature, self.previous, self.logprobs = torch.tensor(forbidden), temperature, None, []

    def __call__(self, input_ids, scores):
        if self.previous is not None:
            self.logprobs.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        scores = scores.float() / self.temperature  # a new tensor: generate's own logits are not touched
        self.forbidden = self.forbidden.to(scores.device)  # copied to the device once, not at every step
        scores[:, self.forbidden] = -math.inf
        self.previous = torch.log_softmax(scores, dim=-1)
        return self.previous

    def finish(self, sequences):
        self.logprobs.append(self.previous.gather(1, sequences[:, -1:]).squeeze(1))
        return torch.stack(self.logprobs, dim=1)


class StopAtPattern(StoppingCriteria):
    """Per-row stop once the generated text matches `pattern`; remembers where each row stopped. Each step decodes
    only the newest token of each row (the text so far is kept), so checking costs the same at every length, and
    brings the newest tokens to the host in one transfer (not one synchronising read per row)."""

    def __init__(self, tokenizer, prompt_len, pattern):
        self.tokenizer, self.prompt_len, self.pattern = tokenizer, prompt_len, re.compile(pattern, re.DOTALL)
        self.texts, self.stop_at = {}, {}

    def __call__(self, input_ids, scores, **kwargs):
        newest = input_ids[:, -1].tolist()
        for row, token in enumerate(newest):
            if row not in self.stop_at:
                self.texts[row] = self.texts.get(row, "") + self.tokenizer.decode([token])
                if self.pattern.search(self.texts[row]):
                    self.stop_at[row] = input_ids.shape[1] - self.prompt_len
        return torch.tensor([row in self.stop_at for row in range(len(newest))], device=input_ids.device)


JSON_BLOCK_END = r"```json.*?```"           # MGPO turn 1: the box block is complete
TOOL_TURN_END = r"</tool_call>|</answer>"  # tool recipe: a call to run, or the answer


def forbidden_token_ids(model, tokenizer):
    """Ids the policy may never sample: a sampled image placeholder or vision-start breaks the next forward. The
    tokens are the model family's (`family.Family`), numbered by the tokenizer."""
    family = family_of(model.config)
    return tokenizer.convert_tokens_to_ids([family.image_pad, family.video_pad, family.vision_start])


def end_of_turn_ids(model, tokenizer):
    """The ids that end an assistant turn: the checkpoint's `generation_config` eos ids (an int or a list: Qwen's
    lists <|im_end|> and <|endoftext|>) and the tokenizer's eos, the chat template's closing of a turn."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return sorted(set(ids) | {tokenizer.eos_token_id})


@dataclass
class TurnCache:
    """What `generate` leaves after a turn, so that the next turn encodes only its new tokens.

    `sequences` [B, W]: the left-padded prompts and the sampled columns. `attention_mask` [B, W]: 1 on each row's
    prompt and the sampled tokens it kept, 0 on left pads and on what generate made after the row had stopped, so
    row r's conversation so far is `sequences[r][attention_mask[r] == 1]`. `past_key_values`: the keys and values
    of the first W - 1 columns (the last sampled token was never fed back), or None for a family whose cache holds
    a recurrent state (`continues_from_cache`): the next turn then encodes the whole conversation. E.g. prompts
    [[5, 6], [7]], row 0 stops after 1 token, row 1 samples 2: sequences [[5, 6, 8, pad], [pad, 7, 3, 4]],
    attention_mask [[1, 1, 1, 0], [0, 1, 1, 1]], a cache of 3 columns."""
    sequences: torch.Tensor
    attention_mask: torch.Tensor
    past_key_values: DynamicCache | None

    def select(self, rows):
        """Keep only `rows` (e.g. the episodes still going), in that order, for the next turn to continue from;
        the cache is changed in place. E.g. 4 rows, rows [0, 2] -> sequences [2, W], a cache of [2, heads, W - 1,
        head dim] per layer. The columns stay: a column all pads in the kept rows is masked, never attended."""
        index = torch.tensor(rows, dtype=torch.long, device=self.sequences.device)
        if self.past_key_values is not None:
            self.past_key_values.reorder_cache(index)  # every layer type has it (a recurrent one: no batch_select)
        return TurnCache(self.sequences[index], self.attention_mask[index], self.past_key_values)


def prompt_batch(model, tokenizer, trajs):
    """The trajectories so far as generate's input: `collate`d, left-padded, on the model's device and dtype."""
    return collate([t.input_ids for t in trajs], [t.pixel_values for t in trajs], [t.image_grid_thw for t in trajs],
                   tokenizer.pad_token_id, model.config.image_token_id, left_pad=True,
                   device=next(model.parameters()).device, dtype=model.dtype)


def rope_positions(model, batch):
    """Generate's `position_ids` [4, B, L] for a batch: row 0 the text positions (each row's count of unmasked
    tokens before it, 0 on pads), rows 1-3 the 3-D M-RoPE positions of `get_rope_index`, the function the training
    forward uses. Passed explicitly, generate feeds the columns past the cache at these positions and adds 1 per
    sampled token; left to itself with a cache and no new image, it would add the `rope_deltas` its last call left.
    E.g. ids [pad, s, v, v, v, v, t] (one image of grid [1, 4, 4], 2x2 merged, 4 tokens v) -> text row
    [0, 0, 1, 2, 3, 4, 5], rows 1-3 [0, 0, 1, 1, 1, 1, 3] (t), [0, 0, 1, 1, 2, 2, 3] (h), [0, 0, 1, 2, 1, 2, 3] (w)."""
    mask = batch["attention_mask"]
    text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    vision, _ = model.model.get_rope_index(batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                                           image_grid_thw=batch["image_grid_thw"], attention_mask=mask)
    return torch.cat([text[None], vision.to(text.device)])


def prompt_key(traj):
    """What makes two first prompts the same: their ids and the very same image tensors (the forks of a group
    share them, see `rollout.fork`)."""
    return tuple(traj.input_ids), tuple(id(p) for p in traj.pixel_values)


@torch.no_grad()
def shared_prompt_batch(model, tokenizer, trajs):
    """Generate's input for the first turn of `trajs`, each distinct prompt prefilled once for all its rows.

    The G rollouts of a group share their first prompt (system, global view, question): one forward encodes the
    distinct prompts' images and prefills their ids but the last, then the cache's rows are repeated for the
    trajectories (`Cache.reorder_cache`, which also repeats a recurrent layer's state), and generate feeds only
    each row's last prompt token (an assistant header token, never an image) at the positions of `rope_positions`,
    and samples each row on its own.
    E.g. trajs [a, a, a, b] with prompts of 9 and 7 ids -> one forward over [a, b] left-padded to 9, minus its
    last column: images of a and b encoded once, a cache of [2 rows, heads, 8 columns, head dim] per layer, then
    rows [0, 0, 0, 1] -> [4, heads, 8, head dim]; input_ids [4, 9] with the pads of b masked, as `prompt_batch`.
    Under a sharded model the forward is a collective, as generate is: every rank calls this once per turn."""
    keys = [prompt_key(t) for t in trajs]
    distinct = list(dict.fromkeys(keys))
    batch = prompt_batch(model, tokenizer, [trajs[keys.index(k)] for k in distinct])
    positions = rope_positions(model, batch)
    prefill = model(input_ids=batch["input_ids"][:, :-1], attention_mask=batch["attention_mask"][:, :-1],
                    position_ids=positions[..., :-1], pixel_values=batch["pixel_values"],
                    image_grid_thw=batch["image_grid_thw"], use_cache=True, logits_to_keep=1)
    rows = torch.tensor([distinct.index(k) for k in keys], device=positions.device)
    prefill.cache.reorder_cache(rows)
    return {"input_ids": batch["input_ids"][rows], "attention_mask": batch["attention_mask"][rows],
            "position_ids": positions[:, rows], "cache": prefill.cache}


@torch.no_grad()
def continue_batch(model, tokenizer, trajs, turn):
    """Generate's input for the next turn of `trajs`, continuing from `turn`'s cache: each row's new ids (the
    closing of the turn and the next user turn, appended to the trajectory after all of the turn's kept ids)
    left-padded after the turn's columns, and the vision features of the new images only.

    E.g. turn.sequences [[5, 6, 8, pad], [pad, 7, 3, 4]] with mask [[1, 1, 1, 0], [0, 1, 1, 1]] and new ids
    [[a, b], [c]] -> input_ids [[5, 6, 8, pad, a, b], [pad, 7, 3, 4, pad, c]], attention_mask
    [[1, 1, 1, 0, 1, 1], [0, 1, 1, 1, 0, 1]]. Generate feeds only the columns past the cache of 3: [pad, a, b] and
    [4, pad, c] (row 1's last sampled token was never fed), at `rope_positions` of all columns (skipping the 0s:
    the training forward's positions).

    A round with no new image (a tool error text) encodes none; under a sharded model the vision tower is still
    called once, on an image already encoded, as every rank must make the same collective calls."""
    vision_start = model.config.vision_start_token_id
    tails = [t.input_ids[n:] for t, n in zip(trajs, turn.attention_mask.sum(1).tolist())]
    first_new = [len(t.pixel_values) - tail.count(vision_start) for t, tail in zip(trajs, tails)]
    new = collate(tails, [t.pixel_values[k:] for t, k in zip(trajs, first_new)],
                  [t.image_grid_thw[k:] for t, k in zip(trajs, first_new)], tokenizer.pad_token_id,
                  model.config.image_token_id, left_pad=True, device=turn.sequences.device, dtype=model.dtype)
    input_ids = torch.cat([turn.sequences, new["input_ids"]], 1)
    attention_mask = torch.cat([turn.attention_mask, new["attention_mask"]], 1)
    whole = {"input_ids": input_ids, "attention_mask": attention_mask,
             "mm_token_type_ids": ((input_ids == model.config.image_token_id) & (attention_mask == 1)).long(),
             "image_grid_thw": torch.cat([t.image_grid_thw for t in trajs]).to(input_ids.device)}
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": rope_positions(model, whole),
             "cache": turn.past_key_values}
    if new["pixel_values"] is not None:
        features = model.model.get_image_features(new["pixel_values"], new["image_grid_thw"], return_dict=True)
        batch["mm_encoder_outputs"] = {"image": features}
    elif is_sharded(model):  # a stand-in call, discarded (see the docstring)
        model.model.get_image_features(trajs[0].pixel_values[-1].to(input_ids.device, model.dtype),
                                       trajs[0].image_grid_thw[-1:].to(input_ids.device))
    return batch


def generation_config(end_ids, pad_id, max_new_tokens, do_sample):
    """Generate's settings, with each of transformers' own logits processors a no-op: `SamplingLogProbs` alone
    makes the distribution. Set explicitly, since generate fills a None from the checkpoint's own
    generation_config (Qwen2.5-VL-Instruct's: temperature 0.1, top_k 1, top_p 0.001, repetition_penalty 1.05)."""
    sampling = dict(temperature=1.0, top_k=0, top_p=1.0) if do_sample else {}  # greedy runs no warper
    return GenerationConfig(do_sample=do_sample, **sampling, repetition_penalty=1.0, max_new_tokens=max_new_tokens,
                            eos_token_id=end_ids, pad_token_id=pad_id, return_dict_in_generate=True)


@torch.no_grad()
def generate_turn(model, tokenizer, batch, max_new_tokens, temperature=1.0, stop_pattern=None, do_sample=True):
    """One assistant turn for a batch of conversations; `batch` is generate's input (`prompt_batch` or
    `continue_batch`). Returns ((sampled ids, their log-probs) per conversation, each cut after its first end id
    (`end_of_turn_ids`) or after the token that completes a match of `stop_pattern`; the `TurnCache` after it).
    Log-probs are those of the tempered distribution sampled from (greedy: the model's own, temperature 1)."""
    end_ids = end_of_turn_ids(model, tokenizer)
    config = generation_config(end_ids, tokenizer.pad_token_id, max_new_tokens, do_sample)
    recorder = SamplingLogProbs(forbidden_token_ids(model, tokenizer), temperature if do_sample else 1.0)
    prompt_len = batch["input_ids"].shape[1]
    stop = [StopAtPattern(tokenizer, prompt_len, stop_pattern)] if stop_pattern else []
    out = model.generate(**batch, generation_config=config, logits_processor=[recorder], stopping_criteria=stop,
                         synced_gpus=is_sharded(model))  # sharded: every rank runs every decoding step
    logprobs = recorder.finish(out.sequences).cpu()
    generated = out.sequences[:, prompt_len:].cpu()
    results = []
    for row in range(generated.shape[0]):
        ids = generated[row].tolist()
        length = next((k + 1 for k, token in enumerate(ids) if token in end_ids), len(ids))
        if stop and row in stop[0].stop_at:
            length = min(length, stop[0].stop_at[row])
        results.append((ids[:length], logprobs[row, :length].tolist()))
    if not continues_from_cache(model):  # the cache is dropped here, never cropped
        return results, TurnCache(out.sequences, turn_mask(batch, out, results), None)
    return results, turn_cache(batch, out, results)


def continues_from_cache(model):
    """Whether a turn may continue from the last turn's cache (`continue_batch`), read from the model's family.

    Not when the cache holds a recurrent state (Qwen3.5's Gated DeltaNet layers, `Family.recurrent_cache`): the
    tokens generate feeds to rows that already stopped enter that state although they are masked afterwards, and
    no crop can take them out again, so a continued turn would score differently from the training forward. Such
    a family encodes each turn's whole conversation instead (`shared_prompt_batch`)."""
    return not family_of(model.config).recurrent_cache


def turn_mask(batch, out, results):
    """`TurnCache.attention_mask` of a finished generate: the prompt's mask, then 1 on each row's kept tokens."""
    prompt_len = batch["input_ids"].shape[1]
    mask = torch.cat([batch["attention_mask"], torch.zeros_like(out.sequences[:, prompt_len:])], 1)
    for row, (ids, _) in enumerate(results):
        mask[row, prompt_len:prompt_len + len(ids)] = 1
    return mask


def turn_cache(batch, out, results):
    """The `TurnCache` of a finished generate: the kept tokens unmasked, the cache cut to the sequences (a rank
    that finished first under synced_gpus keeps running forwards that grow its cache but not its sequences)."""
    extra = out.cache.get_seq_length() - (out.sequences.shape[1] - 1)
    if extra:  # a negative count: the columns to drop from the end
        out.cache.crop(-extra)
    return TurnCache(out.sequences, turn_mask(batch, out, results), out.cache)


def chunks(model, items, size, group=1):
    """`items` in consecutive chunks of at most `size` (0: one chunk), one rollout each, so that only one chunk's
    KV cache and pixels exist at a time. With `size` at least `group` (the G rollouts of a prompt), chunks hold
    whole groups, so that a group's prompt is prefilled once (`shared_prompt_batch`): 12 items in groups of 4,
    size 6 -> chunks of 4. A sharded model's generate is collective, so every rank then goes through
    as many chunks as the rank with the most; the chunks it lacks are None, for a stand-in whose result is
    discarded. E.g. 6 items, size 4 -> [items[0:4], items[4:6]]; sharded, with another rank at 3 chunks ->
    [items[0:4], items[4:6], None]; no items and no rank with any -> []."""
    if size < 0:
        raise ValueError(f"rollout_batch_size {size}: use 0 (one chunk) or more")
    step = (size // group * group if size >= group else size) or max(len(items), 1)
    out = [items[start:start + step] for start in range(0, len(items), step)]
    if is_sharded(model):
        out += [None] * (int(max_over_ranks(len(out))) - len(out))
    return out


def release_cache():
    """Hand the freed KV caches' memory back to the device for the update (caching allocator); no-op on CPU."""
    torch.cuda.empty_cache()
