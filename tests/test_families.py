"""The same guarantees for every model family (Qwen2.5-VL, Qwen3-VL, Qwen3.5), each on its tiny offline model:
the family record matches the checkpoint, rollout and training log-probs agree for two-image MGPO and six-image
LFPC conversations in left-padded batches, a box drawn on an original maps back onto it through the family's frame,
a checkpoint survives save_policy -> from_pretrained, and the 2-rank FSDP2 update equals the 1-process one."""

import copy
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

import rollout
from crop import resize_for_model
from data import Sample
from demo.synthetic import synthetic_samples
from demo.tiny import TINY_SPECS, build_tiny, resolve_model_path
from family import family_of
from grpo import batch_logprobs, grpo_update
from model import load_policy, save_policy
from prompts import MGPO_PROMPTS, TOOL_PROMPTS, prompts_for
from tests.fsdp_update import UPDATE, make_optimizer, trajectories
from tests.test_fsdp import make_batch, torchrun

CPU = (torch.device("cpu"), torch.float32)
MGPO_CFG = SimpleNamespace(global_max_pixels=224 * 224, crop_max_pixels=112 * 112, min_pixels=28 * 28,
                           max_new_tokens_turn1=24, max_new_tokens_turn2=12, temperature=1.0, micro_batch_size=8,
                           rollout_batch_size=0, min_box_side=28, do_sample=True, probe="none")
TOOL_CFG = SimpleNamespace(**{**vars(MGPO_CFG), "crop_max_pixels": 56 * 56, "max_turns": 5, "max_response_tokens": 100,
                              "max_new_tokens_per_turn": 6, "micro_batch_size": 4})
# Turn-1 boxes handed out in order (trajectories 0-3 on a square image, 4-7 on a 640 x 300 one), in each frame, and
# whether each is valid (both sides over 28 input px), worked out by hand from the global views: 224 x 224 for the
# square image in every family; the wide one 308 x 140 (factor 28) or 320 x 128 (factor 32).
BOXES = {
    # absolute: [50, 50, 60, 60] is under 28 px, [30, 40, 200, 220] leaves the 140-px height
    "absolute": ([[10, 10, 100, 60], None, [0, 0, 224, 224], [50, 50, 60, 60],
                  [30, 40, 200, 220], [5, 5, 40, 140], [100, 20, 300, 50], [0, 0, 30, 30]],
                 [True, False, True, False, False, True, True, True]),
    # relative: [200, 200, 300, 300] is 22.4 px of 224; [300, 60, 950, 160] is 10% of 128 = 12.8 px high
    "relative": ([[40, 40, 450, 270], None, [0, 0, 1000, 1000], [200, 200, 300, 300],
                  [100, 150, 900, 990], [20, 20, 180, 620], [300, 60, 950, 160], [0, 0, 140, 300]],
                 [True, False, True, False, True, True, False, True]),
}
# LFPC: what the parser reads each round (see tests/test_tool_rollout.py's SCRIPT); episode 0 crops 5 times
CALLS = {"absolute": ([10, 10, 100, 60], [20, 30, 120, 130], [0, 0, 200, 100], [0, 0, 400, 50]),
         "relative": ([40, 40, 450, 270], [90, 130, 540, 580], [0, 0, 890, 440], [0, 0, 1200, 50])}


def tool_script(frame):
    v1, v2, v3, outside = CALLS[frame]
    bad = (None, "invalid JSON in <tool_call>")
    return [(v1, None), bad, None, (outside, None), (v2, None), (v1, None), (v3, None), (v3, None), None,
            (v1, None), (v1, None), None, (v2, None), (v1, None)]


@pytest.fixture(scope="session", params=list(TINY_SPECS))
def tiny(request, tmp_path_factory):
    """(name, checkpoint path, (model, tokenizer, image_processor), family) of each family's tiny model; the
    Qwen2.5-VL one is conftest's."""
    name = request.param
    if name == "qwen2.5-vl":
        path, policy = request.getfixturevalue("tiny_path"), request.getfixturevalue("policy")
    else:
        path = build_tiny(str(tmp_path_factory.mktemp(name) / "tiny"), family=name)
        policy = load_policy(path, *CPU)
    return SimpleNamespace(name=name, path=path, policy=policy, family=family_of(policy[0].config))


def worst_gap(model, tokenizer, trajs, cfg):
    """The largest |rollout - training forward| log-prob over every sampled token."""
    [logprobs] = batch_logprobs(model, trajs, tokenizer, cfg, *CPU)
    worst = 0.0
    for row, t in enumerate(trajs):
        mask = torch.tensor(t.loss_mask, dtype=torch.bool)
        assert torch.isfinite(torch.tensor(t.rollout_logprobs)).all()
        worst = max(worst, (logprobs[row, :len(t.input_ids)][mask] - torch.tensor(t.rollout_logprobs)[mask])
                    .abs().max().item())
    return worst


def test_family_record_matches_the_tiny_checkpoint(tiny):
    model, tokenizer, image_processor = tiny.policy
    f = tiny.family
    assert f is TINY_SPECS[tiny.name].family and type(model) is f.model_class
    assert type(image_processor) is f.image_processor_class
    assert (f.patch_size, f.merge_size) == (image_processor.patch_size, image_processor.merge_size) == (
        model.config.vision_config.patch_size, model.config.vision_config.spatial_merge_size)
    decoder_layer, vision_block = f.fsdp_units
    assert sum(isinstance(m, decoder_layer) for m in model.modules()) == model.config.text_config.num_hidden_layers
    assert sum(isinstance(m, vision_block) for m in model.modules()) == model.config.vision_config.depth
    ids = tokenizer.convert_tokens_to_ids([f.image_pad, f.video_pad, f.vision_start, f.vision_end])
    assert ids == [model.config.image_token_id, model.config.video_token_id, model.config.vision_start_token_id,
                   model.config.vision_end_token_id]
    assert f.vision_tower(model) is model.model.visual and f.lm_head(model) is model.lm_head
    # a recurrent cache is what the hybrid decoder's config says it has
    assert f.recurrent_cache == ("linear_attention" in (getattr(model.config.text_config, "layer_types", None) or []))
    # 224 x 224: 8 x 8 tokens of 28 px, or 7 x 7 of 32 px, and as many rows from the vision tower
    out = image_processor(images=[Image.new("RGB", (224, 224), "gray")], do_resize=False, return_tensors="pt")
    tokens = (224 // f.factor) ** 2
    assert f.tokens_per_image(out["image_grid_thw"][0]) == tokens
    with torch.no_grad():
        features = model.model.get_image_features(out["pixel_values"], out["image_grid_thw"], return_dict=True)
    assert features.pooler_output[0].shape[0] == tokens


def test_tiny_names_resolve_to_their_family(tmp_path, tiny):
    name = f"tiny-{tiny.name}"
    path = resolve_model_path(name, str(tmp_path))
    assert family_of(load_policy(path, *CPU)[0].config) is tiny.family
    assert resolve_model_path(name, str(tmp_path)) == path  # built once
    if tiny.name == "qwen2.5-vl":
        assert resolve_model_path("tiny", str(tmp_path)) == path


def test_mgpo_two_image_logprobs_agree_in_the_familys_frame(tiny, monkeypatch):
    """Two images of different shapes x 4 generations, left-padded; turn 2 continues from turn 1's cache where
    the family keeps it (a recurrent cache re-encodes, generation.continues_from_cache)."""
    model, tokenizer, image_processor = tiny.policy
    boxes, valid = BOXES[tiny.family.frame]
    handed = iter(boxes)
    monkeypatch.setattr(rollout, "parse_box", lambda text: next(handed))
    calls = {"continue": 0}
    continued = rollout.continue_batch
    monkeypatch.setattr(rollout, "continue_batch", lambda *a: calls.__setitem__("continue", 1) or continued(*a))
    wide = Sample("wide", Image.new("RGB", (640, 300), (90, 120, 200)), "What colour?", ["red", "blue"], "B", None)
    square = synthetic_samples(1, seed=3)[0]
    torch.manual_seed(0)
    trajs = rollout.mgpo_rollout(model, tokenizer, image_processor, [square, wide], 4, MGPO_CFG)
    # the rollout picks the family's prompts itself
    assert prompts_for(tiny.family).mgpo.turn1.format(question=square.question) in tokenizer.decode(trajs[0].input_ids)
    assert [t.box_valid for t in trajs] == valid
    assert trajs[4].input_size == ((308, 140) if tiny.family.factor == 28 else (320, 128))
    assert len({len(t.input_ids) for t in trajs}) > 3  # ragged: left padding differs row to row
    w, h = trajs[0].original_size  # the first box in original pixels, by hand
    expected = ([10 * w / 224, 10 * h / 224, 100 * w / 224, 60 * h / 224] if tiny.family.frame == "absolute" else
                [40 * w / 1000, 40 * h / 1000, 450 * w / 1000, 270 * h / 1000])
    assert trajs[0].box_original == pytest.approx(expected)
    assert calls["continue"] == (not tiny.family.recurrent_cache)
    gap = worst_gap(model, tokenizer, trajs, MGPO_CFG)
    assert gap < 1e-5, gap


def test_lfpc_six_image_logprobs_agree(tiny, monkeypatch):
    model, tokenizer, image_processor = tiny.policy
    script = iter(tool_script(tiny.family.frame))
    monkeypatch.setattr(rollout, "parse_tool_call", lambda text: next(script))
    wide = Sample("wide", Image.new("RGB", (640, 300), (90, 120, 200)), "What colour?", ["red", "blue"], "B", None)
    torch.manual_seed(0)
    trajs = rollout.tool_rollout(model, tokenizer, image_processor, [synthetic_samples(1, seed=4)[0], wide], 2,
                                 TOOL_CFG)
    assert tokenizer.decode(trajs[0].input_ids).count(prompts_for(tiny.family).tool.system) == 1
    assert next(script, "done") == "done"
    assert [len(t.images) for t in trajs] == [6, 2, 1, 3]
    gap = worst_gap(model, tokenizer, trajs, TOOL_CFG)
    assert gap < 1e-5, gap


def test_a_box_drawn_on_the_original_maps_back_onto_it(tiny):
    """A red rectangle at [448, 336, 896, 672] of a 1792 x 1344 original, seen in the model input and written in
    the family's frame ([250, 250, 500, 500] in thousandths by hand; input pixels for Qwen2.5-VL), is cut back out
    of the original by the rollout's crop: the recorded box is the drawn one, and the crop is red."""
    f = tiny.family
    original = Image.new("RGB", (1792, 1344), "white")
    ImageDraw.Draw(original).rectangle([448, 336, 895, 671], fill="red")
    view = resize_for_model(original, 28 * 28, 448 * 336, f.factor)
    assert view.size == ((448, 336) if f.factor == 28 else (448, 320))  # smart_resize by hand
    written = ([round(v * view.width / 1792) if i % 2 == 0 else round(v * view.height / 1344)
                for i, v in enumerate([448, 336, 896, 672])] if f.frame == "absolute" else [250, 250, 500, 500])
    traj = SimpleNamespace(family=f, input_size=view.size, original_size=original.size, crop_boxes=[],
                           sample=SimpleNamespace(id="drawn", boxes=[]))
    cfg = SimpleNamespace(min_pixels=28 * 28, crop_max_pixels=224 * 224)
    crop = rollout.cut_crop(traj, original, written, cfg)
    assert traj.crop_boxes == [[448, 336, 896, 672]]
    r, g, b = np.asarray(crop, dtype=np.int32).transpose(2, 0, 1)
    assert ((r > 200) & (g < 60) & (b < 60)).mean() > 0.95
    assert crop.width % f.factor == 0 and crop.height % f.factor == 0


def test_checkpoint_round_trip_through_from_pretrained(tiny, tmp_path):
    model, tokenizer, image_processor = load_policy(tiny.path, *CPU)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    save_policy(model, tokenizer, image_processor, str(tmp_path / "ckpt"))
    loaded = tiny.family.model_class.from_pretrained(str(tmp_path / "ckpt"))
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    again = load_policy(str(tmp_path / "ckpt"), *CPU)
    assert family_of(again[0].config) is tiny.family and again[1].get_vocab() == tokenizer.get_vocab()
    assert (again[2].patch_size, again[2].merge_size) == (tiny.family.patch_size, tiny.family.merge_size)


def test_two_process_fsdp_update_equals_single_process(tiny, tmp_path):
    if tiny.name == "qwen2.5-vl":
        pytest.skip("tests/test_fsdp.py runs it, with the gradient-sharding probes")
    model, tokenizer, _ = tiny.policy
    batch = make_batch(tiny.policy)
    torch.save(batch, tmp_path / "batch.pt")
    out = torchrun("tests/fsdp_update.py", tiny.path, str(tmp_path / "batch.pt"), str(tmp_path), timeout=180).stdout
    assert out.count("plain: decoder 1.0 vision 1.0") == 2, out
    single = copy.deepcopy(model)
    grpo_update(single, make_optimizer(single.parameters()), trajectories(batch), batch["advantages"], tokenizer,
                SimpleNamespace(**{**UPDATE, "mini_batch_size": 8}), *CPU)
    expected = single.state_dict()
    for run in ("plain", "checkpointed"):
        sharded = load_file(str(tmp_path / f"{run}.safetensors"))
        worst = max((sharded[k] - expected[k]).abs().max().item() for k in sharded)
        assert worst < 1e-5, (run, worst)
        assert max((sharded[k] - model.state_dict()[k]).abs().max().item() for k in sharded) > 1e-4
    assert re.search(r"checkpointed: decoder 2.0 vision 2.0", out)


def test_prompts_ask_for_boxes_in_the_familys_frame():
    """Qwen2.5-VL keeps the recipes' strings; a relative family's differ only where they state the box's frame."""
    absolute, relative = prompts_for(TINY_SPECS["qwen2.5-vl"].family), prompts_for(TINY_SPECS["qwen3-vl"].family)
    assert (absolute.mgpo, absolute.tool) == (MGPO_PROMPTS, TOOL_PROMPTS)
    changed = {k for k, v in vars(relative.mgpo).items() if v != vars(MGPO_PROMPTS)[k]}
    assert changed == {"turn1"} and "from 0 to 1000" in relative.mgpo.turn1
    changed = {k for k, v in vars(relative.tool).items() if v != vars(TOOL_PROMPTS)[k]}
    assert changed == {"system", "error"} and "from 0 to 1000" in relative.tool.system
    assert "in pixels of the image as you see it" not in relative.tool.system
    assert "at least 32 pixels" in relative.tool.error.format(error="bbox_2d [0, 0, 5, 5] is too small")


def test_qwen3_tiny_tokenizer_and_template(tiny):
    """Qwen3's added tokens are single tokens kept by decoding; the template has no default system turn."""
    _, tokenizer, _ = tiny.policy
    if tiny.name == "qwen2.5-vl":
        pytest.skip("tests/test_model.py")
    for token in ["<think>", "</think>", "<tool_response>", "</tool_call>", "<|image_pad|>", "<|im_end|>"]:
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids(token)]
    ids = tokenizer("<tool_response>\n<think>a</think>", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<tool_response>\n<think>a</think>"
    content = [{"type": "image"}, {"type": "text", "text": "Q"}]
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    assert text == "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Q<|im_end|>\n<|im_start|>assistant\n"
