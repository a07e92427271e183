"""Tests for the benchmark readers of benchmarks.py: V* Bench, HR-Bench, MME-RealWorld, and read_benchmark's dispatch;
and HR-Bench's accuracy over option rotations (eval.accuracy) on rows read from a TSV.

Every fixture is built in tmp_path from code, in its benchmark's published layout, around a few tiny images.
"""

import base64
import csv
import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from answers import answer_matches
from benchmarks import read_benchmark, read_hrbench, read_mme_realworld, read_vstar
from data import DataError, Sample, load_image, load_samples, read_jsonl
from eval import accuracy

RED, GREEN, BLUE = (200, 20, 20), (20, 200, 20), (20, 20, 200)


def encoded(colour, size, kind: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, kind)
    return buffer.getvalue()


def write_image(path: Path, colour, size=(48, 32)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def assert_colour(image: Image.Image, colour, size) -> None:
    """JPEG is lossy, so a flat colour comes back within a few grey levels."""
    assert image.mode == "RGB" and image.size == size
    assert np.abs(np.asarray(image, dtype=np.int16) - np.array(colour)).max() <= 4


# ----------------------------------------------------------------------------------------------------------------
# V* Bench: <folder>/<category>/<stem>.jpg with <stem>.json beside it

VSTAR_SIZE = (96, 80)
VSTAR = {  # "<category>/<stem>": (the JSON record, the image's colour)
    "direct_attributes/sa_1": ({"question": "What is the color of the glove?",
                                "options": ["black", "white", "red", "blue"],
                                "target_object": ["glove"], "bbox": [[10, 20, 30, 40]]}, RED),
    "relative_position/sa_2": ({"question": "Is the cup on the left or on the right of the plate?",
                                "options": ["left", "right"],
                                "target_object": ["cup", "plate"], "bbox": [[1, 2, 3, 4], [50.5, 60, 10, 5]]}, BLUE),
}


def write_vstar(root: Path, **changes) -> Path:
    """The V* folder; `changes` replaces fields of the direct_attributes/sa_1 record (None drops the field)."""
    for name, (record, colour) in VSTAR.items():
        if name == "direct_attributes/sa_1":
            record = {k: v for k, v in {**record, **changes}.items() if v is not None}
        write_image(root / f"{name}.jpg", colour, VSTAR_SIZE)
        (root / f"{name}.json").write_text(json.dumps(record), encoding="utf-8")
    return root


def test_read_vstar(tmp_path: Path):
    root = write_vstar(tmp_path / "vstar_bench")
    (root / "test_questions.jsonl").write_text("not read: the per-image JSON files are the source of truth\n")
    samples = read_vstar(root)
    images = root.resolve()
    assert samples == [
        Sample("direct_attributes/sa_1", str(images / "direct_attributes" / "sa_1.jpg"),
               "What is the color of the glove?", ["black", "white", "red", "blue"], "A",
               [[10.0, 20.0, 40.0, 60.0]],  # [x, y, w, h] = [10, 20, 30, 40] -> [10, 20, 10 + 30, 20 + 40]
               meta={"benchmark": "vstar", "category": "direct_attributes", "group": "direct_attributes",
                     "target_object": ["glove"]}),
        Sample("relative_position/sa_2", str(images / "relative_position" / "sa_2.jpg"),
               "Is the cup on the left or on the right of the plate?", ["left", "right"], "A",
               [[1.0, 2.0, 4.0, 6.0], [50.5, 60.0, 60.5, 65.0]],
               meta={"benchmark": "vstar", "category": "relative_position", "group": "relative_position",
                     "target_object": ["cup", "plate"]}),
    ]
    assert all(type(v) is float for s in samples for box in s.boxes for v in box)
    assert_colour(load_image(samples[0]), RED, VSTAR_SIZE)
    assert_colour(load_image(samples[1]), BLUE, VSTAR_SIZE)


BAD_VSTAR = {
    "missing key": ({"bbox": None}, "missing field 'bbox'"),
    "question not a string": ({"question": 3}, "field 'question' must be a string"),
    "bbox of 3 numbers": ({"bbox": [[1, 2, 3]]}, "bad 'bbox'"),
    "bbox with a string": ({"bbox": [[1, 2, "3", 4]]}, "bad 'bbox'"),
    "bbox of zero width": ({"bbox": [[1, 2, 0, 4]]}, "bad 'bbox'"),
    "bbox empty": ({"bbox": []}, "bad 'bbox'"),
    "one box for two targets": ({"target_object": ["cup", "plate"]}, "one per box of 'bbox'"),
    "no options": ({"options": []}, "'options' must be a non-empty list"),
}


@pytest.mark.parametrize("changes, expected", BAD_VSTAR.values(), ids=BAD_VSTAR.keys())
def test_malformed_vstar_names_the_json_file(tmp_path: Path, changes, expected):
    root = write_vstar(tmp_path, **changes)
    with pytest.raises(DataError) as error:
        read_vstar(root)
    assert str(error.value).startswith(f"{root / 'direct_attributes' / 'sa_1.json'}: ")
    assert expected in str(error.value)


def test_vstar_broken_json_missing_image_missing_category(tmp_path: Path):
    root = write_vstar(tmp_path)
    json_path = root / "relative_position" / "sa_2.json"
    json_path.write_text('{"question": "Is the cup', encoding="utf-8")
    with pytest.raises(DataError, match="not valid JSON") as error:
        read_vstar(root)
    assert str(error.value).startswith(f"{json_path}: ")

    root = write_vstar(tmp_path)
    (root / "relative_position" / "sa_2.jpg").unlink()
    with pytest.raises(DataError, match="image not found") as error:
        read_vstar(root)
    assert str(error.value).startswith(f"{json_path}: ")

    for path in (root / "relative_position").iterdir():
        path.unlink()
    (root / "relative_position").rmdir()
    with pytest.raises(DataError, match="no relative_position/ folder") as error:
        read_vstar(root)
    assert str(error.value).startswith(f"{root}: ")


# ----------------------------------------------------------------------------------------------------------------
# HR-Bench: one TSV, a header row, the image inline in base64

HR_COLUMNS = ["index", "question", "answer", "category", "A", "B", "C", "D", "cycle_category", "image"]
HR_PNG = encoded(GREEN, (40, 30), "PNG")
HR_JPEG = encoded(RED, (48, 32), "JPEG")


def hr_row(index, answer, options, cycle, image=HR_PNG, question='What colour is the "EXIT" sign?',
           category="single") -> dict:
    # the quotes in the question make csv quote the field, as pandas does
    return {"index": str(index), "question": question, "answer": answer, "category": category,
            **dict(zip("ABCD", options)), "cycle_category": str(cycle), "image": base64.b64encode(image).decode()}


def hr_rows() -> list[dict]:
    """One question in two rotations of its options; cycle_category is the rotation's index, not the question's."""
    return [hr_row(0, "B", ["red", "green", "blue", "yellow"], 0),
            hr_row(1, "C", ["yellow", "red", "green", "blue"], 1, image=HR_JPEG)]


def write_tsv(path: Path, rows: list, header=HR_COLUMNS) -> Path:
    """Rows are dicts (written in the header's column order) or lists of fields written as they are."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        writer.writerows([row[c] for c in header] if isinstance(row, dict) else row for row in rows)
    return path


def test_read_hrbench(tmp_path: Path):
    samples = read_hrbench(write_tsv(tmp_path / "hr_bench_4k.tsv", hr_rows()))
    question = 'What colour is the "EXIT" sign?'
    assert samples == [
        Sample("hrbench-0", HR_PNG, question, ["red", "green", "blue", "yellow"], "B", None,
               meta={"benchmark": "hrbench", "category": "single", "group": "single", "cycle_category": "0",
                     "index": "0"}),
        Sample("hrbench-1", HR_JPEG, question, ["yellow", "red", "green", "blue"], "C", None,
               meta={"benchmark": "hrbench", "category": "single", "group": "single", "cycle_category": "1",
                     "index": "1"}),
    ]
    png = load_image(samples[0])
    assert png.size == (40, 30) and png.getpixel((3, 3)) == GREEN  # lossless
    assert_colour(load_image(samples[1]), RED, (48, 32))


def test_hrbench_columns_found_by_name(tmp_path: Path):
    header = ["source", *reversed(HR_COLUMNS)]  # another order, and a column the reader does not use
    rows = [{"source": "test", **row} for row in hr_rows()]
    moved = read_hrbench(write_tsv(tmp_path / "moved.tsv", rows, header))
    assert moved == read_hrbench(write_tsv(tmp_path / "plain.tsv", hr_rows()))


def test_hrbench_image_over_the_default_csv_field_limit(tmp_path: Path):
    noise = np.random.default_rng(0).integers(0, 256, size=(256, 256, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "PNG")
    row = {**hr_rows()[0], "image": base64.b64encode(buffer.getvalue()).decode()}
    assert len(row["image"]) > 131072  # csv's default limit, which a fresh process starts with
    default = csv.field_size_limit(131072)
    try:
        (sample,) = read_hrbench(write_tsv(tmp_path / "big.tsv", [row]))
    finally:
        csv.field_size_limit(default)
    assert np.array_equal(np.asarray(load_image(sample)), noise)


def test_hrbench_accuracy_is_the_mean_over_rotations(tmp_path: Path):
    # Three questions in rotation 0, and (a cut file) only the first of them in rotation 1. A policy that always
    # answers "green" is right on q0 in both rotations and wrong on q1 and q2:
    #   rotation 0: 1/3, rotation 1: 1/1 -> accuracy (1/3 + 1) / 2 = 2/3, as HR-Bench's evaluation averages;
    #   not the row mean 2/4, nor the mean over questions (1 + 0 + 0) / 3 = 1/3.
    rows = [hr_row(0, "B", ["red", "green", "blue", "yellow"], 0, question="q0"),
            hr_row(1, "A", ["red", "green", "blue", "yellow"], 0, question="q1"),
            hr_row(2, "C", ["blue", "red", "yellow", "green"], 0, question="q2", category="cross"),
            hr_row(3, "A", ["green", "blue", "yellow", "red"], 1, question="q0")]
    samples = read_hrbench(write_tsv(tmp_path / "hr.tsv", rows))
    records = [{"id": s.id, "group": s.meta["group"], "cycle": s.meta["cycle_category"],
                "correct": answer_matches("green", s.answer, s.options)} for s in samples]
    assert [r["correct"] for r in records] == [True, False, False, True]
    assert accuracy(records) == pytest.approx(2 / 3)
    single = [r for r in records if r["group"] == "single"]  # per group likewise: rotation 0 1/2, rotation 1 1/1
    assert accuracy(single) == pytest.approx((1 / 2 + 1) / 2)


def hr_bad_row(**changes) -> dict:
    return {**hr_rows()[1], **changes}


BAD_HR_ROWS = {  # the bad row is the second one, on line 3 after the header
    "broken base64": (hr_bad_row(image="not base64 at all!"), "broken base64 image (index 1)"),
    "base64 with bad padding": (hr_bad_row(image="iVBORw0KGgo"), "broken base64 image (index 1)"),
    "answer not a letter": (hr_bad_row(answer="green"), "answer 'green' is not one of the option letters ABCD"),
    "answer E": (hr_bad_row(answer="E"), "answer 'E' is not one of the option letters ABCD"),
    "too few fields": ([v for k, v in hr_bad_row().items() if k != "cycle_category"],
                       "9 fields where the header has 10"),
    "too many fields": ([*hr_bad_row().values(), "extra"], "11 fields where the header has 10"),
    "duplicate index": (hr_bad_row(index="0"), "duplicate id 'hrbench-0'"),
}


@pytest.mark.parametrize("bad, expected", BAD_HR_ROWS.values(), ids=BAD_HR_ROWS.keys())
def test_malformed_hrbench_row_names_file_and_line(tmp_path: Path, bad, expected):
    path = write_tsv(tmp_path / "hr.tsv", [hr_rows()[0], bad])
    with pytest.raises(DataError) as error:
        read_hrbench(path)
    assert str(error.value) == f"{path}:3: {expected}"


def test_hrbench_missing_column_names_file_and_column(tmp_path: Path):
    header = [c for c in HR_COLUMNS if c != "cycle_category"]
    path = write_tsv(tmp_path / "hr.tsv", hr_rows(), header)
    with pytest.raises(DataError) as error:
        read_hrbench(path)
    assert str(error.value).startswith(f"{path}: missing column") and "'cycle_category'" in str(error.value)


# ----------------------------------------------------------------------------------------------------------------
# MME-RealWorld: one JSON list of records, image paths relative to an image root

MME = [
    {"Question_id": "perception/ocr_cc/book_map_poster/0001", "Image": "imgs/poster.png",
     "Text": "What dish does the menu show?", "Question Type": "Multiple Choice",
     "Answer choices": ["(A) Ribs", "(B) Noodles", "(C) Rice", "(D) Soup", "(E) The image does not feature it."],
     "Ground truth": "B", "Category": "book_map_poster", "Subtask": "OCR with Complex Context",
     "Task": "Perception"},
    {"Question_id": 17, "Image": "imgs/road.png", "Text": "Should the red car turn left?",
     "Answer choices": ["(A) Yes", "No prefix here"], "Ground truth": "A",
     "Category": "intention", "Subtask": "Autonomous Driving", "Task": "Reasoning"},
]


def write_mme(json_path: Path, records=MME, image_root: Path | None = None) -> Path:
    image_root = image_root or json_path.parent
    write_image(image_root / "imgs" / "poster.png", GREEN)
    write_image(image_root / "imgs" / "road.png", BLUE, (60, 30))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    return json_path


def expected_mme(image_root: Path) -> list[Sample]:
    images = image_root.resolve() / "imgs"
    return [
        Sample("perception/ocr_cc/book_map_poster/0001", str(images / "poster.png"), "What dish does the menu show?",
               ["Ribs", "Noodles", "Rice", "Soup", "The image does not feature it."], "B", None,
               meta={"benchmark": "mme_realworld", "category": "book_map_poster",
                     "subtask": "OCR with Complex Context", "task": "Perception", "group": "Perception"}),
        Sample("17", str(images / "road.png"), "Should the red car turn left?", ["Yes", "No prefix here"], "A", None,
               meta={"benchmark": "mme_realworld", "category": "intention", "subtask": "Autonomous Driving",
                     "task": "Reasoning", "group": "Reasoning"}),
    ]


def test_read_mme_realworld(tmp_path: Path):
    samples = read_mme_realworld(write_mme(tmp_path / "MME_RealWorld.json"))
    assert samples == expected_mme(tmp_path)
    assert load_image(samples[0]).getpixel((1, 1)) == GREEN
    assert load_image(samples[1]).size == (60, 30)


def test_mme_realworld_image_root(tmp_path: Path):
    json_path = write_mme(tmp_path / "annotations" / "MME_RealWorld.json", image_root=tmp_path / "data")
    assert read_mme_realworld(json_path, image_root=tmp_path / "data") == expected_mme(tmp_path / "data")
    with pytest.raises(DataError, match="image not found"):
        read_mme_realworld(json_path)  # the JSON's own folder holds no imgs/


def mme_bad_record(**changes) -> dict:
    """The second record with `changes` (None drops the field)."""
    return {k: v for k, v in {**MME[1], **changes}.items() if v is not None}


BAD_MME_RECORDS = {  # the bad record is the second one: record 1
    "missing key": (mme_bad_record(**{"Ground truth": None}), "(Question_id 17): missing field 'Ground truth'"),
    "missing Task": (mme_bad_record(Task=None), "(Question_id 17): missing field 'Task'"),
    "letter past the choices": (mme_bad_record(**{"Ground truth": "C"}),
                                "(Question_id 17): answer 'C' is not one of the option letters AB"),
    "choices not a list": (mme_bad_record(**{"Answer choices": "(A) Yes (B) No"}),
                           "(Question_id 17): field 'Answer choices' must be a list, got str"),
    "Question_id true": (mme_bad_record(Question_id=True),
                         "(Question_id True): field 'Question_id' must be a string or an integer, got bool"),
    "missing image": (mme_bad_record(Image="imgs/missing.png"), "(Question_id 17): image not found"),
    "not an object": (["a", "list"], ": expected a JSON object, got list"),
    "duplicate id": (mme_bad_record(Question_id="perception/ocr_cc/book_map_poster/0001"),
                     "(Question_id 'perception/ocr_cc/book_map_poster/0001'): duplicate id"),
}


@pytest.mark.parametrize("bad, expected", BAD_MME_RECORDS.values(), ids=BAD_MME_RECORDS.keys())
def test_malformed_mme_record_names_file_and_record(tmp_path: Path, bad, expected):
    path = write_mme(tmp_path / "MME_RealWorld.json", [MME[0], bad])
    with pytest.raises(DataError) as error:
        read_mme_realworld(path)
    assert str(error.value).startswith(f"{path}: record 1")
    assert expected in str(error.value)


@pytest.mark.parametrize("text, expected", [('[{"Question_id": 1', "not valid JSON"),
                                            ('{"Question_id": 1}', "expected a JSON list of records, got dict")])
def test_malformed_mme_file(tmp_path: Path, text, expected):
    path = tmp_path / "MME_RealWorld.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as error:
        read_mme_realworld(path)
    assert str(error.value).startswith(f"{path}: {expected}")


# ----------------------------------------------------------------------------------------------------------------
# Encoded images, dispatch, load_samples


def test_load_image_of_broken_bytes_names_the_sample():
    sample = Sample("hrbench-9", b"not an image", "?", None, "x", None)
    with pytest.raises(DataError, match=r"cannot read image <12 encoded bytes> of sample 'hrbench-9'"):
        load_image(sample)
    truncated = replace(sample, image=HR_JPEG[: len(HR_JPEG) // 2])
    with pytest.raises(DataError, match="sample 'hrbench-9'"):
        load_image(truncated)


def test_read_benchmark_dispatches_on_the_kind_of_path(tmp_path: Path):
    vstar = write_vstar(tmp_path / "vstar_bench")
    tsv = write_tsv(tmp_path / "hr_bench_8k.tsv", hr_rows())
    mme = write_mme(tmp_path / "mme" / "MME_RealWorld.json")
    assert read_benchmark(vstar) == read_vstar(vstar)
    assert read_benchmark(str(tsv)) == read_hrbench(tsv)
    assert read_benchmark(mme) == read_mme_realworld(mme)

    write_image(tmp_path / "img" / "a.png", GREEN)
    record = {"id": "q1", "image": "img/a.png", "question": "Which colour?", "options": ["red", "green"],
              "answer": "B", "boxes": None}
    (tmp_path / "set.jsonl").write_text(json.dumps(record) + "\n", encoding="utf-8")
    (ours,) = read_benchmark(tmp_path / "set.jsonl")
    assert ours.meta == {"benchmark": "jsonl", "group": "all"}
    assert replace(ours, meta={}) == read_jsonl(tmp_path / "set.jsonl")[0]  # otherwise as read_jsonl reads it

    for unknown in (tmp_path / "hr_bench.csv", tmp_path / "missing_folder"):
        with pytest.raises(DataError, match="V\\* Bench folder") as error:
            read_benchmark(unknown)
        assert str(error.value).startswith(f"{unknown}: ")


def test_load_samples_reads_benchmarks_and_tags_synthetic(tmp_path: Path):
    tsv = write_tsv(tmp_path / "hr_bench_4k.tsv", hr_rows())
    assert load_samples(str(tsv), n_synthetic=3, seed=0) == read_hrbench(tsv)
    for s in load_samples("synthetic", n_synthetic=3, seed=0):
        assert (s.meta["benchmark"], s.meta["group"], len(s.meta["frames"])) == ("synthetic", "synthetic", 5)
