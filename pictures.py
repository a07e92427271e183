"""Pictures for people: one trajectory of a grounding rollout, with Pillow only (curves.py draws training curves).

A trajectory picture shows the original image (downscaled) with the predicted boxes numbered in the order the
crops were made and the ground-truth boxes dashed in green; to its right the crops the model received, framed and
captioned in the colour of their box; underneath the question, what the model wrote and the verdict.

    >>> picture = trajectory_picture(traj, load_image(traj.sample.image), "correct (answer B, predicted B)")
    >>> save_picture(picture, "out/vis/cup-12.png")
"""

import bisect
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

FONT_SIZE = 16
LINE_HEIGHT = 21  # pixels from one text line to the next
MARGIN = 12
BOX_WIDTH = 3
LEFT_SHARE = 0.62  # of the width, for the original when there are crops to show beside it
MAX_VIEW_ASPECT = 0.75  # height over width of the left panel: a tall image must not push the text off screen
MIN_CROP_HEIGHT = 120  # many crops beside a flat image still get a readable slot each
MAX_TURN_CHARS = 400
MAX_TEXT_LINES = 60  # a model that writes thousands of newlines still gives a picture of sane height
TURN_SEP = "\n---\n"

WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (90, 90, 90)
GREEN, RED = (30, 150, 30), (200, 30, 30)
# Distinct from GREEN (ground truth) and RED (a wrong verdict, and the target frame of the synthetic task).
PALETTE = [(31, 119, 180), (255, 127, 14), (148, 103, 189), (23, 190, 207), (227, 119, 194), (140, 86, 75),
           (188, 189, 34), (127, 127, 127)]


def colour(i):
    """Colour of the i-th box, crop or series (0-based), cycling through PALETTE."""
    return PALETTE[i % len(PALETTE)]


# ---------------------------------------------------------------------------------------------------------------
# text


def load_font(size=FONT_SIZE):
    """Pillow's built-in font at `size` pixels; on Pillow < 10.1 (no size argument) its small bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def printable(text, font):
    """Text the font can draw without raising: control characters become spaces, and the bitmap fallback font,
    which only encodes latin-1, gets '?' for anything else. Example: 'a\\tb\\x00c' -> 'a b c'."""
    text = "".join(c if c.isprintable() or c == "\n" else " " for c in str(text))
    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    return text.encode("latin-1", "replace").decode("latin-1")


def shorten(text, limit=MAX_TURN_CHARS):
    """Keep the first `limit` characters. Example: shorten('abcdef', 3) -> 'abc [... 3 more chars]'."""
    return text if len(text) <= limit else f"{text[:limit]} [... {len(text) - limit} more chars]"


def split_long_word(word, font, max_width):
    """Cut a word wider than the line into pieces that fit, e.g. a 500-character hash or a run of digits."""
    pieces = []
    while font.getlength(word) > max_width:
        # prefixes only get wider, so bisect finds how many characters fit; at least one, to make progress
        fits = bisect.bisect_right(range(1, len(word) + 1), max_width, key=lambda k: font.getlength(word[:k]))
        pieces.append(word[:max(1, fits)])
        word = word[max(1, fits):]
    return pieces + [word]


def wrap(text, font, max_width):
    """Greedy word wrap by rendered width; newlines in the text start new lines.
    Example: wrap('a b\\nc', font, 1000) -> ['a b', 'c']."""
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= max_width:
                line = candidate
                continue
            if line:
                lines.append(line)
            *full, line = split_long_word(word, font, max_width)
            lines.extend(full)
        lines.append(line)
    return lines


def text_lines(question, model_text, verdict, font, max_width):
    """(line, colour) pairs of the text block: question, model turns (each shortened) and the verdict."""
    turns = [shorten(turn) for turn in printable(model_text, font).split(TURN_SEP)]
    verdict = printable(verdict, font)
    blocks = [(f"Q: {shorten(printable(question, font))}", BLACK), (TURN_SEP.join(turns), GREY),
              (verdict, GREEN if verdict.lower().startswith("correct") else RED)]
    lines = [(line, fill) for text, fill in blocks for line in wrap(text, font, max_width)]
    if len(lines) > MAX_TEXT_LINES:
        # the verdict is the one line a reader looks for: keep it
        lines = lines[:MAX_TEXT_LINES - 2] + [("[... more lines]", GREY), lines[-1]]
    return lines


# ---------------------------------------------------------------------------------------------------------------
# images and boxes


def fit(image, max_width, max_height):
    """An RGB copy of `image` scaled to fit max_width x max_height with its aspect ratio kept (up or down), and the
    scale factor. Example: a 3000 x 2000 image into 780 x 585 -> a 780 x 520 copy, scale 0.26."""
    scale = min(max_width / image.width, max_height / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    # reducing_gap lets Pillow shrink an 8K image by whole factors first: much faster, same look
    small = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return small.convert("RGB"), scale


def box_on_view(box, original_size, scale, origin):
    """A box in original pixels -> canvas pixels of the scaled original drawn at `origin`: corners put in order and
    clamped to the image first, so a reversed or overhanging box still draws where it points."""
    (w, h), (ox, oy) = original_size, origin
    x1, x2 = sorted(min(max(v, 0), w) for v in (box[0], box[2]))
    y1, y2 = sorted(min(max(v, 0), h) for v in (box[1], box[3]))
    return [ox + x1 * scale, oy + y1 * scale, ox + x2 * scale, oy + y2 * scale]


def draw_frame(draw, box, fill, width=BOX_WIDTH):
    """A rectangle outline centred on the box edges, so that the line sits on the pixels the box names."""
    half = width // 2
    draw.rectangle([box[0] - half, box[1] - half, box[2] + half, box[3] + half], outline=fill, width=width)


def draw_dashed_frame(draw, box, fill, width=BOX_WIDTH, dash=8):
    """A dashed rectangle outline: ground truth stays readable where a predicted box lies on top of it."""
    x1, y1, x2, y2 = box
    for (ax, ay), (bx, by) in [((x1, y1), (x2, y1)), ((x2, y1), (x2, y2)), ((x2, y2), (x1, y2)), ((x1, y2), (x1, y1))]:
        length = math.hypot(bx - ax, by - ay)
        for start in range(0, math.ceil(length), 2 * dash):
            t0, t1 = start / length, min(start + dash, length) / length
            draw.line([(ax + t0 * (bx - ax), ay + t0 * (by - ay)), (ax + t1 * (bx - ax), ay + t1 * (by - ay))],
                      fill=fill, width=width)


def tag_box(draw, corner, text, font, right_aligned=False):
    """Where a tag holding `text` goes: its bottom at corner's y (but not above the canvas), its left edge at corner's
    x, or its right edge when right_aligned."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    width, height = right + 4, bottom - top + 4
    x = corner[0] - width if right_aligned else corner[0]
    y = max(0, corner[1] - height)
    return [x, y, x + width, y + height]


def draw_tag(draw, box, text, fill, font):
    """White text on a filled tag, e.g. a box's index above its corner."""
    top = draw.textbbox((0, 0), text, font=font)[1]
    draw.rectangle(box, fill=fill)
    draw.text((box[0] + 2, box[1] + 2 - top), text, fill=WHITE, font=font)


def overlaps(a, b):
    """Whether two [x1, y1, x2, y2] rectangles share any area."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def left_panel_width(width, with_crops):
    """Width given to the original: all of it when there are no crops to show beside it."""
    inner = width - 2 * MARGIN
    return int((inner - MARGIN) * LEFT_SHARE) if with_crops else inner


def crop_slot_height(view_height, n_crops):
    """Height available to each crop so that the column of crops is about as tall as the original beside it."""
    return max(MIN_CROP_HEIGHT, (view_height - n_crops * (LINE_HEIGHT + MARGIN)) // max(1, n_crops))


def draw_crops(canvas, crops, views, x, font):
    """Paste the scaled crops in a column from (x, MARGIN): a caption with the crop's own size, then the crop
    framed in the colour of its box."""
    draw = ImageDraw.Draw(canvas)
    y = MARGIN
    for i, (crop, view) in enumerate(zip(crops, views)):
        draw.text((x, y), f"crop {i + 1}  ({crop.width}x{crop.height} px)", fill=colour(i), font=font)
        y += LINE_HEIGHT
        canvas.paste(view, (x + BOX_WIDTH, y + BOX_WIDTH))
        frame = [x + 1, y + 1, x + view.width + 2 * BOX_WIDTH - 2, y + view.height + 2 * BOX_WIDTH - 2]
        draw_frame(draw, frame, colour(i))
        y += view.height + 2 * BOX_WIDTH + MARGIN


def draw_boxes(draw, pred_boxes, gt_boxes, original_size, scale, font):
    """Ground truth dashed in green and tagged 'GT' above its top-right corner, the predictions numbered in crop
    order above their top-left corner. Tags go on last, so that no frame cuts through one."""
    origin, tags = (MARGIN, MARGIN), []
    for box in gt_boxes or []:
        view_box = box_on_view(box, original_size, scale, origin)
        draw_dashed_frame(draw, view_box, GREEN)
        tag = tag_box(draw, (view_box[2] + 1, view_box[1] - 1), "GT", font, right_aligned=True)
        # nested ground-truth boxes often share a corner: one readable tag beats a smudge of several
        if not any(overlaps(tag, other) for other, _, _ in tags):
            tags.append((tag, "GT", GREEN))
    for i, box in enumerate(pred_boxes or []):
        view_box = box_on_view(box, original_size, scale, origin)
        draw_frame(draw, view_box, colour(i))
        tags.append((tag_box(draw, (view_box[0] - 1, view_box[1] - 1), str(i + 1), font), str(i + 1), colour(i)))
    for tag, text, fill in tags:
        draw_tag(draw, tag, text, fill, font)


# ---------------------------------------------------------------------------------------------------------------
# the public pictures


def draw_trajectory(original, crops, pred_boxes, gt_boxes, question, model_text, verdict, width=1280):
    """
    One trajectory as a picture `width` pixels wide; the height grows with the text. Boxes are in original pixels,
    `pred_boxes[i]` being the box of `crops[i]`; `crops`, `pred_boxes` and `gt_boxes` may be empty (or None for
    gt_boxes). Never raises on odd text (unicode, control characters, megabytes of it).

    >>> picture = draw_trajectory(Image.open("street.jpg"), [sign_crop], [[4100, 2300, 4700, 2650]],
    ...                           [[4150, 2350, 4600, 2600]], "What does the sign say?",
    ...                           '```json [{"bbox_2d": [...]}] ``` ... \\boxed{B}', "correct (answer B, predicted B)")
    """
    font = load_font()
    crops = list(crops or [])
    left_width = left_panel_width(width, bool(crops))
    view, scale = fit(original, left_width, round(left_width * MAX_VIEW_ASPECT))
    # the crops start right after the original: a tall original leaves them more room than LEFT_SHARE promised
    crops_x = MARGIN + view.width + MARGIN
    slot_height = crop_slot_height(view.height, len(crops))
    crop_views = [fit(c, width - crops_x - MARGIN - 2 * BOX_WIDTH, slot_height - 2 * BOX_WIDTH)[0] for c in crops]
    crops_bottom = MARGIN + sum(LINE_HEIGHT + v.height + 2 * BOX_WIDTH + MARGIN for v in crop_views)
    lines = text_lines(question, model_text, verdict, font, width - 2 * MARGIN)
    text_top = max(MARGIN + view.height + MARGIN, crops_bottom)

    canvas = Image.new("RGB", (width, text_top + len(lines) * LINE_HEIGHT + MARGIN), WHITE)
    canvas.paste(view, (MARGIN, MARGIN))
    draw = ImageDraw.Draw(canvas)
    draw_boxes(draw, pred_boxes, gt_boxes, original.size, scale, font)
    draw_crops(canvas, crops, crop_views, crops_x, font)
    for i, (line, fill) in enumerate(lines):
        draw.text((MARGIN, text_top + i * LINE_HEIGHT), line, fill=fill, font=font)
    return canvas


def trajectory_picture(traj, original, verdict, width=1280):
    """
    `draw_trajectory` for a rollout `Trajectory`: the crops are the images of later user turns that are not the
    global view again (MGPO answers an invalid box with the global image; the tool loop answers a bad call with
    text only), the predicted boxes are `traj.crop_boxes`, the assistant turns are joined with '---' lines.

    >>> picture = trajectory_picture(traj, load_image(traj.sample.image), "wrong (answer B, predicted C)")
    """
    crops = [image for image in traj.images[1:] if image is not traj.images[0]]
    return draw_trajectory(original, crops, traj.crop_boxes, traj.sample.boxes, traj.sample.question,
                           TURN_SEP.join(traj.texts), verdict, width=width)


def save_picture(image, path):
    """Save as PNG, creating the parent folders. Example: save_picture(picture, "out/vis/step100/cup-12.png")."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
