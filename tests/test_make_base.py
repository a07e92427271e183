"""make_base.py: the SFT conversations are what the rollouts produce, a few SFT steps run, the saved directory
loads like any checkpoint, and the base's sampled turn-1 boxes parse."""

import random
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from answers import extract_answer_tag, extract_boxed
from config import parse_config
from crop import coverage, is_valid_box, parse_box, parse_tool_call, to_original
from demo.make_base import (PLACES, Config, box_ids, build_base_tokenizer, build_model, freeze_language_model,
                            make_base, make_conversations, make_pointing_examples, make_reading_examples,
                            mgpo_turn1_ids, reading_accuracy, sft, template_batches, tool_turn1_ids)
from demo.synthetic import FRAME_COLOURS
from demo.tiny import TINY_MAX_PIXELS, TINY_MIN_PIXELS, check_prompt_fingerprint
from model import load_policy
from rollout import mgpo_rollout

SMALL = ["--num_images", "6", "--steps", "3", "--batch_size", "2", "--log_every", "1", "--hidden_size", "32",
         "--intermediate_size", "64", "--num_heads", "2", "--mrope_section", "1,3,4", "--vision_hidden_size", "32",
         "--read_images", "2", "--read_crops_per_image", "2", "--read_steps", "2",
         "--read_held_out", "1", "--vision_steps", "2", "--readout_steps", "2",
         "--read_batch_size", "2", "--point_images", "4", "--tool_pointing", "4", "--mix_tool_pointing", "2"]


def test_each_coordinate_is_one_token_and_the_boxes_parse():
    tok = build_base_tokenizer()
    ids = box_ids(tok, [0, 112, 84, 196])
    assert [tok.decode([i]) for i in ids] == ["0", ",", " ", "112", ",", " ", "84", ",", " ", "196"]
    assert parse_box(tok.decode(mgpo_turn1_ids(tok, [0, 112, 84, 196], "red"))) == [0.0, 112.0, 84.0, 196.0]
    assert parse_tool_call(tok.decode(tool_turn1_ids(tok, [28, 0, 112, 84], "red"))) == ([28.0, 0.0, 112.0, 84.0],
                                                                                          None)
    # text the model did not sample tokenizes the same way: a number is one token wherever it appears
    assert tok.decode(tok("[7, 224]")["input_ids"]) == "[7, 224]" and len(tok("224")["input_ids"]) == 1


def named_place(text):
    """What the turn-1 text names: "The key area is in the top half: ..." -> "top half"."""
    return next(p for p in PLACES if f"the {p}" in text)


def frame_colour_at(image, box, original_size):
    """The colour name of the global view's pixel in the middle of the 16-px ring at the box's top-left corner."""
    scale = image.width / original_size[0]
    x, y = (int((box[k] + 8) * scale) for k in (0, 1))
    pixel = np.asarray(image, dtype=int)[y, x]
    return next(name for name, c in FRAME_COLOURS.items() if np.abs(pixel - c).max() <= 30)


def test_pointing_examples_box_the_named_frame():
    cfg = parse_config(Config, ["--point_images", "10"])
    cfg.min_pixels = TINY_MIN_PIXELS
    tok = build_base_tokenizer()
    processor = Qwen2VLImageProcessorPil(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS)
    examples = make_pointing_examples(cfg, tok, processor, random.Random(0))
    assert len(examples) == 10
    sides = [int(v) for v in cfg.box_sides.split(",")]
    for ex in examples:
        box, question = parse_box(ex.texts[0]), tok.decode(ex.input_ids)
        assert box[2] - box[0] == box[3] - box[1] and box[2] - box[0] in sides
        assert "Where is the red frame? Output the coordinates" in question and named_place(ex.texts[0]) == "red frame"
        assert ex.texts[0].startswith("The key area is the red frame:")
        assert coverage(to_original(box, ex.input_size, ex.original_size), ex.sample.boxes[0]) == 1.0
        # the pixels the model is shown at that place are red
        assert frame_colour_at(ex.images[0], ex.sample.boxes[0], ex.original_size) == "red"
        assert ex.sample.image is None  # settled: the 896 x 896 canvas is not kept


def test_tool_pointing_boxes_the_red_frame_at_the_token_distance_of_a_tool_conversation():
    cfg = parse_config(Config, ["--tool_pointing", "6", "--num_images", "4", "--tool_fraction", "1.0"])
    cfg.min_pixels = TINY_MIN_PIXELS
    tok = build_base_tokenizer()
    processor = Qwen2VLImageProcessorPil(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS)
    examples = make_pointing_examples(cfg, tok, processor, random.Random(0), tool=True)
    convs = [t for t in make_conversations(cfg, tok, processor, random.Random(0))[0] if len(t.texts) == 2]
    assert len(examples) == 6 and convs
    image_pad = tok.convert_tokens_to_ids("<|image_pad|>")

    def answer_offset(traj):  # tokens from the global view's last visual token to the first trained token
        return traj.loss_mask.index(1) - traj.input_ids.index(image_pad) - int(traj.image_grid_thw[0].prod()) // 4

    offsets = {answer_offset(t) for t in convs}
    assert len(offsets) == 1  # the options' order does not change the prompt's length
    for ex in examples:
        box, call = parse_tool_call(ex.texts[0])[0], tok.decode(ex.input_ids)
        assert "Where is the red frame? (A)" in call and ex.texts[0].startswith("<think>The key area is the red frame.")
        assert coverage(to_original(box, ex.input_size, ex.original_size), ex.sample.boxes[0]) == 1.0
        assert answer_offset(ex) in offsets


def test_without_tool_pointing_the_main_random_stream_is_untouched():
    # the committed base was built before tool pointing existed: with --tool_pointing 0 it must build the same
    cfg = parse_config(Config, [])
    cfg.min_pixels = TINY_MIN_PIXELS
    rng = random.Random(7)
    assert make_pointing_examples(cfg, build_base_tokenizer(), None, rng, tool=True) == []
    assert rng.random() == random.Random(7).random()


def test_conversations_hide_the_target_in_the_text_and_show_it_in_some_crops():
    cfg = parse_config(Config, ["--num_images", "8", "--tool_fraction", "0.5"])
    cfg.min_pixels = TINY_MIN_PIXELS
    tok = build_base_tokenizer()
    processor = Qwen2VLImageProcessorPil(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS)
    convs, hits = make_conversations(cfg, tok, processor, random.Random(0))
    direct = [t for t in convs if len(t.texts) == 1]
    convs = [t for t in convs if len(t.texts) == 2]
    assert len(convs) == 16 and 0 < hits < 8 and len(direct) <= 8
    sides = [int(v) for v in cfg.box_sides.split(",")]
    for traj in direct:  # the direct baseline's format: the global view only, a random option
        assert len(traj.images) == 1 and extract_boxed(traj.texts[0]) in traj.sample.options
    for traj in convs:
        assert len(traj.input_ids) == len(traj.loss_mask) and len(traj.images) == 2
        trained = tok.decode([i for i, m in zip(traj.input_ids, traj.loss_mask) if m])
        turn1, turn2 = traj.texts
        box = parse_box(turn1) if "```json" in turn1 else parse_tool_call(turn1)[0]
        assert is_valid_box(box, traj.input_size, 28) and box[2] - box[0] in sides
        # turn 1 boxes the place it names; the crop is that box; turn 2 names the pattern of a frame held whole
        place, crop = named_place(turn1), traj.crop_boxes[0]
        assert crop == to_original(box, traj.input_size, traj.original_size)
        if place == "red frame":
            assert coverage(crop, traj.sample.boxes[0]) == 1.0
        else:
            assert {"top": box[3] <= 112, "bottom": box[1] >= 112, "left": box[2] <= 112,
                    "right": box[0] >= 112}[place.split()[0]] and f"is in the {place}" in turn1
        held = [f["pattern"] for f in traj.sample.meta["frames"] if coverage(crop, f["box"]) == 1.0]
        answer = extract_boxed(turn2) or extract_answer_tag(turn2)
        assert answer == held[0] if held else answer in traj.sample.options
        assert trained.startswith(turn1[:10]) and traj.input_ids.count(tok.convert_tokens_to_ids("<|image_pad|>")) \
            == sum(int(g.prod()) // 4 for g in traj.image_grid_thw)
    named = Counter(named_place(t.texts[0]) for t in convs)  # whatever the question asks
    assert named["red frame"] == hits and len(named) >= 3
    tool = [t for t in convs if t.texts[0].startswith("<think>")]
    assert 0 < len(tool) < len(convs)


def test_reading_examples_show_the_whole_target_and_train_on_its_name():
    cfg = parse_config(Config, [])
    cfg.min_pixels = TINY_MIN_PIXELS
    tok = build_base_tokenizer()
    processor = Qwen2VLImageProcessorPil(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS)
    examples = make_reading_examples(cfg, tok, processor, random.Random(0), num_images=3)
    assert len(examples) == 3 * cfg.read_crops_per_image
    low, high = (int(v) for v in cfg.read_crop_sides.split(","))
    for ex in examples:
        (box,), trained = ex.crop_boxes, ex.texts[0]
        frames = [f for f in ex.sample.meta["frames"] if coverage(box, f["box"]) == 1.0]
        assert trained in [f["pattern"] for f in frames] and low <= box[2] - box[0] == box[3] - box[1] <= high
        assert abs(ex.images[0].width - (box[2] - box[0])) <= 14  # shown at its own resolution (multiple of 28)
        assert tok.decode([i for i, m in zip(ex.input_ids, ex.loss_mask) if m], skip_special_tokens=True) == trained
        assert len(ex.input_ids) < 120  # short: several times more examples per second than the conversations


def test_phase_3_trains_the_vision_tower_and_leaves_the_language_model_as_it_was():
    cfg = parse_config(Config, SMALL)
    cfg.min_pixels = TINY_MIN_PIXELS
    tok = build_base_tokenizer()
    processor = Qwen2VLImageProcessorPil(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS)
    model = build_model(cfg, tok)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    examples = make_reading_examples(cfg, tok, processor, random.Random(0), num_images=2)
    sft(cfg, freeze_language_model(model), tok, processor, examples, random.Random(0), 2, 2, 1e-2, log=lambda s: None)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    vision = {name for name in before if name.startswith("model.visual.")}
    assert changed == vision  # every vision weight moved (patch embedding, blocks, merger), nothing else
    assert any(".merger." in name for name in vision) and any("patch_embed" in name for name in vision)


def test_batches_of_one_template_each_and_a_clear_error_when_none_fills_a_batch():
    convs = [SimpleNamespace(texts=[t]) for t in ["mgpo turn", "mgpo turn", "tool turn", "tool turn", "tool turn"]]
    batch = next(template_batches(convs, 2, random.Random(0)))
    assert len(batch) == 2 and batch[0].texts == batch[1].texts
    with pytest.raises(ValueError, match="batch_size=4"):  # else the endless stream would spin without a batch
        next(template_batches(convs, 4, random.Random(0)))


def test_a_few_sft_steps_save_a_checkpoint_whose_boxes_parse(tmp_path):
    out = str(tmp_path / "base")
    lines = []
    cfg = parse_config(Config, SMALL + ["--output_dir", out])
    make_base(cfg, log=lines.append)
    assert any(line.startswith("reading+pointing step 2/2 loss") for line in lines)
    assert sum("held-out reading accuracy" in line for line in lines) == 4  # after each phase
    assert any(line.startswith("vision tower step 2/2 loss") for line in lines)
    assert any(line.startswith("readout step 2/2 loss") for line in lines)
    assert any(line.startswith("formats step 3/3 loss") for line in lines)
    model, tok, processor = load_policy(out, torch.device("cpu"), torch.float32)
    assert model.config.text_config.hidden_size == 32
    check_prompt_fingerprint(out, "demo.make_base")  # stops unless today's fingerprint was stored beside the base
    # sampling from an almost untrained base: force the prefix of the format and let it write the numbers
    run = SimpleNamespace(global_max_pixels=TINY_MAX_PIXELS, crop_max_pixels=TINY_MAX_PIXELS,
                          min_pixels=TINY_MIN_PIXELS, max_new_tokens_turn1=48, max_new_tokens_turn2=4,
                          temperature=1.0, do_sample=True, rollout_batch_size=0,
                          min_box_side=28, probe="none")
    from demo.synthetic import synthetic_samples
    torch.manual_seed(0)
    trajs = mgpo_rollout(model, tok, processor, synthetic_samples(2, seed=3), 2, run)
    assert len(trajs) == 4 and all(len(t.texts) == 2 for t in trajs)


def test_reading_accuracy_counts_greedy_answers_that_are_the_pattern():
    cfg = parse_config(Config, [])
    cfg.min_pixels = TINY_MIN_PIXELS
    tok = build_base_tokenizer()
    processor = Qwen2VLImageProcessorPil(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS)
    examples = make_reading_examples(cfg, tok, processor, random.Random(0), num_images=2)  # 8 crops

    class Reader:
        """Answers the first three crops with their pattern, the others with 'checkerboard' (right only if it is)."""
        config = SimpleNamespace(image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"))
        asked = 0

        def generate(self, input_ids, **batch):
            ex = examples[self.asked]
            answer = ex.texts[0] if self.asked < 3 else "checkerboard"
            self.asked += 1
            assert input_ids[0].tolist() == ex.input_ids[:len(ex.input_ids) - sum(ex.loss_mask)]  # the question only
            ids = tok(answer)["input_ids"] + [tok.eos_token_id, tok.pad_token_id]
            return torch.cat([input_ids, torch.tensor([ids])], dim=1)

    expected = (3 + sum(ex.texts[0] == "checkerboard" for ex in examples[3:])) / len(examples)
    assert reading_accuracy(Reader(), tok, processor, examples) == expected
