"""Token ids of conversation pieces through the checkpoint's own chat template: the first prompt, a later user turn,
the closing of an assistant turn, and the pixels of the images they show.

The template writes one image placeholder per image (`Family.image_pad`); the model expects as many as the image has
visual tokens (`Family.tokens_per_image`), so the rendered text is expanded before it is tokenized, as the HF
processor does. The rollout (rollout.py) appends these ids to what the model sampled, never re-encoding a turn."""

import functools

import torch
from PIL import Image


def expand_image_pads(text, grids, family):
    """Replace the i-th image placeholder by as many copies as image i has visual tokens, as Qwen's processor
    does. Qwen2.5-VL, one image of grid [1, 16, 24]: one placeholder becomes 16 * 24 / 2**2 = 96."""
    pieces = text.split(family.image_pad)
    assert len(pieces) == len(grids) + 1, f"{len(pieces) - 1} image placeholders for {len(grids)} images"
    out = pieces[0]
    for grid, piece in zip(grids, pieces[1:]):
        out += family.image_pad * family.tokens_per_image(grid) + piece
    return out


def user_content(parts):
    """Chat-template content from a list of str (text) and PIL images, in order."""
    return [{"type": "image"} if isinstance(p, Image.Image) else {"type": "text", "text": p} for p in parts]


THINKING = ("template", "on", "off")
SWITCH = "{%- set enable_thinking = "  # what with_thinking puts before a template


def with_thinking(template, thinking, model):
    """The chat template with its `enable_thinking` switch fixed for the whole run, so that every piece the rollout
    renders (first prompt, later user turns, closings) and the saved checkpoint agree: 'template' leaves it as
    shipped. E.g. Qwen3.5's, 'off': each generation prompt ends '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n'
    instead of '...<think>\\n'. A template without the switch (Qwen2.5-VL, both Qwen3-VL) stops the run. A checkpoint
    this code saved (resumed, evaluated) has its switch replaced, not stacked."""
    if thinking == "template":
        return template
    if "enable_thinking" not in template:
        raise SystemExit(f"error: --thinking {thinking}: the chat template of --model {model!r} has no enable_thinking "
                         f"switch; use --thinking template")
    shipped = template.split(" %}", 1)[1] if template.startswith(SWITCH) else template
    return SWITCH + ("true" if thinking == "on" else "false") + " %}" + shipped


def encode_prompt(tokenizer, family, system, parts, grids):
    """Ids of system + first user turn + the assistant header, with image placeholders expanded."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user_content(parts)}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(expand_image_pads(text, grids, family), add_special_tokens=False)["input_ids"]


# An assistant turn's content in the renderings below: text no template writes itself or rewrites (no whitespace
# to trim, no <think> tags to split), so that where it ends in a rendering is unambiguous.
TURN = "\x00turn\x00"
# A conversation that ends with such a turn. The user query is there because some templates refuse a conversation
# without one (Qwen3.5: "No user query found in messages.").
HEAD = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": TURN}]


def after_turn(tokenizer, messages, **kwargs):
    """The chat template's text after the content of HEAD's assistant turn, with `messages` following it.
    E.g. Qwen's templates, messages=[]: '<|im_end|>\\n'."""
    text = tokenizer.apply_chat_template(HEAD + messages, tokenize=False, **kwargs)
    if text.count(TURN) != 1:
        raise ValueError("the checkpoint's chat template does not write an assistant turn's content as given, so the "
                         "rollout cannot tell where a sampled turn ends in its renderings")
    return text.split(TURN)[1]


@functools.lru_cache(maxsize=16)
def closing(tokenizer, template):
    """The chat template's closing of an assistant turn (Qwen's '<|im_end|>\\n'): rendered once per tokenizer and
    template (the rollout asks for it twice per turn of every trajectory), `template` keying a changed one anew."""
    return after_turn(tokenizer, [])


def encode_user_turn(tokenizer, family, parts, grids):
    """Ids of a later user turn plus the next assistant header, cut from the chat template's own rendering of
    [..., assistant, user]: what follows the assistant turn's closing (`close_assistant_turn`). E.g. for Qwen2.5-VL:
    '<|im_start|>user\\n', the family's vision start, the image's placeholders, vision end, then
    'text<|im_end|>\\n<|im_start|>assistant\\n' (Qwen3.5 and Qwen3-VL-Thinking add '<think>\\n').

    The cut is taken after the turn, not as the difference of two whole renderings: thinking templates write the
    last assistant turn with a (possibly empty) <think> block and earlier ones without, so a conversation renders
    differently once a turn is added. The rollout keeps the sampled ids as they are either way."""
    end = closing(tokenizer, tokenizer.chat_template)
    after = after_turn(tokenizer, [{"role": "user", "content": user_content(parts)}], add_generation_prompt=True)
    if not after.startswith(end):
        raise ValueError(f"the checkpoint's chat template ends an assistant turn with {end!r} when it is the last "
                         f"one but with {after[:len(end)]!r} when a user turn follows; the rollout appends turns "
                         f"to sampled ids and needs one closing")
    return tokenizer(expand_image_pads(after[len(end):], grids, family), add_special_tokens=False)["input_ids"]


def close_assistant_turn(tokenizer, sampled):
    """Ids that end an assistant turn the way the chat template does (Qwen's: '<|im_end|>\\n'), read from the
    template itself rather than from tokenizer.eos_token, which a checkpoint may set to <|endoftext|>. The model may
    already have sampled the closing's first token (it stops there): then only the rest. A turn cut by a stop string
    or the length limit, or ended by another of the checkpoint's end ids (Qwen's <|endoftext|>, kept as sampled),
    gets the whole closing."""
    ids = tokenizer(closing(tokenizer, tokenizer.chat_template), add_special_tokens=False)["input_ids"]
    return ids[1:] if sampled and ids and sampled[-1] == ids[0] else ids


def encode_images(image_processor, images):
    """(list of per-image pixel_values, image_grid_thw [n, 3]) for model-input images, already resized by
    `crop.resize_for_model` (sides multiples of the family's factor, which is the processor's patch x merge). The
    processor must not resize them again: its own max_pixels may be below the run's pixel budget, and boxes are
    read in the frame of the image we resized.
    E.g. a 448 x 448 global view (budget 256 tokens) with a processor capped at 224 x 224 -> grid [1, 32, 32]."""
    factor = image_processor.patch_size * image_processor.merge_size
    for image in images:
        if image.width % factor or image.height % factor:
            raise ValueError(f"image of {image.width} x {image.height} px: sides must be multiples of {factor} "
                             f"(resize it with crop.resize_for_model first)")
    out = image_processor(images=images, do_resize=False, return_tensors="pt")
    sizes = out["image_grid_thw"].prod(-1).tolist()
    return list(torch.split(out["pixel_values"], sizes)), out["image_grid_thw"]
