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

import zlib
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image

from chat import close_assistant_turn, encode_images, encode_prompt, encode_user_turn
from crop import crop_original, is_valid_box, parse_box, parse_tool_call, resize_for_model
from data import Sample, format_choices, load_image
from distributed import is_sharded, max_over_ranks
from family import Family, family_of
from generation import (JSON_BLOCK_END, TOOL_TURN_END, chunks, continue_batch, generate_turn, release_cache,
                        shared_prompt_batch)
from prompts import DIRECT_PROMPT, DIRECT_SYSTEM, prompts_for


@dataclass
class Trajectory:
    """One conversation: ids of every token, which of them were sampled, and what the environment did.

    `input_ids`, `loss_mask` and `rollout_logprobs` have one entry per token; `rollout_logprobs` is the sampling
    log-prob on sampled tokens and 0.0 elsewhere. `pixel_values[i]` and `image_grid_thw[i]` belong to the i-th
    image placeholder run in `input_ids`. `family` is the model's: its image tokens, its resize factor and the
    frame its boxes are written in."""
    sample: Sample
    family: Family
    input_ids: list
    loss_mask: list
    rollout_logprobs: list
    images: list                  # the model-input images, in conversation order
    pixel_values: list            # one [patches, C*T*patch*patch] tensor per image
    image_grid_thw: torch.Tensor  # [n_images, 3]
    texts: list = field(default_factory=list)  # decoded assistant turns, for rewards and logs only
    original_size: tuple = None   # (W, H) of the original image
    input_size: tuple = None      # (w, h) of the global model input
    box_input: list = None        # turn-1 box as written, in the family's frame (None: no parsable box)
    box_original: list = None     # the same box in original pixels
    box_valid: bool = False
    crop_boxes: list = field(default_factory=list)  # original-pixel boxes of the crops made, in order
    tool_calls: int = 0           # tool calls executed, valid or not (tool recipe)
    end_reason: str = ""          # why a tool episode ended: answer, no_tool_call, max_turns, length


# ---------------------------------------------------------------------------------------------------------------
# Building blocks shared by both recipes.

def global_view(sample, original, min_pixels, global_max_pixels, factor):
    """What the model sees of the whole image: the original, first brought to the sample's info-gap `global_size`
    when it has one (LFPC stage I), then resized under the global pixel budget (sides multiples of `factor`)."""
    if sample.global_size:
        original = original.resize(tuple(sample.global_size), Image.BICUBIC)
    return resize_for_model(original, min_pixels, global_max_pixels, factor)


def start_trajectory(sample, tokenizer, image_processor, family, system, text, global_max_pixels, min_pixels):
    """The first prompt of one sample, as ids: system, then a user turn of the global view and `text`."""
    original = load_image(sample)
    view = global_view(sample, original, min_pixels, global_max_pixels, family.factor)
    pixel_values, grids = encode_images(image_processor, [view])
    ids = encode_prompt(tokenizer, family, system, [view, text], grids)
    return Trajectory(sample=sample, family=family, input_ids=ids, loss_mask=[0] * len(ids),
                      rollout_logprobs=[0.0] * len(ids), images=[view], pixel_values=pixel_values,
                      image_grid_thw=grids, original_size=original.size, input_size=view.size), original


def start_groups(samples, tokenizer, image_processor, family, num_generations, cfg, system, text_fn):
    """`num_generations` copies of each sample's first prompt, grouped: trajectories[i*n:(i+1)*n] share sample i.
    Returns (trajectories, the original image of each)."""
    trajs, originals = [], []
    for sample in samples:
        first, original = start_trajectory(sample, tokenizer, image_processor, family, system, text_fn(sample),
                                           cfg.global_max_pixels, cfg.min_pixels)
        trajs += [fork(first) for _ in range(num_generations)]
        originals += [original] * num_generations
    return trajs, originals


def fork(traj):
    """A copy whose growing lists are its own; images and pixel tensors are shared, never modified in place."""
    return replace(traj, input_ids=list(traj.input_ids), loss_mask=list(traj.loss_mask), texts=list(traj.texts),
                   rollout_logprobs=list(traj.rollout_logprobs), images=list(traj.images),
                   pixel_values=list(traj.pixel_values), crop_boxes=list(traj.crop_boxes))


def generate_for(model, tokenizer, trajs, max_new_tokens, cfg, stop_pattern=None, after=None):
    """One assistant turn for each trajectory (see `generate_turn`): the whole conversations encoded, each distinct
    one prefilled once (a group's first prompt), or with `after` (the `TurnCache` of these trajectories' previous
    turn) only what was appended since; a family whose cache is recurrent keeps none and encodes it all again
    (`generation.continues_from_cache`)."""
    batch = (shared_prompt_batch(model, tokenizer, trajs) if after is None or after.past_key_values is None else
             continue_batch(model, tokenizer, trajs, after))
    return generate_turn(model, tokenizer, batch, max_new_tokens, temperature=cfg.temperature,
                         stop_pattern=stop_pattern, do_sample=cfg.do_sample)


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
    ids = close_assistant_turn(tokenizer, traj.input_ids) + encode_user_turn(tokenizer, traj.family, parts, grids)
    traj.input_ids += ids
    traj.loss_mask += [0] * len(ids)
    traj.rollout_logprobs += [0.0] * len(ids)


def cut_crop(traj, original, box, cfg, probe="none"):
    """The crop for a box the model wrote about the global view, in its family's frame: mapped to original pixels
    (recorded), cut from the full original, resized under the crop budget (cfg.min_pixels, cfg.crop_max_pixels).

    Crop-reliance probes (LFPC section 3; the rollouts pass `cfg.probe`, set by evaluation only): 'gt' cuts the
    sample's smallest ground-truth box instead of the predicted one, 'noise' returns uniform noise of the crop's
    size."""
    box_original = traj.family.to_original(box, traj.input_size, traj.original_size)
    traj.crop_boxes.append(box_original)
    region = crop_original(original, traj.sample.boxes[0] if probe == "gt" else box_original)
    if probe == "noise":
        rng = np.random.default_rng(zlib.crc32(f"{traj.sample.id}-{len(traj.crop_boxes)}".encode()))
        region = Image.fromarray(rng.integers(0, 256, (region.height, region.width, 3), dtype=np.uint8))
    return resize_for_model(region, cfg.min_pixels, cfg.crop_max_pixels, traj.family.factor)


def valid_box(traj, box, min_box_side):
    """Whether a box the model wrote (in its family's frame) is usable, judged in model-input pixels
    (`crop.is_valid_box`)."""
    return is_valid_box(traj.family.input_pixels(box, traj.input_size), traj.input_size, min_box_side)


def visual_tokens(traj, first=0):
    """Image tokens in the conversation from its `first` image on: global view + crops (+ repeats) by default,
    the crops alone with first=1."""
    return sum(traj.family.tokens_per_image(grid) for grid in traj.image_grid_thw[first:])


# ---------------------------------------------------------------------------------------------------------------
# MGPO: the fixed two-turn template.

def apply_turn1_box(traj, original, tokenizer, image_processor, prompts, cfg):
    """Parse the turn-1 box, crop the original (or return the global view again when the box is missing or
    invalid, as MGPO does), and append the turn-2 user message."""
    box = parse_box(traj.texts[-1])
    traj.box_input = box
    traj.box_valid = box is not None and valid_box(traj, box, cfg.min_box_side)
    if traj.box_valid:
        intro, image = prompts.crop_intro, cut_crop(traj, original, box, cfg, cfg.probe)
        traj.box_original = traj.crop_boxes[-1]
    else:
        intro, image = prompts.invalid_intro, traj.images[0]
    question = prompts.turn2.format(question=traj.sample.question, choices=format_choices(traj.sample.options))
    append_user_turn(traj, tokenizer, image_processor, [intro, image, question])


def mgpo_rollout(model, tokenizer, image_processor, samples, num_generations, cfg, prompts=None):
    """`num_generations` two-turn trajectories per sample, grouped: trajectories[i*n:(i+1)*n] share sample i.

    Turn 1 prefills each sample's prompt once for its group (`generation.shared_prompt_batch`); turn 2 continues
    from turn 1's KV cache: its prefill encodes the crop and the new user turn, not the global image and turn 1
    again (a family with a recurrent cache, Qwen3.5, encodes it all again: `generation.continues_from_cache`). The
    trajectories go through both turns in chunks of `cfg.rollout_batch_size` (whole groups, see
    `chunks`), each chunk's cache freed before the next starts. `cfg` (a config.RolloutConfig) needs:
    global_max_pixels, crop_max_pixels, min_pixels, max_new_tokens_turn1, max_new_tokens_turn2, temperature,
    do_sample, probe, rollout_batch_size."""
    family = family_of(model.config)
    prompts = prompts or prompts_for(family).mgpo  # boxes asked for in the family's frame
    trajs, originals = mgpo_prompts(samples, tokenizer, image_processor, family, num_generations, cfg, prompts)
    stand_in = [fork(t) for t in trajs[:1]]  # kept at its first prompt, for a rank out of chunks
    for part in chunks(model, range(len(trajs)), cfg.rollout_batch_size, num_generations):
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


def mgpo_prompts(samples, tokenizer, image_processor, family, num_generations, cfg, prompts):
    """The grouped first prompts of `mgpo_rollout`: (trajectories, the original image of each)."""
    return start_groups(samples, tokenizer, image_processor, family, num_generations, cfg, prompts.system,
                        lambda s: prompts.turn1.format(question=s.question))


def grounding_turn(model, tokenizer, image_processor, trajs, originals, cfg, prompts):
    """Turn 1 (the box) and the turn-2 user message (the crop, or the global view again); returns turn 1's
    `TurnCache`."""
    outs, turn1 = generate_for(model, tokenizer, trajs, cfg.max_new_tokens_turn1, cfg, stop_pattern=JSON_BLOCK_END)
    for traj, original, (sampled, logprobs) in zip(trajs, originals, outs):
        append_sampled(traj, sampled, logprobs, tokenizer)
        apply_turn1_box(traj, original, tokenizer, image_processor, prompts, cfg)
    return turn1


def mgpo_grounding_turn(model, tokenizer, image_processor, samples, num_generations, cfg, prompts=None):
    """Turn 1 of `mgpo_rollout` for all samples in one generate call, unchunked (bench.py and tests time and
    check the turn-2 continuation on its cache). Returns (trajectories, turn 1's `TurnCache`)."""
    family = family_of(model.config)
    prompts = prompts or prompts_for(family).mgpo
    trajs, originals = mgpo_prompts(samples, tokenizer, image_processor, family, num_generations, cfg, prompts)
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
    if error is None and not valid_box(traj, box, cfg.min_box_side):
        w, h = traj.family.frame_size(traj.input_size)
        error = f"bbox_2d {box} is outside the {w}x{h} image or under {traj.family.factor} pixels"
    if error:
        append_user_turn(traj, tokenizer, image_processor, [prompts.error.format(error=error)])
    else:
        crop = cut_crop(traj, original, box, cfg, cfg.probe)
        append_user_turn(traj, tokenizer, image_processor, [prompts.crop_before, crop, prompts.crop_after])
    return True


def tool_rollout(model, tokenizer, image_processor, samples, num_generations, cfg, prompts=None):
    """`num_generations` tool-calling episodes per sample, grouped as in `mgpo_rollout`.

    The episodes run in chunks of `cfg.rollout_batch_size` (whole groups, see `chunks`), each chunk round after
    round to its end (`tool_episodes`) before the next starts. An episode ends at an answer, a turn without a
    tool call, after `max_turns` executed calls (the model then had its last turn), or when its sampled tokens
    reach `max_response_tokens`. `cfg` needs: global_max_pixels, crop_max_pixels, min_pixels, max_turns,
    max_response_tokens, max_new_tokens_per_turn, temperature, rollout_batch_size."""
    family = family_of(model.config)
    prompts = prompts or prompts_for(family).tool
    trajs, originals = start_groups(
        samples, tokenizer, image_processor, family, num_generations, cfg, prompts.system,
        lambda s: prompts.user.format(question=s.question, choices=format_choices(s.options)))
    first = fork(trajs[0])  # kept at its first prompt, for a rank out of chunks
    for part in chunks(model, range(len(trajs)), cfg.rollout_batch_size, num_generations):
        part = part or []  # None: a rank out of chunks joins the others' rounds with a stand-in
        tool_episodes(model, tokenizer, image_processor, [trajs[i] for i in part], [originals[i] for i in part],
                      cfg, prompts, stand_in=fork(first))
    release_cache()
    return trajs


def tool_episodes(model, tokenizer, image_processor, trajs, originals, cfg, prompts, stand_in):
    """Every round of the episodes `trajs` (one chunk, at their first prompt). Each round generates one assistant
    turn for the episodes still going, continuing from the last round's KV cache with their rows selected
    (`TurnCache.select`): its prefill encodes only the closing of the last turn, the tool's response and its crop
    (a family with a recurrent cache encodes the whole conversations: `generation.continues_from_cache`).

    A sharded model's generate is collective: the ranks agree every round whether any episode goes on, and a rank
    with none going runs a stand-in conversation instead, discarded: `stand_in` (a first prompt) when it has no
    episodes, else a copy of its last episode that gets an error turn each round. So every rank makes the same
    calls, whatever round its own episodes end in."""
    original_of = {id(t): original for t, original in zip(trajs, originals)}  # stand-ins have none
    batch, turn = list(trajs) or [stand_in], None  # the conversations of the cache's rows
    while rounds_left(model, sum(id(t) in original_of for t in batch)):
        room = {id(t): cfg.max_response_tokens - sum(t.loss_mask) for t in batch if id(t) in original_of}
        max_new_tokens = min(cfg.max_new_tokens_per_turn, max(room.values(), default=1))
        outs, turn = generate_for(model, tokenizer, batch, max_new_tokens, cfg, stop_pattern=TOOL_TURN_END, after=turn)
        going = []
        for row, (traj, (sampled, logprobs)) in enumerate(zip(batch, outs)):
            keep = room.get(id(traj), len(sampled))
            append_sampled(traj, sampled[:keep], logprobs[:keep], tokenizer)
            if id(traj) not in original_of:  # a stand-in goes on
                append_user_turn(traj, tokenizer, image_processor, [prompts.error.format(error="stand-in")])
            elif not tool_step(traj, original_of[id(traj)], tokenizer, image_processor, cfg, prompts):
                continue
            going.append(row)
        if not going and is_sharded(model):  # in case other ranks go on
            batch, going = [fork(batch[0])], [0]
            append_user_turn(batch[0], tokenizer, image_processor, [prompts.error.format(error="stand-in")])
        batch, turn = [batch[row] for row in going], turn.select(going)


def rounds_left(model, going):
    """Whether a round follows: an episode here goes on, or (sharded) on any rank."""
    return int(max_over_ranks(going)) > 0 if is_sharded(model) else going > 0


# ---------------------------------------------------------------------------------------------------------------
# One turn, no tool.

def direct_rollout(model, tokenizer, image_processor, samples, num_generations, cfg):
    """One turn of up to `cfg.max_new_tokens` per sample from the global view alone, no crop (each image under the
    global budget, after its `global_size` when it has one): the evaluation baseline (greedy) and the direct
    baseline's GRPO (train_mgpo.py --direct; sampled at cfg.temperature, `num_generations` per sample); in chunks of
    `cfg.rollout_batch_size`."""
    trajs, _ = start_groups(
        samples, tokenizer, image_processor, family_of(model.config), num_generations, cfg, DIRECT_SYSTEM,
        lambda s: DIRECT_PROMPT.format(question=s.question, choices=format_choices(s.options)))
    stand_in = [fork(t) for t in trajs[:1]]  # kept at its first prompt, for a rank out of chunks
    for part in chunks(model, trajs, cfg.rollout_batch_size, num_generations):  # None: a stand-in, discarded
        batch = shared_prompt_batch(model, tokenizer, part or stand_in)
        outs = generate_turn(model, tokenizer, batch, cfg.max_new_tokens, temperature=cfg.temperature,
                             do_sample=cfg.do_sample)[0]  # its cache freed here
        for traj, (sampled, logprobs) in zip(part or [], outs):
            append_sampled(traj, sampled, logprobs, tokenizer)
    release_cache()
    return trajs


def direct_answers(model, tokenizer, image_processor, items, cfg, max_new_tokens):
    """Greedy one-turn answers to [(sample, (w, h)), ...], each sample's image first brought to size (w, h)."""
    shown = [replace(sample, global_size=list(size)) for sample, size in items]
    greedy = replace(cfg, do_sample=False, max_new_tokens=max_new_tokens)
    return [t.texts[-1] for t in direct_rollout(model, tokenizer, image_processor, shown, 1, greedy)]
