"""A tiny BASE model for the CPU demo of MGPO: it plays the part of a pretrained VLM that follows the formats, can
read a clear crop and can box a named object, but has no trained sense of where to look for the question.

    python -m demo.make_base                 # writes demo/checkpoints/tiny-base (committed; ~70 minutes, 1 thread)
    python train_mgpo.py                     # the demo: MGPO from that base (README, "Quick start")

Supervised fine-tuning (plain PyTorch, CPU) of a freshly built tiny Qwen2.5-VL, with the loss on assistant tokens
only, in four phases: 1. reading a pattern from a crop, and pointing at the red frame; 2. the MGPO, tool and direct
formats, turn 1 naming a place drawn at random whatever the question; 3. the vision tower alone; 4. the turn-2
readout. Each phase's design and why, the model's shape, the measurements of the committed checkpoint and what did
not work: docs/demo.md, "How the base was built (make_base.py)".
"""

import math
import random
import time
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import torch
from tokenizers import AddedToken
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from config import opt, parse_config
from crop import coverage, resize_for_model, to_original
from chat import encode_images, encode_prompt
from data import format_choices, load_image
from family import QWEN2_5_VL
from generation import collate
from grpo import training_batch
from model import save_policy
from prompts import DIRECT_PROMPT, DIRECT_SYSTEM, MGPO_PROMPTS, TOOL_PROMPTS
from rollout import Trajectory, append_sampled, append_user_turn, cut_crop, start_groups
from demo.synthetic import synthetic_samples
from demo.tiny import (SPECIAL_TOKENS, TINY_BASE, TINY_MAX_PIXELS, TINY_MIN_PIXELS, build_tiny_tokenizer,
                  write_prompt_fingerprint)


@dataclass
class Config:
    output_dir: str = opt(TINY_BASE, "demo/checkpoints/tiny-base next to this file")
    seed: int = opt(0, "weights, examples, batches: same seed, same checkpoint")
    data_seed: int = opt(4242, "synthetic images of the SFT set (train_mgpo uses 0, eval 1000003)")
    num_images: int = opt(1200, "synthetic images; each gives `convs_per_image` conversations")
    convs_per_image: int = opt(2, "conversations per synthetic image")
    tool_fraction: float = opt(0.25, "share of conversations in the tool-call template (the rest MGPO)")
    direct_fraction: float = opt(0.15, "images that also get a direct conversation (the direct baseline's: one turn)")
    box_sides: str = opt("42,56", "sides of the turn-1 boxes, global-view pixels (1.5-2x a frame)")
    box_grid: int = opt(14, "their positions are multiples of this (half a visual token)")
    global_max_pixels: int = opt(TINY_MAX_PIXELS, "224 x 224: 64 visual tokens, the pattern averages to grey")
    crop_max_pixels: int = opt(TINY_MAX_PIXELS, "a 56-px box is 224 original px, shown at full resolution")
    min_pixels: ClassVar[int] = TINY_MIN_PIXELS  # not an option: the tiny image processor's floor, one visual token
    # phase 1, reading
    read_images: int = opt(500, "synthetic images (seed data_seed + 1); each gives `read_crops_per_image`")
    read_crops_per_image: int = opt(4, "reading examples per image")
    read_crop_sides: str = opt("112,224", "crop side range in original pixels (always holding the whole target)")
    point_images: int = opt(2400, "pointing examples (phase 1, and mixed into phase 2)")
    tool_pointing: int = opt(0, "the same asked in the tool-call template (images of seed data_seed + 4)")
    read_steps: int = opt(1200, "phase-1 optimizer steps")
    read_held_out: int = opt(25, "images (seed data_seed + 3) whose crops measure reading after each phase")
    read_batch_size: int = opt(32, "phase-1 batch size")
    read_learning_rate: float = opt(3e-3, "phase-1 learning rate")
    # phase 2, formats
    mix_reading: int = opt(800, "phase-1 examples mixed into the phase-2 set (own batches) to keep reading")
    mix_pointing: int = opt(800, "the same for pointing")
    mix_tool_pointing: int = opt(0, "the same for pointing in the tool-call template")
    steps: int = opt(800, "optimizer steps (about 1/4 of them on the mixed-in reading examples)")
    batch_size: int = opt(16, "phase-2 batch size")
    learning_rate: float = opt(1e-3, "phase-2 learning rate")
    # phase 3, reading again with the language model frozen (batch size read_batch_size)
    vision_steps: int = opt(3000, "phase-3 optimizer steps")
    vision_learning_rate: float = opt(1e-3, "phase-3 learning rate")
    vision_convs: int = opt(1600, "phase-2 conversations mixed in, so that turn 1 reads the image as before")
    # phase 4, phase 2's data again (fresh conversations) for the whole model, so turn 2 follows the vision tower
    readout_steps: int = opt(300, "phase-4 optimizer steps")
    readout_learning_rate: float = opt(1e-4, "phase-4 learning rate")
    warmup_steps: int = opt(30, "linear warm-up steps of each phase")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "gradient norm clip")
    # model shape (text hidden size = vision out_hidden_size)
    hidden_size: int = opt(96, "text hidden size (= the vision tower's out_hidden_size)")
    intermediate_size: int = opt(192, "text MLP width")
    num_layers: int = opt(3, "decoder layers")
    num_heads: int = opt(3, "head_dim = hidden_size / num_heads")
    num_kv_heads: int = opt(1, "key/value heads")
    rope_theta: float = opt(500.0, "rotary base")
    mrope_section: str = opt("1,3,12", "temporal, height, width; sums to head_dim / 2")
    vision_hidden_size: int = opt(64, "vision tower width")
    vision_depth: int = opt(2, "vision blocks")
    log_every: int = opt(25, "print the loss every N steps")
    num_threads: int = opt(1, "torch threads; 1 is fastest on a small shared CPU (see the report)")


# ---------------------------------------------------------------------------------------------------------------
# The model

def build_model(cfg, tokenizer):
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vision = dict(depth=cfg.vision_depth, hidden_size=cfg.vision_hidden_size,
                  intermediate_size=2 * cfg.vision_hidden_size, num_heads=2, out_hidden_size=cfg.hidden_size,
                  fullatt_block_indexes=[cfg.vision_depth - 1], window_size=112, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, tokens_per_second=2)
    section = [int(v) for v in cfg.mrope_section.split(",")]
    assert sum(section) * 2 == cfg.hidden_size // cfg.num_heads, "mrope_section must sum to head_dim / 2"
    text = dict(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=8192, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta, "mrope_section": section},
                vocab_size=len(tokenizer), bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=ids["<|image_pad|>"],
                              video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                              vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True)
    torch.manual_seed(cfg.seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return model


# ---------------------------------------------------------------------------------------------------------------
# Assistant turns as ids

def build_base_tokenizer():
    """The tiny tokenizer plus one token per coordinate 0..MAX_COORDINATE, so a box coordinate is one decision."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens([AddedToken(str(n), normalized=False, special=False) for n in range(MAX_COORDINATE + 1)])
    return tokenizer


def text_ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def box_ids(tokenizer, box):
    """'x1, y1, x2, y2', each number one token: [0, 112, 84, 196] -> '0' ',' ' ' '112' ',' ' ' '84' ',' ' ' '196'."""
    space = tokenizer.convert_tokens_to_ids("\u0120")  # the byte-level BPE's space
    ids = tokenizer.convert_tokens_to_ids([str(int(box[0]))])
    for v in box[1:]:
        ids += text_ids(tokenizer, ",") + [space] + tokenizer.convert_tokens_to_ids([str(int(v))])
    return ids


def said(place):
    """How turn 1 names its place: "the red frame", "in the top half". The word after "is" (" the" one time in five,
    " in" four times) keeps the base's greedy turn 1 off the red frame."""
    return f"the {place}" if place == PLACES[0] else f"in the {place}"


def mgpo_turn1_ids(tokenizer, box, place):
    return (text_ids(tokenizer, f'The key area is {said(place)}:\n```json\n[{{"bbox_2d": [')
            + box_ids(tokenizer, box) + text_ids(tokenizer, f'], "label": "{place}"}}]\n```'))


def tool_turn1_ids(tokenizer, box, place):
    return (text_ids(tokenizer, f'<think>The key area is {said(place)}.</think>\n<tool_call>{{"name": '
                                '"image_zoom_in_tool", "arguments": {"bbox_2d": [') + box_ids(tokenizer, box)
            + text_ids(tokenizer, "]}}</tool_call>"))


def mgpo_turn2_ids(tokenizer, answer):
    return text_ids(tokenizer, f"\\boxed{{{answer}}}") + [tokenizer.eos_token_id]


def tool_turn2_ids(tokenizer, answer):
    return text_ids(tokenizer, f"<answer>{answer}</answer>")  # the tool loop stops at </answer>


# ---------------------------------------------------------------------------------------------------------------
# Boxes

def grid_boxes(cfg, size):
    """Every square of a side in box_sides, on the box_grid, inside a (w, h) global view."""
    w, h = size
    return [[x, y, x + side, y + side] for side in (int(v) for v in cfg.box_sides.split(","))
            for y in range(0, h - side + 1, cfg.box_grid) for x in range(0, w - side + 1, cfg.box_grid)]


def holds(traj, box, frame_box):
    """Whether the crop of `box` (global-view pixels) holds the whole `frame_box` (original pixels)."""
    return coverage(to_original(box, traj.input_size, traj.original_size), frame_box) >= 1.0


def holding_boxes(cfg, traj, frame_box):
    """The grid boxes whose crop holds the whole `frame_box`."""
    return [box for box in grid_boxes(cfg, traj.input_size) if holds(traj, box, frame_box)]


def half_boxes(cfg, traj, half):
    """The grid boxes inside one half of the global view: "top", "bottom", "left" or "right"."""
    w, h = traj.input_size
    inside = {"top": lambda b: b[3] <= h // 2, "bottom": lambda b: b[1] >= h // 2,
              "left": lambda b: b[2] <= w // 2, "right": lambda b: b[0] >= w // 2}[half]
    return [b for b in grid_boxes(cfg, traj.input_size) if inside(b)]


def on_distractors(traj, boxes):
    """Those of `boxes` whose crop holds a whole frame other than the red one."""
    frames = traj.sample.meta["frames"][1:]
    return [b for b in boxes if any(holds(traj, b, f["box"]) for f in frames)]


def pattern_in(traj, box, rng):
    """The pattern of the frame the box's crop holds whole, else a random option (the base guesses)."""
    held = [f["pattern"] for f in traj.sample.meta["frames"] if holds(traj, box, f["box"])]
    return held[0] if held else rng.choice(traj.sample.options)


def settle(traj):
    """Keep what SFT reads (ids, loss mask, model-sized images). The 896 x 896 canvas (2.4 MB a sample) and the
    pixel values, recomputed per batch, would hold about 11 GB over the ~7,000 examples (2.8 GB peak without them)."""
    traj.pixel_values = None
    traj.sample = replace(traj.sample, image=None)
    return traj


# ---------------------------------------------------------------------------------------------------------------
# Phase 1: reading

READ_SYSTEM = "You are a helpful assistant."
# Pointing is asked in MGPO's own chat format, as a pretrained VLM's grounding would be: the same system prompt and
# turn-1 instruction, with a question that asks where the frame is instead of what is inside it
POINT_QUESTION = "Where is the red frame?"
# What turn 1 of the base names and boxes, uniformly, whatever the question: the red frame (the target, boxed as in
# pointing) or a half of the image (a box in it; make_conversations says which)
PLACES = ("red frame", "top half", "bottom half", "left half", "right half")
MAX_COORDINATE = math.isqrt(TINY_MAX_PIXELS)  # 224: the synthetic (square) global view fills the tiny pixel budget
READ_QUESTION = "Pattern?"


def reading_crop(frame, original, side, rng):
    """A `side` x `side` square of the original holding the whole frame at a random place, as (box, image)."""
    x1, y1, x2, y2 = frame["box"]
    width, height = original.size
    side = max(side, math.ceil(max(x2 - x1, y2 - y1)))
    left = rng.randint(max(0, math.ceil(x2) - side), min(int(x1), width - side))
    top = rng.randint(max(0, math.ceil(y2) - side), min(int(y1), height - side))
    box = [left, top, left + side, top + side]
    return box, original.crop(box)


def make_reading_examples(cfg, tokenizer, image_processor, rng, num_images=None, seed=None):
    """Single-turn "[crop] Pattern?" -> "<pattern>" examples (loss on the answer), several crops per image, each
    around a frame of any colour."""
    low, high = (int(v) for v in cfg.read_crop_sides.split(","))
    seed = cfg.data_seed + 1 if seed is None else seed
    examples = []
    for sample in synthetic_samples(cfg.read_images if num_images is None else num_images, seed):
        original = load_image(sample)
        for _ in range(cfg.read_crops_per_image):
            frame = rng.choice(sample.meta["frames"])
            box, region = reading_crop(frame, original, rng.randint(low, high), rng)
            crop = resize_for_model(region, cfg.min_pixels, cfg.crop_max_pixels, QWEN2_5_VL.factor)
            _, grids = encode_images(image_processor, [crop])
            ids = encode_prompt(tokenizer, QWEN2_5_VL, READ_SYSTEM, [crop, READ_QUESTION], grids)
            traj = Trajectory(sample=sample, family=QWEN2_5_VL, input_ids=ids, loss_mask=[0] * len(ids),
                              rollout_logprobs=[0.0] * len(ids), images=[crop], pixel_values=None,
                              image_grid_thw=grids, crop_boxes=[box])
            answer = text_ids(tokenizer, frame["pattern"]) + [tokenizer.eos_token_id]
            append_sampled(traj, answer, [0.0] * len(answer), tokenizer)
            examples.append(settle(traj))
    return examples


def reading_accuracy(model, tokenizer, image_processor, examples):
    """Share of reading examples whose greedy answer is their pattern: how far the one skill RL cannot teach got."""
    right = 0
    for traj in examples:
        prompt = len(traj.input_ids) - sum(traj.loss_mask)
        pixel_values, grids = encode_images(image_processor, traj.images)
        batch = collate([traj.input_ids[:prompt]], [pixel_values], [grids], tokenizer.pad_token_id,
                        model.config.image_token_id, left_pad=True)
        out = model.generate(**batch, max_new_tokens=8, do_sample=False)
        right += out[0, prompt:].tolist()[:sum(traj.loss_mask)] == traj.input_ids[prompt:]
    return right / len(examples)


def make_pointing_examples(cfg, tokenizer, image_processor, rng, tool=False):
    """Single-turn "[global view] Where is the red frame? ..." -> 'The key area is the red frame:
    ```json [{"bbox_2d": [...], ...}] ```' with a random grid box that holds the whole red frame: the grounding a
    pretrained VLM brings (it boxes a named object when asked). With `tool`, asked in the tool-call template with a
    sample's options, so that as many tokens lie between the global view and the answer as in a tool conversation
    (the model boxes by attending at a learned token distance), and answered with its turn 1:
    '<think>The key area is the red frame.</think>\n<tool_call>...'."""
    if tool:
        count, seed, system, turn1, end = cfg.tool_pointing, cfg.data_seed + 4, TOOL_PROMPTS.system, tool_turn1_ids, []
        text = lambda s: TOOL_PROMPTS.user.format(question=POINT_QUESTION, choices=format_choices(s.options))
    else:
        count, seed, system, turn1 = cfg.point_images, cfg.data_seed + 2, MGPO_PROMPTS.system, mgpo_turn1_ids
        text, end = lambda s: MGPO_PROMPTS.turn1.format(question=POINT_QUESTION), [tokenizer.eos_token_id]
    examples = []
    for sample in synthetic_samples(count, seed):
        (traj,), _ = start_groups([sample], tokenizer, image_processor, QWEN2_5_VL, 1, cfg, system, text)
        answer = turn1(tokenizer, rng.choice(holding_boxes(cfg, traj, sample.boxes[0])), PLACES[0]) + end
        append_sampled(traj, answer, [0.0] * len(answer), tokenizer)
        examples.append(settle(traj))
    return examples


# ---------------------------------------------------------------------------------------------------------------
# Phase 2: the format conversations

def direct_conversation(sample, tokenizer, image_processor, rng, cfg):
    """The one-turn format of rollout.direct_rollout, answered with a random option: the global view alone does
    not show the pattern. Single-turn GRPO, the paper's baseline, starts from this."""
    text = DIRECT_PROMPT.format(question=sample.question, choices=format_choices(sample.options))
    (traj,), _ = start_groups([sample], tokenizer, image_processor, QWEN2_5_VL, 1, cfg, DIRECT_SYSTEM, lambda s: text)
    answer = mgpo_turn2_ids(tokenizer, rng.choice(sample.options))
    append_sampled(traj, answer, [0.0] * len(answer), tokenizer)
    return settle(traj)


def make_conversations(cfg, tokenizer, image_processor, rng):
    """Token-id conversations (rollout.Trajectory) with loss_mask 1 on the assistant turns; pixel values are
    dropped (recomputed per batch from traj.images) to keep memory small. Turn 1 names one of PLACES at random,
    whatever the question asks, and boxes it; the crop of that box comes back; turn 2 names the pattern of the
    frame in the crop, or guesses. Returns (conversations, how many named the red frame, the target)."""
    samples = synthetic_samples(cfg.num_images, cfg.data_seed)
    convs, hits_made = [], 0
    for sample in samples:
        if rng.random() < cfg.direct_fraction:
            convs.append(direct_conversation(sample, tokenizer, image_processor, rng, cfg))
        for _ in range(cfg.convs_per_image):
            tool = rng.random() < cfg.tool_fraction
            if tool:
                text = TOOL_PROMPTS.user.format(question=sample.question, choices=format_choices(sample.options))
                system = TOOL_PROMPTS.system
            else:
                text, system = MGPO_PROMPTS.turn1.format(question=sample.question), MGPO_PROMPTS.system
            (traj,), (original,) = start_groups([sample], tokenizer, image_processor, QWEN2_5_VL, 1, cfg, system,
                                                lambda s: text)
            place = rng.choice(PLACES)  # independent of the question: no sense of where to look
            if place == PLACES[0]:
                box = rng.choice(holding_boxes(cfg, traj, sample.boxes[0]))
            else:  # on a distractor frame when that half has one, so that turn 2 is mostly reading, rarely a guess
                boxes = half_boxes(cfg, traj, place.removesuffix(" half"))
                box = rng.choice(on_distractors(traj, boxes) or boxes)
            hits_made += place == PLACES[0]
            turn1 = (tool_turn1_ids if tool else mgpo_turn1_ids)(tokenizer, box, place)
            append_sampled(traj, turn1, [0.0] * len(turn1), tokenizer)
            crop = cut_crop(traj, original, box, cfg)
            if tool:
                parts = [TOOL_PROMPTS.crop_before, crop, TOOL_PROMPTS.crop_after]
            else:
                question = MGPO_PROMPTS.turn2.format(question=sample.question,
                                                     choices=format_choices(sample.options))
                parts = [MGPO_PROMPTS.crop_intro, crop, question]
            append_user_turn(traj, tokenizer, image_processor, parts)
            # the answer is the option's text, which the rewards accept (answers.extract_choice): naming what the crop
            # shows needs no lookup of the shuffled letter, which the tiny model did not learn in 400 steps
            turn2 = (tool_turn2_ids if tool else mgpo_turn2_ids)(tokenizer, pattern_in(traj, box, rng))
            append_sampled(traj, turn2, [0.0] * len(turn2), tokenizer)
            convs.append(settle(traj))
    return convs, hits_made


def sft_loss(model, batch, loss_mask):
    """Token-mean cross-entropy on the assistant tokens; position t's hidden state predicts token t+1. The LM head
    only runs on the rows that predict an assistant token (a few percent of the conversation)."""
    hidden = model.model(**batch, use_cache=False).last_hidden_state[:, :-1]
    rows = loss_mask[:, 1:] > 0
    logits = model.lm_head(hidden[rows]).float()
    return torch.nn.functional.cross_entropy(logits, batch["input_ids"][:, 1:][rows])


def with_pixels(convs, image_processor):
    for traj in convs:
        traj.pixel_values = encode_images(image_processor, traj.images)[0]
    return convs


def template_batches(convs, batch_size, rng):
    """Endless batches, each of one template (similar lengths, little padding), in a fresh order every epoch."""
    kinds = {}
    for i, traj in enumerate(convs):
        kinds.setdefault((len(traj.texts), traj.texts[0][:8]), []).append(i)  # one template (or answer) per batch
    if all(len(ids) < batch_size for ids in kinds.values()):
        raise ValueError(f"no template has batch_size={batch_size} examples: lower the batch size or add examples")
    while True:
        batches = []
        for ids in kinds.values():
            ids = rng.sample(ids, len(ids))
            batches += [ids[k:k + batch_size] for k in range(0, len(ids) - batch_size + 1, batch_size)]
        for b in rng.sample(batches, len(batches)):
            yield [convs[i] for i in b]


def sft(cfg, model, tokenizer, image_processor, convs, rng, steps, batch_size, learning_rate, log=print, name=""):
    """AdamW with linear warm-up and cosine decay over `steps` batches of `convs`; frozen parameters stay frozen."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=cfg.weight_decay)
    schedule = lambda step: min(1.0, (step + 1) / max(cfg.warmup_steps, 1)) * 0.5 * (
        1 + math.cos(math.pi * step / max(steps, 1)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    start, running = time.time(), []
    stream = template_batches(convs, batch_size, rng)
    model.train()
    for step in range(steps):
        micro = next(stream)
        batch, mask = training_batch(with_pixels(micro, image_processor), tokenizer, model.config.image_token_id,
                                     torch.device("cpu"), torch.float32)
        for traj in micro:
            traj.pixel_values = None
        loss = sft_loss(model, batch, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        running.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
            log(f"{name}step {step + 1}/{steps} loss {np.mean(running):.4f} lr {scheduler.get_last_lr()[0]:.2e} "
                f"{time.time() - start:.0f}s")
            running = []
    model.eval()
    return model


def freeze_language_model(model):
    """Leave only the vision tower (patch embedding, blocks, merger) trainable: phase 3 changes what the model sees,
    not what it writes."""
    for name, p in model.named_parameters():
        p.requires_grad = ".visual." in name
    return model


def make_base(cfg, log=print):
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    tokenizer = build_base_tokenizer()
    image_processor = Qwen2VLImageProcessorPil(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS)
    model = build_model(cfg, tokenizer)
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    torch.manual_seed(cfg.seed)
    start = time.time()
    reading = make_reading_examples(cfg, tokenizer, image_processor, rng)
    pointing = make_pointing_examples(cfg, tokenizer, image_processor, rng)
    tool_pointing = make_pointing_examples(cfg, tokenizer, image_processor, rng, tool=True)
    # their own random stream, so that measuring does not change the checkpoint
    held_out = make_reading_examples(cfg, tokenizer, image_processor, random.Random(cfg.seed + 1),
                                     num_images=cfg.read_held_out, seed=cfg.data_seed + 3)
    reads = lambda: f"held-out reading accuracy {reading_accuracy(model, tokenizer, image_processor, held_out):.2f}"
    log(f"phase 1: {len(reading)} reading examples ({np.mean([len(t.input_ids) for t in reading]):.0f} tokens), "
        f"{len(pointing)} pointing examples ({np.mean([len(t.input_ids) for t in pointing]):.0f} tokens) and "
        f"{len(tool_pointing)} in the tool-call template, "
        f"built in {time.time() - start:.0f}s")
    sft(cfg, model, tokenizer, image_processor, reading + pointing + tool_pointing, rng, cfg.read_steps,
        cfg.read_batch_size, cfg.read_learning_rate, log, name="reading+pointing ")
    log(f"phase 1: {reads()}")
    start = time.time()
    convs, hits = make_conversations(cfg, tokenizer, image_processor, rng)
    log(f"phase 2: {len(convs)} conversations ({hits} boxing the red frame, the target), "
        f"{np.mean([len(t.input_ids) for t in convs]):.0f} tokens each, built in {time.time() - start:.0f}s")
    mixed = reading[:cfg.mix_reading] + pointing[:cfg.mix_pointing] + tool_pointing[:cfg.mix_tool_pointing]
    log(f"phase 2: {cfg.mix_reading} reading, {cfg.mix_pointing} pointing and {cfg.mix_tool_pointing} tool-template "
        f"pointing examples mixed in")
    del pointing, tool_pointing
    sft(cfg, model, tokenizer, image_processor, convs + mixed, rng, cfg.steps, cfg.batch_size, cfg.learning_rate, log,
        name="formats ")
    log(f"phase 2: {reads()}")
    # phases 3 and 4 shuffle (and phase 4 draws its conversations) from streams of their own, not from `rng`
    # after phase 2: how phase 2 consumed it does not change them
    sft(cfg, freeze_language_model(model), tokenizer, image_processor, reading + convs[:cfg.vision_convs],
        random.Random(cfg.seed + 2), cfg.vision_steps, cfg.read_batch_size, cfg.vision_learning_rate, log,
        name="vision tower ")
    log(f"phase 3: {reads()}")
    convs, _ = make_conversations(cfg, tokenizer, image_processor, random.Random(cfg.seed + 3))
    sft(cfg, model.requires_grad_(True), tokenizer, image_processor, convs + mixed, random.Random(cfg.seed + 4),
        cfg.readout_steps, cfg.batch_size, cfg.readout_learning_rate, log, name="readout ")
    log(f"phase 4: {reads()}")
    save_policy(model, tokenizer, image_processor, cfg.output_dir)
    write_prompt_fingerprint(cfg.output_dir)  # tiny.resolve_model_path checks it against the prompts of the day
    log(f"saved {cfg.output_dir}")
    return cfg.output_dir


if __name__ == "__main__":
    config = parse_config(Config, description=__doc__)
    if config.num_threads > 0:
        # tiny ops: with 2 threads on 2 busy cores, one small attention call takes ~1 ms instead of ~30 us
        torch.set_num_threads(config.num_threads)
    make_base(config)
