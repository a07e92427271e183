"""Rollout speed without changing what is sampled: a group's first prompt is prefilled once for its G rollouts
(`generation.shared_prompt_batch`), and each LFPC round continues from the last round's KV cache (`TurnCache.select`
+ `continue_batch`), encoding only the new tokens and images."""

from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import generation
import rollout
from bench import group_prefill_row, lfpc_round_row
from data import Sample
from family import QWEN2_5_VL
from rollout import fork, mgpo_rollout, start_trajectory, tool_rollout
from demo.synthetic import synthetic_samples
from tests.test_rollout import BOXES, CFG, training_gap

TOOL = SimpleNamespace(global_max_pixels=224 * 224, crop_max_pixels=56 * 56, min_pixels=28 * 28, max_turns=5,
                       max_response_tokens=100, max_new_tokens_per_turn=6, temperature=1.0, micro_batch_size=4,
                       rollout_batch_size=0, min_box_side=28, do_sample=True, probe="none")
V1, V2, V3 = [10, 10, 100, 60], [20, 30, 120, 130], [0, 0, 200, 100]
BAD_JSON = (None, "invalid JSON in <tool_call>")
# round by round, the episodes going in index order: round 3 has error turns only (no new image at all)
SCRIPT = [(V1, None), BAD_JSON, (V2, None), None,   # round 1: 0-3; 3 ends
          BAD_JSON, BAD_JSON, None,                 # round 2: 0-2; 2 ends
          (V3, None), None,                         # round 3: 0, 1; 1 ends
          None]                                     # round 4: 0


def two_samples():
    wide = Sample("wide", Image.new("RGB", (640, 300), (90, 120, 200)), "What colour?", ["red", "blue"], "B", None)
    return [synthetic_samples(1, seed=3)[0], wide]


def count_patches(monkeypatch, model):
    """The number of patch rows of each vision-tower call, as a list that fills while the model runs."""
    calls, forward = [], model.model.visual.forward

    def counted(hidden_states, *args, **kwargs):
        calls.append(hidden_states.shape[0])
        return forward(hidden_states, *args, **kwargs)

    monkeypatch.setattr(model.model.visual, "forward", counted)
    return calls


def test_mgpo_group_prefill_encodes_each_prompt_once_and_logprobs_agree(policy, monkeypatch):
    """2 prompts x G = 3: turn 1's vision call gets the 2 global views (not 6), and both turns' log-probs are
    the training forward's (turn 2 continues from the expanded cache)."""
    model, tokenizer, image_processor = policy
    patches = count_patches(monkeypatch, model)
    boxes = iter(BOXES)
    monkeypatch.setattr(rollout, "parse_box", lambda text: next(boxes))
    torch.manual_seed(0)
    trajs = mgpo_rollout(model, tokenizer, image_processor, two_samples(), 3, CFG)
    globals_ = [trajs[0].pixel_values[0].shape[0], trajs[3].pixel_values[0].shape[0]]
    assert patches[0] == sum(globals_)  # one call, each distinct global view once
    assert patches[1:] == [sum(t.pixel_values[1].shape[0] for t in trajs)]  # turn 2: the 6 new images
    assert training_gap(policy, trajs, CFG) < 1e-5


def first_step_distributions(monkeypatch):
    """The log-softmax each generate call samples its first token from, [B, vocab], in a list."""
    seen = []

    class Recorder(generation.SamplingLogProbs):
        def __call__(self, input_ids, scores):
            out = super().__call__(input_ids, scores)
            if not self.logprobs:
                seen.append(out.clone())
            return out

    monkeypatch.setattr(generation, "SamplingLogProbs", Recorder)
    return seen


def test_rows_of_a_group_share_the_distribution_and_sample_independently(policy, monkeypatch):
    """One shared prefill gives every row of a group the same first-token distribution as prefilling each row on
    its own (generate's own prefill), and the rows' draws differ."""
    model, tokenizer, image_processor = policy
    firsts = [start_trajectory(s, tokenizer, image_processor, QWEN2_5_VL, "system", "question", 112 * 112, 784)[0]
              for s in two_samples()]
    trajs = [fork(t) for t in firsts for _ in range(4)]
    seen = first_step_distributions(monkeypatch)
    patches = count_patches(monkeypatch, model)
    torch.manual_seed(0)
    outs, _ = generation.generate_turn(model, tokenizer, generation.shared_prompt_batch(model, tokenizer, trajs), 8)
    # the same rows, each prefilled on its own by generate (today's way): the second method
    generation.generate_turn(model, tokenizer, generation.prompt_batch(model, tokenizer, trajs), 1)
    shared, per_row = (logprobs.exp() for logprobs in seen)  # probabilities: forbidden ids are 0, not -inf
    assert patches == [sum(t.pixel_values[0].shape[0] for t in group) for group in (firsts, trajs)]
    for group in (range(0, 4), range(4, 8)):
        assert (shared[list(group)] - shared[group[0]]).abs().max() < 1e-6
        assert len({tuple(outs[row][0]) for row in group}) > 1  # independent draws
    assert (shared - per_row).abs().max() < 1e-5
    assert (shared[0] - shared[4]).abs().max() > 1e-4  # the two prompts do differ (near-uniform tiny model)


def test_chunks_hold_whole_groups(policy):
    model = policy[0]
    assert generation.chunks(model, list(range(12)), 6, group=4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert generation.chunks(model, list(range(12)), 8, group=4) == [list(range(8)), list(range(8, 12))]
    assert generation.chunks(model, list(range(6)), 2, group=4) == [[0, 1], [2, 3], [4, 5]]  # smaller than a group


def zero_runs(mask):
    """Lengths of the runs of 0 in a loss mask: the first prompt, then each turn's closing + user turn."""
    runs, k = [], 0
    while k < len(mask):
        if mask[k] == 0:
            start = k
            while k < len(mask) and mask[k] == 0:
                k += 1
            runs.append(k - start)
        else:
            k += 1
    return runs


@pytest.fixture(scope="module")
def continued(policy):
    """A tool rollout with the tokens of each language-model forward and the patches of each vision call
    recorded, and where each generate call starts among them."""
    model, tokenizer, image_processor = policy
    with pytest.MonkeyPatch.context() as patch:
        patches, tokens, starts = count_patches(patch, model), [], []
        forward, generate_turn, calls = model.model.language_model.forward, rollout.generate_turn, iter(SCRIPT)

        def language_model(*args, **kwargs):
            tokens.append(kwargs["inputs_embeds"].shape[:2])
            return forward(*args, **kwargs)

        def generate(*args, **kwargs):
            starts.append(len(tokens))
            return generate_turn(*args, **kwargs)

        patch.setattr(model.model.language_model, "forward", language_model)
        patch.setattr(rollout, "generate_turn", generate)
        patch.setattr(rollout, "parse_tool_call", lambda text: next(calls))
        torch.manual_seed(0)
        trajs = tool_rollout(model, tokenizer, image_processor, two_samples(), 2, TOOL)
        assert next(calls, "done") == "done"
    return trajs, patches, tokens, starts


def test_each_round_prefills_only_its_new_tokens(continued):
    """Round 1: one forward of the 2 distinct prompts (less their last id), then generate feeds 1 id per row.
    Round k > 1: generate's first forward feeds the last sampled id + the widest new closing-and-user-turn of the
    episodes going (left-padded), a few tokens, not their conversations."""
    trajs, _, tokens, starts = continued
    assert [len(t.texts) for t in trajs] == [4, 3, 2, 1]
    runs = [zero_runs(t.loss_mask) for t in trajs]
    first = [len(t.input_ids) - sum(t.loss_mask) - sum(r[1:]) for t, r in zip(trajs, runs)]
    assert tokens[0] == (2, max(first) - 1) and tokens[starts[0]] == (4, 1)
    for k in range(1, 4):  # rounds 2-4
        going = [r for t, r in zip(trajs, runs) if len(t.texts) > k]
        conversation = min(sum(r[:k + 1]) for r in going)
        assert tokens[starts[k]] == (len(going), 1 + max(r[k] for r in going))
        assert tokens[starts[k]][1] < conversation / 3


def test_each_image_is_encoded_once(continued):
    """The global views once per group, each crop once in the round it arrives; round 3 (error turns only)
    encodes nothing."""
    trajs, patches, _, _ = continued
    crops = [[t.pixel_values[k].shape[0] for t in trajs if len(t.pixel_values) > k] for k in (1, 2)]
    assert patches == [trajs[0].pixel_values[0].shape[0] + trajs[2].pixel_values[0].shape[0],
                       sum(crops[0]), sum(crops[1])]


def test_continued_rounds_logprobs_agree(policy, continued):
    """The log-probs of 4 rounds continued from the cache (one of them with no new image) are the training
    forward's."""
    assert training_gap(policy, continued[0], TOOL) < 1e-5


def test_bench_rows_report_their_parts(policy):
    """bench.py's rows for items 2 and 3 at a small size. Round 3 of 896 x 896 views (1,024 tokens, 4,096
    patches) with two crops of their top-left quarter (448 x 448: 256 tokens, 1,024 patches each): the new
    patches are 1,024 of 6,144, the new tokens one crop, its text and the last sampled token."""
    group = group_prefill_row(policy, 2, 4, 64, 1)
    assert group["shared_vs_per_row"] == group["shared_s"] / group["per_row_s"] and group["target"] == 1.3 / 4
    lfpc = lfpc_round_row(policy, 2, 1024, 256, 3, 1)
    assert lfpc["new_patch_share"] == 1024 / 6144
    assert 256 + 1 < lfpc["new_tokens"] < 256 + 50 and lfpc["conversation_tokens"] > 1024 + 2 * 256
    assert lfpc["new_token_share"] == lfpc["new_tokens"] / lfpc["conversation_tokens"]
