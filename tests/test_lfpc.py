"""train_lfpc.py: the reward of an episode by hand, its options and checks, stage 1 then stage 2 end to end."""

import json
from types import SimpleNamespace

import pytest
import torch

from config import parse_config
from data import Sample
from family import QWEN2_5_VL
from config import check_config
from rewards import lfpc_stage1_reward, lfpc_stage2_reward
from train_lfpc import Config, extra_checks, lfpc_metrics, normalised_answer, reward_parts, train

FAST = ["--max_steps", "1", "--max_new_tokens_per_turn", "8", "--num_synthetic", "8", "--batch_size", "2",
        "--num_generations", "2", "--max_response_tokens", "24"]
SAMPLE = Sample("s", None, "Which?", ["cat", "dog"], "B", [[100, 100, 200, 200], [50, 50, 300, 300]])
GOOD = "<think>look</think> <answer>B</answer>"


def episode(texts, crop_boxes, sample=SAMPLE):
    return SimpleNamespace(sample=sample, family=QWEN2_5_VL, texts=texts, crop_boxes=crop_boxes,
                           original_size=(1000, 500), tool_calls=len(crop_boxes), end_reason="answer",
                           loss_mask=[1, 1, 0],
                           image_grid_thw=torch.tensor([[1, 8, 8]] + [[1, 4, 4]] * len(crop_boxes)))


def test_resolution_selection_compares_answers_not_their_wrapping():
    # SAMPLE's option B is "dog": the same answer three ways, and a different one
    same = [normalised_answer(t, SAMPLE) for t in ("B", r"\boxed{B}", r"The answer: \boxed{dog}.")]
    assert same == ["B", "B", "B"]
    assert normalised_answer(r"\boxed{cat}", SAMPLE) == "A"
    # no options: the normalised free text, unwrapped
    free = Sample("f", None, "Colour?", None, "red", [])
    assert normalised_answer(r"\boxed{The Red}", free) == normalised_answer("red.", free) == "red"


def test_stage1_reward_by_hand():
    cfg = Config()
    # correct, well formed, one crop: 0.8*1 + 0.2*0 + 1.2*1
    assert lfpc_stage1_reward(episode(["<tool_call>...</tool_call>", GOOD], [[0, 0, 10, 10]]), cfg) == \
        pytest.approx(2.0)
    # correct without a crop: no tool bonus
    assert lfpc_stage1_reward(episode([GOOD], []), cfg) == pytest.approx(0.8)
    # wrong and no answer tag: 0.8*0 + 0.2*(-1) + 0
    assert lfpc_stage1_reward(episode(["I think A"], []), cfg) == pytest.approx(-0.2)


def test_stage2_adds_the_grounding_reward_of_the_last_crop():
    cfg = Config(stage=2, iou_weight=0.5, grounding_weight=1.0)
    exact = [100, 100, 200, 200]  # = B1: coverage 1, IoU 1, L1 0 -> r_geo 1
    off = [0, 0, 100, 100]        # coverage 0 -> r_iou 0; L1 to B1 = (0.1 + 0.2 + 0.1 + 0.2) / 4 = 0.15,
    #                               to B2 = (0.05 + 0.1 + 0.2 + 0.4) / 4 = 0.1875 -> r_l1 = 0.85, r_geo = 0.425
    reward = lfpc_stage2_reward(episode([GOOD], [off, exact]), cfg)
    assert reward == pytest.approx(0.8 + 1.2 + 1.0)
    reward, parts = (f(episode([GOOD], [exact, off]), cfg) for f in (lfpc_stage2_reward, reward_parts))
    assert parts["grounding_r_geo"] == pytest.approx(0.425) and reward == pytest.approx(2.0 + 0.425)
    best = Config(stage=2, grounding_crop="best")
    assert lfpc_stage2_reward(episode([GOOD], [exact, off]), best) == pytest.approx(3.0)


def test_metrics_count_crops_and_visual_tokens():
    eps = [episode([GOOD], [[100, 100, 200, 200], [0, 0, 500, 250]]), episode([GOOD], [])]
    m = lfpc_metrics(eps, Config())
    assert m["tool_calls"] == (2, 2) and m["valid_crops"] == (2, 2)
    # IoU with the best-matching box, coverage of B1: the first crop is B1 exactly (IoU 1, coverage 1); the second
    # [0, 0, 500, 250] matches B2 = [50, 50, 300, 300] best (IoU 50000 / 137500, vs 10000 / 125000 with B1) and
    # holds all of B1 (coverage 1)
    assert m["crop_iou"] == (pytest.approx(1.0 + 50000 / 137500), 2)
    assert m["crop_coverage"] == (pytest.approx(2.0), 2)
    assert m["crop_area_ratio"] == (pytest.approx(0.02 + 0.25), 2)
    assert m["visual_tokens"] == (16 + 4 + 4 + 16, 2) and m["crop_visual_tokens"] == (8, 2)


def test_lfpc_options_are_checked():
    for argv, flag in [(["--stage", "3"], "--stage"), (["--grounding_crop", "first"], "--grounding_crop"),
                       (["--resolution_factor", "1"], "--resolution_factor"), (["--iou_weight", "2"], "--iou_weight"),
                       (["--resolution_unchanged", "x"], "--resolution_unchanged")]:
        cfg = parse_config(Config, argv)
        with pytest.raises(SystemExit, match=flag):
            check_config(cfg, 1, extra_checks(cfg))


def test_stage2_needs_boxes(tmp_path):
    from PIL import Image
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    (tmp_path / "d.jsonl").write_text(json.dumps({"id": "a", "image": "a.png", "question": "q", "options": ["x", "y"],
                                                  "answer": "A", "boxes": None}) + "\n")
    cfg = parse_config(Config, FAST + ["--stage", "2", "--data", str(tmp_path / "d.jsonl"),
                                       "--output_dir", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="--stage 2 needs ground-truth boxes"):
        train(cfg)


def test_stage1_runs_resolution_selection_then_trains(tmp_path):
    out = tmp_path / "s1"
    train(parse_config(Config, FAST + ["--output_dir", str(out)]))
    records = [json.loads(line) for line in (out / "resolution.jsonl").read_text().splitlines()]
    assert len(records) == 8 and all(r["sizes"][0] == [896, 896] for r in records)
    row = json.loads((out / "metrics.jsonl").read_text())
    for key in ("reward", "accuracy", "format_ok", "tool_calls", "visual_tokens", "crop_visual_tokens"):
        assert key in row
    assert (out / "checkpoint-1" / "model.safetensors").exists()
