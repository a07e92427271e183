"""report.py: the curves' running mean, the before/after table, and the held-out report on a sharded model when the
ranks have different numbers of questions."""

import json
from types import SimpleNamespace

import numpy as np
import torch

from model import load_policy
from report import held_out, running_mean, table
from tests.held_out_uneven import MODES, held_out_config, held_out_rollout
from tests.test_eval import torchrun_or_stop
from demo.tiny import COMMITTED


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


def test_held_out_on_a_sharded_model_with_uneven_ranks_matches_one_process(tmp_path):
    base = COMMITTED["tiny-base"][0]  # its tool episodes end at different rounds (held_out_config)
    torchrun_or_stop(["tests/held_out_uneven.py", base, str(tmp_path / "two")], timeout=120)
    model, tokenizer, image_processor = load_policy(base, torch.device("cpu"), torch.float32)
    ctx = SimpleNamespace(rank=0, world_size=1, model=model, tokenizer=tokenizer, image_processor=image_processor,
                          rollout=held_out_rollout(image_processor))
    for mode in MODES:
        (tmp_path / "one" / mode).mkdir(parents=True)
        one = held_out(ctx, held_out_config(str(tmp_path / "one" / mode)), mode, "after")
        two = json.loads((tmp_path / "two" / mode / "held_out_after.json").read_text())
        one.pop("seconds_per_question")
        two.pop("seconds_per_question")
        assert two == one, mode
        assert two["questions"] == 9
        if mode == "tool":  # question 0's crop, from its second round (see held_out_config): the case is exercised
            assert one["crops_per_question"] == 1 / 9
