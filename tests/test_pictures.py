"""
Tests for pictures.py and curves.py. Positions are found in the saved PNG itself: the scaled original is located by
its fill colour, so the expected place of a box is computed from what was drawn, not from the module's layout
arithmetic.
"""

import math
import time
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from curves import draw_curves
from pictures import (GREEN, MAX_TEXT_LINES, RED, TURN_SEP, colour, draw_trajectory, load_font, save_picture,
                      trajectory_picture, wrap)

# The background of the synthetic original, found again in the picture to locate it: a tint that no grey text
# and no box colour blended with white produces.
FILL = (240, 200, 160)
TARGET = [1200, 800, 1800, 1200]  # a red rectangle on the 3000 x 2000 original, in original pixels
WEIRD = "héllo wörld ∑ 中文 😀 \x00 \t \ud800 \u202e rtl \r\n" * 200  # 10k characters, newlines, odd unicode


def synthetic_original(size=(3000, 2000)):
    image = Image.new("RGB", size, FILL)
    ImageDraw.Draw(image).rectangle(TARGET, fill=(220, 20, 20))
    return image


def saved(image, tmp_path, name="picture.png"):
    """Round-trip through a PNG file, as eval.py would write it."""
    path = tmp_path / "nested" / "dir" / name
    save_picture(image, path)
    with Image.open(path) as reopened:
        assert reopened.format == "PNG"
        return reopened.convert("RGB") if reopened.mode != "RGB" else reopened.copy()


def has_colour(pixels, rgb):
    return bool(np.all(pixels == np.array(rgb, dtype=np.uint8), axis=-1).any())


def fill_extent(array):
    """(x0, y0, x1, y1), inclusive, of the scaled original: the first block of columns, from the left, holding its
    fill colour (a crop to its right may hold the colour too, after a white gap)."""
    mask = np.all(np.abs(array.astype(int) - FILL) <= 2, axis=-1)
    cols = np.nonzero(mask.any(axis=0))[0]
    gaps = np.nonzero(np.diff(cols) > 1)[0]
    x0, x1 = cols[0], cols[gaps[0]] if len(gaps) else cols[-1]
    rows = np.nonzero(mask[:, x0:x1 + 1].any(axis=1))[0]
    return x0, rows[0], x1, rows[-1]


# -----------------------------------------------------------------------------
# draw_trajectory


def test_predicted_box_is_drawn_on_the_target(tmp_path):
    original = synthetic_original()
    picture = draw_trajectory(original, [original.crop(TARGET)], [TARGET], None, "Which pattern?",
                              '```json\n[{"bbox_2d": [1, 2, 3, 4]}]\n```\n---\n\\boxed{B}', "correct (answer B)")
    reopened = saved(picture, tmp_path)
    assert reopened.mode == "RGB" and reopened.width == 1280 and reopened.height > 400
    array = np.asarray(reopened)

    x0, y0, x1, y1 = fill_extent(array)
    scale_x, scale_y = (x1 - x0 + 1) / 3000, (y1 - y0 + 1) / 2000
    assert scale_x == pytest.approx(scale_y, rel=0.01)  # aspect ratio kept
    assert x1 < 1280 * 0.75  # room was left for the crop column

    def at(x, y):  # original pixels -> picture pixels
        return round(x0 + x * scale_x), round(y0 + y * scale_y)

    def near(x, y, r=3):
        px, py = at(x, y)
        return array[py - r:py + r + 1, px - r:px + r + 1]

    mid_y, mid_x = (TARGET[1] + TARGET[3]) / 2, (TARGET[0] + TARGET[2]) / 2
    for x, y in [(TARGET[0], mid_y), (TARGET[2], mid_y), (mid_x, TARGET[1]), (mid_x, TARGET[3])]:
        assert has_colour(near(x, y), colour(0)), (x, y)
    assert tuple(array[at(mid_x, mid_y)[::-1]]) == pytest.approx((220, 20, 20), abs=3)  # the target itself
    assert not has_colour(near(600, 1000), colour(0))  # no box where there is none
    assert has_colour(array[:, x1 + 5:], colour(0))  # the crop's frame and caption in the box's colour


def test_huge_original_keeps_the_requested_width(tmp_path):
    start = time.perf_counter()
    picture = draw_trajectory(Image.new("RGB", (8000, 6000), FILL), [Image.new("RGB", (3000, 3000), "blue")],
                              [[0, 0, 3000, 3000]], [[100, 100, 900, 900]], "Q", "text", "wrong")
    assert picture.width == 1280 and picture.height < 1400
    assert time.perf_counter() - start < 5
    assert draw_trajectory(Image.new("L", (8000, 6000), 128), [], [], None, "Q", "", "", width=640).width == 640


def test_weird_text_does_not_raise_and_height_is_bounded(tmp_path):
    picture = draw_trajectory(synthetic_original(), [], [], None, WEIRD, WEIRD + TURN_SEP + WEIRD, WEIRD)
    reopened = saved(picture, tmp_path)
    assert reopened.width == 1280
    assert reopened.height < 1280 + MAX_TEXT_LINES * 40
    one_line = draw_trajectory(synthetic_original(), [], [], None, "", "", "")
    assert one_line.height < reopened.height


def test_bitmap_font_fallback_of_old_pillow_survives_unicode(monkeypatch):
    # Pillow < 10.1: load_default takes no size and returns a latin-1 bitmap font
    monkeypatch.setattr(ImageFont, "load_default", lambda: ImageFont.load_default_imagefont())
    assert not isinstance(load_font(), ImageFont.FreeTypeFont)
    picture = draw_trajectory(synthetic_original(), [Image.new("RGB", (50, 50))], [TARGET], [TARGET],
                              WEIRD, WEIRD, "correct ∑")
    assert picture.width == 1280


def test_no_crops_and_no_ground_truth(tmp_path):
    array = np.asarray(saved(draw_trajectory(synthetic_original(), [], [], None, "Q", "A", "wrong"), tmp_path))
    x0, _, x1, _ = fill_extent(array)
    assert x1 - x0 > 1280 * 0.9  # the original takes the whole width
    assert not has_colour(array, GREEN) and has_colour(array, RED)  # no ground truth, a red verdict
    assert not has_colour(array, colour(0))


def test_ground_truth_is_green_and_verdict_colour(tmp_path):
    array = np.asarray(saved(draw_trajectory(synthetic_original(), [], [], [TARGET], "Q", "A", "wrong"), tmp_path))
    x0, y0, x1, y1 = fill_extent(array)
    assert has_colour(array[y0:y1, x0:x1], GREEN)
    text = np.asarray(draw_trajectory(synthetic_original(), [], [], None, "Q", "A", "correct (answer B)"))[y1:]
    assert has_colour(text, GREEN) and not has_colour(text, RED)


def test_reversed_and_overhanging_boxes_still_draw():
    picture = draw_trajectory(synthetic_original(), [], [[1800, 1200, 1200, 800], [-50, -50, 5000, 400]],
                              [[2900, 1900, 3500, 2500]], "Q", "A", "wrong")
    assert picture.width == 1280


# -----------------------------------------------------------------------------
# trajectory_picture


def fake_trajectory(images, crop_boxes, texts):
    sample = SimpleNamespace(question="What pattern is inside the red frame?", boxes=[TARGET])
    return SimpleNamespace(sample=sample, images=images, crop_boxes=crop_boxes, texts=texts)


def test_trajectory_picture_mgpo_invalid_box_shows_no_crop():
    original = synthetic_original()
    global_view = original.resize((420, 280))
    texts = ["```json\n[{\"bbox_2d\": [0, 0, 1, 1]}]\n```", "\\boxed{C}"]
    traj = fake_trajectory([global_view, global_view], [], texts)
    expected = draw_trajectory(original, [], [], [TARGET], traj.sample.question, TURN_SEP.join(texts), "wrong")
    assert np.array_equal(np.asarray(trajectory_picture(traj, original, "wrong")), np.asarray(expected))


def test_trajectory_picture_tool_loop_with_two_crops_and_an_error_turn():
    original = synthetic_original()
    boxes = [[1000, 600, 2000, 1400], TARGET]
    crops = [original.crop(box) for box in boxes]
    texts = ["<tool_call>bad</tool_call>", "<tool_call>1</tool_call>", "<tool_call>2</tool_call>", "<answer>B"]
    # the error turn carries no image: images are the global view and the two crops
    traj = fake_trajectory([original.resize((420, 280))] + crops, boxes, texts)
    picture = np.asarray(trajectory_picture(traj, original, "correct (answer B, predicted B)"))
    expected = draw_trajectory(original, crops, boxes, [TARGET], traj.sample.question, TURN_SEP.join(texts),
                               "correct (answer B, predicted B)")
    assert np.array_equal(picture, np.asarray(expected))
    x1 = fill_extent(picture)[2]
    assert has_colour(picture[:, x1 + 5:], colour(0)) and has_colour(picture[:, x1 + 5:], colour(1))
    assert not has_colour(picture, colour(2))


# -----------------------------------------------------------------------------
# text wrapping


def test_wrap_fits_the_width_and_keeps_every_character():
    font = load_font()
    text = "short words then " + "x" * 500 + " and\nanother paragraph"
    lines = wrap(text, font, 300)
    assert all(font.getlength(line) <= 300 for line in lines)
    assert "".join(lines).replace(" ", "") == text.replace(" ", "").replace("\n", "")
    assert wrap("a b\nc", font, 1000) == ["a b", "c"]


# -----------------------------------------------------------------------------
# draw_curves


def test_curves_with_gaps_constant_and_empty_series(tmp_path):
    steps = [0, 10, 20, 30, 40]
    series = {"loss": [1.0, math.nan, 0.5, None, 0.2], "accuracy": [0.3] * 5, "empty": []}
    chart = saved(draw_curves(series, steps, "training"), tmp_path, "curves.png")
    assert chart.size == (900, 300) and chart.mode == "RGB"
    plot = np.asarray(chart)[50:]  # below the title and legend row
    assert has_colour(plot, colour(0)) and has_colour(plot, colour(1))
    assert has_colour(np.asarray(chart)[:50], colour(2))  # the empty series is still in the legend


def test_constant_series_is_a_flat_line_in_the_middle():
    chart = np.asarray(draw_curves({"accuracy": [0.3] * 20}, list(range(20)), "flat", width=600, height=200))
    rows, cols = np.nonzero(np.all(chart[50:] == colour(0), axis=-1))
    assert rows.max() - rows.min() <= 3
    assert cols.max() - cols.min() > 400
    assert 30 < 50 + rows.mean() < 170


@pytest.mark.parametrize("series, steps", [({}, []), ({"a": []}, []), ({"a": [math.nan, None]}, [1, 2]),
                                           ({"a": [2.0]}, [7]), ({"a": [1.0, math.inf, 3.0]}, [0, 1, 2])])
def test_curves_degenerate_inputs(series, steps, tmp_path):
    assert saved(draw_curves(series, steps, "degenerate", width=400, height=200), tmp_path).size == (400, 200)
