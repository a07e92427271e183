"""Tests for synthetic.py: the synthetic high-resolution task (frames, patterns, determinism)."""

from collections import Counter

import numpy as np
import pytest
from PIL import Image

from data import LETTERS, Sample
from demo.synthetic import FRAME_COLOURS, FRAME_GAP, FRAME_THICKNESS, PATTERNS, TARGET_SIDE, synthetic_samples

DOWNSCALED = 224
# Largest std of the downscaled interior over 100 samples was 0.31 (grey levels, 0..255); at full resolution the
# interior std is ~127 (half black, half white). The threshold sits well between.
DOWNSCALED_STD_MAX = 3.0


@pytest.fixture(scope="module")
def synthetic() -> list[Sample]:
    return synthetic_samples(24, seed=3)


def pixels(sample: Sample) -> np.ndarray:
    return np.asarray(sample.image, dtype=np.int16)


def target_box(sample: Sample) -> tuple[int, int, int, int]:
    return tuple(int(v) for v in sample.boxes[0])


def interior(sample: Sample) -> np.ndarray:
    x1, y1, x2, y2 = target_box(sample)
    t = FRAME_THICKNESS
    return np.asarray(sample.image.convert("L"), dtype=np.float64)[y1 + t : y2 - t, x1 + t : x2 - t]


def test_synthetic_is_deterministic(synthetic):
    again = synthetic_samples(24, seed=3)
    other = synthetic_samples(4, seed=4)
    for a, b in zip(synthetic, again):
        assert (a.id, a.options, a.answer, a.boxes) == (b.id, b.options, b.answer, b.boxes)
        assert np.array_equal(pixels(a), pixels(b))
    for a, b in zip(synthetic, other):
        assert not np.array_equal(pixels(a), pixels(b))
    # sample i depends on (seed, i) only, so asking for fewer samples gives a prefix
    assert np.array_equal(pixels(synthetic_samples(2, seed=3)[1]), pixels(synthetic[1]))


def test_synthetic_record(synthetic):
    for i, s in enumerate(synthetic):
        assert s.id == f"synthetic-3-{i}"
        assert s.image.mode == "RGB" and s.image.size == (896, 896)
        assert s.question == "What pattern is inside the red frame?"
        assert sorted(s.options) == sorted(PATTERNS)
        assert s.answer in LETTERS[:4]
        (tx1, ty1, tx2, ty2), (cx1, cy1, cx2, cy2) = s.boxes
        assert TARGET_SIDE[0] <= tx2 - tx1 == ty2 - ty1 <= TARGET_SIDE[1]
        assert 0 <= cx1 <= tx1 < tx2 <= cx2 <= 896 and 0 <= cy1 <= ty1 < ty2 <= cy2 <= 896
        assert cx2 - cx1 > tx2 - tx1
    # shuffled options: the answer letter and the option order vary over samples
    assert len(Counter(s.answer for s in synthetic)) > 1
    assert len({tuple(s.options) for s in synthetic}) > 1


def test_target_box_holds_the_red_frame_and_only_it(synthetic):
    for s in synthetic:
        rgb = pixels(s)
        strongly_red = (rgb[..., 0] > 180) & (rgb[..., 1] < 60) & (rgb[..., 2] < 60)
        x1, y1, x2, y2 = target_box(s)
        side, t = x2 - x1, FRAME_THICKNESS
        inside = np.zeros_like(strongly_red)
        inside[y1:y2, x1:x2] = True
        assert strongly_red[inside].sum() == side**2 - (side - 2 * t) ** 2  # exactly the frame ring
        assert strongly_red[~inside].sum() == 0


def test_five_frames_of_their_colours_apart_each_around_its_pattern(synthetic):
    for s in synthetic:
        frames = s.meta["frames"]
        assert [f["colour"] for f in frames] == list(FRAME_COLOURS) and frames[0]["box"] == s.boxes[0]
        assert s.options[LETTERS.index(s.answer)] == frames[0]["pattern"]
        rgb = pixels(s)
        for i, f in enumerate(frames):
            x1, y1, x2, y2 = (int(v) for v in f["box"])
            assert TARGET_SIDE[0] <= x2 - x1 == y2 - y1 <= TARGET_SIDE[1]
            t = FRAME_THICKNESS
            ring = rgb[y1:y2, x1:x2].copy()
            ring[t:-t, t:-t] = FRAME_COLOURS[f["colour"]]
            assert (ring == FRAME_COLOURS[f["colour"]]).all()  # pasted last: no clutter covers a frame
            assert np.array_equal(rgb[y1 + t:y2 - t, x1 + t:x2 - t, 0], rgb[y1 + t:y2 - t, x1 + t:x2 - t, 2])
            assert f["pattern"] in PATTERNS
            for g in frames[i + 1:]:  # at least FRAME_GAP pixels apart on one axis
                a, b = f["box"], g["box"]
                assert max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3]) >= FRAME_GAP


def test_frame_stays_visible_after_downscale(synthetic):
    for s in synthetic:
        small = np.asarray(s.image.resize((DOWNSCALED, DOWNSCALED), Image.BICUBIC), dtype=np.int16)
        redness = small[..., 0] - np.maximum(small[..., 1], small[..., 2])
        x1, y1, x2, y2 = (v // 4 for v in target_box(s))
        assert redness[y1 : y2 + 1, x1 : x2 + 1].max() > 150


def test_pattern_readable_at_full_resolution_not_after_downscale(synthetic):
    stds = []
    for s in synthetic:
        assert interior(s).std() > 120
        small = np.asarray(s.image.resize((DOWNSCALED, DOWNSCALED), Image.BICUBIC).convert("L"), dtype=np.float64)
        x1, y1, x2, y2 = target_box(s)
        t, margin = FRAME_THICKNESS, 2  # 2 downscaled pixels: the bicubic kernel's reach, so no frame red bleeds in
        region = small[(y1 + t) // 4 + margin : (y2 - t) // 4 - margin, (x1 + t) // 4 + margin : (x2 - t) // 4 - margin]
        assert region.size > 0
        stds.append(region.std())
    assert max(stds) < DOWNSCALED_STD_MAX


def classify(pattern: np.ndarray) -> str:
    """Name the pattern from pixels alone, independently of how synthetic.py draws it."""
    row_means, column_means = pattern.mean(axis=1), pattern.mean(axis=0)
    if row_means.var() > 10 * column_means.var() + 1:
        return "horizontal stripes"  # every row is one colour
    if column_means.var() > 10 * row_means.var() + 1:
        return "vertical stripes"
    # constant along anti-diagonals: pixel (y + 1, x) equals pixel (y, x + 1)
    if np.array_equal(pattern[1:, :-1], pattern[:-1, 1:]):
        return "diagonal stripes"
    return "checkerboard"


def test_answer_letter_names_the_drawn_pattern(synthetic):
    drawn = [classify(interior(s)) for s in synthetic]
    assert set(drawn) == set(PATTERNS)  # 24 samples cover all four kinds
    for s, name in zip(synthetic, drawn):
        assert s.options[LETTERS.index(s.answer)] == name
