"""
Geometry for grounding-based cropping, family-free: the resize factor (28 for Qwen2.5-VL, 32 for Qwen3-VL) comes in
as an argument from `family.Family.factor`, and a model's own coordinate frame is mapped by `Family.to_original`.

The model never sees the original image: it sees a copy resized by the Qwen rule (`smart_resize`), and the boxes
it writes are about that copy. A crop must come from the full-resolution original, so every box goes
through `to_original` first. Keeping the resize rule, the box parsers, the mapping and the metrics in one file means
there is exactly one place where a coordinate can go wrong.

Boxes are [x1, y1, x2, y2] lists of floats, x to the right and y down; sizes are (width, height) in PIL order,
except `smart_resize`, which keeps HF's (height, width) order.
"""

import json
import math
import re
import reprlib

from PIL import Image

MAX_ASPECT_RATIO = 200  # Qwen's image processor refuses anything more elongated

# -----------------------------------------------------------------------------
# the Qwen resize rule


def smart_resize(height, width, min_pixels, max_pixels, factor):
    """
    Return the (height, width) a Qwen image processor resizes an image to: both sides multiples of `factor`, the
    aspect ratio kept, and h*w within [min_pixels, max_pixels]. Same arithmetic, in the same order, as
    transformers' `smart_resize`, so the result is bit-identical to the size the image processor picks.

    Example with Qwen2.5-VL's factor 28 and its default budget max_pixels = 1280*28*28 = 1003520:
        3000 x 4000 (h x w) rounds to 2996 x 4004 (12.0 Mpx, too many), so both sides shrink by
        beta = sqrt(3000*4000 / 1003520) = 3.458 and round *down* to multiples of 28: 840 x 1148.
    Rounding of sides is Python's round (halves to even): a 70 px side (2.5 patches) becomes 56, a 98 px side 112.
    The two clamps do not always hold together: a tiny image of extreme aspect ratio, or min_pixels close to
    max_pixels, can leave h*w slightly outside the range, exactly as in HF.
    """
    if height < 1 or width < 1:
        # HF raises ZeroDivisionError here; say what is wrong instead
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    aspect = max(height, width) / min(height, width)
    if aspect > MAX_ASPECT_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, "
            f"got {aspect} for height={height}, width={width}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resize_for_model(image, min_pixels, max_pixels, factor):
    """
    Resize an image to the size the model sees (RGB, bicubic like the HF image processor); `factor` is the
    family's (`Family.factor`). Boxes the model emits are about this image (in its pixels for an absolute frame).
    Resizing twice changes nothing: a size whose sides are multiples of `factor`
    and whose area is within [min_pixels, max_pixels] maps to itself (only the extreme cases where smart_resize
    itself lands outside the budget, see there, would move again).
    """
    height, width = smart_resize(image.height, image.width, min_pixels, max_pixels, factor)
    return image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)


# -----------------------------------------------------------------------------
# parsing a box out of model text

# a ```json fence, up to the next fence or, if generation stopped right after opening it, the end of the text
JSON_BLOCK = re.compile(r"```json(.*?)(?:```|\Z)", re.DOTALL)


def parse_bbox_value(value):
    """
    Turn a decoded JSON value into 4 finite floats, or None. Accepts a list of 4 ints/floats; rejects bools
    (True is an int in Python), strings, NaN, infinities and ints too large for a float.
    Example: [10, 20.5, 30, 40] -> [10.0, 20.5, 30.0, 40.0]; [1, 2, 3] -> None; [1, 2, 3, "4"] -> None.
    """
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return None
    try:
        box = [float(v) for v in value]
    except OverflowError:  # an int like 10**400 has no float
        return None
    return box if all(math.isfinite(v) for v in box) else None


def parse_box(text):
    """
    Extract the box from MGPO's turn-1 output, or None. The expected format is
        ```json
        [{"bbox_2d": [x1, y1, x2, y2], "label": "the red sign"}]
        ```
    The last ```json block in the text counts (the model may think aloud with drafts first); inside it, a single
    dict is accepted in place of a list, and the first entry that has a "bbox_2d" decides. The numbers come back
    as written, so a reversed or out-of-range box still parses: `is_valid_box` judges it. Never raises.
    Example: 'I look at the sign. ```json\\n[{"bbox_2d": [120, 40, 260, 98], "label": "sign"}]\\n```'
             -> [120.0, 40.0, 260.0, 98.0]
    """
    blocks = JSON_BLOCK.findall(text)
    if not blocks:
        return None
    try:
        data = json.loads(blocks[-1])
    except (ValueError, RecursionError):  # bad JSON, ints over Python's digit limit, absurdly deep nesting
        return None
    entries = [data] if isinstance(data, dict) else data
    if not isinstance(entries, list):
        return None
    bbox = next((e["bbox_2d"] for e in entries if isinstance(e, dict) and "bbox_2d" in e), None)
    return parse_bbox_value(bbox)


# -----------------------------------------------------------------------------
# parsing a DeepEyes-style tool call (LFPC)

TOOL_NAME = "image_zoom_in_tool"
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


def _check_tool_call(call):
    # Outermost problem first: the error goes back to the model, which should fix one thing at a time.
    if not isinstance(call, dict):
        return None, "<tool_call> must hold a JSON object"
    name = call.get("name")
    if name != TOOL_NAME:
        # reprlib shortens the echo: the error text goes back into the model's context
        return None, f"unknown tool {reprlib.repr(name)}"
    arguments = call.get("arguments")
    if not isinstance(arguments, dict) or "bbox_2d" not in arguments:
        return None, "missing arguments.bbox_2d"
    box = parse_bbox_value(arguments["bbox_2d"])
    if box is None:
        return None, "bbox_2d must be 4 finite numbers"
    return box, None


def parse_tool_call(text: str) -> tuple[list[float] | None, str | None] | None:
    """
    Parse LFPC's zoom-in call, in the DeepEyes format
        <tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [x1, y1, x2, y2], "label": ".."}}</tool_call>
    Returns None when the text holds no <tool_call> at all (the model chose to answer), else (box, None) for a
    well-formed call or (None, error) with a short error text that can be sent back to the model. Only the last
    <tool_call> counts; an opening tag with no closing tag after it is an error. "label" is optional and ignored.
    As in `parse_box`, the box comes back as written (model-input pixels): `is_valid_box` judges whether it lies
    inside the image. Never raises.
    Examples:
        'look <tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [10, 20, 110, 220]}}</tool_call>'
            -> ([10.0, 20.0, 110.0, 220.0], None)
        '<tool_call>{"name": "search", "arguments": {}}</tool_call>' -> (None, "unknown tool 'search'")
        '<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [1, 2, 3]}}</tool_call>'
            -> (None, "bbox_2d must be 4 finite numbers")
        '<tool_call>{"name": "image_zoom_in_tool"' -> (None, "unclosed <tool_call>")
    """
    start = text.rfind(TOOL_CALL_OPEN)
    if start < 0:
        return None
    end = text.find(TOOL_CALL_CLOSE, start)
    if end < 0:
        return None, "unclosed <tool_call>"
    try:
        call = json.loads(text[start + len(TOOL_CALL_OPEN):end])
    except (ValueError, RecursionError):  # bad JSON, ints over Python's digit limit, absurdly deep nesting
        return None, "invalid JSON in <tool_call>"
    return _check_tool_call(call)


# -----------------------------------------------------------------------------
# mapping between the model input and the original image


def to_original(box, input_size, original_size):
    """
    Map a box from model-input pixels to original-image pixels. Sizes are (width, height). Each axis has its own
    scale factor, sx = W_orig / w_in and sy = H_orig / h_in, because rounding sides to multiples of the factor changes
    the aspect ratio slightly.
    Example: a 4000 x 3000 original is shown as 1148 x 840 (default budget), so sx = 3.4843 and sy = 3.5714;
    the box [287, 210, 574, 420] on the model input is [1000, 750, 2000, 1500] on the original.
    """
    (w_in, h_in), (w_orig, h_orig) = input_size, original_size
    x1, y1, x2, y2 = box
    # multiply before dividing so that exact cases (like the example) stay exact in floating point
    return [x1 * w_orig / w_in, y1 * h_orig / h_in, x2 * w_orig / w_in, y2 * h_orig / h_in]


def to_input(box, input_size, original_size):
    """
    Map a box from original-image pixels to model-input pixels, the inverse of `to_original`.
    Example: original 4000 x 3000 shown as 1148 x 840: [1000, 750, 2000, 1500] -> [287, 210, 574, 420].
    """
    return to_original(box, original_size, input_size)


# -----------------------------------------------------------------------------
# validity and cropping


def is_valid_box(box, input_size, min_side, max_aspect=100.0):
    """
    MGPO's test for a usable box, in model-input pixels with input_size = (w, h). Valid iff the box lies inside
    the image (0 <= x1 < x2 <= w, 0 <= y1 < y2 <= h), both sides are strictly longer than `min_side` pixels
    (MGPO's rollout checks `(x2 - x1) > 28 and (y2 - y1) > 28`: 29 passes, 28 and 27 fail), and the long side over
    the short side is below `max_aspect`. Anything that is not 4 finite numbers (None included) is invalid.
    Never raises.
    Example: on a 1148 x 840 input, [100, 100, 129, 200] is valid (29 x 100); [100, 100, 128, 200] is not (28 px).
    """
    box = parse_bbox_value(box)
    if box is None:
        return False
    (w, h), (x1, y1, x2, y2) = input_size, box
    if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
        return False
    side_w, side_h = x2 - x1, y2 - y1
    if min(side_w, side_h) <= min_side:
        return False
    return max(side_w, side_h) / min(side_w, side_h) < max_aspect


def crop_original(image, box):
    """
    Crop a box given in ORIGINAL pixels from the original image. The box is rounded outward (floor x1, y1;
    ceil x2, y2) so that no pixel the model pointed at is lost, then clamped to the image.
    Example: on a 4000 x 3000 image, [999.6, 750.2, 2000.1, 1500.0] crops [999, 750, 2001, 1500]: 1002 x 750.
    """
    x1, y1, x2, y2 = box
    left, top = max(0, math.floor(x1)), max(0, math.floor(y1))
    right, bottom = min(image.width, math.ceil(x2)), min(image.height, math.ceil(y2))
    if right <= left or bottom <= top:
        raise ValueError(f"box {box} has no pixels inside the {image.width}x{image.height} image")
    return image.crop((left, top, right, bottom))


# -----------------------------------------------------------------------------
# metrics


def box_area(box):
    """Area of a box; a reversed or empty box has area 0. Example: [1, 1, 3, 4] -> 6."""
    x1, y1, x2, y2 = box
    return max(0.0, x2 - x1) * max(0.0, y2 - y1)


def intersection_area(a, b):
    """Area of the overlap of two boxes. Example: [0, 0, 2, 2] and [1, 1, 3, 3] overlap in [1, 1, 2, 2]: 1."""
    return box_area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])


def box_area_ratio(box, size):
    """Area of the box over the area of an image of size (W, H). Example: [0, 0, 50, 20] in 100 x 100 -> 0.1."""
    image_area = size[0] * size[1]
    return box_area(box) / image_area if image_area > 0 else 0.0


def iou(a, b):
    """Intersection over union. Example: [0, 0, 2, 2] vs [1, 1, 3, 3]: inter 1, union 4 + 4 - 1 = 7 -> 1/7."""
    inter = intersection_area(a, b)
    union = box_area(a) + box_area(b) - inter
    return inter / union if union > 0 else 0.0


def coverage(pred, target):
    """
    Fraction of the target box inside the predicted box, |pred ∩ target| / |target|: 1.0 when the crop contains
    the whole target, however large the crop. Example: pred [0, 0, 2, 2], target [1, 0, 3, 2] -> 2/4 = 0.5.
    """
    target_area = box_area(target)
    return intersection_area(pred, target) / target_area if target_area > 0 else 0.0


def box_metrics(box, gt_boxes, size):
    """(iou, coverage, area ratio) of a predicted box in original pixels, by LFPC's rule for nested boxes (the
    grounding reward's, `rewards.grounding_reward`): coverage of the first box, B1 (smallest first: the least region
    that answers the question, so "does the crop hold the object"), IoU with the best-matching box (any of the
    nested regions is a good crop), and the box's share of an image of size (W, H). Without ground-truth boxes:
    (None, None, area ratio). Training and eval both report these.
    Example: [0, 0, 500, 250] in 1000 x 500, boxes [[100, 100, 200, 200], [50, 50, 300, 300]]: IoUs
    10000 / 125000 = 0.08 and 50000 / 137500 = 0.364 -> 0.364; B1 lies inside it: coverage 1; area 0.25."""
    area = box_area_ratio(box, size)
    if not gt_boxes:
        return None, None, area
    return max(iou(box, gt) for gt in gt_boxes), coverage(box, gt_boxes[0]), area


def l1_distance(a, b, size):
    """
    Mean absolute difference of the four corners, x normalised by the width and y by the height of size=(W, H).
    Example: [0, 0, 10, 10] vs [10, 0, 10, 20] in a 100 x 50 image: (10/100 + 0 + 0 + 10/50) / 4 = 0.075.
    """
    w, h = size
    if w <= 0 or h <= 0:
        return 0.0
    scales = (w, h, w, h)
    return sum(abs(p - q) / s for p, q, s in zip(a, b, scales)) / 4
