"""Line charts of training curves, with Pillow only: report.py draws metrics.jsonl's windowed means.

    >>> save_picture(draw_curves({"reward": rewards}, steps, "mean reward"), "out/reward.png")
"""

import math

from PIL import Image, ImageDraw

from pictures import BLACK, LINE_HEIGHT, MARGIN, WHITE, colour, load_font, printable

MAX_X_LABELS = 6


def is_number(value):
    """True for a finite number; None, NaN and infinities are gaps in a curve."""
    return value is not None and math.isfinite(float(value))


def to_pixel(value, low, high, pixel_low, pixel_high):
    """Linear map of [low, high] onto [pixel_low, pixel_high]; a range of one value maps to the middle, so a
    constant series or a single step needs no special case."""
    if high == low:
        return (pixel_low + pixel_high) / 2
    return pixel_low + (value - low) / (high - low) * (pixel_high - pixel_low)


def runs(points):
    """Split (x, y-or-None) points into runs of consecutive real values: a curve is not drawn across a gap.
    Example: [(0, 1), (1, None), (2, 3), (3, 4)] -> [[(0, 1.0)], [(2, 3.0), (3, 4.0)]]."""
    out, current = [], []
    for x, y in points:
        if is_number(y):
            current.append((x, float(y)))
        elif current:
            out.append(current)
            current = []
    return out + [current] if current else out


def x_ticks(xs, limit=MAX_X_LABELS):
    """At most `limit` of the sorted steps, evenly spaced, first and last included.
    Example: x_ticks(list(range(0, 101, 10)), 3) -> [0, 50, 100]."""
    if len(xs) <= limit:
        return xs
    return [xs[round(i * (len(xs) - 1) / (limit - 1))] for i in range(limit)]


def draw_legend(draw, names, right, y, font):
    """Colour swatches and series names, right-aligned so that they end at x = right."""
    widths = [16 + draw.textlength(name, font=font) + MARGIN for name in names]
    x = right - sum(widths) + MARGIN
    for i, (name, item_width) in enumerate(zip(names, widths)):
        draw.rectangle([x, y + 3, x + 11, y + 14], fill=colour(i))
        draw.text((x + 16, y), name, fill=BLACK, font=font)
        x += item_width


def draw_run(draw, pixels, fill):
    """One unbroken piece of a curve; a lone point between gaps would be an invisible line, so it is a dot."""
    if len(pixels) > 1:
        draw.line(pixels, fill=fill, width=2, joint="curve")
    else:
        (x, y), = pixels
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=fill)


def draw_curves(series, steps, title, width=900, height=300):
    """
    A line chart of training curves: `series[name][i]` is the value at `steps[i]`, one colour per series, a legend,
    the y axis labelled at the lowest and highest value, a few steps labelled on the x axis. None, NaN and inf are
    gaps; a constant series lies across the middle; empty series and no steps give empty axes.

    >>> chart = draw_curves({"reward": [0.1, 0.3, float("nan"), 0.5], "accuracy": [0.2, 0.2, 0.2, 0.2]},
    ...                     [0, 10, 20, 30], "GRPO on the synthetic task")
    """
    font = load_font()
    curves = [runs(zip(steps, values)) for values in series.values()]
    xs = sorted({x for curve in curves for run in curve for x, _ in run} or set(steps))
    ys = [y for curve in curves for run in curve for _, y in run]
    y_range = (min(ys), max(ys)) if ys else ()
    y_labels = [f"{v:.4g}" for v in y_range]

    canvas = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(canvas)
    draw.text((MARGIN, MARGIN), printable(title, font), fill=BLACK, font=font)
    draw_legend(draw, [printable(name, font) for name in series], width - MARGIN, MARGIN, font)
    left = MARGIN + max([draw.textlength(label, font=font) for label in y_labels], default=0) + 6
    top, right, bottom = MARGIN + 2 * LINE_HEIGHT, width - MARGIN, height - MARGIN - LINE_HEIGHT
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=BLACK)
    pad = 8  # keeps the extreme values off the axes

    def x_pixel(x):
        return to_pixel(x, xs[0], xs[-1], left + pad, right - pad)

    def y_pixel(y):
        return to_pixel(y, *y_range, bottom - pad, top + pad)

    for label, value in zip(y_labels, y_range):
        draw.line([(left + 1, y_pixel(value)), (right, y_pixel(value))], fill=(225, 225, 225))
        draw.text((left - 4, y_pixel(value)), label, fill=BLACK, font=font, anchor="rm")
    for x in x_ticks(xs):
        draw.line([(x_pixel(x), bottom), (x_pixel(x), bottom + 4)], fill=BLACK)
        draw.text((x_pixel(x), bottom + 5), str(x), fill=BLACK, font=font, anchor="mt")
    for i, curve in enumerate(curves):
        for run in curve:
            draw_run(draw, [(x_pixel(x), y_pixel(y)) for x, y in run], colour(i))
    return canvas
