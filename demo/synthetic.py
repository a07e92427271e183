"""The synthetic high-resolution task: it needs no files. A small red frame somewhere on a large cluttered canvas
(with four frames of other colours) holds a fine pattern that averages to grey once the canvas is downscaled to what
a model sees, so the question can only be answered by cropping the original.

    >>> train = synthetic_samples(64, seed=0)
    >>> train[0].question
    'What pattern is inside the red frame?'
"""

import functools

import numpy as np
from PIL import Image, ImageDraw

from data import LETTERS, Sample

# The frame must survive a 4x downscale (896 -> 224) while the pattern must not.
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
