"""Qwen3.5's hybrid decoder in the rollout: 3 of its 4 tiny layers are Gated DeltaNet, whose cache holds a
recurrent and a convolution state instead of keys and values per column. Tokens generate feeds to a row after it
stopped enter that state (masking them afterwards cannot take them out, no crop can), so a family with
`Family.recurrent_cache` encodes each later turn's whole conversation instead of continuing from the last turn's
cache (`generation.continues_from_cache`); a group's shared first prompt is expanded with `reorder_cache`, which
repeats the recurrent state too. Measured here against the training forward (`grpo.sequence_logprobs`), fp32."""

from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from transformers.cache_utils import LinearAttentionLayer

import generation
import rollout
from data import Sample
from generation import forbidden_token_ids
from grpo import sequence_logprobs, training_batch
from model import load_policy
from demo.synthetic import synthetic_samples
from demo.tiny import build_tiny

MGPO = SimpleNamespace(global_max_pixels=224 * 224, crop_max_pixels=96 * 96, min_pixels=32 * 32,
                       max_new_tokens_turn1=40, max_new_tokens_turn2=8, temperature=1.0, micro_batch_size=8,
                       rollout_batch_size=0, min_box_side=32, do_sample=True, probe="none")
TOOL = SimpleNamespace(global_max_pixels=160 * 160, crop_max_pixels=64 * 64, min_pixels=32 * 32, max_turns=5,
                       max_response_tokens=100, max_new_tokens_per_turn=6, temperature=1.0, micro_batch_size=4,
                       rollout_batch_size=0, min_box_side=32, do_sample=True, probe="none")
# Turn-1 boxes in Qwen3.5's relative frame (0..1000), handed out in order; None brings the global view back.
BOXES = [[100, 100, 600, 500], None, [0, 0, 1000, 1000], [300, 200, 900, 700], [500, 0, 1000, 400], None]
CROP = ([200, 200, 700, 700], None)
# Tool calls round by round, the episodes going in index order: episode 0 makes 5 crops (6 images) and ends at
# max_turns; 1 ends in round 3, 2 in round 1, 3 in round 2.
SCRIPT = [CROP, CROP, None, CROP,  # round 1: 0-3; 2 ends
          CROP, CROP, None,        # round 2: 0, 1, 3; 3 ends
          CROP, None,              # round 3: 0, 1; 1 ends
          CROP, CROP, CROP]        # rounds 4-6: 0; round 6 ends it at max_turns


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    """(model, tokenizer, image_processor): the tiny Qwen3.5 (`--model tiny-qwen3.5`; layers: 3 Gated DeltaNet, 1
    full attention) in fp32, with one id in 12 an end id, so that rows stop at different steps and generate feeds
    pads to the rows that stopped."""
    path = build_tiny(str(tmp_path_factory.mktemp("tiny-qwen3.5") / "tiny"), family="qwen3.5")
    model, tokenizer, image_processor = load_policy(path, torch.device("cpu"), torch.float32)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id] + list(range(0, 900, 12))
    return model, tokenizer, image_processor


def two_samples():
    wide = Sample("wide", Image.new("RGB", (640, 300), (90, 120, 200)), "What colour?", ["red", "blue"], "B", None)
    return [synthetic_samples(1, seed=3)[0], wide]


def training_gap(policy, trajs, cfg):
    """The largest |rollout - training forward| log-prob over the sampled tokens of all turns: the training
    forward is one right-padded batch of the whole conversations, no cache."""
    model, tokenizer, _ = policy
    batch, loss_mask = training_batch(trajs, tokenizer, model.config.image_token_id, torch.device("cpu"),
                                      torch.float32)
    with torch.no_grad():
        train = sequence_logprobs(model, batch, loss_mask, forbidden_token_ids(model, tokenizer), cfg.temperature)
    worst = 0.0
    for row, t in enumerate(trajs):
        mask = torch.tensor(t.loss_mask, dtype=torch.bool)
        sampled = torch.tensor(t.rollout_logprobs)[mask]
        assert torch.isfinite(sampled).all()
        worst = max(worst, (train[row, :len(t.input_ids)][mask] - sampled).abs().max().item())
    return worst


def mgpo_two_turns(policy, monkeypatch, seed=0):
    """2 samples x 3 generations through both MGPO turns; returns the trajectories and each turn's sampled lengths."""
    model, tokenizer, image_processor = policy
    boxes, lengths, generate_turn = iter(BOXES), [], generation.generate_turn

    def recorded(*args, **kwargs):
        outs, turn = generate_turn(*args, **kwargs)
        lengths.append([len(ids) for ids, _ in outs])
        return outs, turn

    monkeypatch.setattr(rollout, "parse_box", lambda text: next(boxes))
    monkeypatch.setattr(rollout, "generate_turn", recorded)
    torch.manual_seed(seed)
    return rollout.mgpo_rollout(model, tokenizer, image_processor, two_samples(), 3, MGPO), lengths


def test_the_cache_is_hybrid_and_the_family_says_so(hybrid):
    """What the rest of this file relies on: the tiny model's cache has recurrent layers, cannot be cropped, and
    its family (read from config.model_type) tells the rollout not to continue from it."""
    model, tokenizer, image_processor = hybrid
    first, _ = rollout.start_trajectory(two_samples()[0], tokenizer, image_processor, rollout.family_of(model.config),
                                        "system", "question", 128 * 128, 1024)
    out = model(**generation.prompt_batch(model, tokenizer, [first]), use_cache=True)
    kinds = [type(layer) for layer in out.past_key_values.layers]
    assert kinds.count(LinearAttentionLayer) == 3 and len(kinds) == 4
    with pytest.raises(RuntimeError, match="does not track past states"):
        out.past_key_values.crop(-1)
    assert not generation.continues_from_cache(model)


def test_group_rows_get_the_per_row_prefill_distribution(hybrid, monkeypatch):
    """One prefill per distinct prompt, expanded to the group's rows with `reorder_cache` (recurrent states
    included): each row's first-token distribution is the one generate's own prefill of that row gives."""
    model, tokenizer, image_processor = hybrid
    family = rollout.family_of(model.config)
    firsts = [rollout.start_trajectory(s, tokenizer, image_processor, family, "system", "question", 128 * 128,
                                       1024)[0] for s in two_samples()]
    trajs = [rollout.fork(t) for t in firsts for _ in range(3)]
    seen = []

    class Recorder(generation.SamplingLogProbs):
        def __call__(self, input_ids, scores):
            out = super().__call__(input_ids, scores)
            if not self.logprobs:
                seen.append(out.masked_fill(out.isinf(), 0.0))  # forbidden ids: -inf in both, compared as 0
            return out

    monkeypatch.setattr(generation, "SamplingLogProbs", Recorder)
    generation.generate_turn(model, tokenizer, generation.shared_prompt_batch(model, tokenizer, trajs), 1)
    generation.generate_turn(model, tokenizer, generation.prompt_batch(model, tokenizer, trajs), 1)
    shared, per_row = seen
    assert (shared - per_row).abs().max() < 1e-5
    assert (shared[0] - shared[3]).abs().max() > 1e-2  # the two prompts do differ (near-uniform tiny model)


def test_mgpo_two_turns_logprobs_agree(hybrid, monkeypatch):
    """Two-image MGPO conversations, left-padded, rows stopping at different steps in both turns: turn 2 encodes
    the whole conversation again, and both turns' log-probs are the training forward's."""
    trajs, lengths = mgpo_two_turns(hybrid, monkeypatch)
    assert all(len(t.image_grid_thw) == 2 for t in trajs)
    assert len(set(lengths[0])) > 2 and len(set(lengths[1])) > 1  # rows stopped at different steps
    assert len({len(t.input_ids) for t in trajs}) > 3
    assert training_gap(hybrid, trajs, MGPO) < 1e-5


def test_continuing_from_the_masked_cache_would_disagree(hybrid, monkeypatch):
    """Why the re-encode: the same rollout with turn 2 continued from turn 1's cache (`continue_batch`, the path
    of the families with a key-value cache) scores turn 2 differently from the training forward, since the pads
    fed to the rows that had stopped (up to 24 of them here) are in their recurrent state. Measured: 1.9e-3, against
    5e-7 re-encoded; the tiny model's near-uniform outputs keep it small (at weights of std 0.05, not 0.02: 7e-3)."""
    monkeypatch.setattr(generation, "continues_from_cache", lambda model: True)
    trajs, lengths = mgpo_two_turns(hybrid, monkeypatch)
    assert len(set(lengths[0])) > 2
    assert training_gap(hybrid, trajs, MGPO) > 1e-3


def test_lfpc_six_images_logprobs_agree(hybrid, monkeypatch):
    """A tool rollout whose longest episode holds 6 images (global view + 5 crops) over 6 rounds, the others
    ending in rounds 1-3, rows stopping at different steps within a round: every round encodes the conversations
    still going, and all log-probs are the training forward's."""
    model, tokenizer, image_processor = hybrid
    calls = iter(SCRIPT)
    monkeypatch.setattr(rollout, "parse_tool_call", lambda text: next(calls))
    torch.manual_seed(0)
    trajs = rollout.tool_rollout(model, tokenizer, image_processor, two_samples(), 2, TOOL)
    assert next(calls, "done") == "done"
    assert [len(t.image_grid_thw) for t in trajs] == [6, 3, 1, 2]
    assert [t.end_reason for t in trajs] == ["max_turns", "no_tool_call", "no_tool_call", "no_tool_call"]
    assert len({len(t.input_ids) for t in trajs}) == 4
    assert training_gap(hybrid, trajs, TOOL) < 1e-5
