"""The tiny offline Qwen2.5-VL: a few hundred thousand parameters, its own byte-level BPE tokenizer with Qwen's
special tokens and chat template, and a Qwen2-VL image processor built from parameters.

It is written to disk as an ordinary checkpoint directory and loaded back by `model.load_policy`, the same
`from_pretrained` path a real checkpoint takes, so tests and the CPU demo exercise the real loading code.
"""

import hashlib
import json
import os

import torch
import torch.distributed as dist
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from data import format_choices
from prompts import DIRECT_PROMPT, DIRECT_SYSTEM, MGPO_PROMPTS, TOOL_PROMPTS
from demo.synthetic import synthetic_samples

# Qwen2.5's added tokens, in Qwen's order, so that the tiny model's prompts look exactly like a real model's.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
]

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

# The tiny model's shape. Small enough for a 2-core CPU, but every part of the real architecture is there:
# windowed and full-attention vision blocks, the 2x2 patch merger, GQA and 3-D M-RoPE in the language model.
TINY_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                   fullatt_block_indexes=[1], window_size=112, patch_size=14, spatial_merge_size=2,
                   temporal_patch_size=2, tokens_per_second=2)
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=8192, rms_norm_eps=1e-6,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
TINY_VOCAB = 1024
TINY_MIN_PIXELS, TINY_MAX_PIXELS = 28 * 28, 224 * 224
TINY_BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "tiny-base")
TINY_TOOL_BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "tiny-tool-base")
# The demo's 224-px global views show the red frame 24-28 px wide, and the committed bases box it tightly at 28 px:
# the demo scripts accept sides over 27 (MGPO's rule, > 28, would make the base's tight boxes invalid).
DEMO_MIN_BOX_SIDE = 27
COMMITTED = {"tiny-base": (TINY_BASE, "demo.make_base"), "tiny-tool-base": (TINY_TOOL_BASE, "demo.make_tool_base")}
FINGERPRINT_FILE = "prompt_fingerprint.json"  # beside a base: the sha256 of each text it was built from


def tokenizer_corpus():
    """Text the tiny BPE is trained on: the recipes' prompts, JSON boxes, answers and digits."""
    lines = [str(p) for prompts in (MGPO_PROMPTS, TOOL_PROMPTS) for p in vars(prompts).values()]
    for s in synthetic_samples(32, seed=12345):
        lines.append(f"{s.question} {format_choices(s.options)} \\boxed{{{s.answer}}} <answer>{s.answer}</answer>")
    boxes = [(i, i + 7, i + 31, i + 57) for i in range(0, 1000, 13)]
    lines += ['```json\n[{"bbox_2d": [%d, %d, %d, %d], "label": "target"}]\n```' % b for b in boxes]
    lines += ['<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [%d, %d, %d, %d]}}</tool_call>' % b
              for b in boxes]
    return lines


def build_tiny_tokenizer():
    """A byte-level BPE with Qwen's special tokens and chat template, trained offline on `tokenizer_corpus()`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB - len(SPECIAL_TOKENS), special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(tokenizer_corpus(), trainer)
    tok.add_special_tokens(SPECIAL_TOKENS[:-2])
    # <tool_call>, </tool_call>: added but not special in Qwen, so decoding keeps them
    tok.add_tokens(SPECIAL_TOKENS[-2:])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE)


def build_tiny(path, seed=0):
    """Write a tiny random-weight Qwen2.5-VL checkpoint directory to `path` (config, safetensors, tokenizer,
    image processor) and return `path`. Same seed, same weights."""
    tokenizer = build_tiny_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        vision_config=TINY_VISION,
        text_config=dict(TINY_TEXT, vocab_size=len(tokenizer), bos_token_id=ids["<|endoftext|>"],
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    Qwen2VLImageProcessorPil(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS).save_pretrained(path)
    return path


def resolve_model_path(name, workdir):
    """`tiny` -> a freshly built tiny checkpoint under `workdir` (built once by rank 0); `tiny-base` and
    `tiny-tool-base` -> the CPU demo's committed bases (make_base.py, make_tool_base.py); otherwise `name` itself."""
    if name in COMMITTED:
        path, script = COMMITTED[name]
        if not os.path.exists(os.path.join(path, "config.json")):
            raise SystemExit(f"error: --model {name}: no checkpoint at {path}; rebuild it with `python -m {script}`")
        check_prompt_fingerprint(path, script)
        return path
    if name != "tiny":
        return name
    path = os.path.join(workdir, "tiny-init")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and not os.path.exists(os.path.join(path, "config.json")):
        build_tiny(path)
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
