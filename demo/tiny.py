"""The tiny offline models, one per family (Qwen2.5-VL, Qwen3-VL, Qwen3.5): a few hundred thousand parameters, a
byte-level BPE tokenizer with the family's special tokens and a chat template in its style, and a Qwen2-VL image
processor with the family's patching, all built from parameters.

Each is written to disk as an ordinary checkpoint directory and loaded back by `model.load_policy`, the same
`from_pretrained` path a real checkpoint takes, so tests and the CPU demo exercise the real loading code.
`--model tiny-qwen2.5-vl` (alias `tiny`, the CPU demo's), `tiny-qwen3-vl` and `tiny-qwen3.5` build one
(`resolve_model_path`).
"""

import hashlib
import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen3_5Config, Qwen3VLConfig

from data import format_choices
from family import QWEN2_5_VL, QWEN3_5, QWEN3_VL
from prompts import DIRECT_PROMPT, DIRECT_SYSTEM, MGPO_PROMPTS, TOOL_PROMPTS, prompts_for
from demo.synthetic import synthetic_samples

# Qwen2.5's added tokens, in Qwen's order, so that the tiny model's prompts look exactly like a real model's.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
]
# Qwen3's tokenizer (Qwen3-VL's; Qwen3.5's numbers the same strings from 248044): the same special tokens, and
# more added tokens that are not special (decoding keeps them), of which the recipes' text uses these four.
QWEN3_ADDED = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]

# Qwen2.5-VL's chat template, reduced to images and text (no video): what the real checkpoints ship.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3-VL-Instruct's layout: no default system message. The real Qwen3.5 template (and Qwen3-VL-Thinking's) also
# writes <think> blocks (an open <think> after the assistant header, reasoning kept only after the last user
# turn); the tiny template leaves them out. tests/test_chat_template.py runs the rollout's pieces through the real
# templates (tests/fixtures/templates).
QWEN3_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}", "")

# The tiny model's shape. Small enough for a 2-core CPU, but every part of the real architecture is there:
# windowed and full-attention vision blocks, the 2x2 patch merger, GQA and 3-D M-RoPE in the language model.
TINY_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                   fullatt_block_indexes=[1], window_size=112, patch_size=14, spatial_merge_size=2,
                   temporal_patch_size=2, tokens_per_second=2)
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=8192, rms_norm_eps=1e-6,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
# Qwen3-VL: 16-px patches, learned position embeddings (an 8 x 8 table, interpolated), DeepStack features of both
# vision blocks added to the first two decoder layers; interleaved M-RoPE over head_dim 16 (8 frequency pairs).
TINY_QWEN3_VL_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                            patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                            deepstack_visual_indexes=[0, 1])
TINY_QWEN3_VL_TEXT = dict(TINY_TEXT, head_dim=16, rope_parameters={
    "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True})
# Qwen3.5: the same vision tower without DeepStack; 4 decoder layers, 3 Gated DeltaNet and 1 gated full attention
# (Qwen3.5's 3:1 pattern). Rotary on a quarter of head_dim 32 (Qwen3.5's partial_rotary_factor): 4 pairs.
TINY_QWEN3_5_VISION = {k: v for k, v in TINY_QWEN3_VL_VISION.items() if k != "deepstack_visual_indexes"}
TINY_QWEN3_5_TEXT = dict(TINY_TEXT, num_hidden_layers=4, head_dim=32, linear_key_head_dim=8, linear_value_head_dim=8,
                         linear_num_key_heads=2, linear_num_value_heads=4, linear_conv_kernel_dim=4, rope_parameters={
                             "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                             "mrope_section": [2, 1, 1], "mrope_interleaved": True})
TINY_VOCAB = 1024
TINY_MIN_PIXELS, TINY_MAX_PIXELS = 28 * 28, 224 * 224  # 224 = 8 x 28 = 7 x 32: a 224 x 224 view in every family


@dataclass(frozen=True)
class TinySpec:
    """What a tiny model of one family is built from."""
    family: object               # family.Family
    config_class: type
    vision: dict
    text: dict
    special_tokens: list         # special, in this order (the image and vision tokens among them)
    added_tokens: list           # added but not special: decoding keeps them, as in Qwen's tokenizers
    chat_template: str
    min_pixels: int


TINY_SPECS = {
    "qwen2.5-vl": TinySpec(QWEN2_5_VL, Qwen2_5_VLConfig, TINY_VISION, TINY_TEXT, SPECIAL_TOKENS[:-2],
                           SPECIAL_TOKENS[-2:], CHAT_TEMPLATE, TINY_MIN_PIXELS),
    "qwen3-vl": TinySpec(QWEN3_VL, Qwen3VLConfig, TINY_QWEN3_VL_VISION, TINY_QWEN3_VL_TEXT, SPECIAL_TOKENS[:-2],
                         QWEN3_ADDED, QWEN3_CHAT_TEMPLATE, 32 * 32),
    "qwen3.5": TinySpec(QWEN3_5, Qwen3_5Config, TINY_QWEN3_5_VISION, TINY_QWEN3_5_TEXT, SPECIAL_TOKENS[:-2],
                        QWEN3_ADDED, QWEN3_CHAT_TEMPLATE, 32 * 32),
}
TINY_NAMES = {"tiny": "qwen2.5-vl", **{f"tiny-{name}": name for name in TINY_SPECS}}  # --model name -> family key

TINY_BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "tiny-base")
TINY_TOOL_BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "tiny-tool-base")
# The demo's 224-px global views show the red frame 24-28 px wide, and the committed bases box it tightly at 28 px:
# the demo scripts accept sides over 27 (MGPO's rule, > 28, would make the base's tight boxes invalid).
DEMO_MIN_BOX_SIDE = 27
COMMITTED = {"tiny-base": (TINY_BASE, "demo.make_base"), "tiny-tool-base": (TINY_TOOL_BASE, "demo.make_tool_base")}
FINGERPRINT_FILE = "prompt_fingerprint.json"  # beside a base: the sha256 of each text it was built from


def tiny_spec(family):
    if family not in TINY_SPECS:
        raise ValueError(f"tiny model family {family!r}: use one of {', '.join(TINY_SPECS)}")
    return TINY_SPECS[family]


def tokenizer_corpus(family="qwen2.5-vl"):
    """Text the tiny BPE is trained on: the recipes' prompts (in the family's frame), JSON boxes, answers, digits."""
    prompts = prompts_for(tiny_spec(family).family)
    # Qwen2.5-VL's through this module's names, which tests/test_prompt_guard.py replaces to edit a prompt
    mgpo, tool = (MGPO_PROMPTS, TOOL_PROMPTS) if family == "qwen2.5-vl" else (prompts.mgpo, prompts.tool)
    lines = [str(p) for group in (mgpo, tool) for p in vars(group).values()]
    for s in synthetic_samples(32, seed=12345):
        lines.append(f"{s.question} {format_choices(s.options)} \\boxed{{{s.answer}}} <answer>{s.answer}</answer>")
    boxes = [(i, i + 7, i + 31, i + 57) for i in range(0, 1000, 13)]
    lines += ['```json\n[{"bbox_2d": [%d, %d, %d, %d], "label": "target"}]\n```' % b for b in boxes]
    lines += ['<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [%d, %d, %d, %d]}}</tool_call>' % b
              for b in boxes]
    return lines


def build_tiny_tokenizer(family="qwen2.5-vl"):
    """A byte-level BPE with the family's special tokens and chat template, trained offline on its
    `tokenizer_corpus`."""
    spec = tiny_spec(family)
    tokens = spec.special_tokens + spec.added_tokens
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB - len(tokens), special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(tokenizer_corpus(family), trainer)
    tok.add_special_tokens(spec.special_tokens)
    tok.add_tokens(spec.added_tokens)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=spec.chat_template)


def build_tiny(path, seed=0, family="qwen2.5-vl"):
    """Write a tiny random-weight checkpoint directory of `family` ('qwen2.5-vl', 'qwen3-vl', 'qwen3.5') to `path`
    (config, safetensors, tokenizer, image processor) and return `path`. Same seed, same weights."""
    spec = tiny_spec(family)
    tokenizer = build_tiny_tokenizer(family)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    f = spec.family
    config = spec.config_class(
        vision_config=spec.vision,
        text_config=dict(spec.text, vocab_size=len(tokenizer), bos_token_id=ids["<|endoftext|>"],
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        image_token_id=ids[f.image_pad], video_token_id=ids[f.video_pad],
        vision_start_token_id=ids[f.vision_start], vision_end_token_id=ids[f.vision_end],
        tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = f.model_class(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    f.image_processor_class(patch_size=f.patch_size, merge_size=f.merge_size, min_pixels=spec.min_pixels,
                            max_pixels=TINY_MAX_PIXELS).save_pretrained(path)
    return path


def resolve_model_path(name, workdir):
    """`tiny` (= `tiny-qwen2.5-vl`), `tiny-qwen3-vl`, `tiny-qwen3.5` -> a freshly built tiny checkpoint of that
    family under `workdir` (built once by rank 0); `tiny-base` and `tiny-tool-base` -> the CPU demo's committed
    bases (make_base.py, make_tool_base.py); otherwise `name` itself."""
    if name in COMMITTED:
        path, script = COMMITTED[name]
        if not os.path.exists(os.path.join(path, "config.json")):
            raise SystemExit(f"error: --model {name}: no checkpoint at {path}; rebuild it with `python -m {script}`")
        check_prompt_fingerprint(path, script)
        return path
    if name not in TINY_NAMES:
        return name
    family = TINY_NAMES[name]
    path = os.path.join(workdir, "tiny-init" if family == "qwen2.5-vl" else f"tiny-{family}-init")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and not os.path.exists(os.path.join(path, "config.json")):
        build_tiny(path, family=family)
    if dist.is_initialized():
        dist.barrier()
    return path


# ----------------------------------------------------------------------------------------------------------------
# The guard between the prompt strings and the committed bases: the bases' tokenizer is trained on
# tokenizer_corpus() and their weights on conversations in the prompts, so editing one string invalidates them.


def base_texts():
    """Every text a demo base is built from, by name: each prompt string, and the tokenizer corpus as a whole
    (which also holds the synthetic question, the option names and the box formats)."""
    groups = {"MGPO_PROMPTS": MGPO_PROMPTS, "TOOL_PROMPTS": TOOL_PROMPTS}
    texts = {f"{group}.{key}": text for group, prompts in groups.items() for key, text in vars(prompts).items()}
    return texts | {"DIRECT_SYSTEM": DIRECT_SYSTEM, "DIRECT_PROMPT": DIRECT_PROMPT,
                    "tokenizer_corpus": "\n".join(tokenizer_corpus())}


def prompt_fingerprint():
    """The sha256 of each of base_texts(): {"DIRECT_PROMPT": "5e1f...", ..., "tokenizer_corpus": "..."}."""
    return {name: hashlib.sha256(text.encode("utf-8")).hexdigest() for name, text in base_texts().items()}


def write_prompt_fingerprint(path):
    """Store today's prompt_fingerprint() beside the base just saved at `path` (make_base.py, make_tool_base.py)."""
    with open(os.path.join(path, FINGERPRINT_FILE), "w", encoding="utf-8") as f:
        json.dump(prompt_fingerprint(), f, indent=1, sort_keys=True)
        f.write("\n")


def check_prompt_fingerprint(path, script):
    """Stop when today's prompt strings are not those the base at `path` was built from, naming the texts that
    changed and the two ways out: revert them, or rebuild the base with `script`."""
    stored_file = os.path.join(path, FINGERPRINT_FILE)
    if not os.path.exists(stored_file):
        raise SystemExit(f"error: the base {path} has no {FINGERPRINT_FILE}, so nothing says which prompt strings "
                         f"it was built from; rebuild it with `python -m {script}`")
    with open(stored_file, encoding="utf-8") as f:
        stored = json.load(f)
    today = prompt_fingerprint()
    changed = sorted(name for name in stored.keys() | today.keys() if stored.get(name) != today.get(name))
    if changed:
        raise SystemExit(
            f"error: the prompt strings are not those the base {path} was built from (changed: {', '.join(changed)}). "
            f"Its tokenizer was trained on those strings and its weights on conversations in them, so it no longer "
            f"fits the code. Either revert the strings, or rebuild the base with `python -m {script}` and commit it.")
