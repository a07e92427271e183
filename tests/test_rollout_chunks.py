"""`--rollout_batch_size`: rollouts in chunks give the same trajectories as one generate call, and each chunk's KV
cache is gone before the next chunk starts."""

import json
import re
import weakref
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import generation
import rollout
from data import Sample
from generation import chunks
from rollout import mgpo_rollout, tool_rollout
from demo.synthetic import synthetic_samples
from tests.test_fsdp import torchrun

GREEDY = dict(global_max_pixels=224 * 224, crop_max_pixels=112 * 112, min_pixels=28 * 28, temperature=1.0,
              do_sample=False, min_box_side=28, probe="none")
MGPO = SimpleNamespace(**GREEDY, max_new_tokens_turn1=16, max_new_tokens_turn2=8)
TOOL = SimpleNamespace(**GREEDY, max_turns=5, max_response_tokens=100, max_new_tokens_per_turn=6)
# turn-1 boxes of the 6 MGPO trajectories, in order: crops of different shapes and invalid ones (global view again)
BOXES = [[10, 10, 100, 60], None, [0, 0, 224, 224], [50, 50, 60, 60], [5, 5, 40, 140], [100, 20, 300, 50]]
V1, V2, V3 = [10, 10, 100, 60], [20, 30, 120, 130], [0, 0, 200, 100]
# the tool calls each episode reads, round by round: episodes 1, 2, 4 end in rounds 1, 2, 2; 0 and 5 in round 3,
# 3 in round 4 (so 6, 5, 3, 1 episodes go through rounds 1-4)
SCRIPT = {0: [(V1, None), (V2, None), None], 1: [None], 2: [(V2, None), None],
          3: [(None, "invalid JSON in <tool_call>"), (V1, None), (V1, None), None], 4: [(V3, None), None],
          5: [(V1, None), (V3, None), None]}


def six_samples():
    """6 questions on images of 3 shapes, so rows are ragged and chunks pad differently from the whole batch."""
    wide = Sample("wide", Image.new("RGB", (640, 300), (90, 120, 200)), "What colour?", ["red", "blue"], "B", None)
    tall = Sample("tall", Image.new("RGB", (300, 700), (200, 40, 40)), "What colour?", ["red", "blue"], "A", None)
    return synthetic_samples(4, seed=5) + [wide, tall]


def run(policy, monkeypatch, recipe, size):
    """(trajectories, the batch size of each generate call) of a greedy rollout in chunks of `size`."""
    model, tokenizer, image_processor = policy
    samples = six_samples()
    if recipe is mgpo_rollout:
        boxes = iter(BOXES)
        monkeypatch.setattr(rollout, "parse_box", lambda text: next(boxes))
    else:  # the calls of the episode whose tool_step reads the text: episodes run in another order when chunked
        calls, tool_step, ids = {i: iter(c) for i, c in SCRIPT.items()}, rollout.tool_step, []

        def scripted(traj, *args):
            ids.append([s.id for s in samples].index(traj.sample.id))
            return tool_step(traj, *args)

        monkeypatch.setattr(rollout, "tool_step", scripted)
        monkeypatch.setattr(rollout, "parse_tool_call", lambda text: next(calls[ids[-1]]))
    rows, generate_turn = [], rollout.generate_turn

    def counted(model, tokenizer, batch, *args, **kwargs):
        rows.append(batch["input_ids"].shape[0])
        return generate_turn(model, tokenizer, batch, *args, **kwargs)

    monkeypatch.setattr(rollout, "generate_turn", counted)
    cfg = SimpleNamespace(**vars(MGPO if recipe is mgpo_rollout else TOOL), rollout_batch_size=size)
    trajs = recipe(model, tokenizer, image_processor, samples, 1, cfg)
    left = [next(boxes, "done")] if recipe is mgpo_rollout else [next(c, "done") for c in calls.values()]
    assert set(left) == {"done"}  # read exactly as scripted
    return trajs, rows


@pytest.mark.parametrize("recipe, rows, chunked_rows", [(mgpo_rollout, [6, 6], [4, 4, 2, 2]),
                                                        (tool_rollout, [6, 5, 3, 1], [4, 3, 2, 1, 2, 2, 1])])
def test_chunked_greedy_rollout_equals_one_call(policy, monkeypatch, recipe, rows, chunked_rows):
    """MGPO: each chunk runs turn 1 then turn 2 on its own cache; the tool loop runs each chunk's rounds to its end
    (episodes 0-3: 4, 3, 2, 1 going; then 4-5: 2, 2, 1), each round on the last round's cache."""
    whole, calls = run(policy, monkeypatch, recipe, 0)
    assert calls == rows
    chunked, calls = run(policy, monkeypatch, recipe, 4)
    assert calls == chunked_rows
    assert [t.input_ids for t in chunked] == [t.input_ids for t in whole]  # token for token, every turn
    assert [t.loss_mask for t in chunked] == [t.loss_mask for t in whole]
    assert [t.image_grid_thw.tolist() for t in chunked] == [t.image_grid_thw.tolist() for t in whole]
    worst = max((torch.tensor(a.rollout_logprobs) - torch.tensor(b.rollout_logprobs)).abs().max().item()
                for a, b in zip(chunked, whole))
    assert worst < 1e-5, worst


def test_each_chunk_frees_its_cache_before_the_next(policy, monkeypatch):
    """Turn 2 continues on turn 1's cache of the same chunk; the next chunk starts with no cache alive, and none
    survives the rollout (for the update's memory). Weak references see when a cache is freed; no gc.collect."""
    caches, alive_at_start = [], []
    turn_cache = generation.turn_cache

    def watched(batch, out, results):
        alive_at_start.append(sum(ref() is not None for ref in caches))
        caches.append(weakref.ref(out.cache))
        return turn_cache(batch, out, results)

    monkeypatch.setattr(generation, "turn_cache", watched)
    trajs, _ = run(policy, monkeypatch, mgpo_rollout, 4)
    assert len(trajs) == 6 and len(caches) == 4  # 2 chunks x 2 turns
    assert alive_at_start == [0, 1, 0, 1]  # chunk 1 turn 1, its turn 2 (on the same cache), chunk 2 ...
    assert caches[0]() is None and caches[2]() is None  # ... and nothing is left after the rollout


def test_chunks_rule(policy):
    model = policy[0]  # unsharded: no collective, no stand-ins
    assert chunks(model, list(range(6)), 4) == [[0, 1, 2, 3], [4, 5]]
    assert chunks(model, list(range(6)), 0) == [list(range(6))]
    assert chunks(model, list(range(6)), 6) == [list(range(6))]
    assert chunks(model, [], 4) == [] and chunks(model, [], 0) == []


def test_ranks_with_different_chunk_counts_do_not_hang(tiny_path):
    """2 ranks (tests/fsdp_chunks.py): sharded, the rank with fewer chunks (MGPO) or fewer episodes going (tool
    loop) joins the other's generate calls; unsharded, ranks run different numbers of rollouts with no collective."""
    done = torchrun("tests/fsdp_chunks.py", tiny_path, timeout=180)
    found = re.findall(r"rank (\d) (\w+) mgpo turns (\[[^\]]*\]) tool calls (\[[^\]]*\])", done.stdout)
    lines = {f"{rank} {kind}": (json.loads(turns), json.loads(calls)) for rank, kind, turns, calls in found}
    for kind in ("sharded", "unsharded"):
        assert lines[f"0 {kind}"] == ([2] * 2, [0] * 2)  # 1 chunk of MGPO, tool episodes ending in round 1
        assert lines[f"1 {kind}"] == ([2] * 6, [3] * 6)  # 2 chunks, and 4 rounds of 2 chunks
