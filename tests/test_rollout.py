"""The token-id discipline of the two-turn rollout, and the agreement of rollout and training log-probs."""

import copy
import dataclasses
import warnings
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode
from transformers import GenerationConfig

import generation
import rollout
from chat import close_assistant_turn, encode_images, expand_image_pads
from data import Sample
from family import QWEN2_5_VL
from grpo import batch_logprobs
from generation import JSON_BLOCK_END, StopAtPattern, end_of_turn_ids, forbidden_token_ids
from prompts import MGPO_PROMPTS, TOOL_PROMPTS
from rollout import mgpo_rollout
from demo.synthetic import synthetic_samples

CFG = SimpleNamespace(global_max_pixels=224 * 224, crop_max_pixels=112 * 112, min_pixels=28 * 28,
                      max_new_tokens_turn1=24, max_new_tokens_turn2=12, temperature=1.0, micro_batch_size=8,
                      rollout_batch_size=0, min_box_side=28, do_sample=True, probe="none")
# Turn-1 boxes in model-input pixels, handed out in order: crops of different shapes, and invalid ones
# (None: no parsable box; [50, 50, 60, 60]: under 28 px) that bring the global view back.
# The wide image's model input is 308x140, so [30, 40, 200, 220] is out of range there.
BOXES = [[10, 10, 100, 60], None, [0, 0, 224, 224], [50, 50, 60, 60],
         [30, 40, 200, 220], [5, 5, 40, 140], [100, 20, 300, 50], [0, 0, 30, 30]]


def two_image_rollout(policy, cfg, seed=0):
    """8 two-image conversations: 2 images of different sizes (so different global grids) x 4 generations."""
    model, tokenizer, image_processor = policy
    wide = Sample("wide", Image.new("RGB", (640, 300), (90, 120, 200)), "What colour?", ["red", "blue"], "B", None)
    samples = [synthetic_samples(1, seed=3)[0], wide]
    boxes = iter(BOXES)
    original = rollout.parse_box
    rollout.parse_box = lambda text: next(boxes)
    try:
        torch.manual_seed(seed)
        return mgpo_rollout(model, tokenizer, image_processor, samples, 4, cfg)
    finally:
        rollout.parse_box = original


@pytest.fixture(scope="module")
def trajectories(policy):
    return two_image_rollout(policy, CFG)


def training_gap(policy, trajectories, cfg):
    """The largest |rollout - training forward| log-prob over the sampled tokens of both turns."""
    model, tokenizer, _ = policy
    [logprobs] = batch_logprobs(model, trajectories, tokenizer, cfg, torch.device("cpu"), torch.float32)
    worst = 0.0
    for row, t in enumerate(trajectories):
        mask = torch.tensor(t.loss_mask, dtype=torch.bool)
        train = logprobs[row, :len(t.input_ids)][mask]
        sampled = torch.tensor(t.rollout_logprobs)[mask]
        assert torch.isfinite(sampled).all()
        worst = max(worst, (train - sampled).abs().max().item())
    return worst


def test_batch_really_is_ragged(trajectories):
    assert len({len(t.input_ids) for t in trajectories}) > 3  # left padding differs row to row
    assert len({tuple(t.image_grid_thw[1].tolist()) for t in trajectories}) > 3  # crops of several shapes
    assert [t.box_valid for t in trajectories] == [True, False, True, False, False, True, True, True]


def test_rollout_and_training_forward_logprobs_agree(policy, trajectories):
    """The training forward (right-padded, one batch, 3-D positions from mm_token_type_ids) scores the sampled
    tokens of both turns exactly as generate (left-padded, per turn, with a KV cache) sampled them."""
    worst = training_gap(policy, trajectories, CFG)
    assert worst < 1e-5, worst


# Qwen2.5-VL-7B-Instruct's generation_config.json: two end ids, and sampling settings that generate would apply to
# any setting we left None
QWEN_SAMPLING = dict(do_sample=True, temperature=0.1, top_k=1, top_p=0.001, repetition_penalty=1.05)


@pytest.fixture
def qwen_generation_config(policy, monkeypatch):
    model, tokenizer, _ = policy
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    monkeypatch.setattr(model, "generation_config", GenerationConfig(
        **QWEN_SAMPLING, bos_token_id=endoftext, pad_token_id=endoftext, eos_token_id=[im_end, endoftext]))
    return im_end, endoftext


def test_logprobs_at_temperature_0_7_are_the_training_forwards(policy, qwen_generation_config):
    """Sampled at 0.7 under Qwen's own generation_config, both turns' log-probs are the training forward's at
    0.7 (grpo.sequence_logprobs), and differ from the untempered ones."""
    tempered = SimpleNamespace(**{**vars(CFG), "temperature": 0.7})
    trajs = two_image_rollout(policy, tempered, seed=1)
    worst = training_gap(policy, trajs, tempered)
    assert worst < 1e-5, worst
    assert training_gap(policy, trajs, CFG) > 1e-2


def test_generate_samples_from_the_recorded_distribution(policy, qwen_generation_config, monkeypatch):
    """The probability the sampler is handed for each token it draws is exp(recorded log-prob), at 0.7: none of
    transformers' processors (nor Qwen's top_k 1 / top_p 0.001) reshapes the distribution after it is recorded."""
    model, tokenizer, image_processor = policy
    drawn, multinomial = [], torch.multinomial

    def spy(probs, num_samples, **kwargs):
        tokens = multinomial(probs, num_samples, **kwargs)
        drawn.append(probs.gather(1, tokens).squeeze(1))
        return tokens

    monkeypatch.setattr(torch, "multinomial", spy)
    first, _ = rollout.start_trajectory(synthetic_samples(1, seed=3)[0], tokenizer, image_processor, QWEN2_5_VL,
                                        "system", "question", 112 * 112, 784)
    torch.manual_seed(0)
    outs, _ = generation.generate_turn(model, tokenizer, generation.prompt_batch(model, tokenizer, [first] * 4), 10,
                                    temperature=0.7)
    drawn = torch.stack(drawn, 1)
    for row, (ids, logprobs) in enumerate(outs):
        torch.testing.assert_close(drawn[row, :len(ids)], torch.tensor(logprobs).exp(), rtol=1e-5, atol=1e-7)
    assert drawn.min() < 0.5  # a spread distribution, not top-k 1's certainty


def test_without_mm_token_type_ids_positions_are_wrong(policy, trajectories):
    """The check above can fail: dropping mm_token_type_ids (1-D positions, as in MGPO's public code) breaks it."""
    model, tokenizer, _ = policy
    from grpo import sequence_logprobs, training_batch
    batch, mask = training_batch(trajectories, tokenizer, model.config.image_token_id, torch.device("cpu"),
                                 torch.float32)
    del batch["mm_token_type_ids"]
    with torch.no_grad():
        lp = sequence_logprobs(model, batch, mask, forbidden_token_ids(model, tokenizer))
    t = trajectories[0]
    m = torch.tensor(t.loss_mask, dtype=torch.bool)
    assert (lp[0, :len(t.input_ids)][m] - torch.tensor(t.rollout_logprobs)[m]).abs().max() > 1e-4


def test_conversation_is_the_chat_template_with_sampled_ids_inside(policy, trajectories):
    """Decoding the ids gives exactly the chat template's rendering of the conversation; the loss mask covers
    exactly the two assistant turns' sampled ids."""
    model, tokenizer, _ = policy
    for t in trajectories:
        ids, mask = t.input_ids, t.loss_mask
        runs = [(i, j) for i, j in _runs(mask)]
        assert len(runs) == 2 and runs[1][1] == len(ids)  # turn 1 and turn 2, the conversation ends sampled
        sampled_text = [tokenizer.decode(ids[i:j], skip_special_tokens=True) for i, j in runs]
        assert sampled_text == t.texts
        q = t.sample
        from data import format_choices
        p = MGPO_PROMPTS
        intro = p.crop_intro if t.box_valid else p.invalid_intro
        turn2 = p.turn2.format(question=q.question, choices=format_choices(q.options))
        messages = [{"role": "system", "content": p.system},
                    {"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": p.turn1.format(question=q.question)}]},
                    {"role": "assistant", "content": tokenizer.decode(ids[runs[0][0]:runs[0][1]])
                     .removesuffix("<|im_end|>")},
                    {"role": "user", "content": [{"type": "text", "text": intro}, {"type": "image"},
                                                 {"type": "text", "text": turn2}]}]
        expected = expand_image_pads(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                                   tokenize=False), t.image_grid_thw, QWEN2_5_VL)
        decoded = tokenizer.decode(ids)
        assert decoded.startswith(expected)
        assert decoded[len(expected):] == tokenizer.decode(ids[runs[1][0]:])
        # the image placeholders match the images: what the forward checks
        n_pad = sum(i == tokenizer.convert_tokens_to_ids("<|image_pad|>") for i in ids)
        assert n_pad == int(t.image_grid_thw.prod(-1).sum()) // 4
        assert not set(forbidden_token_ids(model, tokenizer)) & {ids[k] for k in range(len(ids)) if mask[k]}


class StopRowsEarly(StopAtPattern):
    """Row r stops after 3 + 2r sampled tokens: turn 1 leaves masked columns in the middle of the cache."""

    def __call__(self, input_ids, scores, **kwargs):
        for row in range(input_ids.shape[0]):
            if input_ids.shape[1] - self.prompt_len >= 3 + 2 * row:
                self.stop_at.setdefault(row, 3 + 2 * row)
        return torch.tensor([row in self.stop_at for row in range(input_ids.shape[0])])


def test_turn2_from_the_cache_equals_reencoding_the_conversation(policy, monkeypatch):
    """Turn 2 continued from turn 1's KV cache samples the same greedy tokens with the same log-probs as a turn 2
    that re-encodes everything, while its prefill runs the language model over only the new columns."""
    model, tokenizer, image_processor = policy
    wide = Sample("wide", Image.new("RGB", (640, 300), (90, 120, 200)), "What colour?", ["red", "blue"], "B", None)
    boxes = iter(BOXES)
    monkeypatch.setattr(rollout, "parse_box", lambda text: next(boxes))
    monkeypatch.setattr(generation, "StopAtPattern", StopRowsEarly)
    torch.manual_seed(0)
    trajs, turn1 = rollout.mgpo_grounding_turn(model, tokenizer, image_processor,
                                               [synthetic_samples(1, seed=3)[0], wide], 4, CFG)
    assert [t.box_valid for t in trajs] == [True, False, True, False, False, True, True, True]
    widths = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True)
    greedy = SimpleNamespace(temperature=1.0, do_sample=False)
    try:
        cached, _ = rollout.generate_for(model, tokenizer, trajs, 12, greedy, after=turn1)
    finally:
        hook.remove()
    reencoded, _ = rollout.generate_for(model, tokenizer, trajs, 12, greedy)
    new_columns = max(len(t.input_ids) - n for t, n in zip(trajs, turn1.attention_mask.sum(1).tolist()))
    assert widths[0] == new_columns + 1  # the new ids and turn 1's last sampled token, never fed back in turn 1
    assert [ids for ids, _ in cached] == [ids for ids, _ in reencoded]
    worst = max((torch.tensor(a) - torch.tensor(b)).abs().max().item() for (_, a), (_, b) in zip(cached, reencoded))
    assert worst < 1e-5, worst


def test_invalid_box_returns_the_global_view(trajectories):
    for t in trajectories:
        if t.box_valid:
            assert t.box_original is not None and t.images[1] is not t.images[0]
        else:
            assert t.images[1] is t.images[0] and torch.equal(t.pixel_values[1], t.pixel_values[0])


def test_min_box_side_decides_which_boxes_are_cropped(policy, trajectories):
    """[100, 20, 300, 50] (200 x 30 on the 308 x 140 view) and [0, 0, 30, 30] (the 7th and 8th boxes) have a 30-px
    side: valid over 28 (MGPO), invalid over 30; [10, 10, 100, 60] (90 x 50) is valid under both, [50, 50, 60, 60]
    (10 px) under neither."""
    strict = two_image_rollout(policy, SimpleNamespace(**{**vars(CFG), "min_box_side": 30}))
    assert [t.box_valid for t in trajectories] == [True, False, True, False, False, True, True, True]
    assert [t.box_valid for t in strict] == [True, False, True, False, False, True, False, False]
    assert strict[7].images[1] is strict[7].images[0]  # the global view again


def _runs(mask):
    start = None
    for k, m in enumerate(mask + [0]):
        if m and start is None:
            start = k
        if not m and start is not None:
            yield start, k
            start = None


def test_stop_after_json_block(policy):
    _, tokenizer, _ = policy
    text = 'I look at the frame. ```json\n[{"bbox_2d": [1, 2, 30, 40]}]\n``` and more'
    ids = tokenizer(text)["input_ids"]
    prompt = [7, 8, 9]
    stop = StopAtPattern(tokenizer, len(prompt), JSON_BLOCK_END)
    fired = None
    for n in range(1, len(ids) + 1):
        batch = torch.tensor([prompt + ids[:n]])
        if stop(batch, None)[0] and fired is None:
            fired = n
    assert tokenizer.decode(ids[:fired]).endswith("```") and tokenizer.decode(ids[:fired]).count("```") == 2
    assert stop.stop_at[0] == fired


def test_close_assistant_turn(policy):
    _, tokenizer, _ = policy
    eos = tokenizer.eos_token_id
    assert tokenizer.decode(close_assistant_turn(tokenizer, [5, eos])) == "\n"
    assert tokenizer.decode(close_assistant_turn(tokenizer, [5, 6])) == "<|im_end|>\n"
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")  # sampled and kept; the template closes with im_end
    assert tokenizer.decode(close_assistant_turn(tokenizer, [5, endoftext])) == "<|im_end|>\n"
    # A checkpoint whose tokenizer names <|endoftext|> its eos: the closing still comes from the template.
    other = copy.deepcopy(tokenizer)
    other.eos_token = "<|endoftext|>"
    assert other.eos_token_id == endoftext
    for sampled, closing in [([5, eos], "\n"), ([5, 6], "<|im_end|>\n"), ([5, endoftext], "<|im_end|>\n")]:
        assert other.decode(close_assistant_turn(other, sampled)) == closing


def test_a_turn_ends_at_any_end_id_of_the_checkpoint(policy, qwen_generation_config, monkeypatch):
    """With Qwen's two end ids, a greedy turn whose second token is <|endoftext|> ends there (generate stops, the
    cut keeps it); with only <|im_end|> the same turn runs on to the length limit."""
    model, tokenizer, image_processor = policy
    im_end, endoftext = qwen_generation_config
    assert end_of_turn_ids(model, tokenizer) == sorted([im_end, endoftext])
    forwards = []

    def endoftext_second(module, args, logits):  # on the lm_head: <|endoftext|> wins the 2nd decoding step only
        forwards.append(1)
        if len(forwards) == 2:
            logits[..., endoftext] += 1e4
        return logits

    first, _ = rollout.start_trajectory(synthetic_samples(1, seed=3)[0], tokenizer, image_processor, QWEN2_5_VL,
                                        "system", "question", 112 * 112, 784)
    batch = generation.prompt_batch(model, tokenizer, [first] * 2)
    hook = model.lm_head.register_forward_hook(endoftext_second)
    try:
        outs, turn = generation.generate_turn(model, tokenizer, batch, 8, do_sample=False)
        assert [len(ids) for ids, _ in outs] == [2, 2] and all(ids[1] == endoftext for ids, _ in outs)
        assert turn.sequences.shape[1] == batch["input_ids"].shape[1] + 2  # generate itself stopped
        forwards.clear()
        model.generation_config.eos_token_id = im_end
        assert end_of_turn_ids(model, tokenizer) == [im_end]
        outs, _ = generation.generate_turn(model, tokenizer, batch, 8, do_sample=False)
        assert [len(ids) for ids, _ in outs] == [8, 8] and all(ids[1] == endoftext for ids, _ in outs)
    finally:
        hook.remove()


def test_turn_2_passes_its_cache_under_the_current_name(policy):
    """generate's `past_key_values` is deprecated (FutureWarning, removed in transformers 6): turn 2 on turn 1's
    cache must not use it."""
    model, tokenizer, image_processor = policy
    wide = Sample("wide", Image.new("RGB", (640, 300), (90, 120, 200)), "What colour?", ["red", "blue"], "B", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        trajs, turn1 = rollout.mgpo_grounding_turn(model, tokenizer, image_processor, [wide], 2, CFG)
        outs, _ = rollout.generate_for(model, tokenizer, trajs, 4, CFG, after=turn1)
    assert len(outs) == 2


class HostReads(TorchFunctionMode):
    """Counts the tensor operations that bring values to the host (each a device sync on a GPU)."""
    READS = {"tolist", "item", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__", "__array__"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", "") in self.READS
        return func(*args, **(kwargs or {}))


def test_stop_check_reads_the_newest_tokens_in_one_transfer(policy):
    """One host read per decoding step for a batch of 5 rows, not one per row; the rows still stop on their own."""
    _, tokenizer, _ = policy
    ids = tokenizer('x ```json\n[1]\n``` y', add_special_tokens=False)["input_ids"]
    rows = torch.tensor([[7] * 3 + ids] + [[7] * 3 + [ids[0]] * len(ids)] * 4)  # row 0 closes a json block
    stop = StopAtPattern(tokenizer, 3, JSON_BLOCK_END)
    for width in range(4, rows.shape[1] + 1):
        with HostReads() as reads:
            done = stop(rows[:, :width], None)
        assert reads.count == 1
    assert done.tolist() == [True, False, False, False, False]
    assert tokenizer.decode(ids[:stop.stop_at[0]]).endswith("```")


def test_images_are_encoded_at_the_size_we_resized_them_to(policy):
    """A pixel budget above the processor's own cap (tiny: 224 x 224) must not be resized again behind our back:
    boxes are read in the frame of the image `resize_for_model` made."""
    _, _, image_processor = policy
    assert image_processor.size["longest_edge"] == 224 * 224  # its max_pixels
    big = Image.new("RGB", (448, 336), (10, 200, 30))
    pixels, grids = encode_images(image_processor, [big])
    assert grids.tolist() == [[1, 336 // 14, 448 // 14]] and pixels[0].shape[0] == 24 * 32  # patches of 14 px
    with pytest.raises(ValueError, match="multiples of 28"):
        encode_images(image_processor, [Image.new("RGB", (100, 100))])


def test_boxes_are_read_in_the_frame_of_the_trajectorys_family(monkeypatch):
    """A box the model wrote is mapped and judged in its family's frame: absolute pixels of the 448 x 336 input, or
    thousandths of the image (relative, Qwen3-VL's); validity in input pixels, the crop on a 1792 x 1344 original."""
    relative = dataclasses.replace(QWEN2_5_VL, frame="relative")
    original = Image.new("RGB", (1792, 1344), "white")
    cfg = SimpleNamespace(min_pixels=784, crop_max_pixels=112 * 112, min_box_side=28, probe="none",
                          max_response_tokens=100, max_turns=5)

    def trajectory(family):
        return SimpleNamespace(sample=None, family=family, crop_boxes=[], input_size=(448, 336),
                               original_size=original.size, texts=[], loss_mask=[1], tool_calls=0)

    for family, box in [(QWEN2_5_VL, [112, 84, 224, 168]), (relative, [250, 250, 500, 500])]:
        traj = trajectory(family)
        crop = rollout.cut_crop(traj, original, box, cfg)
        assert traj.crop_boxes == [[448, 336, 896, 672]]  # by hand: 4x each way / 1792 * 0.25 = 448, ...
        assert crop.size == (112, 84)  # 448 x 336 under 112 * 112 px: sqrt(12) smaller, floored to 28s
    # [0, 0, 60, 60]: 60 x 60 input px (valid), or 26.9 x 20.2 (relative: too small); x2 = 500 > 448 is outside
    # the absolute input, 224 x 100.8 px inside it when relative
    for box, absolute_ok, relative_ok in [([0, 0, 60, 60], True, False), ([0, 0, 500, 300], False, True)]:
        assert rollout.valid_box(trajectory(QWEN2_5_VL), box, 28) is absolute_ok
        assert rollout.valid_box(trajectory(relative), box, 28) is relative_ok
    # the tool's error names the frame the model writes in; [0, 0, 500, 20]: outside, or 224 x 6.7 px
    sent = []
    monkeypatch.setattr(rollout, "append_user_turn", lambda traj, tok, proc, parts: sent.append(parts))
    call = '<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [0, 0, 500, 20]}}</tool_call>'
    for family in (QWEN2_5_VL, relative):
        traj = trajectory(family)
        traj.texts.append(call)
        assert rollout.tool_step(traj, original, None, None, cfg, TOOL_PROMPTS) and traj.tool_calls == 1
    assert sent[0] == [TOOL_PROMPTS.error.format(
        error="bbox_2d [0.0, 0.0, 500.0, 20.0] is outside the 448x336 image or under 28 pixels")]
    assert sent[1] == [TOOL_PROMPTS.error.format(
        error="bbox_2d [0.0, 0.0, 500.0, 20.0] is outside the 1000x1000 image or under 28 pixels")]
