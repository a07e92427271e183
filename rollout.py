"""Multi-turn rollouts with HF `generate`, kept as token ids from the first prompt to the last sampled token.

Two recipes. LFPC's free tool loop (DeepEyes' template): the model may call `image_zoom_in_tool` with a box,
the crop comes back in a user turn inside <tool_response>, until <answer> (see `tool_rollout`).
MGPO's fixed two-turn template (the paper's Figure 3):

    system     MGPO_PROMPTS.system
    user       <global image> question + "Output the coordinates ... in JSON format."
    assistant  ... ```json [{"bbox_2d": [x1, y1, x2, y2], "label": ...}] ```        <- sampled, loss_mask = 1
    user       "Based on the provided coordinates, return the sub-image:" <crop> question + choices + instruction
               (or, for a missing/invalid box, "Not providing correct coordinates ...:" <global image again> ...)
    assistant  ... \\boxed{B}                                                     <- sampled, loss_mask = 1

What the model sampled is never decoded and re-encoded: the next user turn's tokens (text and image placeholders)
are appended to the sampled ids, so the training forward sees exactly the tokens that were sampled. Decoded text is
only read (box parsing, rewards, logs).
"""

import json
import math
import re
import zlib
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image
from transformers import DynamicCache, GenerationConfig, LogitsProcessor, StoppingCriteria

from crop import (TOOL_NAME, crop_original, is_valid_box, parse_box, parse_tool_call, resize_for_model,
                  to_original)
from data import Sample, format_choices, load_image
from distributed import is_sharded, max_over_ranks


@dataclass(frozen=True)
class MGPOPrompts:
    """Every string of the MGPO template, in one place so that a fork changes them here and nowhere else."""
    system: str = (
        "You are a helpful assistant. Given an image and one question. First, identify the coordinates of the key "
        "image area relevant to solving the problem. Append the coordinates in JSON format at the end of your "
        "response and stop. This will trigger cropping of the corresponding area in the original image and enlarge "
        "it for improved clarity. Once the enlarged image is available, provide the final answer (A, B, C, D, or E) "
        "enclosed within \\boxed{}.")
    turn1: str = "{question} Output the coordinates of the key image area relevant to the problem in JSON format."
    crop_intro: str = "Based on the provided coordinates, return the sub-image:"
    invalid_intro: str = "Not providing correct coordinates or invalid coordinate values, return the original image:"
    turn2: str = ("Question: {question} {choices}\nAnalyse the original image and the sub-image together, then "
                  "put the final answer (the option letter) within \\boxed{{}}.")


MGPO_PROMPTS = MGPOPrompts()

# The cropping tool in Qwen's function-calling style (the schema goes into the system prompt, as Qwen's template
# renders `tools`).
ZOOM_TOOL = {"type": "function", "function": {
    "name": TOOL_NAME,
    "description": "Zoom in on a region of the image: the region is cut from the full-resolution original and "
                   "returned as a new image.",
    "parameters": {"type": "object", "required": ["bbox_2d"], "properties": {
        "bbox_2d": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4,
                    "description": "The region as [x1, y1, x2, y2] in pixels of the image as you see it."},
        "label": {"type": "string", "description": "The name of the object in the region."}}}}}


@dataclass(frozen=True)
class ToolPrompts:
    """Every string of the tool-calling template (DeepEyes' wording), in one place."""
    system: str = (
        "You are a helpful assistant.\n\n# Tools\n\nYou may call one or more functions to assist with the user "
        "query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        + json.dumps(ZOOM_TOOL) + "\n</tools>\n\nFor each function call, return a json object with function name "
        "and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
        "\"arguments\": <args-json-object>}\n</tool_call>")
    user: str = ("{question} {choices}\nThink first, call image_zoom_in_tool if needed, then answer. Format "
                 "strictly as: <think>...</think> <tool_call>...</tool_call> (if tools needed) <answer>...</answer>")
    crop_before: str = "<tool_response>\n"
    crop_after: str = "\n</tool_response>"
    error: str = ("<tool_response>\nError: {error}. Call image_zoom_in_tool with bbox_2d [x1, y1, x2, y2] inside the "
                  "image, at least 28 pixels wide and high, or give your answer.\n</tool_response>")


TOOL_PROMPTS = ToolPrompts()

# One turn, no tool: the baseline prompt, and how offline resolution selection asks for the policy's answer.
DIRECT_SYSTEM = "You are a helpful assistant."
DIRECT_PROMPT = "{question} {choices}\nAnswer with the option's letter from the given choices directly."


@dataclass
class Trajectory:
    """One conversation: ids of every token, which of them were sampled, and what the environment did.

    `input_ids`, `loss_mask` and `rollout_logprobs` have one entry per token; `rollout_logprobs` is the sampling
    log-prob on sampled tokens and 0.0 elsewhere. `pixel_values[i]` and `image_grid_thw[i]` belong to the i-th
    image placeholder run in `input_ids`."""
    sample: Sample
    input_ids: list
    loss_mask: list
    rollout_logprobs: list
    images: list                  # the model-input images, in conversation order
    pixel_values: list            # one [patches, C*T*14*14] tensor per image
    image_grid_thw: torch.Tensor  # [n_images, 3]
    texts: list = field(default_factory=list)  # decoded assistant turns, for rewards and logs only
    original_size: tuple = None   # (W, H) of the original image
    input_size: tuple = None      # (w, h) of the global model input
    box_input: list = None        # turn-1 box in model-input pixels (None: no parsable box)
    box_original: list = None     # the same box in original pixels
    box_valid: bool = False
    crop_boxes: list = field(default_factory=list)  # original-pixel boxes of the crops made, in order
    tool_calls: int = 0           # tool calls executed, valid or not (tool recipe)
    end_reason: str = ""          # why a tool episode ended: answer, no_tool_call, max_turns, length


# ---------------------------------------------------------------------------------------------------------------
# Token ids of conversation pieces, through the checkpoint's own chat template.

def image_pad_count(grid_thw, merge_size=2):
    """Placeholder tokens of one image: its patches over the 2x2 merge. Grid [1, 16, 24] -> 96 tokens."""
    return int(grid_thw.prod()) // merge_size ** 2


def expand_image_pads(text, grids, merge_size=2):
    """Replace the i-th `<|image_pad|>` by as many copies as image i has tokens, as Qwen's processor does."""
    pieces = text.split("<|image_pad|>")
    assert len(pieces) == len(grids) + 1, f"{len(pieces) - 1} image placeholders for {len(grids)} images"
    out = pieces[0]
    for grid, piece in zip(grids, pieces[1:]):
        out += "<|image_pad|>" * image_pad_count(grid, merge_size) + piece
    return out


def user_content(parts):
    """Chat-template content from a list of str (text) and PIL images, in order."""
    return [{"type": "image"} if isinstance(p, Image.Image) else {"type": "text", "text": p} for p in parts]


def encode_prompt(tokenizer, system, parts, grids):
    """Ids of system + first user turn + the assistant header, with image placeholders expanded."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user_content(parts)}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(expand_image_pads(text, grids), add_special_tokens=False)["input_ids"]


def encode_user_turn(tokenizer, parts, grids):
    """Ids of a later user turn plus the next assistant header, cut from the chat template's own rendering:
    the rendering of [..., assistant, user] minus that of [..., assistant]. E.g. for Qwen:
    '<|im_start|>user\\n<|vision_start|><|image_pad|>...<|vision_end|>text<|im_end|>\\n<|im_start|>assistant\\n'."""
    head = [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]
    before = tokenizer.apply_chat_template(head, tokenize=False)
    after = tokenizer.apply_chat_template(head + [{"role": "user", "content": user_content(parts)}],
                                          add_generation_prompt=True, tokenize=False)
    assert after.startswith(before), "chat template renders a prefix differently once a turn is added"
    return tokenizer(expand_image_pads(after[len(before):], grids), add_special_tokens=False)["input_ids"]


def close_assistant_turn(tokenizer, sampled):
    """Ids that end an assistant turn the way the chat template does: '<|im_end|>\\n', of which the model may
    already have sampled the '<|im_end|>' (it stops there); a turn cut by a stop string or the length limit, or
    ended by another of the checkpoint's end ids (Qwen's <|endoftext|>, kept as sampled), gets the whole closing."""
    text = "\n" if sampled and sampled[-1] == tokenizer.eos_token_id else tokenizer.eos_token + "\n"
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_images(image_processor, images):
    """(list of per-image pixel_values, image_grid_thw [n, 3]) for model-input images, already resized by
    `crop.resize_for_model` (sides multiples of 28). The processor must not resize them again: its own max_pixels
    may be below the run's pixel budget, and boxes are read in the frame of the image we resized.
    E.g. a 448 x 448 global view (budget 256 tokens) with a processor capped at 224 x 224 -> grid [1, 32, 32]."""
    factor = image_processor.patch_size * image_processor.merge_size
    for image in images:
        if image.width % factor or image.height % factor:
            raise ValueError(f"image of {image.width} x {image.height} px: sides must be multiples of {factor} "
                             f"(resize it with crop.resize_for_model first)")
    out = image_processor(images=images, do_resize=False, return_tensors="pt")
    sizes = out["image_grid_thw"].prod(-1).tolist()
    return list(torch.split(out["pixel_values"], sizes)), out["image_grid_thw"]


# ---------------------------------------------------------------------------------------------------------------
# Batching conversations for generate and for the training forward.

def collate(seqs, pixel_values, grids, pad_id, image_token_id, left_pad, device="cpu", dtype=torch.float32):
    """Pad a list of id lists into one batch; concatenate all images in batch order.

    Returns input_ids, attention_mask and mm_token_type_ids [B, L] (the last is 1 on image tokens: without it
    Qwen2.5-VL silently falls back to 1-D positions), pixel_values [sum patches, D], image_grid_thw [n_images, 3].
    E.g. seqs [[5, 6], [7]] with left_pad -> input_ids [[5, 6], [pad, 7]], attention_mask [[1, 1], [0, 1]]."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left_pad else slice(0, len(s))
        ids[i, cols] = torch.tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    mm_token_type_ids = ((ids == image_token_id) & (mask == 1)).long()
    batch = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": mm_token_type_ids,
             "pixel_values": torch.cat([p for ps in pixel_values for p in ps]), "image_grid_thw": torch.cat(grids)}
    batch = {k: v.to(device) for k, v in batch.items()}
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


def forbidden_token_ids(tokenizer):
    """Ids the policy may never sample: a sampled image placeholder or vision-start breaks the next forward."""
    return tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>"])


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
    of the first W - 1 columns (the last sampled token was never fed back). E.g. prompts [[5, 6], [7]], row 0
    stops after 1 token, row 1 samples 2: sequences [[5, 6, 8, pad], [pad, 7, 3, 4]], attention_mask
    [[1, 1, 1, 0], [0, 1, 1, 1]], a cache of 3 columns."""
    sequences: torch.Tensor
    attention_mask: torch.Tensor
    past_key_values: DynamicCache


def prompt_batch(model, tokenizer, trajs):
    """The trajectories so far as generate's input: `collate`d, left-padded, on the model's device and dtype."""
    return collate([t.input_ids for t in trajs], [t.pixel_values for t in trajs], [t.image_grid_thw for t in trajs],
                   tokenizer.pad_token_id, model.config.image_token_id, left_pad=True,
                   device=next(model.parameters()).device, dtype=model.dtype)


@torch.no_grad()
def continue_batch(model, tokenizer, trajs, turn):
    """Generate's input for the next turn of `trajs`, continuing from `turn`'s cache: each row's new ids (the
    closing of the turn and the next user turn, appended to the trajectory after all of the turn's kept ids)
    left-padded after the turn's columns, and the vision features of the new images only.

    E.g. turn.sequences [[5, 6, 8, pad], [pad, 7, 3, 4]] with mask [[1, 1, 1, 0], [0, 1, 1, 1]] and new ids
    [[a, b], [c]] -> input_ids [[5, 6, 8, pad, a, b], [pad, 7, 3, 4, pad, c]], attention_mask
    [[1, 1, 1, 0, 1, 1], [0, 1, 1, 1, 0, 1]]. Generate feeds only the columns past the cache, and computes the
    3-D positions of all columns with get_rope_index skipping the 0s: the training forward's positions."""
    vision_start = model.config.vision_start_token_id
    tails = [t.input_ids[n:] for t, n in zip(trajs, turn.attention_mask.sum(1).tolist())]
    first_new = [len(t.pixel_values) - tail.count(vision_start) for t, tail in zip(trajs, tails)]
    new = collate(tails, [t.pixel_values[k:] for t, k in zip(trajs, first_new)],
                  [t.image_grid_thw[k:] for t, k in zip(trajs, first_new)], tokenizer.pad_token_id,
                  model.config.image_token_id, left_pad=True, device=turn.sequences.device, dtype=model.dtype)
    input_ids = torch.cat([turn.sequences, new["input_ids"]], 1)
    attention_mask = torch.cat([turn.attention_mask, new["attention_mask"]], 1)
    features = model.model.get_image_features(new["pixel_values"], new["image_grid_thw"], return_dict=True)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "mm_token_type_ids": ((input_ids == model.config.image_token_id) & (attention_mask == 1)).long(),
            "image_grid_thw": torch.cat([t.image_grid_thw for t in trajs]).to(input_ids.device),
            "mm_encoder_outputs": {"image": features}, "cache": turn.past_key_values}


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
    recorder = SamplingLogProbs(forbidden_token_ids(tokenizer), temperature if do_sample else 1.0)
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
    return results, turn_cache(batch, out, results)


def turn_cache(batch, out, results):
    """The `TurnCache` of a finished generate: the kept tokens unmasked, the cache cut to the sequences (a rank
    that finished first under synced_gpus keeps running forwards that grow its cache but not its sequences)."""
    prompt_len = batch["input_ids"].shape[1]
    mask = torch.cat([batch["attention_mask"], torch.zeros_like(out.sequences[:, prompt_len:])], 1)
    for row, (ids, _) in enumerate(results):
        mask[row, prompt_len:prompt_len + len(ids)] = 1
    extra = out.cache.get_seq_length() - (out.sequences.shape[1] - 1)
    out.cache.crop(-extra)  # a negative count: the columns to drop from the end
    return TurnCache(out.sequences, mask, out.cache)


# ---------------------------------------------------------------------------------------------------------------
# Building blocks shared by both recipes.

def global_view(sample, original, min_pixels, global_max_pixels):
    """What the model sees of the whole image: the original, first brought to the sample's info-gap `global_size`
    when it has one (LFPC stage I), then resized under the global pixel budget."""
    if sample.global_size:
        original = original.resize(tuple(sample.global_size), Image.BICUBIC)
    return resize_for_model(original, min_pixels, global_max_pixels)


def start_trajectory(sample, tokenizer, image_processor, system, text, global_max_pixels, min_pixels):
    """The first prompt of one sample, as ids: system, then a user turn of the global view and `text`."""
    original = load_image(sample)
    view = global_view(sample, original, min_pixels, global_max_pixels)
    pixel_values, grids = encode_images(image_processor, [view])
    ids = encode_prompt(tokenizer, system, [view, text], grids)
    return Trajectory(sample=sample, input_ids=ids, loss_mask=[0] * len(ids), rollout_logprobs=[0.0] * len(ids),
                      images=[view], pixel_values=pixel_values, image_grid_thw=grids,
                      original_size=original.size, input_size=view.size), original


def start_groups(samples, tokenizer, image_processor, num_generations, cfg, system, text_fn):
    """`num_generations` copies of each sample's first prompt, grouped: trajectories[i*n:(i+1)*n] share sample i.
    Returns (trajectories, the original image of each)."""
    trajs, originals = [], []
    for sample in samples:
        first, original = start_trajectory(sample, tokenizer, image_processor, system, text_fn(sample),
                                           cfg.global_max_pixels, cfg.min_pixels)
        trajs += [fork(first) for _ in range(num_generations)]
        originals += [original] * num_generations
    return trajs, originals


def fork(traj):
    """A copy whose growing lists are its own; images and pixel tensors are shared, never modified in place."""
    return replace(traj, input_ids=list(traj.input_ids), loss_mask=list(traj.loss_mask), texts=list(traj.texts),
                   rollout_logprobs=list(traj.rollout_logprobs), images=list(traj.images),
                   pixel_values=list(traj.pixel_values), crop_boxes=list(traj.crop_boxes))


def chunks(model, items, size):
    """`items` in consecutive chunks of at most `size` (0: one chunk), one rollout each, so that only one chunk's
    KV cache and pixels exist at a time. A sharded model's generate is collective, so every rank then goes through
    as many chunks as the rank with the most; the chunks it lacks are None, for a stand-in whose result is
    discarded. E.g. 6 items, size 4 -> [items[0:4], items[4:6]]; sharded, with another rank at 3 chunks ->
    [items[0:4], items[4:6], None]; no items and no rank with any -> []."""
    if size < 0:
        raise ValueError(f"rollout_batch_size {size}: use 0 (one chunk) or more")
    step = size or max(len(items), 1)
    out = [items[start:start + step] for start in range(0, len(items), step)]
    if is_sharded(model):
        out += [None] * (int(max_over_ranks(len(out))) - len(out))
    return out


def release_cache():
    """Hand the freed KV caches' memory back to the device for the update (caching allocator); no-op on CPU."""
    torch.cuda.empty_cache()


def generate_for(model, tokenizer, trajs, max_new_tokens, cfg, stop_pattern=None, after=None):
    """One assistant turn for each trajectory (see `generate_turn`): the whole conversations encoded, or with
    `after` (the `TurnCache` of these trajectories' previous turn) only what was appended since."""
    batch = prompt_batch(model, tokenizer, trajs) if after is None else continue_batch(model, tokenizer, trajs, after)
    return generate_turn(model, tokenizer, batch, max_new_tokens, temperature=cfg.temperature,
                         stop_pattern=stop_pattern, do_sample=getattr(cfg, "do_sample", True))


def append_sampled(traj, sampled, logprobs, tokenizer):
    """Add an assistant turn: sampled ids with loss_mask 1, their log-probs, and its decoded text."""
    traj.input_ids += sampled
    traj.loss_mask += [1] * len(sampled)
    traj.rollout_logprobs += logprobs
    traj.texts.append(tokenizer.decode(sampled, skip_special_tokens=True))


def append_user_turn(traj, tokenizer, image_processor, parts):
    """Close the assistant turn and add a user turn of `parts` (text and images); none of it is trained on."""
    images = [p for p in parts if isinstance(p, Image.Image)]
    grids = torch.zeros((0, 3), dtype=torch.long)
    if images:
        pixel_values, grids = encode_images(image_processor, images)
        traj.images += images
        traj.pixel_values += pixel_values
        traj.image_grid_thw = torch.cat([traj.image_grid_thw, grids])
    ids = close_assistant_turn(tokenizer, traj.input_ids) + encode_user_turn(tokenizer, parts, grids)
    traj.input_ids += ids
    traj.loss_mask += [0] * len(ids)
    traj.rollout_logprobs += [0.0] * len(ids)


def cut_crop(traj, original, box, cfg):
    """The crop for a box in the global view's pixels: mapped to original pixels (recorded), cut from the full
    original, resized under the crop budget.

    Crop-reliance probes (LFPC section 3; `cfg.probe`, evaluation only): 'gt' cuts the sample's smallest
    ground-truth box instead of the predicted one, 'noise' returns uniform noise of the crop's size."""
    box_original = to_original(box, traj.input_size, traj.original_size)
    traj.crop_boxes.append(box_original)
    probe = getattr(cfg, "probe", "none")
    region = crop_original(original, traj.sample.boxes[0] if probe == "gt" else box_original)
    if probe == "noise":
        rng = np.random.default_rng(zlib.crc32(f"{traj.sample.id}-{len(traj.crop_boxes)}".encode()))
        region = Image.fromarray(rng.integers(0, 256, (region.height, region.width, 3), dtype=np.uint8))
    return resize_for_model(region, cfg.min_pixels, cfg.crop_max_pixels)


def visual_tokens(traj):
    """Image tokens in the conversation: global view + crops (+ repeats), 4 patches per token."""
    return int(traj.image_grid_thw.prod(-1).sum()) // 4


# ---------------------------------------------------------------------------------------------------------------
# MGPO: the fixed two-turn template.

def apply_turn1_box(traj, original, tokenizer, image_processor, prompts, cfg):
    """Parse the turn-1 box, crop the original (or return the global view again when the box is missing or
    invalid, as MGPO does), and append the turn-2 user message."""
    box = parse_box(traj.texts[-1])
    traj.box_input = box
    traj.box_valid = box is not None and is_valid_box(box, traj.input_size, cfg.min_box_side)
    if traj.box_valid:
        intro, image = prompts.crop_intro, cut_crop(traj, original, box, cfg)
        traj.box_original = traj.crop_boxes[-1]
    else:
        intro, image = prompts.invalid_intro, traj.images[0]
    question = prompts.turn2.format(question=traj.sample.question, choices=format_choices(traj.sample.options))
    append_user_turn(traj, tokenizer, image_processor, [intro, image, question])


def mgpo_rollout(model, tokenizer, image_processor, samples, num_generations, cfg, prompts=MGPO_PROMPTS):
    """`num_generations` two-turn trajectories per sample, grouped: trajectories[i*n:(i+1)*n] share sample i.

    Turn 2 continues from turn 1's KV cache: its prefill encodes the crop and the new user turn, not the global
    image and turn 1 again. The trajectories go through both turns in chunks of `cfg.rollout_batch_size` (see
    `chunks`), each chunk's cache freed before the next starts. `cfg` needs: global_max_pixels, crop_max_pixels,
    min_pixels, max_new_tokens_turn1, max_new_tokens_turn2, temperature, rollout_batch_size (and optionally
    do_sample, default True)."""
    trajs, originals = mgpo_prompts(samples, tokenizer, image_processor, num_generations, cfg, prompts)
    stand_in = [fork(t) for t in trajs[:1]]  # kept at its first prompt, for a rank out of chunks
    for part in chunks(model, range(len(trajs)), cfg.rollout_batch_size):
        if part is None:
            mgpo_turns(model, tokenizer, image_processor, [fork(t) for t in stand_in], originals[:1], cfg, prompts)
        else:
            mgpo_turns(model, tokenizer, image_processor, [trajs[i] for i in part], [originals[i] for i in part],
                       cfg, prompts)
    release_cache()
    return trajs


def mgpo_turns(model, tokenizer, image_processor, trajs, originals, cfg, prompts):
    """Both turns of trajectories at their first prompt; turn 1's KV cache lives only until this returns."""
    turn1 = grounding_turn(model, tokenizer, image_processor, trajs, originals, cfg, prompts)
    outs, _ = generate_for(model, tokenizer, trajs, cfg.max_new_tokens_turn2, cfg, after=turn1)
    for traj, (sampled, logprobs) in zip(trajs, outs):
        append_sampled(traj, sampled, logprobs, tokenizer)


def mgpo_prompts(samples, tokenizer, image_processor, num_generations, cfg, prompts):
    """The grouped first prompts of `mgpo_rollout`: (trajectories, the original image of each)."""
    return start_groups(samples, tokenizer, image_processor, num_generations, cfg, prompts.system,
                        lambda s: prompts.turn1.format(question=s.question))


def grounding_turn(model, tokenizer, image_processor, trajs, originals, cfg, prompts):
    """Turn 1 (the box) and the turn-2 user message (the crop, or the global view again); returns turn 1's
    `TurnCache`."""
    outs, turn1 = generate_for(model, tokenizer, trajs, cfg.max_new_tokens_turn1, cfg, stop_pattern=JSON_BLOCK_END)
    for traj, original, (sampled, logprobs) in zip(trajs, originals, outs):
        append_sampled(traj, sampled, logprobs, tokenizer)
        apply_turn1_box(traj, original, tokenizer, image_processor, prompts, cfg)
    return turn1


def mgpo_grounding_turn(model, tokenizer, image_processor, samples, num_generations, cfg, prompts=MGPO_PROMPTS):
    """Turn 1 of `mgpo_rollout` for all samples in one generate call, unchunked (bench.py and tests time and
    check the turn-2 continuation on its cache). Returns (trajectories, turn 1's `TurnCache`)."""
    trajs, originals = mgpo_prompts(samples, tokenizer, image_processor, num_generations, cfg, prompts)
    return trajs, grounding_turn(model, tokenizer, image_processor, trajs, originals, cfg, prompts)


# ---------------------------------------------------------------------------------------------------------------
# LFPC: the free multi-turn cropping tool (DeepEyes' template).

def tool_step(traj, original, tokenizer, image_processor, cfg, prompts):
    """After an assistant turn: end the episode (recording why) or run its last tool call and append the tool's
    response (the crop, or an error text for an invalid call). Returns True while the episode goes on."""
    text = traj.texts[-1]
    call = parse_tool_call(text)
    end = ("length" if sum(traj.loss_mask) >= cfg.max_response_tokens else
           "answer" if "</answer>" in text else
           "no_tool_call" if call is None else
           "max_turns" if traj.tool_calls >= cfg.max_turns else None)
    if end:
        traj.end_reason = end
        return False
    traj.tool_calls += 1
    box, error = call
    if error is None and not is_valid_box(box, traj.input_size, cfg.min_box_side):
        error = f"bbox_2d {box} is outside the {traj.input_size[0]}x{traj.input_size[1]} image or under 28 pixels"
    if error:
        append_user_turn(traj, tokenizer, image_processor, [prompts.error.format(error=error)])
    else:
        crop = cut_crop(traj, original, box, cfg)
        append_user_turn(traj, tokenizer, image_processor, [prompts.crop_before, crop, prompts.crop_after])
    return True


def tool_rollout(model, tokenizer, image_processor, samples, num_generations, cfg, prompts=None):
    """`num_generations` tool-calling episodes per sample, grouped as in `mgpo_rollout`.

    Each round generates one assistant turn for every episode still going, in chunks of `cfg.rollout_batch_size`
    (see `chunks`; on a sharded model the ranks agree on the number of chunks every round, as their episodes end
    at different rounds); an episode ends at an answer, a turn without a tool call, after `max_turns` executed
    calls (the model then had its last turn), or when its sampled tokens reach `max_response_tokens`. `cfg`
    needs: global_max_pixels, crop_max_pixels, min_pixels, max_turns, max_response_tokens,
    max_new_tokens_per_turn, temperature, rollout_batch_size."""
    prompts = prompts or TOOL_PROMPTS
    trajs, originals = start_groups(samples, tokenizer, image_processor, num_generations, cfg, prompts.system,
                                    lambda s: prompts.user.format(question=s.question,
                                                                  choices=format_choices(s.options)))
    active = list(range(len(trajs)))
    while parts := chunks(model, active, cfg.rollout_batch_size):
        active = [i for part in parts for i in tool_turn(model, tokenizer, image_processor, trajs, originals, part,
                                                         cfg, prompts)]
    release_cache()
    return trajs


def tool_turn(model, tokenizer, image_processor, trajs, originals, part, cfg, prompts):
    """One assistant turn and the tool's response for the episodes `part` (indices into `trajs`); returns those
    still going. `part` None: a stand-in generate that joins the other ranks' (sharded model), discarded.

    Each round re-encodes the episodes' whole conversations, unlike MGPO's turn 2 that continues from turn 1's
    cache: the active episodes change from round to round, so continuing would mean picking their rows out of the
    last round's cache."""
    if part is None:
        generate_for(model, tokenizer, trajs[:1], 1, cfg)
        return []
    room = {i: cfg.max_response_tokens - sum(trajs[i].loss_mask) for i in part}
    outs, _ = generate_for(model, tokenizer, [trajs[i] for i in part],
                           min(cfg.max_new_tokens_per_turn, max(room.values())), cfg, stop_pattern=TOOL_TURN_END)
    going = []
    for i, (sampled, logprobs) in zip(part, outs):
        append_sampled(trajs[i], sampled[:room[i]], logprobs[:room[i]], tokenizer)
        if tool_step(trajs[i], originals[i], tokenizer, image_processor, cfg, prompts):
            going.append(i)
    return going


# ---------------------------------------------------------------------------------------------------------------
# One turn, no tool.

def direct_rollout(model, tokenizer, image_processor, samples, num_generations, cfg, max_new_tokens,
                   do_sample=False):
    """One turn per sample from the global view alone, no crop (each image under the global budget, after its
    `global_size` when it has one): the evaluation baseline (greedy) and single-turn GRPO, the paper's baseline
    (sampled at cfg.temperature, `num_generations` per sample); in chunks of `cfg.rollout_batch_size`."""
    trajs, _ = start_groups(samples, tokenizer, image_processor, num_generations, cfg, DIRECT_SYSTEM,
                            lambda s: DIRECT_PROMPT.format(question=s.question, choices=format_choices(s.options)))
    for part in chunks(model, trajs, cfg.rollout_batch_size):  # None: a stand-in (see `chunks`), discarded
        outs = generate_turn(model, tokenizer, prompt_batch(model, tokenizer, part or trajs[:1]), max_new_tokens,
                             temperature=cfg.temperature, do_sample=do_sample)[0]  # its cache freed here
        for traj, (sampled, logprobs) in zip(part or [], outs):
            append_sampled(traj, sampled, logprobs, tokenizer)
    release_cache()
    return trajs


def direct_answers(model, tokenizer, image_processor, items, cfg, max_new_tokens):
    """Greedy one-turn answers to [(sample, (w, h)), ...], each sample's image first brought to size (w, h)."""
    shown = [replace(sample, global_size=list(size)) for sample, size in items]
    return [t.texts[-1] for t in direct_rollout(model, tokenizer, image_processor, shown, 1, cfg, max_new_tokens)]
