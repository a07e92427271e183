"""Samples: the record, its checks, the JSONL reader, sharding and batching.

A sample is one question about one image, stored as one JSON line (DESIGN.md, "Sample"):

    {"id": "cup-12", "image": "images/12.jpg", "question": "What colour is the cup?",
     "options": ["red", "blue"], "answer": "B", "boxes": [[410, 220, 470, 300]]}

`boxes` are in original-image pixels, nested smallest first (LFPC stage II uses them for the grounding reward);
an optional `"global_size": [w, h]` is the info-gap view chosen by offline resolution selection (LFPC stage I).

The published benchmarks are read into the same record by benchmarks.py, with the checks below (parse_all and the
field checks); the synthetic task that needs no files is synthetic.py.

    >>> train = load_samples("synthetic", n_synthetic=64, seed=0)
    >>> bench = load_samples("benchmarks/hr_bench_4k.tsv", n_synthetic=0, seed=0)
    >>> for batch in batches(shard(train, rank=0, world_size=2), batch_size=4, seed=0):
    ...     break
"""

import io
import itertools
import json
import math
import string
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image

LETTERS = string.ascii_uppercase


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
        return parse_all(lines, lambda line: _parse_line(line, folder), skipped)


def _parse_line(line: str, folder: Path) -> Sample:
    record = json_object(parse_json(line))
    sample_id, image, question, answer = (record_field(record, key)
                                          for key in ("id", "image", "question", "answer"))
    options = check_options(record.get("options"), answer)
    boxes = check_boxes(record.get("boxes"))
    global_size = _check_global_size(record.get("global_size"))
    return Sample(sample_id, image_path(folder, image), question, options, answer, boxes, global_size)


def _check_global_size(size) -> list[int] | None:
    if size is None:
        return None
    ok = isinstance(size, list) and len(size) == 2
    if not (ok and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise DataError(f"bad global_size {size!r}: expected [width, height] of 2 positive integers")
    return size


# ----------------------------------------------------------------------------------------------------------------
# Checks shared by the readers

KIND_NAMES = {str: "a string", list: "a list", (str, int): "a string or an integer"}  # for record_field's errors


def parse_all(located: Iterable[tuple[str, object]], parse: Callable[[object], Sample],
              skipped: list[str] | None = None) -> list[Sample]:
    """parse(record) and check_image for each (where, record). The first error, prefixed with its `where`
    (file:line, ...), stops the read; with a `skipped` list it is appended there instead and the record left out."""
    samples, seen_ids = [], set()
    for where, record in located:
        try:
            with errors_at(where):
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
def errors_at(where: str | Path) -> Iterator[None]:
    try:
        yield
    except DataError as e:
        raise DataError(f"{where}: {e}") from None


def parse_json(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON ({e.msg})") from None


def json_object(value) -> dict:
    if not isinstance(value, dict):
        raise DataError(f"expected a JSON object, got {type(value).__name__}")
    return value


def record_field(record: dict, key: str, kind: type | tuple[type, ...] = str):
    if key not in record:
        raise DataError(f"missing field {key!r}")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool):  # bool is an int, but `true` here is a bug
        raise DataError(f"field {key!r} must be {KIND_NAMES[kind]}, got {type(value).__name__}")
    return value


def image_path(folder: Path, name: str) -> str:
    image = folder / name  # an absolute name stays as it is
    if not image.is_file():
        raise DataError(f"image not found: {image}")
    return str(image)


def check_options(options, answer: str) -> list[str] | None:
    if options is None:
        return None
    if not isinstance(options, list) or not options or not all(isinstance(o, str) for o in options):
        raise DataError("'options' must be a non-empty list of strings or null")
    if len(options) > len(LETTERS):
        raise DataError(f"{len(options)} options, at most {len(LETTERS)} have a letter")
    if answer not in LETTERS[: len(options)]:
        raise DataError(f"answer {answer!r} is not one of the option letters {LETTERS[: len(options)]}")
    return options


def check_boxes(boxes) -> list[list[float]] | None:
    if boxes is None:
        return None
    if not isinstance(boxes, list) or not boxes:
        raise DataError("'boxes' must be a non-empty list of [x1, y1, x2, y2] or null")
    for box in boxes:
        if not is_box(box):
            raise DataError(f"bad box {box!r}: expected [x1, y1, x2, y2] of 4 numbers")
        x1, y1, x2, y2 = box
        if not (x1 < x2 and y1 < y2):
            raise DataError(f"bad box {box!r}: needs x1 < x2 and y1 < y2")
    return [[float(v) for v in box] for box in boxes]


def is_box(value) -> bool:
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
    """"synthetic" for the synthetic task (synthetic.py), otherwise a path that benchmarks.read_benchmark reads
    (JSONL, V*, HR-Bench, ...).

    >>> len(load_samples("synthetic", n_synthetic=16, seed=0))
    16
    """
    # imported here: both modules build on this one
    if spec == "synthetic":
        from demo.synthetic import synthetic_samples
        return synthetic_samples(n_synthetic, seed)
    from benchmarks import read_benchmark
    return read_benchmark(spec, skipped)
