"""The rollout's token ids against Qwen's published chat templates (issue 24, item 6).

The rollout builds a conversation turn by turn (`encode_prompt`, the sampled ids, `close_assistant_turn`,
`encode_user_turn`) through the checkpoint's own template; the tiny model ships a reduced copy of Qwen's
(tiny.CHAT_TEMPLATE). Here the whole conversation is rendered at once by the official templates, and the ids must
be the same.

Where the template texts come from (copied verbatim; `test_template_texts_are_the_published_ones` checks them):
  huggingface/huggingface.js, packages/jinja/test/e2e.test.js (last changed in commit ee92cdbe6f08), the entries
  "Qwen/Qwen2.5-VL-7B-Instruct" and "Qwen/Qwen2.5-7B-Instruct": Hugging Face's test fixtures of the `chat_template`
  of those model repositories (tokenizer_config.json / chat_template.json).
Qwen2.5-VL-Instruct's template has no tools block (it ignores `tools`), so `ToolPrompts.system` is checked against
the Qwen2.5-Instruct (text) template's `tools` rendering, which the tool recipe's system prompt follows.
"""

import hashlib
import json
import os
import re
import shutil
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import rollout
from data import format_choices
from model import load_policy
from prompts import MGPO_PROMPTS, TOOL_PROMPTS, ZOOM_TOOL
from chat import close_assistant_turn, encode_prompt, encode_user_turn, expand_image_pads, with_thinking
from family import QWEN2_5_VL, QWEN3_VL
from rollout import append_sampled, apply_turn1_box, mgpo_rollout, start_trajectory, tool_rollout, tool_step
from demo.synthetic import synthetic_samples
from demo.tiny import TINY_BASE, TINY_TOOL_BASE, build_tiny_tokenizer, tiny_spec

QWEN25_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

QWEN25_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the"
    " user query.\\n\\nYou are provided with function signatures within <tools></tools>"
    " XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with"
    " function name and arguments within <tool_call></tool_call> XML"
    " tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\":"
    " <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are"
    " a helpful assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not"
    " loop.first) or (message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
    "            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

TEMPLATE_SHA256 = {  # of the texts as published (the JavaScript string literals decoded)
    "QWEN25_VL_TEMPLATE": "a0bc6f6fc7a29a80017a433e8f03a1cc1236e838a944a2d034295a60c4f2fddb",
    "QWEN25_TEMPLATE": "cd8e9439f0570856fd70470bf8889ebd8b5d1107207f67a5efb46e342330527f",
}
SAMPLED = "\x00sampled turn\x00"  # stands for an assistant turn's content in a rendering; never tokenized
VISION = "<|vision_start|><|image_pad|><|vision_end|>"  # one image, as both Qwen templates write it
CPU = (torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def base():
    """The MGPO demo's committed base (model, tokenizer, image processor)."""
    return load_policy(TINY_BASE, *CPU)


@pytest.fixture(scope="module")
def tool_base():
    """The LFPC demo's committed base: it writes tool calls."""
    return load_policy(TINY_TOOL_BASE, *CPU)


@pytest.fixture
def user_turns(monkeypatch):
    """The parts of every user turn the rollout appends after the first prompt, by trajectory:
    {id(trajectory): [[str | image, ...], ...]}."""
    seen = {}
    append = rollout.append_user_turn

    def record(traj, tokenizer, image_processor, parts):
        seen.setdefault(id(traj), []).append(parts)
        append(traj, tokenizer, image_processor, parts)
    monkeypatch.setattr(rollout, "append_user_turn", record)
    return seen


def sampled_turns(traj, eos_id):
    """Each assistant turn's content as ids: a run of loss_mask 1, less the <|im_end|> the model may have sampled
    last (a template writes that itself)."""
    turns, start = [], None
    for k, sampled in enumerate(traj.loss_mask + [0]):
        if sampled and start is None:
            start = k
        elif not sampled and start is not None:
            ids = traj.input_ids[start:k]
            turns.append(ids[:-1] if ids[-1] == eos_id else ids)
            start = None
    return turns


def rendered_ids(tokenizer, template, messages, traj, **kwargs):
    """The ids of `traj`'s conversation rendered whole by `template`: the text around the assistant turns
    tokenized, each turn's sampled ids placed where the template writes its content (SAMPLED), every
    <|image_pad|> expanded by its image's grid. Sampled ids are never decoded and re-encoded, here as in the rollout.
    """
    pieces = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs).split(SAMPLED)
    turns = sampled_turns(traj, tokenizer.eos_token_id)
    assert len(pieces) == len(turns) + 1
    grids, ids = list(traj.image_grid_thw), []
    for piece, turn in zip(pieces, turns + [[]]):
        n = piece.count("<|image_pad|>")
        ids += tokenizer(expand_image_pads(piece, grids[:n], QWEN2_5_VL), add_special_tokens=False)["input_ids"] + turn
        grids = grids[n:]
    assert not grids
    return ids


def assert_same_conversation(tokenizer, traj, expected):
    """The rollout's ids are the whole rendering, up to the closing of the last turn that the rollout appends
    only when a next turn follows ('\\n' after a sampled <|im_end|>, else '<|im_end|>\\n')."""
    assert expected[:len(traj.input_ids)] == traj.input_ids
    assert expected[len(traj.input_ids):] == close_assistant_turn(tokenizer, traj.input_ids)


def vl_content(parts):
    """Content for the VL template, images written the way Hugging Face's examples write them."""
    return [{"type": "image", "image": p} if isinstance(p, Image.Image) else {"type": "text", "text": p}
            for p in parts]


def mgpo_messages(traj, p=MGPO_PROMPTS):
    """MGPO's two-turn conversation (rollout.py's docstring) as chat messages, from the prompts alone."""
    s = traj.sample
    turn2 = p.turn2.format(question=s.question, choices=format_choices(s.options))
    return [{"role": "system", "content": p.system},
            {"role": "user", "content": vl_content([traj.images[0], p.turn1.format(question=s.question)])},
            {"role": "assistant", "content": SAMPLED},
            {"role": "user", "content": vl_content([p.crop_intro if traj.box_valid else p.invalid_intro,
                                                    traj.images[1], turn2])},
            {"role": "assistant", "content": SAMPLED}]


def test_template_texts_are_the_published_ones():
    for name, digest in TEMPLATE_SHA256.items():
        assert hashlib.sha256(globals()[name].encode()).hexdigest() == digest, name


def test_tool_system_prompt_is_qwen25_tools_block(base):
    """ToolPrompts.system is Qwen2.5's system turn for tools=[ZOOM_TOOL] under the system text "You are a helpful
    assistant." (Qwen2.5-VL's default); the VL template itself ignores `tools`."""
    tokenizer = base[1]
    messages = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Q"}]
    text = tokenizer.apply_chat_template(messages, tools=[ZOOM_TOOL], chat_template=QWEN25_TEMPLATE, tokenize=False,
                                         add_generation_prompt=True)
    assert text == (f"<|im_start|>system\n{TOOL_PROMPTS.system}<|im_end|>\n"
                    "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n")
    vl = [tokenizer.apply_chat_template(messages, chat_template=QWEN25_VL_TEMPLATE, tokenize=False, **kwargs)
          for kwargs in ({}, {"tools": [ZOOM_TOOL]})]
    assert vl[0] == vl[1]


MGPO_CFG = SimpleNamespace(global_max_pixels=224 * 224, crop_max_pixels=224 * 224, min_pixels=28 * 28,
                           max_new_tokens_turn1=64, max_new_tokens_turn2=16, temperature=1.0,
                           rollout_batch_size=0, min_box_side=28, do_sample=True, probe="none")


def scripted_mgpo(policy, turn1, turn2, seed):
    """One MGPO conversation built by the rollout's own steps, with given assistant turns (text, whether the model
    sampled <|im_end|> last) instead of generated ones."""
    _, tokenizer, image_processor = policy
    sample = synthetic_samples(1, seed=seed)[0]
    traj, original = start_trajectory(sample, tokenizer, image_processor, QWEN2_5_VL, MGPO_PROMPTS.system,
                                      MGPO_PROMPTS.turn1.format(question=sample.question),
                                      MGPO_CFG.global_max_pixels, MGPO_CFG.min_pixels)
    for k, (text, eos) in enumerate([turn1, turn2]):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] * eos
        append_sampled(traj, ids, [0.0] * len(ids), tokenizer)
        if k == 0:
            apply_turn1_box(traj, original, tokenizer, image_processor, MGPO_PROMPTS, MGPO_CFG)
    return traj


def test_scripted_mgpo_conversations_are_the_official_rendering(base):
    """Both turn-2 paths (the crop; the global view again for a missing box) and both ways a turn ends (the
    model's <|im_end|>; a stop string or the length limit, closed by the rollout)."""
    tokenizer = base[1]
    box = '```json\n[{"bbox_2d": [20, 30, 140, 120], "label": "red frame"}]\n```'
    trajs = [scripted_mgpo(base, (box, False), ("\\boxed{B}", True), seed=1),
             scripted_mgpo(base, ("I cannot tell.", True), ("\\boxed{", False), seed=2)]
    assert [t.box_valid for t in trajs] == [True, False]
    for traj in trajs:
        assert len(traj.images) == 2
        assert_same_conversation(tokenizer, traj, rendered_ids(tokenizer, QWEN25_VL_TEMPLATE, mgpo_messages(traj),
                                                               traj))


def test_sampled_mgpo_conversations_are_the_official_rendering(base):
    """Whole two-image conversations that the demo base sampled."""
    model, tokenizer, image_processor = base
    torch.manual_seed(0)
    trajs = mgpo_rollout(model, tokenizer, image_processor, synthetic_samples(4, seed=7), 2, MGPO_CFG)
    for traj in trajs:
        assert_same_conversation(tokenizer, traj, rendered_ids(tokenizer, QWEN25_VL_TEMPLATE, mgpo_messages(traj),
                                                               traj))
    assert any(t.box_valid for t in trajs)


TOOL_CFG = SimpleNamespace(global_max_pixels=224 * 224, crop_max_pixels=224 * 224, min_pixels=28 * 28, max_turns=3,
                           max_response_tokens=256, max_new_tokens_per_turn=96, temperature=1.0,
                           rollout_batch_size=0, min_box_side=28, do_sample=True, probe="none")


def tool_messages(traj, user_turns):
    """A tool episode as chat messages twice: for Qwen2.5-VL's template, the tool's responses in user turns (as
    DeepEyes and the rollout write them); for Qwen2.5's, with tools=[ZOOM_TOOL], as messages of role "tool"."""
    s = traj.sample
    question = TOOL_PROMPTS.user.format(question=s.question, choices=format_choices(s.options))
    vl = [{"role": "system", "content": TOOL_PROMPTS.system},
          {"role": "user", "content": vl_content([traj.images[0], question])}]
    text = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": VISION + question}]
    for parts in user_turns.get(id(traj), []):
        if len(parts) == 3:  # a crop
            assert parts[0] == TOOL_PROMPTS.crop_before and parts[2] == TOOL_PROMPTS.crop_after
            response = VISION
        else:  # an error text
            [error] = parts
            assert error.startswith(TOOL_PROMPTS.crop_before) and error.endswith(TOOL_PROMPTS.crop_after)
            response = error.removeprefix(TOOL_PROMPTS.crop_before).removesuffix(TOOL_PROMPTS.crop_after)
        vl += [{"role": "assistant", "content": SAMPLED}, {"role": "user", "content": vl_content(parts)}]
        text += [{"role": "assistant", "content": SAMPLED}, {"role": "tool", "content": response}]
    last = {"role": "assistant", "content": SAMPLED}
    return vl + [last], text + [last]


def assert_tool_conversation_is_the_official_rendering(tokenizer, traj, user_turns):
    vl, text = tool_messages(traj, user_turns)
    assert_same_conversation(tokenizer, traj, rendered_ids(tokenizer, QWEN25_VL_TEMPLATE, vl, traj))
    assert_same_conversation(tokenizer, traj, rendered_ids(tokenizer, QWEN25_TEMPLATE, text, traj,
                                                           tools=[ZOOM_TOOL]))


def test_scripted_tool_conversation_is_the_official_rendering(tool_base, user_turns):
    """A crop, an error text, then the answer; turns ended by the stop string and by the model's <|im_end|>."""
    _, tokenizer, image_processor = tool_base
    sample = synthetic_samples(1, seed=3)[0]
    traj, original = start_trajectory(sample, tokenizer, image_processor, QWEN2_5_VL, TOOL_PROMPTS.system,
                                      TOOL_PROMPTS.user.format(question=sample.question,
                                                               choices=format_choices(sample.options)),
                                      TOOL_CFG.global_max_pixels, TOOL_CFG.min_pixels)
    call = '<think>look closer</think> <tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": %s}}'
    turns = [(call % [20, 30, 140, 120] + "</tool_call>", False), (call % [0, 0, 900, 50] + "</tool_call>", False),
             ("<answer>B</answer>", True)]
    for text, eos in turns:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] * eos
        append_sampled(traj, ids, [0.0] * len(ids), tokenizer)
        going = tool_step(traj, original, tokenizer, image_processor, TOOL_CFG, TOOL_PROMPTS)
    assert (going, traj.end_reason, traj.tool_calls, len(traj.images)) == (False, "answer", 2, 2)
    assert_tool_conversation_is_the_official_rendering(tokenizer, traj, user_turns)


def test_sampled_tool_conversations_are_the_official_rendering(tool_base, user_turns):
    """Whole tool episodes that the LFPC demo's base sampled."""
    model, tokenizer, image_processor = tool_base
    torch.manual_seed(0)
    trajs = tool_rollout(model, tokenizer, image_processor, synthetic_samples(4, seed=7), 2, TOOL_CFG)
    for traj in trajs:
        assert_tool_conversation_is_the_official_rendering(tokenizer, traj, user_turns)
    assert any(t.crop_boxes for t in trajs)


def test_checkpoint_without_chat_template_stops_at_start_up(tmp_path):
    """No chat_template.jinja and none in tokenizer_config.json: load_policy stops, naming the checkpoint. With
    the template inside tokenizer_config.json (how Qwen's checkpoints carry it) it loads, and that template is used."""
    path = shutil.copytree(TINY_BASE, tmp_path / "no-template")
    os.remove(path / "chat_template.jinja")
    config = json.loads((path / "tokenizer_config.json").read_text())
    assert "chat_template" not in config
    with pytest.raises(ValueError, match=f"{re.escape(repr(str(path)))}.*no chat template"):
        load_policy(str(path), *CPU)
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": QWEN25_VL_TEMPLATE}))
    _, tokenizer, _ = load_policy(str(path), *CPU)
    assert tokenizer.chat_template == QWEN25_VL_TEMPLATE


# ---------------------------------------------------------------------------------------------------------------
# The Qwen3 families' published templates (tests/fixtures/templates, sources in its README.md) with a tiny Qwen3
# tokenizer: Qwen3-VL-Instruct writes no <think>; Qwen3-VL-Thinking and Qwen3.5 open '<think>\n' after the assistant
# header and drop the reasoning of assistant turns before the last user turn.

TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "templates")
REAL_TEMPLATES = {  # fixture -> (tiny family of its tokenizer, what its generation prompt opens the turn with)
    "qwen3_vl_instruct.jinja": ("qwen3-vl", ""),
    "qwen3_vl_thinking.jinja": ("qwen3-vl", "<think>\n"),
    "qwen3_5.jinja": ("qwen3.5", "<think>\n"),
}
GRIDS = torch.tensor([[1, 8, 8], [1, 4, 6]])  # 16 and 6 visual tokens after the 2 x 2 merge
IMAGE = Image.new("RGB", (32, 32))


def pads(n):
    return "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>"


@pytest.fixture(scope="module", params=list(REAL_TEMPLATES))
def real(request):
    """(tokenizer with the published template swapped in, family, what the generation prompt opens)."""
    family_name, opening = REAL_TEMPLATES[request.param]
    tokenizer = build_tiny_tokenizer(family_name)
    with open(os.path.join(TEMPLATE_DIR, request.param), encoding="utf-8") as f:
        tokenizer.chat_template = f.read()
    return tokenizer, tiny_spec(family_name).family, opening


def test_published_qwen3_vl_instruct_template_is_the_ggufs():
    """The fixture is byte for byte the template whose size and sha256 TensorSharp pins for Qwen3-VL-8B-Instruct's
    GGUF (see the README beside it)."""
    with open(os.path.join(TEMPLATE_DIR, "qwen3_vl_instruct.jinja"), "rb") as f:
        data = f.read()
    assert len(data) == 5292
    assert hashlib.sha256(data).hexdigest() == "3636d0f0bd6bef02654cdffdc447b79cb2cef8ab02cc75267345946291a489e4"


def test_first_prompt_through_a_published_template(real):
    tokenizer, family, opening = real
    ids = encode_prompt(tokenizer, family, "sys", [IMAGE, "Where?"], GRIDS[:1])
    text = (f"<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\n{pads(16)}Where?<|im_end|>\n"
            f"<|im_start|>assistant\n{opening}")
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_closing_of_a_turn_through_a_published_template(real):
    tokenizer, _, _ = real
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode(close_assistant_turn(tokenizer, [5, 6])) == "<|im_end|>\n"
    assert tokenizer.decode(close_assistant_turn(tokenizer, [5, im_end])) == "\n"


@pytest.mark.parametrize("stopped", [True, False])
def test_two_turns_through_a_published_template(real, stopped):
    """A two-image conversation built the rollout's way against the template's rendering of it whole, each
    assistant turn's text as sampled (after the generation prompt's opening). The user turn between the two
    assistant turns, and the last turn, are the rendering's; the first turn keeps its sampled reasoning, which the
    thinking templates drop from turns before the last user turn (so their history reads header + answer)."""
    tokenizer, family, opening = real
    reasoning = "look at the red frame\n</think>\n\n" if opening else ""
    turns = [reasoning + "The answer is B.", reasoning + "Still B."]
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")

    ids = encode_prompt(tokenizer, family, "sys", [IMAGE, "Where?"], GRIDS[:1])
    prompt = len(ids)
    ids += encode(turns[0]) + [im_end] * stopped
    first = len(ids) - stopped
    ids += close_assistant_turn(tokenizer, ids) + encode_user_turn(tokenizer, family, ["Crop:", IMAGE, "Now?"],
                                                                     GRIDS[1:])
    between = len(ids)
    ids += encode(turns[1])

    messages = [{"role": "system", "content": "sys"},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where?"}]},
                {"role": "assistant", "content": turns[0]},
                {"role": "user", "content": [{"type": "text", "text": "Crop:"}, {"type": "image"},
                                             {"type": "text", "text": "Now?"}]},
                {"role": "assistant", "content": turns[1]}]
    whole = tokenizer.apply_chat_template(messages, tokenize=False)
    history, rest = whole.split("The answer is B.")
    assert ids[:prompt] == encode(expand_image_pads(history + opening, GRIDS[:1], family))  # then the sampled turn
    last = opening + turns[1] + "<|im_end|>\n"
    assert rest.endswith(last)  # the last turn: the generation prompt's opening and the sampled text, verbatim
    user_turn = rest[:-len(last)]
    assert user_turn == f"<|im_end|>\n<|im_start|>user\nCrop:{pads(1)}Now?<|im_end|>\n<|im_start|>assistant\n"
    assert ids[first:between] == encode(expand_image_pads(user_turn + opening, GRIDS[1:], family))


def test_template_without_one_closing_is_refused():
    """A template that ends the last assistant turn otherwise than one followed by a user turn cannot be
    appended to: a clear error, not a wrong id sequence."""
    tokenizer = build_tiny_tokenizer("qwen3-vl")
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content if m.content is string else '' }}"
        "{{ '<|im_end|>\n' if loop.last else '<|im_end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(ValueError, match="ends an assistant turn with '<\\|im_end\\|>\\\\n' when it is the last"):
        encode_user_turn(tokenizer, QWEN3_VL, ["Now?"], torch.zeros((0, 3), dtype=torch.long))
    tokenizer.chat_template = "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}{% endfor %}"
    with pytest.raises(ValueError, match="does not write an assistant turn's content"):
        close_assistant_turn(tokenizer, [5])


@pytest.mark.parametrize("thinking, opening", [("template", "<think>\n"), ("on", "<think>\n"),
                                               ("off", "<think>\n\n</think>\n\n")])
def test_thinking_switch_of_the_qwen3_5_template(thinking, opening):
    """--thinking fixes the published Qwen3.5 template's enable_thinking: every generation prompt the rollout renders
    opens the turn as the template does when called with enable_thinking itself (the independent rendering)."""
    tokenizer = build_tiny_tokenizer("qwen3.5")
    with open(os.path.join(TEMPLATE_DIR, "qwen3_5.jinja"), encoding="utf-8") as f:
        shipped = tokenizer.chat_template = f.read()
    family = tiny_spec("qwen3.5").family
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "Where?"}]
    kwargs = {} if thinking == "template" else {"enable_thinking": thinking == "on"}
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
    assert expected.endswith("<|im_start|>assistant\n" + opening)
    tokenizer.chat_template = with_thinking(shipped, thinking, "m")
    assert tokenizer.decode(encode_prompt(tokenizer, family, "sys", ["Where?"], GRIDS[:0])) == expected
    assert tokenizer.decode(encode_user_turn(tokenizer, family, ["Now?"], GRIDS[:0])).endswith(
        "Now?<|im_end|>\n<|im_start|>assistant\n" + opening)
    # a saved checkpoint's template, loaded again with another choice, gets that choice (the switch is replaced)
    if thinking != "template":
        other = "on" if thinking == "off" else "off"
        assert with_thinking(with_thinking(shipped, other, "m"), thinking, "m") == tokenizer.chat_template


def test_thinking_switch_needs_a_template_that_has_one():
    with open(os.path.join(TEMPLATE_DIR, "qwen3_vl_thinking.jinja"), encoding="utf-8") as f:
        template = f.read()
    assert with_thinking(template, "template", "m") == template
    with pytest.raises(SystemExit, match="--thinking off: the chat template of --model 'm' has no enable_thinking"):
        with_thinking(template, "off", "m")
