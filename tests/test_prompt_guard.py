"""The guard between the prompt strings and the committed demo bases (tiny.check_prompt_fingerprint): the bases'
tokenizer was trained on the tiny corpus, which is built from the prompts, so an edited prompt must stop
`--model tiny-base` / `tiny-tool-base` with a message saying what changed and how to get out.

test_committed_bases_fit_todays_prompt_strings is the CI guard: it fails on any commit that edits a prompt string
without rebuilding the bases."""

import json
import shutil
from dataclasses import replace

import pytest

from demo import tiny
from demo.tiny import COMMITTED, FINGERPRINT_FILE, build_tiny_tokenizer, prompt_fingerprint, resolve_model_path


def vocab_and_merges(tokenizer_json: dict):
    return tokenizer_json["model"]["vocab"], tokenizer_json["model"]["merges"]


def committed_tokenizer(path) -> dict:
    with open(f"{path}/tokenizer.json", encoding="utf-8") as f:
        return json.load(f)


def test_committed_bases_fit_todays_prompt_strings(tmp_path):
    today = prompt_fingerprint()
    # a second witness besides the stored hashes: BPE trained on today's corpus is the committed tokenizer (the
    # bases add their coordinate tokens as added tokens, outside the BPE vocabulary and merges)
    rebuilt = vocab_and_merges(json.loads(build_tiny_tokenizer().backend_tokenizer.to_str()))
    for name, (path, _) in COMMITTED.items():
        with open(f"{path}/{FINGERPRINT_FILE}", encoding="utf-8") as f:
            assert json.load(f) == today, f"{name}: prompt strings changed since the base was built"
        assert vocab_and_merges(committed_tokenizer(path)) == rebuilt, name
        assert resolve_model_path(name, str(tmp_path)) == path


def test_an_edited_prompt_stops_the_base_naming_what_changed_and_the_ways_out(tmp_path, monkeypatch):
    edited = replace(tiny.MGPO_PROMPTS, turn1="{question} Give the box of the region that answers it, as JSON.")
    monkeypatch.setattr(tiny, "MGPO_PROMPTS", edited)
    # the trap itself: the same code would now train another tokenizer than the one the base carries
    rebuilt = vocab_and_merges(json.loads(build_tiny_tokenizer().backend_tokenizer.to_str()))
    assert rebuilt != vocab_and_merges(committed_tokenizer(tiny.TINY_BASE))
    with pytest.raises(SystemExit) as stop:
        resolve_model_path("tiny-base", str(tmp_path))
    message = str(stop.value)
    assert "checkpoints/tiny-base " in message
    assert "(changed: MGPO_PROMPTS.turn1, tokenizer_corpus)" in message  # in the corpus, so both
    assert "revert the strings" in message and "`python -m demo.make_base`" in message


def test_a_prompt_outside_the_corpus_still_counts(tmp_path, monkeypatch):
    # the bases were trained on direct-answer conversations, though the tokenizer never saw this prompt
    monkeypatch.setattr(tiny, "DIRECT_PROMPT", tiny.DIRECT_PROMPT.replace("directly", "only"))
    expected = r"tiny-tool-base was built from \(changed: DIRECT_PROMPT\).*`python -m demo.make_tool_base`"
    with pytest.raises(SystemExit, match=expected):
        resolve_model_path("tiny-tool-base", str(tmp_path))


def test_a_base_without_a_fingerprint_names_the_rebuild(tmp_path, monkeypatch):
    base = tmp_path / "old-base"
    shutil.copytree(tiny.TINY_BASE, base, ignore=shutil.ignore_patterns(FINGERPRINT_FILE, "*.safetensors"))
    monkeypatch.setitem(COMMITTED, "tiny-base", (str(base), "demo.make_base"))
    with pytest.raises(SystemExit, match=f"{base} has no {FINGERPRINT_FILE}.*`python -m demo.make_base`"):
        resolve_model_path("tiny-base", str(tmp_path))
    # what the builders write after saving a base makes it usable again
    tiny.write_prompt_fingerprint(str(base))
    assert resolve_model_path("tiny-base", str(tmp_path)) == str(base)
