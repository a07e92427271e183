import importlib.util
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from model import check_checkpoint_dir, load_policy, save_policy
from demo.tiny import SPECIAL_TOKENS, build_tiny
import pytest


def test_tiny_checkpoint_is_a_real_checkpoint_directory(tiny_path, policy):
    model, tokenizer, image_processor = policy
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "preprocessor_config.json"):
        assert os.path.exists(os.path.join(tiny_path, name)), name
    n = sum(p.numel() for p in model.parameters())
    assert 100_000 < n < 5_000_000
    # every special token is one token, and the config points at the tokenizer's ids
    for t in SPECIAL_TOKENS:
        assert tokenizer(t, add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids(t)]
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    # byte-level: any text round-trips
    text = "Größe 𝛑 ```json [{\"bbox_2d\": [1, 2, 3, 4]}]```"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_chat_template_matches_qwen_layout(policy):
    _, tokenizer, _ = policy
    messages = [{"role": "system", "content": "S"},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>Q<|im_end|>\n<|im_start|>assistant\n")


def test_build_is_deterministic(tmp_path, tiny_path):
    other = build_tiny(str(tmp_path / "again"))
    a = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_path).state_dict()
    b = Qwen2_5_VLForConditionalGeneration.from_pretrained(other).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert AutoTokenizer.from_pretrained(tiny_path).get_vocab() == AutoTokenizer.from_pretrained(other).get_vocab()


def test_checkpoint_round_trip(tmp_path, tiny_path):
    model, tokenizer, image_processor = load_policy(tiny_path, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # a trained model differs from the initial one
    save_policy(model, tokenizer, image_processor, str(tmp_path / "ckpt"))
    loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path / "ckpt"))
    before, after = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    reloaded = load_policy(str(tmp_path / "ckpt"), torch.device("cpu"), torch.float32)
    assert reloaded[1].get_vocab() == tokenizer.get_vocab()
    assert reloaded[2].size == image_processor.size


def test_bad_model_path_names_the_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match="--model"):
        check_checkpoint_dir(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        check_checkpoint_dir(str(tmp_path / "empty"))


def test_attn_implementation_reaches_the_model_and_bad_names_stop(tiny_path, monkeypatch):
    model = load_policy(tiny_path, torch.device("cpu"), torch.float32, attn_implementation="eager")[0]
    assert model.config._attn_implementation == "eager"
    assert model.model.visual.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="--attn_implementation 'flash'"):
        load_policy(tiny_path, torch.device("cpu"), torch.float32, attn_implementation="flash")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)  # as on a machine without flash_attn
    with pytest.raises(ValueError, match="flash_attention_2 needs the flash_attn package"):
        load_policy(tiny_path, torch.device("cpu"), torch.float32, attn_implementation="flash_attention_2")


def test_saved_in_the_checkpoints_own_dtype(tmp_path, tiny_path):
    """A bf16 checkpoint trained in fp32 is written back in bf16 (config and weights), and loads back to the same
    bf16 values; a frozen model (the KL reference) has no gradients."""
    Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_path, dtype=torch.bfloat16).save_pretrained(
        tmp_path / "bf16")
    for file in Path(tiny_path).iterdir():  # tokenizer, chat template, image processor
        if not (tmp_path / "bf16" / file.name).exists():
            (tmp_path / "bf16" / file.name).write_bytes(file.read_bytes())
    model, tokenizer, image_processor = load_policy(str(tmp_path / "bf16"), torch.device("cpu"), torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    save_policy(model, tokenizer, image_processor, str(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    original = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved)
    assert {v.dtype for v in saved.values()} == {torch.bfloat16}
    frozen = load_policy(tiny_path, torch.device("cpu"), torch.float32, frozen=True)[0]
    assert not any(p.requires_grad for p in frozen.parameters())


def test_an_unsupported_model_type_stops_naming_it(tmp_path, tiny_path):
    """load_policy picks the classes from config.json's model_type (family.family_of): a Qwen2-VL checkpoint (a
    real type transformers knows, no family here) stops naming its type and the known ones."""
    for file in Path(tiny_path).iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "qwen2_vl"}))
    with pytest.raises(ValueError, match=r"model_type 'qwen2_vl' .*known: qwen2_5_vl"):
        load_policy(str(tmp_path), torch.device("cpu"), torch.float32)
