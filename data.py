"""Samples: the record, its readers, the synthetic high-resolution task, sharding and batching.

A sample is one question about one image, stored as one JSON line (DESIGN.md, "Sample"):

    {"id": "cup-12", "image": "images/12.jpg", "question": "What colour is the cup?",
     "options": ["red", "blue"], "answer": "B", "boxes": [[410, 220, 470, 300]]}

`boxes` are in original-image pixels, nested smallest first (LFPC stage II uses them for the grounding reward);
an optional `"global_size": [w, h]` is the info-gap view chosen by offline resolution selection (LFPC stage I).

Three published high-resolution benchmarks are read from the files as they are distributed (a V* Bench folder, an
HR-Bench TSV, an MME-RealWorld JSON) into the same record; `read_benchmark` picks the reader from the path, and
`meta["group"]` names the breakdown the benchmark's results are reported by.

The synthetic task needs no files: a small red frame somewhere on a large cluttered canvas (with four frames of
other colours) holds a fine pattern that averages to grey once the canvas is downscaled to what a model sees, so the
question can only be answered by cropping the original.

    >>> train = load_samples("synthetic", n_synthetic=64, seed=0)
    >>> bench = load_samples("benchmarks/hr_bench_4k.tsv", n_synthetic=0, seed=0)
    >>> for batch in batches(shard(train, rank=0, world_size=2), batch_size=4, seed=0):
    ...     break
"""

import base64
import binascii
import csv
import io
import itertools
import functools
import json
import math
import re
import string
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image, ImageDraw

LETTERS = string.ascii_uppercase

# The synthetic task. The frame must survive a 4x downscale (896 -> 224) while the pattern must not.
CANVAS_SIZE = 896
TARGET_SIDE = (96, 112)  # outer side of the red frame in pixels, inclusive range: about one visual token
FRAME_THICKNESS = 16  # thick, so the frame dominates its visual token (the tiny model never found a 6-px ring)
PATTERN_PERIOD = 4  # equal to the downscale factor, so every output pixel averages whole periods to grey
# The target's frame and four distractor frames, each around a pattern of its own: the global view shows five
# frames, only the question says which one matters. A model that boxes "some frame" hits the target 1 time in 5.
FRAME_COLOURS = {"red": (220, 20, 20), "yellow": (220, 220, 20), "magenta": (220, 20, 220), "orange": (230, 130, 20),
                 "purple": (120, 20, 200)}
FRAME_GAP = 16  # pixels between two frames, so a crop that holds one frame whole rarely holds another
NOISE_STD = 8.0
PATTERNS = ("horizontal stripes", "vertical stripes", "checkerboard", "diagonal stripes")
SYNTHETIC_QUESTION = "What pattern is inside the red frame?"


class DataError(ValueError):
    """A sample, file or image that cannot be used as given."""


@dataclass
class Sample:
    """One question about one image.

    `image` is a path, the bytes of an encoded image file (HR-Bench ships its images as base64 inside the TSV), or
    an in-memory image for synthetic data; `answer` is an option letter when `options` are given, else free text;
    `boxes` are original-image pixels [x1, y1, x2, y2], nested smallest first (V* boxes are one per target object
    instead, see read_vstar). `meta` is what a benchmark says besides the question: "benchmark" (its name), "group"
    (the breakdown its results are reported by), "category", and reader-specific keys.

    >>> Sample("q1", "cat.jpg", "What animal is it?", ["dog", "cat"], "B", None)
    >>> Sample("hrbench-7", jpeg_bytes, "What colour is the car?", ["red", "blue"], "A", None,
    ...        meta={"benchmark": "hrbench", "group": "single", "cycle_category": "7"})
    """

    id: str
    image: str | bytes | Image.Image
    question: str
    options: list[str] | None
    answer: str
    boxes: list[list[float]] | None
    global_size: list[int] | None = None
    meta: dict = field(default_factory=dict)


def load_image(sample: Sample) -> Image.Image:
    """The sample's image in RGB, fully decoded, whether it is a path, encoded bytes or already an image.

    >>> load_image(sample).size
    (896, 896)
    """
    if isinstance(sample.image, Image.Image):
        return sample.image.convert("RGB")
    # convert() forces the decode here, so a truncated file fails now rather than deep inside a rollout.
    return _with_image(sample, lambda image: image.convert("RGB"))


MIN_IMAGE_SIDE = 28  # one patch of 14 px merged 2x2: anything smaller holds no visual token of its own


def check_image(sample: Sample) -> None:
    """Stop on an image that cannot be used, before training starts: unreadable, over Pillow's
    decompression-bomb limit, or smaller than 28 px on a side (e.g. a 1x1 placeholder). Reads the header and
    verifies the file's structure without decoding every pixel."""
    if isinstance(sample.image, Image.Image):
        return
    width, height = _with_image(sample, _verified_size)
    if min(width, height) < MIN_IMAGE_SIDE:
        raise DataError(f"image of sample {sample.id!r} is {width}x{height}: smaller than {MIN_IMAGE_SIDE} px a side")


def _verified_size(image: Image.Image) -> tuple[int, int]:
    size = image.size
    image.verify()
    return size


def _with_image(sample: Sample, use: Callable[[Image.Image], object]):
    """use(the opened image), with every way the file can fail turned into a DataError naming it."""
    if isinstance(sample.image, bytes):
        source, name = io.BytesIO(sample.image), f"<{len(sample.image)} encoded bytes>"  # not megabytes of repr
    else:
        source, name = sample.image, sample.image
    try:
        with Image.open(source) as image:
            return use(image)
    except Image.DecompressionBombError as e:
        raise DataError(f"image {name} of sample {sample.id!r} is over Pillow's decompression-bomb limit: {e} "
                        f"(raise PIL.Image.MAX_IMAGE_PIXELS if the image is trusted)") from e
    except (OSError, SyntaxError) as e:  # verify() reports a broken file as SyntaxError
        raise DataError(f"cannot read image {name} of sample {sample.id!r}: {e}") from e


# ----------------------------------------------------------------------------------------------------------------
# JSONL reader


def read_jsonl(path: str | Path, skipped: list[str] | None = None) -> list[Sample]:
    """Read and validate one sample per line; image paths are resolved against the JSONL's folder.

    >>> read_jsonl("data/train.jsonl")[0].image
    '/abs/path/data/images/12.jpg'

    Raises DataError("data/train.jsonl:7: <what is wrong>") on the first bad line.
    """
    folder = Path(path).resolve().parent
    with open(path, encoding="utf-8") as f:
        lines = ((f"{path}:{lineno}", line) for lineno, line in enumerate(f, start=1) if line.strip())
        return _parse_all(lines, lambda line: _parse_line(line, folder), skipped)


def _parse_line(line: str, folder: Path) -> Sample:
    record = _object(_json(line))
    sample_id, image, question, answer = (_field(record, key) for key in ("id", "image", "question", "answer"))
    options = _check_options(record.get("options"), answer)
    boxes = _check_boxes(record.get("boxes"))
    global_size = _check_global_size(record.get("global_size"))
    return Sample(sample_id, _image_path(folder, image), question, options, answer, boxes, global_size)


def _check_global_size(size) -> list[int] | None:
    if size is None:
        return None
    ok = isinstance(size, list) and len(size) == 2
    if not (ok and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise DataError(f"bad global_size {size!r}: expected [width, height] of 2 positive integers")
    return size


# ----------------------------------------------------------------------------------------------------------------
# Benchmark readers: V* Bench, HR-Bench and MME-RealWorld, as they are published

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
    ours, so eval scores a crop against its best-matching target. The folder's test_questions.jsonl repeats the
    questions in another form and is not needed: the per-image JSON files are the source of truth.

    >>> s = read_vstar("benchmarks/vstar_bench")[0]
    >>> s.id, s.answer, s.boxes, s.meta["target_object"]
    ('direct_attributes/sa_4690', 'A', [[1012.0, 1550.0, 1058.0, 1588.0]], ['glove'])
    """
    files = []
    for category in VSTAR_CATEGORIES:
        if not (Path(folder) / category).is_dir():
            raise DataError(f"{folder}: no {category}/ folder; V* Bench has {' and '.join(VSTAR_CATEGORIES)}")
        files += sorted((Path(folder) / category).glob("*.json"))  # sorted: the same order on every machine
    return _parse_all(((str(path), path) for path in files), _vstar_sample, skipped)


def _vstar_sample(path: Path) -> Sample:
    record = _object(_json(path.read_text(encoding="utf-8")))
    question = _field(record, "question")
    options = _check_options(_field(record, "options", list), "A")
    boxes = _xywh_boxes(_field(record, "bbox", list))
    targets = _field(record, "target_object", list)
    if len(targets) != len(boxes) or not all(isinstance(t, str) for t in targets):
        raise DataError(f"'target_object' must be a list of strings, one per box of 'bbox' ({len(boxes)})")
    category = path.parent.name
    image = _image_path(path.resolve().parent, f"{path.stem}.jpg")
    meta = {"benchmark": "vstar", "category": category, "group": category, "target_object": targets}
    return Sample(f"{category}/{path.stem}", image, question, options, "A", boxes, meta=meta)


def _xywh_boxes(bbox: list) -> list[list[float]]:
    if not bbox or not all(_is_box(box) and box[2] > 0 and box[3] > 0 for box in bbox):
        raise DataError(f"bad 'bbox' {bbox!r}: expected a non-empty list of [x, y, w, h], 4 numbers, w and h > 0")
    return _check_boxes([[x, y, x + w, y + h] for x, y, w, h in bbox])


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
        return _parse_all(rows, lambda row: _hrbench_sample(row, header), skipped)


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
    options = _check_options([fields[letter] for letter in "ABCD"], fields["answer"])
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
    with open(json_path, encoding="utf-8") as f, _errors_at(json_path):
        records = _json(f.read())
        if not isinstance(records, list):
            raise DataError(f"expected a JSON list of records, got {type(records).__name__}")
    located = ((_mme_where(json_path, i, record), record) for i, record in enumerate(records))
    return _parse_all(located, lambda record: _mme_sample(record, root), skipped)


def _mme_where(path: str | Path, i: int, record) -> str:
    question_id = record.get("Question_id") if isinstance(record, dict) else None
    return f"{path}: record {i}" + ("" if question_id is None else f" (Question_id {question_id!r})")


def _mme_sample(record, root: Path) -> Sample:
    record = _object(record)
    question_id = _field(record, "Question_id", (str, int))
    image = _image_path(root, _field(record, "Image"))
    question, answer = _field(record, "Text"), _field(record, "Ground truth")
    choices = _check_options(_field(record, "Answer choices", list), answer)
    options = [CHOICE_LETTER.sub("", choice) for choice in choices]
    category, subtask, task = (_field(record, key) for key in ("Category", "Subtask", "Task"))
    meta = {"benchmark": "mme_realworld", "category": category, "subtask": subtask, "task": task, "group": task}
    return Sample(str(question_id), image, question, options, answer, None, meta=meta)


# ----------------------------------------------------------------------------------------------------------------
# Checks shared by the readers

KIND_NAMES = {str: "a string", list: "a list", (str, int): "a string or an integer"}  # for _field's errors


def _parse_all(located: Iterable[tuple[str, object]], parse: Callable[[object], Sample],
               skipped: list[str] | None = None) -> list[Sample]:
    """parse(record) and check_image for each (where, record). The first error, prefixed with its `where`
    (file:line, ...), stops the read; with a `skipped` list it is appended there instead and the record left out."""
    samples, seen_ids = [], set()
    for where, record in located:
        try:
            with _errors_at(where):
                sample = parse(record)
                if sample.id in seen_ids:
                    raise DataError(f"duplicate id {sample.id!r}")
                check_image(sample)
        except DataError as e:
            if skipped is None:
                raise
            skipped.append(str(e))
            continue
        seen_ids.add(sample.id)
        samples.append(sample)
    return samples


@contextmanager
def _errors_at(where: str | Path) -> Iterator[None]:
    try:
        yield
    except DataError as e:
        raise DataError(f"{where}: {e}") from None


def _json(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON ({e.msg})") from None


def _object(value) -> dict:
    if not isinstance(value, dict):
        raise DataError(f"expected a JSON object, got {type(value).__name__}")
    return value


def _field(record: dict, key: str, kind: type | tuple[type, ...] = str):
    if key not in record:
        raise DataError(f"missing field {key!r}")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool):  # bool is an int, but `true` here is a bug
        raise DataError(f"field {key!r} must be {KIND_NAMES[kind]}, got {type(value).__name__}")
    return value


def _image_path(folder: Path, name: str) -> str:
    image = folder / name  # an absolute name stays as it is
    if not image.is_file():
        raise DataError(f"image not found: {image}")
    return str(image)


def _check_options(options, answer: str) -> list[str] | None:
    if options is None:
        return None
    if not isinstance(options, list) or not options or not all(isinstance(o, str) for o in options):
        raise DataError("'options' must be a non-empty list of strings or null")
    if len(options) > len(LETTERS):
        raise DataError(f"{len(options)} options, at most {len(LETTERS)} have a letter")
    if answer not in LETTERS[: len(options)]:
        raise DataError(f"answer {answer!r} is not one of the option letters {LETTERS[: len(options)]}")
    return options


def _check_boxes(boxes) -> list[list[float]] | None:
    if boxes is None:
        return None
    if not isinstance(boxes, list) or not boxes:
        raise DataError("'boxes' must be a non-empty list of [x1, y1, x2, y2] or null")
    for box in boxes:
        if not _is_box(box):
            raise DataError(f"bad box {box!r}: expected [x1, y1, x2, y2] of 4 numbers")
        x1, y1, x2, y2 = box
        if not (x1 < x2 and y1 < y2):
            raise DataError(f"bad box {box!r}: needs x1 < x2 and y1 < y2")
    return [[float(v) for v in box] for box in boxes]


def _is_box(value) -> bool:
    return isinstance(value, list) and len(value) == 4 and all(_is_number(v) for v in value)


def _is_number(value) -> bool:
    # bool is an int in Python, but `true` in a box is a bug in the file
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def format_choices(options: list[str] | None) -> str:
    """The options as one line for a prompt.

    >>> format_choices(["red", "green"])
    '(A) red (B) green'
    """
    if options is None:
        return ""
    # collapse any newline inside an option so the prompt template keeps its line structure
    return " ".join(f"({letter}) {' '.join(option.split())}" for letter, option in zip(LETTERS, options))


# ----------------------------------------------------------------------------------------------------------------
# The synthetic high-resolution task


def synthetic_samples(n: int, seed: int) -> list[Sample]:
    """`n` samples of "which pattern is inside the red frame", deterministic by `seed`.

    Sample i depends only on (seed, i), so synthetic_samples(10, s)[:5] == synthetic_samples(5, s).
    `meta["frames"]` lists the five frames, red first: {"colour", "box" (original pixels), "pattern"}.

    >>> s = synthetic_samples(1, seed=0)[0]
    >>> s.question, s.options, s.answer   # ('What pattern is inside the red frame?', [4 pattern names], 'C')
    >>> [f["colour"] for f in s.meta["frames"]]   # ['red', 'yellow', 'magenta', 'orange', 'purple']
    """
    return [_synthetic_sample(np.random.default_rng([seed, i]), f"synthetic-{seed}-{i}") for i in range(n)]


def _synthetic_sample(rng: np.random.Generator, sample_id: str) -> Sample:
    canvas = _cluttered_canvas(rng)
    frames = []
    for colour, box in zip(FRAME_COLOURS, _frame_boxes(rng, len(FRAME_COLOURS))):
        pattern = PATTERNS[int(rng.integers(len(PATTERNS)))]
        x1, y1, x2, y2 = (int(v) for v in box)
        canvas.paste(Image.fromarray(_target(x2 - x1, pattern, FRAME_COLOURS[colour])), (x1, y1))  # over clutter
        frames.append({"colour": colour, "box": box, "pattern": pattern})

    order = [int(k) for k in rng.permutation(len(PATTERNS))]  # shuffled so the answer letter carries no signal
    target_box, pattern = frames[0]["box"], frames[0]["pattern"]
    return Sample(
        id=sample_id,
        image=canvas,
        question=SYNTHETIC_QUESTION,
        options=[PATTERNS[k] for k in order],
        answer=LETTERS[order.index(PATTERNS.index(pattern))],
        boxes=[target_box, _context_box(target_box)],
        meta={"benchmark": "synthetic", "group": "synthetic", "frames": frames},
    )


def _frame_boxes(rng: np.random.Generator, count: int) -> list[list[float]]:
    """`count` square boxes of TARGET_SIDE sides on the canvas, at least FRAME_GAP apart (rejection sampling)."""
    boxes = []
    while len(boxes) < count:
        side = int(rng.integers(TARGET_SIDE[0], TARGET_SIDE[1] + 1))
        x1, y1 = (int(v) for v in rng.integers(0, CANVAS_SIZE - side + 1, size=2))
        box = [float(x1), float(y1), float(x1 + side), float(y1 + side)]
        if all(_apart(box, other) for other in boxes):
            boxes.append(box)
    return boxes


def _apart(a: list[float], b: list[float]) -> bool:
    return (a[0] >= b[2] + FRAME_GAP or b[0] >= a[2] + FRAME_GAP or a[1] >= b[3] + FRAME_GAP
            or b[1] >= a[3] + FRAME_GAP)


def _cluttered_canvas(rng: np.random.Generator) -> Image.Image:
    """A colour ramp (green grows to the right, blue downwards, red stays low) with grain and clutter on top.

    The ramp is the tiny model's sense of place: Qwen2.5-VL's visual tokens carry their position only as rotary
    phases, and the 0.6M-parameter demo model could not learn to turn those into box coordinates (measured in the
    issue note); with the ramp a visual token's own colour says where it is, as a pretrained VLM's features would.
    Pixel (x, y) of the background is (30, 70 + 140 x / 896, 70 + 140 y / 896) plus grey grain.
    """
    grain = rng.normal(0.0, NOISE_STD, size=(CANVAS_SIZE, CANVAS_SIZE, 1))  # the same on all channels: no hue shift
    canvas = Image.fromarray(np.clip(_ramp() + grain, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(8, 16))):
        x, y, w, h = (int(v) for v in rng.integers([0, 0, 16, 16], [CANVAS_SIZE, CANVAS_SIZE, 200, 200]))
        if rng.random() < 0.3:  # small filled blocks, so that most of the ramp stays in view
            draw.rectangle([x, y, x + w // 3, y + h // 3], fill=_clutter_colour(rng))
        else:  # outlined rectangles: distractors that look like the target frame except for its colour
            draw.rectangle([x, y, x + w, y + h], outline=_clutter_colour(rng), width=int(rng.integers(2, 9)))
    for _ in range(int(rng.integers(4, 10))):
        ends = [int(v) for v in rng.integers(0, CANVAS_SIZE, size=4)]
        draw.line(ends, fill=_clutter_colour(rng), width=int(rng.integers(1, 6)))
    return canvas


@functools.cache
def _ramp() -> np.ndarray:
    y, x = np.mgrid[0:CANVAS_SIZE, 0:CANVAS_SIZE] / CANVAS_SIZE
    return np.stack([np.full_like(x, 30.0), 70 + 140 * x, 70 + 140 * y], axis=-1)


def _clutter_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    if rng.random() < 0.5:
        return (int(rng.integers(40, 220)),) * 3
    r, g, b = (int(v) for v in rng.integers(150, 240, size=3))
    # a pastel never redder than its green or blue channel, so "the red frame" stays unique
    return min(r, max(g, b)), g, b


def _target(side: int, pattern: str, frame_colour: tuple[int, int, int]) -> np.ndarray:
    """A `frame_colour` frame of outer `side` pixels around a black-and-white `pattern`, as uint8 (side, side, 3)."""
    inner = side - 2 * FRAME_THICKNESS
    y, x = np.mgrid[0:inner, 0:inner]
    half = PATTERN_PERIOD // 2
    stripes = {
        "horizontal stripes": y // half,
        "vertical stripes": x // half,
        "checkerboard": x // half + y // half,
        "diagonal stripes": (x + y) // half,
    }[pattern]
    target = np.empty((side, side, 3), dtype=np.uint8)
    target[:] = frame_colour
    t = FRAME_THICKNESS
    target[t:-t, t:-t] = (stripes % 2 * 255).astype(np.uint8)[..., None]
    return target


def _context_box(box: list[float]) -> list[float]:
    """A box twice the side of `box`, centred on it, clamped to the canvas."""
    x1, y1, x2, y2 = box
    cx, cy, half = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1  # twice the side: half-width of one side
    size = float(CANVAS_SIZE)
    return [max(cx - half, 0.0), max(cy - half, 0.0), min(cx + half, size), min(cy + half, size)]


# ----------------------------------------------------------------------------------------------------------------
# Sharding and batching


def shard(samples: list[Sample], rank: int, world_size: int) -> list[Sample]:
    """Every `world_size`-th sample starting at `rank`, all ranks getting the same count.

    The remainder is dropped because under FSDP every rank must run the same number of forward/backward calls:
    one extra step on one rank waits forever for the others' collectives.

    >>> [s.id for s in shard(samples, rank=1, world_size=3)]   # 10 samples -> ids 1, 4, 7 (9 is dropped)
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    return samples[rank::world_size][: len(samples) // world_size]


def batches(samples: list[Sample], batch_size: int, seed: int) -> Iterator[list[Sample]]:
    """An endless stream of batches; each epoch is a fresh permutation from default_rng(seed + epoch).

    The last incomplete batch of an epoch is dropped so that every step sees `batch_size` prompts.

    >>> stream = batches(samples, batch_size=8, seed=0)
    >>> first = next(stream)   # 8 samples
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if len(samples) < batch_size:
        raise DataError(f"{len(samples)} samples cannot fill one batch of {batch_size}")
    return _batch_stream(samples, batch_size, seed)  # checks above run at call time, not at the first next()


def _batch_stream(samples: list[Sample], batch_size: int, seed: int) -> Iterator[list[Sample]]:
    for epoch in itertools.count():
        order = np.random.default_rng(seed + epoch).permutation(len(samples))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield [samples[k] for k in order[start : start + batch_size]]


def load_samples(spec: str, n_synthetic: int, seed: int, skipped: list[str] | None = None) -> list[Sample]:
    """"synthetic" for the synthetic task, otherwise a path that read_benchmark reads (JSONL, V*, HR-Bench, ...).

    >>> len(load_samples("synthetic", n_synthetic=16, seed=0))
    16
    """
    if spec == "synthetic":
        return synthetic_samples(n_synthetic, seed)
    return read_benchmark(spec, skipped)
