"""Tests for data.py: the JSONL reader and its errors, sharding and batching (the synthetic task: test_synthetic.py)."""

import json
from pathlib import Path

import pytest
from PIL import Image

from data import DataError, Sample, batches, format_choices, load_image, load_samples, read_jsonl, shard

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
