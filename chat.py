"""Token ids of conversation pieces through the checkpoint's own chat template: the first prompt, a later user turn,
the closing of an assistant turn, and the pixels of the images they show.

The template writes one image placeholder per image (`Family.image_pad`); the model expects as many as the image has
visual tokens (`Family.tokens_per_image`), so the rendered text is expanded before it is tokenized, as the HF
processor does. The rollout (rollout.py) appends these ids to what the model sampled, never re-encoding a turn."""

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


def encode_prompt(tokenizer, family, system, parts, grids):
    """Ids of system + first user turn + the assistant header, with image placeholders expanded."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user_content(parts)}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(expand_image_pads(text, grids, family), add_special_tokens=False)["input_ids"]


def encode_user_turn(tokenizer, family, parts, grids):
    """Ids of a later user turn plus the next assistant header, cut from the chat template's own rendering:
    the rendering of [..., assistant, user] minus that of [..., assistant]. E.g. for Qwen2.5-VL:
    '<|im_start|>user\\n', the family's vision start, the image's placeholders, vision end, then
    'text<|im_end|>\\n<|im_start|>assistant\\n'."""
    head = [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]
    before = tokenizer.apply_chat_template(head, tokenize=False)
    after = tokenizer.apply_chat_template(head + [{"role": "user", "content": user_content(parts)}],
                                          add_generation_prompt=True, tokenize=False)
    assert after.startswith(before), "chat template renders a prefix differently once a turn is added"
    return tokenizer(expand_image_pads(after[len(before):], grids, family), add_special_tokens=False)["input_ids"]


def close_assistant_turn(tokenizer, sampled):
    """Ids that end an assistant turn the way the chat template does: '<|im_end|>\\n', of which the model may
    already have sampled the '<|im_end|>' (it stops there); a turn cut by a stop string or the length limit, or
    ended by another of the checkpoint's end ids (Qwen's <|endoftext|>, kept as sampled), gets the whole closing."""
    text = "\n" if sampled and sampled[-1] == tokenizer.eos_token_id else tokenizer.eos_token + "\n"
    return tokenizer(text, add_special_tokens=False)["input_ids"]


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
