"""Model specifics live in family.py alone: no other top-level module names a model family's classes, its image
tokens, its module paths or its merge (issue 25, item 5). The demo (demo/, the tiny Qwen2.5-VL) and the tests
build and check one family on purpose and are not scanned."""

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SPECIFICS = {
    "a model class": re.compile(r"\bQwen[0-9_]+(?:VL)?[A-Z]\w*"),  # Qwen2_5_VLForConditionalGeneration, Qwen3_5...
    "an image token string": re.compile(r"<\|(?:image_pad|video_pad|vision_start|vision_end)\|>"),
    "a module path": re.compile(r"\bmodel\.(?:model\.visual|lm_head)\b"),  # family.vision_tower / family.lm_head
    "a bare merge": re.compile(r"//\s*4\b|merge_size\s*=\s*2\b"),  # family.tokens_per_image
}
def modules():
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "*.py")))


def hits(name):
    with open(os.path.join(ROOT, name)) as f:
        return [f"{name}:{n}: {what}: {line.strip()}" for n, line in enumerate(f, 1)
                for what, pattern in SPECIFICS.items() if pattern.search(line)]


def test_the_patterns_find_the_specifics_in_family_py():
    found = {line.split(": ")[1] for line in hits("family.py")}
    assert {"a model class", "an image token string"} <= found


@pytest.mark.parametrize("name", [m for m in modules() if m != "family.py"])
def test_no_module_but_family_py_names_model_specifics(name):
    assert hits(name) == [], "read these from family.py (family_of(model.config)):\n" + "\n".join(hits(name))
