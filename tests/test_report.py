"""report.py: the curves' running mean and the before/after table."""

import numpy as np

from report import running_mean, table


def test_running_mean_by_hand_and_against_numpy():
    assert running_mean([1, None, 3], 2) == [1.0, 1.0, 3.0]
    assert running_mean([None, None], 3) == [None, None]
    values = list(np.random.default_rng(0).random(25))
    window = 10
    full = np.convolve(values, np.ones(window) / window, mode="valid")  # windows that are complete
    assert np.allclose(running_mean(values, window)[window - 1:], full)
    assert np.isclose(running_mean(values, window)[3], np.mean(values[:4]))  # a short window at the start


def test_table_rows_and_missing_metrics():
    text = table([("before", {"accuracy": 0.25, "crop_iou": None}), ("after", {"accuracy": 0.8125})], "held-out")
    lines = text.splitlines()
    assert lines[0].startswith("| held-out | accuracy | IoU | coverage |")
    assert lines[2].startswith("| before | 0.250 | - | -") and lines[3].startswith("| after | 0.812 |")
