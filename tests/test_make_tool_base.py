"""make_tool_base.py: trains the committed tiny-base on tool-template conversations only, and `--model
tiny-tool-base` resolves to its checkpoint (or stops naming the script that rebuilds it)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from demo import make_base
from demo import tiny
from config import parse_config
from crop import parse_tool_call
from demo.make_tool_base import Config, make_tool_base
from prompts import TOOL_PROMPTS
from demo.tiny import TINY_BASE, check_prompt_fingerprint, resolve_model_path


def test_a_few_steps_on_tool_conversations_only_change_the_base(tmp_path, monkeypatch):
    seen = []
    real_sft = make_base.sft

    def recording_sft(cfg, model, tokenizer, image_processor, convs, *args, **kwargs):
        seen.extend(tokenizer.decode(traj.input_ids) for traj in convs)
        return real_sft(cfg, model, tokenizer, image_processor, convs, *args, **kwargs)

    monkeypatch.setattr(make_base, "sft", recording_sft)
    out = tmp_path / "tool-base"
    make_tool_base(parse_config(Config, ["--num_images", "4", "--steps", "2", "--batch_size", "4",
                                         "--output_dir", str(out)]), log=lambda *_: None)
    assert len(seen) == 8  # 4 images x make_base's 2 conversations each, none direct
    for text in seen:
        assert TOOL_PROMPTS.system in text and "\\boxed" not in text
        turn1 = text.split("<|im_start|>assistant\n")[1]
        assert parse_tool_call(turn1)[0] is not None  # every turn 1 is a well-formed tool call
    before, after = load_file(f"{TINY_BASE}/model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # two AdamW steps moved the weights
    vocab = lambda path: json.loads(open(f"{path}/tokenizer.json").read())["model"]["vocab"]
    assert vocab(out) == vocab(TINY_BASE)  # the base's tokenizer: one token per coordinate
    check_prompt_fingerprint(str(out), "demo.make_tool_base")  # stops unless today's fingerprint was stored beside it


def test_tiny_tool_base_resolves_to_its_checkpoint_or_names_the_rebuild(tmp_path, monkeypatch):
    assert resolve_model_path("tiny-tool-base", str(tmp_path)) == tiny.TINY_TOOL_BASE
    monkeypatch.setitem(tiny.COMMITTED, "tiny-tool-base", (str(tmp_path / "missing"), "demo.make_tool_base"))
    with pytest.raises(SystemExit, match="tiny-tool-base.*python -m demo.make_tool_base"):
        resolve_model_path("tiny-tool-base", str(tmp_path))
