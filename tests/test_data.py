"""Tests for data.py: the JSONL reader and its errors, the synthetic task, sharding and batching."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data import (
    FRAME_COLOURS,
    FRAME_GAP,
    FRAME_THICKNESS,
    TARGET_SIDE,
    LETTERS,
    PATTERNS,
    DataError,
    Sample,
    batches,
    format_choices,
    load_image,
    load_samples,
    read_jsonl,
    shard,
    synthetic_samples,
)

# ----------------------------------------------------------------------------------------------------------------
# JSONL reader


def write_image(path: Path, colour=(10, 200, 30), size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def write_jsonl(path: Path, lines: list) -> None:
    """Each entry is a record (dumped as JSON) or a raw string written as is."""
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    path.write_text(text + "\n", encoding="utf-8")


def record(**overrides) -> dict:
    base = {"id": "q1", "image": "img/a.png", "question": "Which colour?", "options": ["red", "green"],
            "answer": "B", "boxes": [[1, 2, 10, 12], [0, 0, 20, 20]]}
    return {**base, **overrides}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    write_image(tmp_path / "img" / "a.png")
    return tmp_path


def test_round_trip(folder: Path):
    write_jsonl(folder / "set.jsonl", [
        record(),
        "",  # blank lines are skipped
        record(id="q2", options=None, answer="a green square", boxes=None, global_size=[16, 12]),
    ])
    samples = read_jsonl(folder / "set.jsonl")
    image = str((folder / "img" / "a.png").resolve())
    assert samples == [
        Sample("q1", image, "Which colour?", ["red", "green"], "B", [[1.0, 2.0, 10.0, 12.0], [0.0, 0.0, 20.0, 20.0]]),
        Sample("q2", image, "Which colour?", None, "a green square", None, [16, 12]),
    ]
    loaded = load_image(samples[0])
    assert loaded.mode == "RGB" and loaded.size == (40, 30) and loaded.getpixel((5, 5)) == (10, 200, 30)


def test_relative_image_paths_resolve_against_the_jsonl_folder(tmp_path: Path, monkeypatch):
    write_image(tmp_path / "data" / "img" / "a.png")
    write_jsonl(tmp_path / "data" / "set.jsonl", [record()])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # not the JSONL's folder, so resolving against the cwd would fail
    (sample,) = read_jsonl("../data/set.jsonl")
    assert Path(sample.image).is_absolute()
    assert Path(sample.image) == (tmp_path / "data" / "img" / "a.png").resolve()
    monkeypatch.chdir(tmp_path)  # the stored path keeps working after a change of directory
    assert load_image(sample).size == (40, 30)


def test_absolute_image_path_is_kept(folder: Path, tmp_path_factory):
    other = tmp_path_factory.mktemp("other") / "b.png"
    write_image(other)
    write_jsonl(folder / "set.jsonl", [record(image=str(other))])
    assert read_jsonl(folder / "set.jsonl")[0].image == str(other)


BAD_LINES = {
    "not json": ("this is not json", "not valid JSON"),
    "truncated": (json.dumps(record(id="q9"))[:-12], "not valid JSON"),
    "not an object": ("[1, 2, 3]", "expected a JSON object"),
    "missing field": ({k: v for k, v in record(id="q9").items() if k != "question"}, "missing field 'question'"),
    "wrong type": (record(id=7), "field 'id' must be a string"),
    "answer not an option letter": (record(id="q9", answer="C"), "answer 'C' is not one of"),
    "answer text with options": (record(id="q9", answer="green"), "answer 'green' is not one of"),
    "empty options": (record(id="q9", options=[]), "'options' must be a non-empty list"),
    "options not strings": (record(id="q9", options=["red", 2]), "'options' must be a non-empty list"),
    "missing image": (record(id="q9", image="img/missing.png"), "image not found"),
    "box of 3 numbers": (record(id="q9", boxes=[[1, 2, 3]]), "bad box"),
    "box with a string": (record(id="q9", boxes=[[1, 2, "3", 4]]), "bad box"),
    "box inverted": (record(id="q9", boxes=[[10, 2, 5, 4]]), "bad box"),
    "boxes not a list of boxes": (record(id="q9", boxes=[1, 2, 3, 4]), "bad box"),
    "bad global_size": (record(id="q9", global_size=[0, 10]), "bad global_size"),
    "duplicate id": (record(), "duplicate id 'q1'"),
}


@pytest.mark.parametrize("bad, expected", BAD_LINES.values(), ids=BAD_LINES.keys())
def test_malformed_line_names_file_and_line(folder: Path, bad, expected):
    path = folder / "set.jsonl"
    write_jsonl(path, [record(), "", bad])  # the bad record is on line 3, after a blank line
    with pytest.raises(DataError) as error:
        read_jsonl(path)
    assert str(error.value).startswith(f"{path}:3: ")
    assert expected in str(error.value)


def test_load_image_errors_name_path_and_id(tmp_path: Path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not a png at all")
    for path in (tmp_path / "missing.png", garbage):
        with pytest.raises(DataError, match="sample 'q7'") as error:
            load_image(Sample("q7", str(path), "?", None, "x", None))
        assert str(path) in str(error.value)


def test_format_choices():
    assert format_choices(["red", "green", "two\nlines"]) == "(A) red (B) green (C) two lines"
    assert format_choices(None) == ""


def test_load_samples_dispatches(folder: Path):
    write_jsonl(folder / "set.jsonl", [record()])
    assert [s.id for s in load_samples(str(folder / "set.jsonl"), n_synthetic=3, seed=0)] == ["q1"]
    assert [s.id for s in load_samples("synthetic", n_synthetic=3, seed=5)] == [f"synthetic-5-{i}" for i in range(3)]


# ----------------------------------------------------------------------------------------------------------------
# The synthetic task

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
    """Name the pattern from pixels alone, independently of how data.py draws it."""
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


# ----------------------------------------------------------------------------------------------------------------
# Sharding and batching


def fake_samples(n: int) -> list[Sample]:
    return [Sample(str(i), "unused.png", "?", None, "x", None) for i in range(n)]


@pytest.mark.parametrize("n, world_size", [(10, 3), (8, 4), (5, 1), (2, 3)])
def test_shards_equal_and_disjoint(n, world_size):
    samples = fake_samples(n)
    shards = [shard(samples, rank, world_size) for rank in range(world_size)]
    assert all(len(s) == n // world_size for s in shards)
    ids = [s.id for part in shards for s in part]
    assert len(ids) == len(set(ids)) == (n // world_size) * world_size
    assert [s.id for s in shard(fake_samples(10), rank=1, world_size=3)] == ["1", "4", "7"]
    with pytest.raises(ValueError):
        shard(samples, rank=world_size, world_size=world_size)


def take(stream, k):
    return [[s.id for s in next(stream)] for _ in range(k)]


def test_batches_deterministic_and_covering():
    samples = fake_samples(12)
    first = take(batches(samples, batch_size=4, seed=7), 9)  # three epochs
    assert first == take(batches(samples, batch_size=4, seed=7), 9)
    assert first != take(batches(samples, batch_size=4, seed=8), 9)
    assert all(len(batch) == 4 for batch in first)
    epochs = [sum(first[e * 3 : e * 3 + 3], []) for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch, key=int) == [s.id for s in samples]  # each epoch covers every sample once
    assert epochs[0] != epochs[1]  # a fresh permutation per epoch


def test_batches_drop_the_incomplete_tail_and_reject_small_sets():
    stream = batches(fake_samples(10), batch_size=4, seed=0)
    epoch = take(stream, 2)
    assert len(set(sum(epoch, []))) == 8
    with pytest.raises(DataError):
        batches(fake_samples(3), batch_size=4, seed=0)  # raised at call time, not at the first next()
