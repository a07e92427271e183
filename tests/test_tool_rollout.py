"""The LFPC tool loop: crops, error turns, episode ends, the loss mask over many turns, and log-prob agreement
with up to 6 images per conversation."""

from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import rollout
from data import Sample
from grpo import batch_logprobs
from prompts import TOOL_PROMPTS
from rollout import tool_rollout, visual_tokens
from demo.synthetic import synthetic_samples

CFG = SimpleNamespace(global_max_pixels=224 * 224, crop_max_pixels=56 * 56, min_pixels=28 * 28, max_turns=5,
                      max_response_tokens=100, max_new_tokens_per_turn=6, temperature=1.0, micro_batch_size=4,
                      rollout_batch_size=0, min_box_side=28, do_sample=True, probe="none")
V1, V2, V3 = [10, 10, 100, 60], [20, 30, 120, 130], [0, 0, 200, 100]
BAD_JSON = (None, "invalid JSON in <tool_call>")
OUTSIDE = [0, 0, 400, 50]  # wider than either global view
# What the (patched) parser reads from each assistant turn, in the order the loop asks: round by round, the
# episodes still going in index order. Episodes 0, 1 are on the square image, 2, 3 on the wide one.
SCRIPT = [(V1, None), BAD_JSON, None, (OUTSIDE, None),   # round 1: all four
          (V2, None), (V1, None), (V3, None),           # round 2: 0, 1, 3 (2 answered without a call)
          (V3, None), None, (V1, None),                 # round 3: 0, 1, 3
          (V1, None), None,                             # round 4: 0, 3
          (V2, None),                                   # round 5: 0
          (V1, None)]                                   # round 6: 0 has made 5 calls: this one does not run


@pytest.fixture(scope="module")
def episodes(policy):
    model, tokenizer, image_processor = policy
    wide = Sample("wide", Image.new("RGB", (640, 300), (90, 120, 200)), "What colour?", ["red", "blue"], "B", None)
    calls = iter(SCRIPT)
    original = rollout.parse_tool_call
    rollout.parse_tool_call = lambda text: next(calls)
    try:
        torch.manual_seed(0)
        trajs = tool_rollout(model, tokenizer, image_processor, [synthetic_samples(1, seed=4)[0], wide], 2, CFG)
    finally:
        rollout.parse_tool_call = original
    assert next(calls, "done") == "done"  # the loop asked exactly as often as scripted
    return trajs


def runs(mask):
    return sum(1 for k, m in enumerate(mask) if m and (k == 0 or not mask[k - 1]))


def test_episode_ends_and_crops(episodes):
    assert [t.end_reason for t in episodes] == ["max_turns", "no_tool_call", "no_tool_call", "no_tool_call"]
    assert [t.tool_calls for t in episodes] == [5, 2, 0, 3]
    assert [len(t.images) for t in episodes] == [6, 2, 1, 3]  # global view + one image per valid call
    assert [len(t.crop_boxes) for t in episodes] == [5, 1, 0, 2]
    assert [len(t.texts) for t in episodes] == [6, 3, 1, 4]
    for t in episodes:
        assert runs(t.loss_mask) == len(t.texts)  # loss mask: exactly the sampled turns
        assert len(t.image_grid_thw) == len(t.images) == len(t.pixel_values)
        assert visual_tokens(t) == sum(int(g.prod()) // 4 for g in t.image_grid_thw)
    # the first crop of episode 0: V1 in the 224x224 view of an 896x896 original -> 4x in original pixels
    assert episodes[0].crop_boxes[0] == [40.0, 40.0, 400.0, 240.0]


def test_error_turns_carry_the_reason(policy, episodes):
    _, tokenizer, _ = policy
    text = tokenizer.decode(episodes[1].input_ids)
    assert "Error: invalid JSON in <tool_call>" in text
    outside = tokenizer.decode(episodes[3].input_ids)
    assert "Error: bbox_2d [0, 0, 400, 50] is outside the 308x140 image" in outside
    assert outside.count("<tool_response>") == 3  # the error and the two crops


def test_crops_come_back_inside_tool_response(policy, episodes):
    _, tokenizer, _ = policy
    text = tokenizer.decode(episodes[0].input_ids)
    assert text.count(TOOL_PROMPTS.crop_before + "<|vision_start|>") == 5
    assert text.count("<|vision_end|>" + TOOL_PROMPTS.crop_after) == 5


def test_six_image_conversations_logprobs_agree(policy, episodes):
    model, tokenizer, _ = policy
    [logprobs] = batch_logprobs(model, episodes, tokenizer, CFG, torch.device("cpu"), torch.float32)
    worst = 0.0
    for row, t in enumerate(episodes):
        mask = torch.tensor(t.loss_mask, dtype=torch.bool)
        worst = max(worst, (logprobs[row, :len(t.input_ids)][mask] - torch.tensor(t.rollout_logprobs)[mask])
                    .abs().max().item())
    assert worst < 1e-5, worst


def test_token_budget_ends_the_episode(policy):
    model, tokenizer, image_processor = policy
    cfg = SimpleNamespace(**{**vars(CFG), "max_response_tokens": 9})
    original = rollout.parse_tool_call
    rollout.parse_tool_call = lambda text: (V1, None)  # always a valid call
    try:
        torch.manual_seed(0)
        [t] = tool_rollout(model, tokenizer, image_processor, synthetic_samples(1, seed=4), 1, cfg)
    finally:
        rollout.parse_tool_call = original
    assert t.end_reason == "length" and sum(t.loss_mask) == 9 and len(t.texts) == 2
