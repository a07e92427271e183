"""Three published high-resolution benchmarks, read from the files as they are distributed (a V* Bench folder, an
HR-Bench TSV, an MME-RealWorld JSON) into data.py's Sample record. `read_benchmark` picks the reader from the path,
and `meta["group"]` names the breakdown the benchmark's results are reported by.

    >>> bench = read_benchmark("benchmarks/hr_bench_4k.tsv")
    >>> sorted({s.meta["group"] for s in bench})
    ['cross', 'single']
"""

import base64
import binascii
import csv
import re
import sys
from pathlib import Path

from data import (DataError, Sample, check_boxes, check_options, errors_at, image_path, is_box, json_object,
                  parse_all, parse_json, read_jsonl, record_field)

VSTAR_CATEGORIES = ("direct_attributes", "relative_position")
HRBENCH_COLUMNS = ("index", "question", "answer", "category", "A", "B", "C", "D", "cycle_category", "image")
CHOICE_LETTER = re.compile(r"^\([A-Z]\)\s*")  # the "(A) " that MME-RealWorld writes before each choice


def read_benchmark(spec: str | Path, skipped: list[str] | None = None) -> list[Sample]:
    """The samples of a benchmark, the reader chosen by the kind of path ("synthetic" is load_samples' job):

        a folder   V* Bench             read_vstar
        *.tsv      HR-Bench 4K or 8K    read_hrbench
        *.json     MME-RealWorld        read_mme_realworld
        *.jsonl    our own samples      read_jsonl, all in the group "all"

    >>> sorted({s.meta["group"] for s in read_benchmark("benchmarks/vstar_bench")})
    ['direct_attributes', 'relative_position']
    """
    path = Path(spec)
    if path.is_dir():
        return read_vstar(spec, skipped)
    if path.suffix.lower() == ".tsv":
        return read_hrbench(spec, skipped)
    if path.suffix.lower() == ".json":
        return read_mme_realworld(spec, skipped=skipped)
    if path.suffix.lower() == ".jsonl":
        samples = read_jsonl(spec, skipped)
        for s in samples:
            s.meta = {"benchmark": "jsonl", "group": "all", **s.meta}
        return samples
    raise DataError(f"{spec}: unknown kind of benchmark; expected a V* Bench folder, an HR-Bench .tsv, "
                    f"an MME-RealWorld .json or a .jsonl of samples")


def read_vstar(folder: str | Path, skipped: list[str] | None = None) -> list[Sample]:
    """V* Bench from its published folder: one JSON file per image, in one sub-folder per category.

        vstar_bench/direct_attributes/sa_4690.jpg
        vstar_bench/direct_attributes/sa_4690.json
            {"question": "What is the color of the glove?",
             "options": ["black", "white", "red", "blue"],
             "target_object": ["glove"], "bbox": [[1012, 1550, 46, 38]]}
        vstar_bench/relative_position/sa_1234.jpg, sa_1234.json   (two target objects, two boxes)

    The correct option is always listed first, so every answer is "A" (eval shuffles the options before asking).
    `bbox` holds one [x, y, w, h] per target object and becomes [x1, y1, x2, y2]; these boxes are not nested like
    ours: eval's crop IoU is with the best-matching target, its coverage of the first. The folder's
    test_questions.jsonl repeats the questions in another form and is not needed: the per-image JSON files are the
    source of truth.

    >>> s = read_vstar("benchmarks/vstar_bench")[0]
    >>> s.id, s.answer, s.boxes, s.meta["target_object"]
    ('direct_attributes/sa_4690', 'A', [[1012.0, 1550.0, 1058.0, 1588.0]], ['glove'])
    """
    files = []
    for category in VSTAR_CATEGORIES:
        if not (Path(folder) / category).is_dir():
            raise DataError(f"{folder}: no {category}/ folder; V* Bench has {' and '.join(VSTAR_CATEGORIES)}")
        files += sorted((Path(folder) / category).glob("*.json"))  # sorted: the same order on every machine
    return parse_all(((str(path), path) for path in files), _vstar_sample, skipped)


def _vstar_sample(path: Path) -> Sample:
    record = json_object(parse_json(path.read_text(encoding="utf-8")))
    question = record_field(record, "question")
    options = check_options(record_field(record, "options", list), "A")
    boxes = _xywh_boxes(record_field(record, "bbox", list))
    targets = record_field(record, "target_object", list)
    if len(targets) != len(boxes) or not all(isinstance(t, str) for t in targets):
        raise DataError(f"'target_object' must be a list of strings, one per box of 'bbox' ({len(boxes)})")
    category = path.parent.name
    image = image_path(path.resolve().parent, f"{path.stem}.jpg")
    meta = {"benchmark": "vstar", "category": category, "group": category, "target_object": targets}
    return Sample(f"{category}/{path.stem}", image, question, options, "A", boxes, meta=meta)


def _xywh_boxes(bbox: list) -> list[list[float]]:
    if not bbox or not all(is_box(box) and box[2] > 0 and box[3] > 0 for box in bbox):
        raise DataError(f"bad 'bbox' {bbox!r}: expected a non-empty list of [x, y, w, h], 4 numbers, w and h > 0")
    return check_boxes([[x, y, x + w, y + h] for x, y, w, h in bbox])


def read_hrbench(tsv_path: str | Path, skipped: list[str] | None = None) -> list[Sample]:
    """HR-Bench 4K or 8K from its published TSV: a header row, then one question per row with its image inline.

        index  question                     answer  category  A    B     C      D       cycle_category  image
        0      What color is the umbrella?  B       single    red  blue  green  yellow  0               /9j/4AAQSk...

    `image` is a base64 JPEG, kept as its encoded bytes (load_image decodes them); `category` is "single" or
    "cross" (single-instance or cross-instance perception). Every question comes back in several rows with its
    options rotated; `cycle_category` is the rotation index, shared by all the questions asked in that rotation
    (not by the rows of one question). The benchmark's accuracy is the mean over rotations of each rotation's
    accuracy, as HR-Bench's own evaluation groups by `cycle_category` (eval.accuracy). Other columns are ignored.

    >>> s = read_hrbench("benchmarks/hr_bench_4k.tsv")[0]
    >>> s.id, s.options, s.answer, s.meta["cycle_category"]
    ('hrbench-0', ['red', 'blue', 'green', 'yellow'], 'B', '0')
    """
    _allow_large_csv_fields()
    with open(tsv_path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, [])
        missing = [column for column in HRBENCH_COLUMNS if column not in header]
        if missing:
            raise DataError(f"{tsv_path}: missing column(s) {', '.join(map(repr, missing))} in the header row")
        rows = ((f"{tsv_path}:{reader.line_num}", row) for row in reader if row)
        return parse_all(rows, lambda row: _hrbench_sample(row, header), skipped)


def _allow_large_csv_fields() -> None:
    # A base64 image is megabytes, far over csv's default limit of 128 KiB per field. sys.maxsize overflows the C
    # long where that is 32 bits (Windows), and 2 GiB is as good a limit there.
    try:
        csv.field_size_limit(sys.maxsize)
    except OverflowError:
        csv.field_size_limit(2**31 - 1)


def _hrbench_sample(row: list[str], header: list[str]) -> Sample:
    if len(row) != len(header):
        raise DataError(f"{len(row)} fields where the header has {len(header)}")
    fields = dict(zip(header, row))
    index, category = fields["index"], fields["category"]
    try:
        image = base64.b64decode(fields["image"], validate=True)
    except binascii.Error:
        raise DataError(f"broken base64 image (index {index})") from None
    options = check_options([fields[letter] for letter in "ABCD"], fields["answer"])
    meta = {"benchmark": "hrbench", "category": category, "group": category,
            "cycle_category": fields["cycle_category"], "index": index}
    return Sample(f"hrbench-{index}", image, fields["question"], options, fields["answer"], None, meta=meta)


def read_mme_realworld(json_path: str | Path, image_root: str | Path | None = None,
                       skipped: list[str] | None = None) -> list[Sample]:
    """MME-RealWorld from its published JSON: a list of records whose images lie under `image_root`.

        [{"Question_id": "perception/ocr_cc/book_map_poster/0913", "Image": "imgs/poster_0913.png",
          "Text": "What dish does the menu show?", "Question Type": "Multiple Choice",
          "Answer choices": ["(A) Ribs", "(B) Noodles", "(C) Rice", "(D) Soup", "(E) The image does not feature it."],
          "Ground truth": "B", "Category": "book_map_poster", "Subtask": "OCR with Complex Context",
          "Task": "Perception"},
         ...]

    `image_root` defaults to the JSON's folder. The "(A) " prefixes are dropped from the choices because the prompt
    adds the letters back (format_choices). Results are reported per Task (Perception, Reasoning): the group.
    Errors name a record by its position in the list, counted from 0.

    >>> s = read_mme_realworld("benchmarks/MME-RealWorld/MME_RealWorld.json")[0]
    >>> s.options[:2], s.answer, s.meta["group"]
    (['Ribs', 'Noodles'], 'B', 'Perception')
    """
    root = Path(json_path).resolve().parent if image_root is None else Path(image_root).resolve()
    with open(json_path, encoding="utf-8") as f, errors_at(json_path):
        records = parse_json(f.read())
        if not isinstance(records, list):
            raise DataError(f"expected a JSON list of records, got {type(records).__name__}")
    located = ((_mme_where(json_path, i, record), record) for i, record in enumerate(records))
    return parse_all(located, lambda record: _mme_sample(record, root), skipped)


def _mme_where(path: str | Path, i: int, record) -> str:
    question_id = record.get("Question_id") if isinstance(record, dict) else None
    return f"{path}: record {i}" + ("" if question_id is None else f" (Question_id {question_id!r})")


def _mme_sample(record, root: Path) -> Sample:
    record = json_object(record)
    question_id = record_field(record, "Question_id", (str, int))
    image = image_path(root, record_field(record, "Image"))
    question, answer = record_field(record, "Text"), record_field(record, "Ground truth")
    choices = check_options(record_field(record, "Answer choices", list), answer)
    options = [CHOICE_LETTER.sub("", choice) for choice in choices]
    category, subtask, task = (record_field(record, key) for key in ("Category", "Subtask", "Task"))
    meta = {"benchmark": "mme_realworld", "category": category, "subtask": subtask, "task": task, "group": task}
    return Sample(str(question_id), image, question, options, answer, None, meta=meta)
