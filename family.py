"""Everything that depends on the model family, in one place: a frozen `Family` record per family and
`family_of(config)`, which picks one from a checkpoint's `config.model_type`.

Adding a family means adding one instance here (and its tests): the rest of the code reads the family's fields
instead of naming Qwen2.5-VL's classes, tokens or numbers. What each caller reads:

    model_class, image_processor_class   model.py (load, build on meta), the demo's tiny builder, memory.py
    fsdp_units, vision_tower             model.shard_units (every unit, then the vision tower, then the root)
    image_pad, video_pad, vision_start   rollout: placeholder expansion, the ids generation must never sample
    factor, patch_size, merge_size       crop.smart_resize / resize_for_model, the processor's side check, memory_sizes
    tokens_per_image                     placeholder counts, visual-token metrics
    to_original                          cutting a crop (model frame -> original pixels)
    to_frame                             its inverse: tests draw a box at a known place in the family's frame
    lm_head                              grpo's log-probs (lm_head's weight on the final hidden states)
    language_model                       memory.py (decoder layers on meta); final_norm: tests/test_family.py
    recurrent_cache                      generation.continues_from_cache: re-encode instead of continuing a turn
    frame                                prompts.prompts_for: the recipes' strings ask for boxes in this frame

The image token ids themselves are read from the checkpoint (`config.image_token_id`, ...): a family names the
tokens, the tokenizer numbers them.
"""

from dataclasses import dataclass

from transformers import (Qwen2_5_VLForConditionalGeneration, Qwen3_5ForConditionalGeneration,
                          Qwen3VLForConditionalGeneration)
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLDecoderLayer, Qwen2_5_VLVisionBlock
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5DecoderLayer, Qwen3_5VisionBlock
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextDecoderLayer, Qwen3VLVisionBlock
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from crop import to_original as rescale

RELATIVE_SPAN = 1000  # a 'relative' frame writes boxes in 0..1000 of the image's width and height


@dataclass(frozen=True)
class Family:
    """One model family: its classes, its image tokens, its patching and the frame its boxes are written in.

    frame: 'absolute' = pixels of the resized model input (Qwen2.5-VL), 'relative' = 0..1000 of the image on
    each axis, whatever its size (Qwen3-VL, Qwen3.5). Module paths are for `model.get_submodule`, valid sharded or
    not."""
    name: str
    model_types: tuple                  # config.model_type values that are this family
    model_class: type                   # the HF ...ForConditionalGeneration
    image_processor_class: type
    fsdp_units: tuple                   # module classes each wrapped by fully_shard (decoder layer, vision block)
    patch_size: int                     # ViT patch side in input pixels
    merge_size: int                     # merge_size x merge_size patches become one visual token
    frame: str                          # 'absolute' or 'relative'
    # True when decoder layers keep a recurrent state (Qwen3.5's Gated DeltaNet layers): such a cache cannot be
    # cropped back to a shorter length, and columns fed after a row stopped enter its state even when masked.
    # generation.py (W3, issue 26) reads it to take the path that keeps rollout and training log-probs equal.
    recurrent_cache: bool = False
    image_pad: str = "<|image_pad|>"    # one per visual token
    video_pad: str = "<|video_pad|>"
    vision_start: str = "<|vision_start|>"
    vision_end: str = "<|vision_end|>"
    vision_tower_path: str = "model.visual"
    language_model_path: str = "model.language_model"
    final_norm_path: str = "model.language_model.norm"
    lm_head_path: str = "lm_head"

    @property
    def factor(self):
        """Input sides are multiples of this: one visual token covers factor x factor pixels (Qwen2.5-VL: 14*2=28)."""
        return self.patch_size * self.merge_size

    def tokens_per_image(self, grid_thw):
        """Placeholder tokens of one image: its t*h*w patches over the merge. Qwen2.5-VL, a 448 x 336 (w x h)
        input: grid [1, 24, 32] (336/14, 448/14) = 768 patches -> 768 / 2**2 = 192 tokens."""
        t, h, w = (int(n) for n in grid_thw)
        return t * h * w // self.merge_size ** 2

    def frame_size(self, input_size):
        """(width, height) spanned by the model's box coordinates on an input of `input_size`."""
        return tuple(input_size) if self.frame == "absolute" else (RELATIVE_SPAN, RELATIVE_SPAN)

    def to_original(self, box, input_size, original_size):
        """A box the model wrote on an input of `input_size` -> original-image pixels; sizes are (width, height).
        Absolute, a 448 x 336 input of a 1792 x 1344 original: [112, 84, 224, 168] -> [448, 336, 896, 672].
        Relative, the same image: [250, 250, 500, 500] -> [448, 336, 896, 672].
        With original_size = input_size it gives model-input pixels (for the size checks of `crop.is_valid_box`)."""
        return rescale(box, self.frame_size(input_size), original_size)

    def to_frame(self, box, input_size, original_size):
        """Original-image pixels -> the model's frame: the inverse of `to_original` (e.g. a ground-truth box shown
        to the model). Absolute, 448 x 336 of 1792 x 1344: [448, 336, 896, 672] -> [112, 84, 224, 168]."""
        return rescale(box, original_size, self.frame_size(input_size))

    def input_pixels(self, box, input_size):
        """A box in the model's frame -> pixels of the model input, where `crop.is_valid_box` checks sizes; an
        absolute box is returned as written (not rescaled by 1, which could move it by a rounding error).
        Relative, a 448 x 336 input: [250, 250, 500, 500] -> [112, 84, 224, 168]."""
        return list(box) if self.frame == "absolute" else self.to_original(box, input_size, input_size)

    def vision_tower(self, model):
        return model.get_submodule(self.vision_tower_path)

    def language_model(self, model):
        return model.get_submodule(self.language_model_path)

    def final_norm(self, model):
        """The norm whose output is the last hidden state: what `output_hidden_states` returns last."""
        return model.get_submodule(self.final_norm_path)

    def lm_head(self, model):
        return model.get_submodule(self.lm_head_path)


QWEN2_5_VL = Family(
    name="Qwen2.5-VL", model_types=("qwen2_5_vl",), model_class=Qwen2_5_VLForConditionalGeneration,
    image_processor_class=Qwen2VLImageProcessorPil, fsdp_units=(Qwen2_5_VLDecoderLayer, Qwen2_5_VLVisionBlock),
    patch_size=14, merge_size=2, frame="absolute")

# Grounds in 0..1000 relative coordinates (Qwen3-VL's technical report and cookbooks); DeepStack visual features
# reach early decoder layers through the model's own forward, so nothing here names them.
QWEN3_VL = Family(
    name="Qwen3-VL", model_types=("qwen3_vl",), model_class=Qwen3VLForConditionalGeneration,
    image_processor_class=Qwen2VLImageProcessorPil, fsdp_units=(Qwen3VLTextDecoderLayer, Qwen3VLVisionBlock),
    patch_size=16, merge_size=2, frame="relative")

# Qwen3-VL's vision tower (no DeepStack) before a hybrid decoder: 3 of every 4 layers Gated DeltaNet, with a
# recurrent and a convolution state in the cache. The relative frame is assumed from Qwen3-VL, whose vision
# stack it reuses: not measured on a released Qwen3.5 checkpoint.
QWEN3_5 = Family(
    name="Qwen3.5", model_types=("qwen3_5",), model_class=Qwen3_5ForConditionalGeneration,
    image_processor_class=Qwen2VLImageProcessorPil, fsdp_units=(Qwen3_5DecoderLayer, Qwen3_5VisionBlock),
    patch_size=16, merge_size=2, frame="relative", recurrent_cache=True)

FAMILIES = (QWEN2_5_VL, QWEN3_VL, QWEN3_5)


def family_of(config):
    """The Family of a checkpoint's config, from `config.model_type`; stops naming it and the known ones."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    known = ", ".join(f"{t} ({f.name})" for f in FAMILIES for t in f.model_types)
    raise ValueError(f"model_type {model_type!r} (config.json) is not a supported model family; known: {known}")
