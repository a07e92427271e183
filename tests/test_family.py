"""The family record agrees with the model, tokenizer and image processor it describes (the tiny Qwen2.5-VL), and
its coordinate maps put a box drawn on the original back where it was drawn."""

import dataclasses

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import Qwen2VLConfig

from crop import resize_for_model, smart_resize
from family import QWEN2_5_VL, family_of


def test_family_of_picks_qwen2_5_vl_and_names_unknown_types(policy):
    model = policy[0]
    assert family_of(model.config) is QWEN2_5_VL
    with pytest.raises(ValueError, match=r"'qwen2_vl'.*known: qwen2_5_vl \(Qwen2.5-VL\), qwen3_vl"):
        family_of(Qwen2VLConfig())


def test_classes_and_fsdp_units_are_the_models(policy):
    model, _, image_processor = policy
    f = family_of(model.config)
    assert type(model) is f.model_class and type(image_processor) is f.image_processor_class
    counts = {cls: sum(isinstance(m, cls) for m in model.modules()) for cls in f.fsdp_units}
    decoder_layer, vision_block = f.fsdp_units
    assert counts[decoder_layer] == model.config.text_config.num_hidden_layers
    assert counts[vision_block] == model.config.vision_config.depth
    assert f.vision_tower(model) is model.model.visual
    assert f.language_model(model) is model.model.language_model


def test_patching_and_token_ids_match_the_checkpoint(policy):
    model, tokenizer, image_processor = policy
    f = family_of(model.config)
    assert (f.patch_size, f.merge_size) == (image_processor.patch_size, image_processor.merge_size)
    assert (f.patch_size, f.merge_size) == (model.config.vision_config.patch_size,
                                            model.config.vision_config.spatial_merge_size)
    ids = tokenizer.convert_tokens_to_ids([f.image_pad, f.video_pad, f.vision_start, f.vision_end])
    assert ids == [model.config.image_token_id, model.config.video_token_id, model.config.vision_start_token_id,
                   model.config.vision_end_token_id]


def test_factor_is_the_processors_resize_rule(policy):
    """smart_resize with the family's factor lands on the size the processor itself picks (grid * patch)."""
    _, _, image_processor = policy
    lo, hi = image_processor.size["shortest_edge"], image_processor.size["longest_edge"]  # HF names pixel counts so
    for w, h in [(500, 300), (1792, 1344), (61, 90)]:
        grid = image_processor(images=[Image.new("RGB", (w, h))], return_tensors="pt")["image_grid_thw"][0]
        assert smart_resize(h, w, lo, hi, factor=QWEN2_5_VL.factor) == (grid[1] * QWEN2_5_VL.patch_size,
                                                                         grid[2] * QWEN2_5_VL.patch_size)


def test_tokens_per_image_is_what_the_vision_tower_returns(policy):
    """A 448 x 336 input: 16 x 12 tokens of 28 x 28 px by hand, and as many feature rows from the vision tower."""
    model, _, image_processor = policy
    out = image_processor(images=[Image.new("RGB", (448, 336), "gray")], do_resize=False, return_tensors="pt")
    grid = out["image_grid_thw"][0]
    assert grid.tolist() == [1, 336 // 14, 448 // 14]
    assert QWEN2_5_VL.tokens_per_image(grid) == (448 // 28) * (336 // 28) == 192
    with torch.no_grad():
        features = model.model.get_image_features(out["pixel_values"], out["image_grid_thw"], return_dict=True)
    assert features.pooler_output[0].shape[0] == 192


def test_final_norm_and_lm_head_make_the_models_logits(policy):
    """The accessors return the modules grpo's log-probs rest on: the last hidden state is the final norm's output,
    and the lm_head applied to it gives the model's own logits."""
    model, tokenizer, _ = policy
    f = family_of(model.config)
    assert f.lm_head(model) is model.lm_head
    seen = []
    hook = f.final_norm(model).register_forward_hook(lambda module, args, out: seen.append(out))
    ids = torch.tensor([tokenizer("Which pattern is in the frame?")["input_ids"]])
    try:
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
    finally:
        hook.remove()
    assert len(seen) == 1 and torch.equal(seen[0], out.hidden_states[-1])
    torch.testing.assert_close(f.lm_head(model)(seen[0]), out.logits, rtol=0, atol=1e-6)


def drawn_box(image):
    """[x1, y1, x2, y2] (x2, y2 exclusive) of the red pixels in `image`."""
    red = [(x, y) for y in range(image.height) for x in range(image.width)
           if image.getpixel((x, y))[0] > 128 and image.getpixel((x, y))[1] < 128]
    xs, ys = [x for x, _ in red], [y for _, y in red]
    return [min(xs), min(ys), max(xs) + 1, max(ys) + 1]


def test_absolute_frame_maps_a_drawn_box_back_onto_the_original():
    """A box drawn on a 1792 x 1344 original is found in the 448 x 336 model input at a quarter of its coordinates,
    and maps back onto the drawn box (to within the resize's blur: one input pixel is 4 original pixels)."""
    original = Image.new("RGB", (1792, 1344), "white")
    ImageDraw.Draw(original).rectangle([448, 336, 895, 671], fill="red")  # pixels 448..895: box [448, 336, 896, 672]
    view = resize_for_model(original, 28 * 28, 448 * 336, QWEN2_5_VL.factor)
    assert view.size == (448, 336)
    seen = drawn_box(view)
    assert max(abs(a - b) for a, b in zip(seen, [112, 84, 224, 168])) <= 1
    back = QWEN2_5_VL.to_original(seen, view.size, original.size)
    assert max(abs(a - b) for a, b in zip(back, [448, 336, 896, 672])) <= 4
    # by hand: exactly 4x each way
    assert QWEN2_5_VL.to_original([112, 84, 224, 168], (448, 336), (1792, 1344)) == [448, 336, 896, 672]
    assert QWEN2_5_VL.to_frame([448, 336, 896, 672], (448, 336), (1792, 1344)) == [112, 84, 224, 168]
    assert QWEN2_5_VL.to_original([112, 84, 224, 168], (448, 336), (448, 336)) == [112, 84, 224, 168]


def test_relative_frame_is_thousandths_of_the_image_whatever_the_input_size():
    relative = dataclasses.replace(QWEN2_5_VL, frame="relative")
    for input_size in [(448, 336), (896, 672)]:
        assert relative.to_original([250, 250, 500, 500], input_size, (1792, 1344)) == [448, 336, 896, 672]
        assert relative.to_frame([448, 336, 896, 672], input_size, (1792, 1344)) == [250, 250, 500, 500]
    # in model-input pixels, for the size checks: a quarter of 448 x 336
    assert relative.to_original([250, 250, 500, 500], (448, 336), (448, 336)) == [112, 84, 224, 168]
