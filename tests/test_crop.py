"""
Tests for crop.py. Expected values come from a second source: transformers' own resize rule and image processor,
pixels found in an actual resized image, or arithmetic done by hand in the comments.
"""

import json
import math
import random

import numpy as np
import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from crop import (
    TOOL_NAME,
    box_area_ratio,
    box_metrics,
    coverage,
    crop_original,
    iou,
    is_valid_box,
    l1_distance,
    parse_bbox_value,
    parse_box,
    parse_tool_call,
    resize_for_model,
    smart_resize,
    to_input,
    to_original,
)

FACTOR = 28  # Qwen2.5-VL's: ViT patch 14 x merge 2 (its image processor's, which the HF references below use)
PX = FACTOR * FACTOR  # pixels per visual token
MGPO_MIN_SIDE = 28  # MGPO's rollout: a box side must exceed 28 px
BUDGETS = [  # (min_pixels, max_pixels)
    (56 * 56, 1280 * PX),  # Qwen2.5-VL defaults
    (256 * PX, 1280 * PX),  # common MGPO setting
    (4 * PX, 16384 * PX),  # LFPC's large evaluation budget
    (56 * 56, 64 * PX),  # tiny-model budget
    (100 * PX, 101 * PX),  # nearly equal bounds: the two clamps fight
]
SIDES = [1, 2, 13, 27, 28, 29, 42, 55, 56, 70, 98, 100, 333, 999, 1000, 1204, 2000, 4000, 7680, 10000, 30000]


def block(payload):
    return f"```json\n{payload}\n```"


# -----------------------------------------------------------------------------
# smart_resize and resize_for_model


def test_smart_resize_matches_hf_on_a_grid():
    for min_pixels, max_pixels in BUDGETS:
        for h in SIDES:
            for w in SIDES:
                if max(h, w) / min(h, w) > 200:
                    continue
                ours = smart_resize(h, w, min_pixels, max_pixels, FACTOR)
                theirs = hf_smart_resize(h, w, factor=28, min_pixels=min_pixels, max_pixels=max_pixels)
                assert ours == tuple(theirs), (h, w, min_pixels, max_pixels)


def test_smart_resize_matches_hf_on_random_sizes():
    rng = random.Random(0)
    for _ in range(3000):
        min_pixels, max_pixels = rng.choice(BUDGETS)
        h = rng.randint(1, 12000)
        w = rng.randint(max(1, math.ceil(h / 200)), min(12000, h * 200))
        assert smart_resize(h, w, min_pixels, max_pixels, FACTOR) == tuple(
            hf_smart_resize(h, w, factor=28, min_pixels=min_pixels, max_pixels=max_pixels)
        ), (h, w, min_pixels, max_pixels)


def test_smart_resize_takes_the_factor_of_the_family():
    # Qwen3-VL: 16-px patches x merge 2 -> sides multiples of 32, as HF's rule with factor=32 gives
    rng = random.Random(1)
    for _ in range(500):
        min_pixels, max_pixels = rng.choice(BUDGETS)
        h, w = rng.randint(1, 5000), rng.randint(1, 5000)
        if max(h, w) / min(h, w) <= 200:
            assert smart_resize(h, w, min_pixels, max_pixels, 32) == tuple(
                hf_smart_resize(h, w, factor=32, min_pixels=min_pixels, max_pixels=max_pixels))
    assert smart_resize(3000, 4000, 56 * 56, 1280 * PX, 32) == (864, 1152)  # beta 3.458: floor(867.6 / 32) * 32


def test_smart_resize_hand_example_and_round_half_to_even():
    # 3000 x 4000 over the default budget: beta = sqrt(12e6 / 1003520) = 3.458 -> 30 x 41 tokens
    assert smart_resize(3000, 4000, 56 * 56, 1280 * PX, FACTOR) == (840, 1148)
    # 70 px = 2.5 patches rounds to 2 (even), 98 px = 3.5 rounds to 4: Python's round, as in HF
    assert smart_resize(70, 98, 56 * 56, 1280 * PX, FACTOR) == (56, 112)


def test_smart_resize_output_conforms_for_usual_budgets_and_shapes():
    # the area can leave the budget only when a side is clamped to 28 (extreme aspect) or the bounds nearly meet
    for min_pixels, max_pixels in BUDGETS[:4]:
        for h in SIDES[4:]:
            for w in SIDES[4:]:
                if max(h, w) / min(h, w) > 20:
                    continue
                rh, rw = smart_resize(h, w, min_pixels, max_pixels, FACTOR)
                assert rh % FACTOR == 0 and rw % FACTOR == 0
                assert min_pixels <= rh * rw <= max_pixels


@pytest.mark.parametrize("h, w", [(1, 201), (201, 1), (10, 2001), (5000, 20)])
def test_smart_resize_rejects_aspect_over_200_like_hf(h, w):
    with pytest.raises(ValueError):
        hf_smart_resize(h, w)
    with pytest.raises(ValueError, match=f"height={h}, width={w}"):
        smart_resize(h, w, 56 * 56, 1280 * PX, FACTOR)


def test_smart_resize_accepts_aspect_exactly_200():
    assert smart_resize(1, 200, 56 * 56, 1280 * PX, FACTOR) == tuple(hf_smart_resize(1, 200))


def test_smart_resize_rejects_empty_image():
    with pytest.raises(ValueError, match="positive"):
        smart_resize(0, 100, 56 * 56, 1280 * PX, FACTOR)


@pytest.mark.parametrize("min_pixels, max_pixels", BUDGETS[:4])
@pytest.mark.parametrize("w, h", [(1000, 700), (700, 1000), (13, 2600), (56, 56), (100, 30), (1001, 999)])
def test_grid_thw_matches_hf_image_processor(w, h, min_pixels, max_pixels):
    processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    out = processor(images=[Image.new("RGB", (w, h))], return_tensors="pt")
    rh, rw = smart_resize(h, w, min_pixels, max_pixels, FACTOR)
    assert out["image_grid_thw"].tolist() == [[1, rh // 14, rw // 14]]


def test_resize_for_model_gives_the_pixels_hf_feeds_the_model():
    # the processor must see the same tensor whether it resizes the original itself or gets our resized copy
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (700, 1000, 3), dtype=np.uint8))
    processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=256 * PX)
    theirs = processor(images=[image], return_tensors="pt")
    ours = processor(images=[resize_for_model(image, 56 * 56, 256 * PX, FACTOR)], return_tensors="pt")
    assert ours["image_grid_thw"].tolist() == theirs["image_grid_thw"].tolist()
    assert (ours["pixel_values"] - theirs["pixel_values"]).abs().max().item() == 0.0


@pytest.mark.parametrize("w, h", [(1500, 1000), (333, 1000), (30, 20), (1204, 812)])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_resize_for_model_is_rgb_and_idempotent(w, h, mode):
    once = resize_for_model(Image.new(mode, (w, h)), 56 * 56, 1280 * PX, FACTOR)
    rh, rw = smart_resize(h, w, 56 * 56, 1280 * PX, FACTOR)
    assert once.mode == "RGB" and once.size == (rw, rh)
    assert resize_for_model(once, 56 * 56, 1280 * PX, FACTOR).size == once.size


# -----------------------------------------------------------------------------
# a rectangle drawn on the original, found in the model input, mapped back


def test_box_found_in_model_input_maps_back_onto_the_original_rectangle():
    original = np.zeros((2000, 3000, 3), dtype=np.uint8)
    true_box = [1210, 530, 1980, 1377]  # pixel edges: columns 1210..1979, rows 530..1376 are white
    original[530:1377, 1210:1980] = 255
    image = Image.fromarray(original)

    model_input = resize_for_model(image, 56 * 56, 1280 * PX, FACTOR)
    assert model_input.size == (1204, 812)  # hand: beta = sqrt(6e6 / 1003520) = 2.445 -> 43 x 29 tokens
    white = np.asarray(model_input.convert("L")) > 127
    rows, cols = np.nonzero(white)
    seen = [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]  # as pixel edges, like true_box

    mapped = to_original(seen, model_input.size, image.size)
    sx, sy = 3000 / 1204, 2000 / 812
    for got, want, scale in zip(mapped, true_box, (sx, sy, sx, sy)):
        assert abs(got - want) <= scale, (mapped, true_box)
    assert iou(mapped, true_box) > 0.98

    crop = np.asarray(crop_original(image, mapped))
    assert (crop == 255).mean() > 0.98  # the crop is the rectangle, give or take a ring of one scale factor


# -----------------------------------------------------------------------------
# to_original / to_input


def test_to_original_docstring_example():
    # 4000 x 3000 shown as 1148 x 840: sx = 4000/1148, sy = 3000/840; 287 = 1148/4, 210 = 840/4
    assert to_original([287, 210, 574, 420], (1148, 840), (4000, 3000)) == [1000.0, 750.0, 2000.0, 1500.0]
    assert to_input([1000, 750, 2000, 1500], (1148, 840), (4000, 3000)) == [287.0, 210.0, 574.0, 420.0]


def test_to_original_uses_separate_axis_scales():
    # 1000 x 500 shown as 100 x 100: x scales by 10, y by 5
    assert to_original([10, 10, 20, 20], (100, 100), (1000, 500)) == [100.0, 50.0, 200.0, 100.0]


def test_to_original_to_input_round_trip():
    rng = random.Random(1)
    for _ in range(500):
        original = (rng.randint(28, 10000), rng.randint(28, 10000))
        shown = (rng.randint(1, 80) * 28, rng.randint(1, 80) * 28)
        box = [rng.uniform(-50, 3000) for _ in range(4)]
        back = to_input(to_original(box, shown, original), shown, original)
        assert back == pytest.approx(box, rel=1e-12, abs=1e-9)


# -----------------------------------------------------------------------------
# parse_box


@pytest.mark.parametrize(
    "text, expected",
    [
        (block('[{"bbox_2d": [10, 20, 110, 220], "label": "cat"}]'), [10.0, 20.0, 110.0, 220.0]),
        (block('[{"bbox_2d": [1, 2, 3, 4]}, {"bbox_2d": [5, 6, 7, 8]}]'), [1.0, 2.0, 3.0, 4.0]),  # first wins
        (block('[{"label": "no box"}, {"bbox_2d": [5, 6, 7, 8]}]'), [5.0, 6.0, 7.0, 8.0]),  # first with a box
        (block('[{"bbox_2d": [1.5, 2.25, 3e2, 4]}]'), [1.5, 2.25, 300.0, 4.0]),
        (block('{"bbox_2d": [1, 2, 3, 4], "label": "single dict"}'), [1.0, 2.0, 3.0, 4.0]),
        (block('[{"bbox_2d": [-5, 40, 3, 2]}]'), [-5.0, 40.0, 3.0, 2.0]),  # invalid but parsed: is_valid_box judges
        (block('[{"bbox_2d": [0, 0, 99999, 1e30]}]'), [0.0, 0.0, 99999.0, 1e30]),
        (block('[{"bbox_2d": [1, 2, 3, 4], "label": "红色的标志 🚦 é"}]'), [1.0, 2.0, 3.0, 4.0]),
        ('Let me look.\n' + block('[{"bbox_2d": [1, 2, 3, 4]}]') + "\nThen answer.", [1.0, 2.0, 3.0, 4.0]),
        (block('[{"bbox_2d": [1, 2, 3, 4]}]') + " retry " + block('[{"bbox_2d": [9, 8, 7, 6]}]'), [9.0, 8.0, 7.0, 6.0]),
        ('think ```json\n[{"bbox_2d": [1, 2, 3, 4]}]', [1.0, 2.0, 3.0, 4.0]),  # generation stopped before the fence
        ("```json[{\"bbox_2d\":[1,2,3,4]}]```", [1.0, 2.0, 3.0, 4.0]),  # no newlines
    ],
)
def test_parse_box_accepts(text, expected):
    assert parse_box(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "no block at all [1, 2, 3, 4]",
        '[{"bbox_2d": [1, 2, 3, 4]}]',  # JSON without the fence
        "```python\n[{\"bbox_2d\": [1, 2, 3, 4]}]\n```",
        block('[{"bbox_2d": [1, 2, 3, 4]'),  # bad JSON
        block("[{'bbox_2d': [1, 2, 3, 4]}]"),  # single quotes are not JSON
        block('[{"box": [1, 2, 3, 4]}]'),
        block("[]"),
        block("[1, 2, 3, 4]"),
        block('"bbox_2d"'),
        block('[{"bbox_2d": [1, 2, 3]}]'),
        block('[{"bbox_2d": [1, 2, 3, 4, 5]}]'),
        block('[{"bbox_2d": ["1", "2", "3", "4"]}]'),
        block('[{"bbox_2d": [1, 2, 3, null]}]'),
        block('[{"bbox_2d": [true, 2, 3, 4]}]'),
        block('[{"bbox_2d": [[1], 2, 3, 4]}]'),
        block('[{"bbox_2d": {"x1": 1, "y1": 2, "x2": 3, "y2": 4}}]'),
        block('[{"bbox_2d": [NaN, 2, 3, 4]}]'),
        block('[{"bbox_2d": [1, 2, 3, Infinity]}]'),
        block('[{"bbox_2d": [1e400, 2, 3, 4]}]'),  # overflows to inf
        block('[{"bbox_2d": [1, 2, 3, ' + "9" * 400 + "]}]"),  # an int with no float
        block('[{"bbox_2d": [1, 2, 3, ' + "9" * 5000 + "]}]"),  # over Python's int digit limit
        block('[{"bbox_2d": [1, 2, 3, 4]}]') + " then " + block("oops"),  # the last block counts
    ],
)
def test_parse_box_rejects(text):
    assert parse_box(text) is None


def test_parse_box_survives_deep_nesting():
    assert parse_box(block("[" * 10000 + "]" * 10000)) is None
    assert parse_box(block('{"bbox_2d": ' + "[" * 10000 + "]" * 10000 + "}")) is None
    assert parse_box(block("{" * 10000)) is None


def test_parse_box_never_raises_on_random_text():
    rng = random.Random(2)
    alphabet = '```json[]{}",:.-+eE0123456789 bbox_2d\n\\u\ud800é🚦NaInfty'
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        parse_box(text)
        parse_box("```json" + text)


def test_parse_box_round_trips_json_dumps():
    rng = random.Random(3)
    for _ in range(200):
        box = [rng.uniform(-1e6, 1e6) for _ in range(4)]
        assert parse_box(block(json.dumps([{"bbox_2d": box, "label": "x"}]))) == box


def test_parse_bbox_value():
    assert parse_bbox_value((1, 2, 3, 4.5)) == [1.0, 2.0, 3.0, 4.5]
    assert parse_bbox_value(None) is None
    assert parse_bbox_value("1234") is None
    assert parse_bbox_value([1, 2, 3, False]) is None
    assert parse_bbox_value([1, 2, 3, 10**400]) is None
    assert parse_bbox_value([1, 2, 3, float("-inf")]) is None


# -----------------------------------------------------------------------------
# parse_tool_call


def call(payload):
    return f"<tool_call>{payload}</tool_call>"


def zoom(bbox_json, extra=""):
    return call('{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": ' + bbox_json + extra + "}}")


def test_tool_name_is_deepeyes():
    assert TOOL_NAME == "image_zoom_in_tool"


@pytest.mark.parametrize(
    "text, expected",
    [
        (zoom("[10, 20, 110, 220]", ', "label": "sign"'), [10.0, 20.0, 110.0, 220.0]),
        (zoom("[10, 20, 110, 220]"), [10.0, 20.0, 110.0, 220.0]),  # label is optional
        (zoom("[1.5, 2.25, 3e2, 4]"), [1.5, 2.25, 300.0, 4.0]),
        (zoom("[-5, 40, 3, 2]"), [-5.0, 40.0, 3.0, 2.0]),  # geometry is is_valid_box's job
        (zoom("[0, 0, 99999, 1e30]"), [0.0, 0.0, 99999.0, 1e30]),  # huge but finite
        (zoom("[1, 2, 3, 4]", ', "label": "红色的标志 🚦"'), [1.0, 2.0, 3.0, 4.0]),
        ("<think>the sign is small</think>\n" + zoom("[1, 2, 3, 4]") + "\n", [1.0, 2.0, 3.0, 4.0]),
        (call('\n{"name": "image_zoom_in_tool",\n "arguments": {"bbox_2d": [1, 2, 3, 4]}}\n'), [1.0, 2.0, 3.0, 4.0]),
        (zoom("[1, 2, 3, 4]") + " retry " + zoom("[9, 8, 7, 6]"), [9.0, 8.0, 7.0, 6.0]),  # two calls: last wins
        (call('{"arguments": {"bbox_2d": [1, 2, 3, 4]}, "name": "image_zoom_in_tool", "extra": 1}'),
         [1.0, 2.0, 3.0, 4.0]),  # key order and unknown keys do not matter
    ],
)
def test_parse_tool_call_accepts(text, expected):
    assert parse_tool_call(text) == (expected, None)


@pytest.mark.parametrize("text", ["", "The answer is <answer>B</answer>", "a stray </tool_call>",
                                  "<tool_response>", '{"name": "image_zoom_in_tool"}'])
def test_parse_tool_call_none_without_a_call(text):
    assert parse_tool_call(text) is None


@pytest.mark.parametrize(
    "text, error",
    [
        ("<tool_call>", "unclosed <tool_call>"),
        ('<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [1, 2, 3, 4]}}', "unclosed <tool_call>"),
        (zoom("[1, 2, 3, 4]") + " and again <tool_call>{", "unclosed <tool_call>"),  # the last call counts
        ("</tool_call><tool_call>", "unclosed <tool_call>"),  # a closing tag before does not close it
        (call(""), "invalid JSON in <tool_call>"),
        (call('{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [1, 2, 3, 4]}'), "invalid JSON in <tool_call>"),
        (call("{'name': 'image_zoom_in_tool'}"), "invalid JSON in <tool_call>"),  # single quotes are not JSON
        (zoom("[1, 2, 3, 4]") + " " + call("oops"), "invalid JSON in <tool_call>"),  # two calls: last wins
        (zoom("[1, 2, 3, " + "9" * 5000 + "]"), "invalid JSON in <tool_call>"),  # over Python's int digit limit
        (call("[1, 2, 3, 4]"), "<tool_call> must hold a JSON object"),
        (call('"image_zoom_in_tool"'), "<tool_call> must hold a JSON object"),
        (call("null"), "<tool_call> must hold a JSON object"),
        (call('{"name": "crop", "arguments": {"bbox_2d": [1, 2, 3, 4]}}'), "unknown tool 'crop'"),
        (call('{"arguments": {"bbox_2d": [1, 2, 3, 4]}}'), "unknown tool None"),
        (call('{"name": 7}'), "unknown tool 7"),
        (call('{"name": "image_zoom_in_tool"}'), "missing arguments.bbox_2d"),
        (call('{"name": "image_zoom_in_tool", "arguments": {"label": "sign"}}'), "missing arguments.bbox_2d"),
        (call('{"name": "image_zoom_in_tool", "arguments": "{\\"bbox_2d\\": [1, 2, 3, 4]}"}'),
         "missing arguments.bbox_2d"),  # arguments as a JSON string (OpenAI style) is not the DeepEyes format
        (call('{"name": "image_zoom_in_tool", "bbox_2d": [1, 2, 3, 4]}'), "missing arguments.bbox_2d"),
        (zoom("[1, 2, 3]"), "bbox_2d must be 4 finite numbers"),
        (zoom("[1, 2, 3, 4, 5]"), "bbox_2d must be 4 finite numbers"),
        (zoom("[]"), "bbox_2d must be 4 finite numbers"),
        (zoom("null"), "bbox_2d must be 4 finite numbers"),
        (zoom('"1, 2, 3, 4"'), "bbox_2d must be 4 finite numbers"),
        (zoom('["1", "2", "3", "4"]'), "bbox_2d must be 4 finite numbers"),
        (zoom("[true, 2, 3, 4]"), "bbox_2d must be 4 finite numbers"),
        (zoom("[NaN, 2, 3, 4]"), "bbox_2d must be 4 finite numbers"),
        (zoom("[1, 2, 3, -Infinity]"), "bbox_2d must be 4 finite numbers"),
        (zoom("[1e400, 2, 3, 4]"), "bbox_2d must be 4 finite numbers"),  # overflows to inf
        (zoom("[1, 2, 3, " + "9" * 400 + "]"), "bbox_2d must be 4 finite numbers"),  # an int with no float
        (zoom("[[1, 2], [3, 4]]"), "bbox_2d must be 4 finite numbers"),
        (zoom('{"x1": 1, "y1": 2, "x2": 3, "y2": 4}'), "bbox_2d must be 4 finite numbers"),
    ],
)
def test_parse_tool_call_errors(text, error):
    assert parse_tool_call(text) == (None, error)


def test_parse_tool_call_error_echo_is_short():
    box, error = parse_tool_call(call('{"name": "' + "x" * 100000 + '"}'))
    assert box is None and error.startswith("unknown tool 'x") and len(error) < 60


def test_parse_tool_call_survives_deep_nesting():
    assert parse_tool_call(call("[" * 100000 + "]" * 100000)) == (None, "invalid JSON in <tool_call>")
    assert parse_tool_call(zoom("[" * 100000 + "]" * 100000)) == (None, "invalid JSON in <tool_call>")
    assert parse_tool_call(call('{"a":' * 100000)) == (None, "invalid JSON in <tool_call>")
    # deep but within the JSON decoder's limit: parsed, then rejected (and echoed) without a RecursionError
    assert parse_tool_call(call('{"name": ' + "[" * 500 + "]" * 500 + "}"))[1].startswith("unknown tool [[")
    assert parse_tool_call(zoom("[" * 500 + "]" * 500)) == (None, "bbox_2d must be 4 finite numbers")


def test_parse_tool_call_round_trips_json_dumps():
    rng = random.Random(4)
    for _ in range(200):
        box = [rng.uniform(-1e6, 1e6) for _ in range(4)]
        payload = {"name": TOOL_NAME, "arguments": {"bbox_2d": box, "label": "x"}}
        assert parse_tool_call(call(json.dumps(payload))) == (box, None)


def test_parse_tool_call_never_raises_on_random_text():
    rng = random.Random(5)
    pieces = ["<tool_call>", "</tool_call>", "<tool_call", "tool_call>", '{"name": "image_zoom_in_tool"', "{", "}",
              "[", "]", ",", ":", '"', '"arguments"', '"bbox_2d"', '"label"', "1", "-2.5", "1e400", "9" * 5000,
              "NaN", "Infinity", "true", "null", "\\", "\\u", "\\ud800", "\ud800", "é", "🚦", "\x00", " ", "\n"]
    alphabet = '<>/tool_call{}[]",:.-+eE0123456789 bbox_2d\n\\u\ud800é🚦NaInfty'
    for i in range(3000):
        if i % 2:
            text = "".join(rng.choice(pieces) for _ in range(rng.randrange(30)))
        else:
            text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(120)))
        for candidate in (text, "<tool_call>" + text + "</tool_call>", zoom(text)):
            result = parse_tool_call(candidate)
            assert result is None or (isinstance(result, tuple) and len(result) == 2)
            if result is not None:
                box, error = result
                assert (box is None) != (error is None)
                assert box is None or (len(box) == 4 and all(math.isfinite(v) for v in box))


# -----------------------------------------------------------------------------
# is_valid_box


@pytest.mark.parametrize(
    "box, valid",
    [
        ([100, 100, 200, 200], True),
        ([0, 0, 1148, 840], True),  # the whole image
        ([100, 100, 129, 129], True),  # 29 x 29: over 28 both ways
        ([100, 100, 128, 128], False),  # exactly 28 x 28: MGPO requires more than 28
        ([100, 100, 128, 200], False),  # 28 px wide
        ([100, 100, 200, 128], False),  # 28 px high
        ([100, 100, 127, 200], False),  # 27 px wide
        ([100, 100, 200, 127], False),  # 27 px high
        ([100.0, 100.0, 128.5, 200.0], True),  # 28.5 px is over 28
        ([100.0, 100.0, 128.0, 200.0], False),
        ([-1, 100, 200, 200], False),  # negative
        ([200, 100, 100, 200], False),  # reversed x
        ([100, 200, 200, 100], False),  # reversed y
        ([100, 100, 1149, 200], False),  # past the right edge
        ([100, 100, 200, 841], False),  # past the bottom edge
        ([0, 0, 29, 840], True),  # aspect 29
        ([0, 0, 1148, 29], True),  # aspect 40
        ([0, 0, 29, 2900], False),  # aspect exactly 100 (also out of range here)
        (None, False),
        ("0 0 100 100", False),
        ([0, 0, 100], False),
        ([0, 0, float("nan"), 100], False),
        ([0, 0, True, 100], False),
    ],
)
def test_is_valid_box(box, valid):
    assert is_valid_box(box, (1148, 840), MGPO_MIN_SIDE) is valid


def test_is_valid_box_aspect_limit_is_strict():
    assert is_valid_box([0, 0, 29, 2871], (5000, 5000), MGPO_MIN_SIDE)  # 99
    assert not is_valid_box([0, 0, 29, 2900], (5000, 5000), MGPO_MIN_SIDE)  # 100
    assert is_valid_box([0, 0, 29, 2900], (5000, 5000), MGPO_MIN_SIDE, max_aspect=101)
    assert is_valid_box([0, 0, 11, 11], (100, 100), min_side=10)
    assert not is_valid_box([0, 0, 10, 10], (100, 100), min_side=10)


def mgpo_box_ok(x1, y1, x2, y2, w, h):
    # MGPO's own check, transcribed from its rollout (xinyu1205/verl, branch mgpo, commit 994efbe,
    # verl/workers/rollout/vllm_rollout/vllm_rollout_spmd.py): the reference is_valid_box must agree with.
    return (x1 < x2 and y1 < y2 and x1 >= 0 and y1 >= 0 and x2 <= w and y2 <= h
            and (x2 - x1) > 28 and (y2 - y1) > 28 and max((x2 - x1) / (y2 - y1), (y2 - y1) / (x2 - x1)) < 100)


@pytest.mark.parametrize("side_w", [27, 28, 29, 100])
@pytest.mark.parametrize("side_h", [27, 28, 29, 100])
def test_is_valid_box_28px_boundary_matches_mgpo(side_w, side_h):
    box, size = [10, 20, 10 + side_w, 20 + side_h], (1148, 840)
    assert is_valid_box(box, size, MGPO_MIN_SIDE) is mgpo_box_ok(*box, *size)
    assert is_valid_box(box, size, MGPO_MIN_SIDE) is (side_w >= 29 and side_h >= 29)


# -----------------------------------------------------------------------------
# crop_original


def test_crop_original_rounds_outward():
    image = Image.new("RGB", (4000, 3000))
    assert crop_original(image, [999.6, 750.2, 2000.1, 1500.0]).size == (1002, 750)
    assert crop_original(image, [10, 20, 110, 70]).size == (100, 50)


def test_crop_original_clamps_to_the_image():
    image = Image.new("RGB", (400, 300))
    assert crop_original(image, [-20.5, -3, 500, 100.2]).size == (400, 101)


def test_crop_original_takes_the_right_pixels():
    pixels = np.arange(30 * 40, dtype=np.uint8).reshape(30, 40)
    crop = crop_original(Image.fromarray(pixels), [5.5, 2.2, 9.0, 4.7])  # -> columns 5..8, rows 2..4
    assert np.array_equal(np.asarray(crop), pixels[2:5, 5:9])


def test_crop_original_rejects_a_box_outside():
    with pytest.raises(ValueError):
        crop_original(Image.new("RGB", (400, 300)), [500, 10, 600, 100])


# -----------------------------------------------------------------------------
# metrics


def test_iou_hand_cases():
    assert iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)
    assert iou([0, 0, 2, 2], [0, 0, 2, 2]) == 1.0
    assert iou([0, 0, 4, 4], [1, 1, 3, 3]) == pytest.approx(4 / 16)
    assert iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0
    assert iou([0, 0, 1, 1], [1, 0, 2, 1]) == 0.0  # touching edges
    assert iou([0, 0, 0, 5], [0, 0, 0, 5]) == 0.0  # degenerate: no division by zero
    assert iou([3, 3, 1, 1], [0, 0, 4, 4]) == 0.0  # reversed box has no area


def test_coverage_hand_cases():
    assert coverage([0, 0, 2, 2], [1, 0, 3, 2]) == pytest.approx(0.5)
    assert coverage([0, 0, 100, 100], [10, 10, 20, 20]) == 1.0  # a huge crop covers everything
    assert coverage([10, 10, 20, 20], [0, 0, 100, 100]) == pytest.approx(0.01)
    assert coverage([0, 0, 2, 2], [1, 1, 1, 1]) == 0.0  # empty target


def test_l1_distance_hand_cases():
    assert l1_distance([0, 0, 10, 10], [10, 0, 10, 20], (100, 50)) == pytest.approx(0.075)
    assert l1_distance([1, 2, 3, 4], [1, 2, 3, 4], (100, 50)) == 0.0
    assert l1_distance([0, 0, 100, 50], [100, 50, 0, 0], (100, 50)) == 1.0
    assert l1_distance([0, 0, 1, 1], [1, 1, 2, 2], (0, 50)) == 0.0


def test_box_area_ratio_hand_cases():
    assert box_area_ratio([0, 0, 50, 20], (100, 100)) == pytest.approx(0.1)
    assert box_area_ratio([0, 0, 1148, 840], (1148, 840)) == 1.0
    assert box_area_ratio([5, 5, 5, 9], (100, 100)) == 0.0
    assert box_area_ratio([0, 0, 10, 10], (0, 0)) == 0.0


def test_box_metrics_follow_the_grounding_rewards_rule():
    # 1000 x 500 image; B1 = [100, 100, 200, 200] (10,000 px), B2 = [50, 50, 300, 300] (62,500 px) around it.
    # [0, 0, 500, 250] (125,000 px) holds all of B1 (coverage 1): IoU 10000 / 125000 = 0.08 with B1; it overlaps B2
    # in [50, 50, 300, 250] = 50,000 px: IoU 50000 / (125000 + 62500 - 50000) = 0.364, the best; area 0.25
    gt = [[100, 100, 200, 200], [50, 50, 300, 300]]
    assert box_metrics([0, 0, 500, 250], gt, (1000, 500)) == (pytest.approx(50000 / 137500), 1.0, pytest.approx(0.25))
    # exactly B1: IoU 1 with B1 (0.16 with B2); coverage of B1 1
    assert box_metrics([100, 100, 200, 200], gt, (1000, 500)) == (1.0, 1.0, pytest.approx(0.02))
    # B2 exactly: IoU 1 (with B2), but it holds B1 whole: coverage 1; a box beside B1 inside B2 covers none of B1
    assert box_metrics([50, 50, 300, 300], gt, (1000, 500))[:2] == (1.0, 1.0)
    assert box_metrics([210, 50, 300, 300], gt, (1000, 500))[1] == 0.0
    assert box_metrics([0, 0, 50, 20], [], (100, 100)) == (None, None, pytest.approx(0.1))
    assert box_metrics([0, 0, 50, 20], None, (100, 100)) == (None, None, pytest.approx(0.1))


def test_box_metrics_against_pixel_masks():
    """IoU (the best over the boxes) and coverage (of the first box) counted pixel by pixel on integer boxes."""
    rng = random.Random(0)
    size = (40, 30)

    def mask(box):
        m = np.zeros(size[::-1], bool)
        m[box[1]:box[3], box[0]:box[2]] = True
        return m

    def rand_box():
        x1, y1 = rng.randrange(0, 39), rng.randrange(0, 29)
        return [x1, y1, rng.randrange(x1 + 1, 41), rng.randrange(y1 + 1, 31)]

    for _ in range(200):
        box, gt = rand_box(), [rand_box() for _ in range(rng.randint(1, 3))]
        counted = [((mask(box) & mask(g)).sum() / (mask(box) | mask(g)).sum(), (mask(box) & mask(g)).sum()
                    / mask(g).sum()) for g in gt]
        got = box_metrics(box, gt, size)
        assert got[0] == pytest.approx(max(c[0] for c in counted)) and got[1] == pytest.approx(counted[0][1])
        assert got[2] == pytest.approx(mask(box).sum() / (size[0] * size[1]))
