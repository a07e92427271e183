import random
from types import SimpleNamespace

import pytest

from answers import extract_answer_tag, extract_boxed, extract_choice, normalize_answer, option_letters
from rewards import (
    GROUNDING_KEYS,
    accuracy_reward,
    grounding_reward,
    lfpc_format_reward,
    mgpo_format_ok,
    mgpo_reward,
    score_crops,
    stage1_sum,
    tool_accuracy_reward,
    tool_bonus,
)

OPTIONS = ["red", "blue", "green", "a yellow car"]  # as in test_answers.py


# -----------------------------------------------------------------------------
# accuracy_reward

@pytest.mark.parametrize("text, answer, expected", [
    (r"I zoomed in. \boxed{B}", "B", 1.0),
    (r"\boxed{(B) blue}", "B", 1.0),
    (r"\boxed{\text{B}}", "B", 1.0),
    (r"\boxed{blue}", "B", 1.0),          # option text against a letter
    (r"\boxed{B}", "blue", 1.0),          # letter against option text
    (r"\boxed{C}", "B", 0.0),             # wrong letter
    (r"\boxed{B} no wait \boxed{C}", "B", 0.0),
    (r"\boxed{C} no wait \boxed{B}", "B", 1.0),
    (r"\boxed{E}", "E", 0.0),             # not an option, even if it equals the answer
    (r"\boxed{B", "B", 0.0),
    ("The answer is B", "B", 0.0),        # no \boxed
])
def test_accuracy_with_options(text, answer, expected):
    assert accuracy_reward(text, answer, OPTIONS) == expected


# -----------------------------------------------------------------------------
# against MGPO's own grader

# MGPO's accuracy reward (xinyu1205/verl, branch mgpo, verl/utils/reward_score/high_resolution.py) is
# mathruler's grade_answer(extract_boxed_content(text), answer). The `official` column was printed by exactly that
# call, mathruler 0.1.0 (with sympy 1.14, pylatexenc 2.11) in a scratch venv outside this repository, on these
# texts and answers; mathruler is no dependency of this project. `ours` is accuracy_reward with OPTIONS.
# Every difference is one of the reasons below, which answers.py's docstring lists.
DELIMITER = "leniency: a letter closed by '.', ')' or ':'"
LETTER_TEXT = "leniency: a letter with text; the letter decides"
OPTION_TEXT = "leniency: the option's text alone"
NOT_A_LETTER = "stricter: a maths grader's 'k = ...' rule, no option letter"
MGPO_GRADER_CASES = [
    # text, answer, official, ours, why they differ
    (r"\boxed{B}", "B", True, True, ""),
    (r"\boxed{{B}}", "B", True, True, ""),
    (r"\boxed{\{B\}}", "B", True, True, ""),
    (r"\boxed{{{B}}}", "B", True, True, ""),
    (r"\boxed{{b}}", "B", True, True, ""),
    (r"\boxed{ B }", "B", True, True, ""),
    (r"\boxed{b}", "B", True, True, ""),
    (r"\boxed{(B)}", "B", True, True, ""),
    (r"\boxed{[B]}", "B", True, True, ""),
    (r"\boxed{$B$}", "B", True, True, ""),
    (r"\boxed{\text{B}}", "B", True, True, ""),
    (r"\boxed{\textbf{B}}", "B", True, True, ""),
    (r"\boxed{\mathrm{B}}", "B", True, True, ""),
    (r"\boxed{\text{(B)}}", "B", True, True, ""),
    (r"\boxed{\text{\{B\}}}", "B", True, True, ""),
    (r"\boxed{\boxed{B}}", "B", True, True, ""),
    (r"so \boxed{B}.", "B", True, True, ""),
    (r"\boxed{A} no, \boxed{B}", "B", True, True, ""),         # the last box
    (r"\boxed{B} no, \boxed{A}", "B", False, False, ""),
    (r"\boxed{B} then \boxed{C", "B", False, False, ""),       # the last box is not closed
    (r"\boxed{B", "B", False, False, ""),
    ("B", "B", False, False, ""),                               # no box
    ("The answer is B.", "B", False, False, ""),
    (r"\boxed{}", "B", False, False, ""),
    (r"\boxed{C}", "B", False, False, ""),
    (r"\boxed{E}", "B", False, False, ""),
    (r"\boxed{BB}", "B", False, False, ""),
    (r"\boxed{B blue}", "B", False, False, ""),
    (r"\boxed{Option B}", "B", False, False, ""),
    (r"\boxed{B, C}", "B", False, False, ""),
    (r"\boxed{2B}", "B", False, False, ""),
    (r"\boxed{(B}", "B", False, False, ""),
    (r"\boxed{B.blue}", "B", False, False, ""),
    (r"\boxed{A. blue}", "B", False, False, ""),
    (r"\boxed{(A) blue}", "B", False, False, ""),
    (r"\boxed{C. blue}", "B", False, False, ""),
    (r"\boxed{B.}", "B", False, True, DELIMITER),
    (r"\boxed{B)}", "B", False, True, DELIMITER),
    (r"\boxed{B:}", "B", False, True, DELIMITER),
    (r"\boxed{B. blue}", "B", False, True, LETTER_TEXT),
    (r"\boxed{(B) blue}", "B", False, True, LETTER_TEXT),
    (r"\boxed{B) blue}", "B", False, True, LETTER_TEXT),
    (r"\boxed{B: blue}", "B", False, True, LETTER_TEXT),
    (r"\boxed{A. blue}", "A", False, True, LETTER_TEXT),
    (r"\boxed{blue}", "B", False, True, OPTION_TEXT),
    (r"\boxed{Blue.}", "B", False, True, OPTION_TEXT),
    (r"\boxed{\text{blue}}", "B", False, True, OPTION_TEXT),
    (r"\boxed{x = B}", "B", True, False, NOT_A_LETTER),
]


@pytest.mark.parametrize("text, answer, official, ours, why", MGPO_GRADER_CASES)
def test_against_mgpo_grader(text, answer, official, ours, why):
    assert accuracy_reward(text, answer, OPTIONS) == float(ours)
    assert (official != ours) == bool(why)  # every difference from MGPO's grader is a stated one


@pytest.mark.parametrize("text, answer, expected", [
    (r"\boxed{The Red car.}", "red car", 1.0),
    (r"\boxed{\text{red car}}", "Red car", 1.0),
    (r"\boxed{blue car}", "red car", 0.0),
    (r"\boxed{3}", "3.0", 1.0),
    (r"\boxed{1,000}", "1000", 1.0),
    (r"\boxed{-3}", "3", 0.0),            # stripping "-" as punctuation must not make these equal
    (r"\boxed{3.5}", "35", 0.0),
    (r"\boxed{4}", "3", 0.0),
    (r"\boxed{a}", "a", 1.0),             # normalises to nothing: compared as written
    (r"\boxed{the}", "a", 0.0),
    ("\\boxed{" + "9" * 5000 + "}", "9" * 5001, 0.0),  # too big for a float: not "inf == inf"
    ("\\boxed{" + "9" * 5000 + "}", "9" * 5000, 1.0),
    ("no box 3", "3", 0.0),
    (r"\boxed{{-3}}", "3", 0.0),          # braces or dollars around a number do not hide its sign
    (r"\boxed{$-3$}", "3", 0.0),
    (r"\boxed{{$1,000$}}", "1000", 1.0),
])
def test_accuracy_free_form(text, answer, expected):
    assert accuracy_reward(text, answer, None) == expected


# -----------------------------------------------------------------------------
# mgpo_format_ok

TURN1_OK = 'x ```json\n[{"bbox_2d": [1, 2, 30, 40], "label": "a"}]\n```'


def test_mgpo_format_ok():
    assert mgpo_format_ok(TURN1_OK, r"so \boxed{B}")
    assert not mgpo_format_ok(TURN1_OK, "B")
    assert not mgpo_format_ok(TURN1_OK, r"\boxed{B")
    assert not mgpo_format_ok("no box", r"\boxed{B}")


# -----------------------------------------------------------------------------
# fuzz: no input may raise, and rewards stay binary

PIECES = ["\\boxed{", "\\text{", "{", "}", "\\{", "\\}", "$", "[", "]", "\\", "(", ")", ".", ",", "-", " ", "\n", "A",
          "b", "B)", "red", "The", "3", "3.0", "1,000", "9" * 400, "é", "猫", "🙂", "\x00", "```json", '"bbox_2d"',
          "[1, 2]"]
VALID = [r"The crop shows a red car. \boxed{A}", r"\boxed{\text{(B) blue}}", r"\boxed{1,000.5}"]


def _random_text(rng):
    if rng.random() < 0.3:
        text = rng.choice(VALID)
        return text[:rng.randrange(len(text) + 1)]  # truncated mid-answer
    return "".join(rng.choice(PIECES) for _ in range(rng.randrange(12)))


def test_fuzz_never_raises():
    rng = random.Random(0)
    for _ in range(3000):
        text, answer = _random_text(rng), _random_text(rng)
        options = rng.choice([None, [], OPTIONS, [_random_text(rng) for _ in range(rng.randrange(1, 5))]])
        boxed = extract_boxed(text)
        assert boxed is None or isinstance(boxed, str)
        assert isinstance(normalize_answer(text), str)
        assert extract_choice(text, options) in [None, *option_letters(options or [])]
        assert accuracy_reward(text, answer, options) in (0.0, 1.0)
        assert mgpo_format_ok(TURN1_OK, text) == (boxed is not None)



# -----------------------------------------------------------------------------
# LFPC: tool_accuracy_reward

@pytest.mark.parametrize("text, answer, expected", [
    ("<answer>B</answer>", "B", 1.0),
    ("<answer>(B) blue</answer>", "B", 1.0),
    ("<answer>B.</answer>", "B", 1.0),
    ("<answer>\n b \n</answer>", "B", 1.0),
    (r"<answer>\text{B}</answer>", "B", 1.0),
    ("<answer>blue</answer>", "B", 1.0),             # option text against a letter
    ("<answer>B</answer>", "blue", 1.0),             # letter against option text
    (r"<answer>\boxed{B}</answer>", "B", 1.0),       # \boxed inside <answer> is unwrapped
    (r"<answer>so \boxed{\text{(B) blue}}</answer>", "B", 1.0),
    (r"<answer>\boxed{C} or \boxed{B}</answer>", "B", 1.0),  # the last \boxed inside
    (r"<answer>\boxed{B</answer>", "B", 0.0),        # an unclosed \boxed is not an answer
    ("<answer>C</answer>", "B", 0.0),
    ("<answer>E</answer>", "E", 0.0),                # not an option
    ("<answer>B</answer> then <answer>C</answer>", "B", 0.0),
    ("<answer>C</answer> then <answer>B</answer>", "B", 1.0),
    (r"\boxed{B}", "B", 0.0),                        # no <answer>: \boxed outside does not count
    (r"\boxed{B} <answer>C</answer>", "B", 0.0),
    ("<answer>B", "B", 0.0),
    ("The answer is B", "B", 0.0),
])
def test_tool_accuracy_with_options(text, answer, expected):
    assert tool_accuracy_reward(text, answer, OPTIONS) == expected


@pytest.mark.parametrize("text, answer, expected", [
    ("<answer>The Red car.</answer>", "red car", 1.0),
    (r"<answer>\boxed{\text{red car}}</answer>", "Red car", 1.0),
    ("<answer>blue car</answer>", "red car", 0.0),
    ("<answer> 1,000 </answer>", "1000", 1.0),
    ("<answer>-3</answer>", "3", 0.0),
    ("<answer></answer>", "", 1.0),                  # same as accuracy_reward on \boxed{}
    ("no tags 3", "3", 0.0),
])
def test_tool_accuracy_free_form(text, answer, expected):
    assert tool_accuracy_reward(text, answer, None) == expected


# -----------------------------------------------------------------------------
# LFPC: lfpc_format_reward

CALL = '<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [1, 2, 30, 40]}}</tool_call>'


@pytest.mark.parametrize("turns", [
    ["<answer>B</answer>"],                                                   # answering at once is fine
    ["<think>the sign is small</think>" + CALL, "<think>now I see it</think><answer>B</answer>"],
    ["<think>a</think>" + CALL, CALL, "<think>b</think>\n<answer> B </answer>\n"],
    ["<think>draft <answer>A</answer>, no:</think><answer>B</answer>"],        # two answers in the final turn
    ["<answer>" + "x" * 10 + "</answer>"],                                    # exactly max_answer_chars
    ["<answer>  " + "x" * 10 + "\n</answer>"],                                # length counted after stripping
    ["<think><think>nested</think></think><answer>B</answer>"],              # nesting is balanced
])
def test_lfpc_format_ok(turns):
    assert lfpc_format_reward(turns, max_answer_chars=10) == 0.0


@pytest.mark.parametrize("turns", [
    [],                                                                       # no turn at all
    ["<think>unclosed<answer>B</answer>"],                                    # unbalanced think
    ["<think>a</think></think><answer>B</answer>"],
    ["<think>a" + CALL, "<answer>B</answer>"],                                # unbalanced in an earlier turn
    ["<tool_call>{}", "<answer>B</answer>"],                                  # unbalanced tool_call
    ["<answer>B</answer></answer>"],                                          # unbalanced answer
    ["<answer>A</answer> <answer>B"],
    ["</think>reasoning<think><answer>B</answer>"],                           # closing before opening
    ["</tool_call>x<tool_call><answer>B</answer>"],
    ["</answer>B<answer>"],
    [CALL],                                                                   # no answer at the end
    ["<think>B</think>"],
    ["B"],
    ["<answer>" + "x" * 11 + "</answer>"],                                    # answer too long
    ["<answer>A</answer>" + CALL, "<answer>B</answer>"],                      # answer in a non-final turn
    ["<answer>A</answer>", CALL, "<answer>B</answer>"],
])
def test_lfpc_format_error(turns):
    assert lfpc_format_reward(turns, max_answer_chars=10) == -1.0


# -----------------------------------------------------------------------------
# LFPC: tool_bonus and stage1_sum

def test_tool_bonus():
    assert tool_bonus(True, 1) == 1.0
    assert tool_bonus(True, 3) == 1.0
    assert tool_bonus(True, 0) == 0.0       # correct without looking closer
    assert tool_bonus(False, 2) == 0.0      # cropping alone earns nothing


@pytest.mark.parametrize("acc, fmt, tool, expected", [
    (1.0, 0.0, 1.0, 2.0),                   # correct with a crop: 0.8 + 0 + 1.2
    (1.0, 0.0, 0.0, 0.8),                   # correct without a crop
    (1.0, -1.0, 1.0, 1.8),                  # correct with a crop, bad format: 0.8 - 0.2 + 1.2
    (0.0, 0.0, 0.0, 0.0),                   # wrong
    (0.0, -1.0, 0.0, -0.2),                 # wrong with a format error
])
def test_stage1_sum_default_weights(acc, fmt, tool, expected):
    assert stage1_sum(acc, fmt, tool) == pytest.approx(expected)


def test_stage1_sum_custom_weights():
    assert stage1_sum(1.0, -1.0, 1.0, acc_weight=1.0, format_weight=0.5, tool_weight=0.0) == pytest.approx(0.5)


# -----------------------------------------------------------------------------
# LFPC: grounding_reward and score_crops

# B1 is 100 x 10 = 1000 px, so a pred [0, 0, x, 10] covers exactly x/100 of it.
STRIP_B1, STRIP_B2 = [0, 0, 100, 10], [0, 0, 200, 50]
STRIP_SIZE = (400, 100)


def test_grounding_coverage_just_below_threshold():
    scores = grounding_reward([0, 0, 89, 10], [STRIP_B1, STRIP_B2], STRIP_SIZE, iou_weight=0.5)
    assert scores["coverage"] == 0.89          # 890 / 1000
    assert scores["r_iou"] == 0.0              # gate closed
    # L1 to B1: only x2 differs, by 11 px of 400: 11/400/4 = 0.006875 (to B2 it is far larger)
    assert scores["r_l1"] == pytest.approx(1 - 0.006875)
    assert scores["r_geo"] == pytest.approx(0.5 * (1 - 0.006875))


def test_grounding_coverage_just_above_threshold():
    scores = grounding_reward([0, 0, 91, 10], [STRIP_B1, STRIP_B2], STRIP_SIZE, iou_weight=0.5)
    assert scores["coverage"] == 0.91
    assert scores["r_iou"] == pytest.approx(0.91)   # IoU with B1 = 910/1000; with B2 only 910/10000
    assert scores["r_l1"] == pytest.approx(1 - 9 / 400 / 4)
    assert scores["r_geo"] == pytest.approx(0.5 * 0.91 + 0.5 * (1 - 9 / 400 / 4))


def test_grounding_coverage_exactly_at_threshold_gets_no_iou():
    scores = grounding_reward([0, 0, 90, 10], [STRIP_B1, STRIP_B2], STRIP_SIZE, iou_weight=0.5)
    assert scores["coverage"] == 0.9 and scores["r_iou"] == 0.0   # "exceeds" the threshold: strictly greater
    assert grounding_reward([0, 0, 90, 10], [STRIP_B1], STRIP_SIZE, 0.5, coverage_threshold=0.89)["r_iou"] == 0.9


# Nested boxes in a 200 x 100 image, smallest first.
B1, B2, B3 = [40, 40, 60, 60], [20, 20, 80, 80], [0, 0, 200, 100]
NESTED, SIZE = [B1, B2, B3], (200, 100)


def test_grounding_max_iou_is_with_b2():
    scores = grounding_reward([25, 25, 75, 75], NESTED, SIZE, iou_weight=0.5)
    # pred is 50 x 50 = 2500 px and contains B1 (400 px) and sits inside B2 (3600 px) and B3 (20000 px):
    # IoU 400/2500 = 0.16, 2500/3600 = 0.694, 2500/20000 = 0.125
    assert scores["coverage"] == 1.0
    assert scores["r_iou"] == pytest.approx(2500 / 3600)
    # L1: to B1 (15/200 + 15/100 + 15/200 + 15/100) / 4 = 0.1125, to B2 (5/200 + 5/100) * 2 / 4 = 0.0375,
    # to B3 (25/200 + 25/100 + 125/200 + 75/100) / 4 = 0.4375
    assert scores["r_l1"] == pytest.approx(1 - 0.0375)
    assert scores["r_geo"] == pytest.approx(0.5 * 2500 / 3600 + 0.5 * 0.9625)


def test_grounding_gate_uses_b1_only():
    # the top half of B2 has IoU 1800/3600 = 0.5 with B2 but covers only half of B1 ([40, 40, 60, 50])
    scores = grounding_reward([20, 20, 80, 50], NESTED, SIZE, iou_weight=0.5)
    assert scores["coverage"] == 0.5
    assert scores["r_iou"] == 0.0
    assert scores["r_l1"] == pytest.approx(1 - (30 / 100) / 4)  # B2: only y2 differs, 30 px of 100


def test_grounding_l1_by_hand():
    # pred [10, 30, 90, 70] against B2 [20, 20, 80, 80]: (10/200 + 10/100 + 10/200 + 10/100) / 4 = 0.075;
    # against B1 (30/200 + 10/100 + 30/200 + 10/100) / 4 = 0.125
    scores = grounding_reward([10, 30, 90, 70], [B1, B2], SIZE, iou_weight=0.0)
    assert scores["r_l1"] == pytest.approx(0.925)
    assert scores["r_geo"] == pytest.approx(0.925)


@pytest.mark.parametrize("iou_weight", [0.0, 0.25, 1.0])
def test_grounding_iou_weight(iou_weight):
    scores = grounding_reward([25, 25, 75, 75], NESTED, SIZE, iou_weight=iou_weight)
    assert scores["r_geo"] == pytest.approx(iou_weight * 2500 / 3600 + (1 - iou_weight) * 0.9625)


def test_grounding_exact_hit_and_no_pred():
    assert grounding_reward(B1, NESTED, SIZE, iou_weight=0.5) == {"coverage": 1.0, "r_iou": 1.0, "r_l1": 1.0,
                                                                   "r_geo": 1.0}
    assert grounding_reward(None, NESTED, SIZE, iou_weight=0.5) == dict.fromkeys(GROUNDING_KEYS, 0.0)


def test_grounding_needs_a_gt_box():
    with pytest.raises(ValueError, match="ground-truth"):
        grounding_reward([0, 0, 1, 1], [], SIZE, iou_weight=0.5)


GOOD, WHOLE, OFF = [25, 25, 75, 75], [0, 0, 200, 100], [100, 0, 200, 100]


def test_score_crops_last_and_best():
    by_crop = {tuple(c): grounding_reward(c, NESTED, SIZE, 0.5) for c in (GOOD, WHOLE, OFF)}
    # WHOLE covers B1 and is B3 itself: r_iou 1, r_l1 1; GOOD: r_iou 0.694, r_l1 0.9625; OFF misses B1: r_iou 0
    assert by_crop[tuple(WHOLE)]["r_geo"] == 1.0
    assert by_crop[tuple(OFF)]["r_iou"] == 0.0
    crops = [GOOD, WHOLE, OFF]
    assert score_crops(crops, NESTED, SIZE, 0.5, 0.9, "last") == by_crop[tuple(OFF)]
    assert score_crops(crops, NESTED, SIZE, 0.5, 0.9, "best") == by_crop[tuple(WHOLE)]
    assert score_crops([GOOD, OFF], NESTED, SIZE, 0.5, 0.9, "best") == by_crop[tuple(GOOD)]
    assert score_crops([OFF, GOOD], NESTED, SIZE, 0.5, 0.9, "last") == by_crop[tuple(GOOD)]


def test_score_crops_docstring_example():
    gt = [B1, B2]
    assert score_crops([GOOD, WHOLE], gt, SIZE, 0.5, 0.9, "best")["r_geo"] == pytest.approx(0.828, abs=1e-3)
    assert score_crops([GOOD, WHOLE], gt, SIZE, 0.5, 0.9, "last")["r_geo"] == pytest.approx(0.4525)


def test_score_crops_passes_the_threshold_on():
    # GOOD has coverage 1: any threshold below 1 opens the gate; coverage 1 is not > 1
    assert score_crops([GOOD], NESTED, SIZE, 0.5, 1.0, "last")["r_iou"] == 0.0
    assert score_crops([GOOD], NESTED, SIZE, 0.5, 0.99, "last")["r_iou"] == pytest.approx(2500 / 3600)


@pytest.mark.parametrize("which", ["last", "best"])
def test_score_crops_without_crops(which):
    assert score_crops([], NESTED, SIZE, 0.5, 0.9, which) == dict.fromkeys(GROUNDING_KEYS, 0.0)


@pytest.mark.parametrize("crops", [[], [GOOD]])
def test_score_crops_unknown_which(crops):
    with pytest.raises(ValueError, match="'first'"):
        score_crops(crops, NESTED, SIZE, 0.5, 0.9, "first")


# -----------------------------------------------------------------------------
# fuzz: LFPC text rewards never raise and stay in range

LFPC_PIECES = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<answer>", "</answer>", "<answer", "answer>",
               "\\boxed{", "{", "}", "\\text{", "B", "(B)", "blue", "3", " ", "\n", "é", "🙂", "\x00", CALL]


def test_lfpc_fuzz_never_raises():
    rng = random.Random(1)
    for _ in range(3000):
        turns = ["".join(rng.choice(LFPC_PIECES) for _ in range(rng.randrange(15))) for _ in range(rng.randrange(4))]
        text = turns[-1] if turns else ""
        options = rng.choice([None, OPTIONS])
        tag = extract_answer_tag(text)
        assert tag is None or ("<answer>" not in tag and "</answer>" not in tag)
        assert tool_accuracy_reward(text, rng.choice(["B", "blue", "3"]), options) in (0.0, 1.0)
        fmt = lfpc_format_reward(turns, max_answer_chars=rng.randrange(20))
        assert fmt in (0.0, -1.0)
        assert fmt == -1.0 or tag is not None


def test_lfpc_text_rewards_are_fast_on_long_text():
    long_texts = ["<answer>" + "x" * 10**6, "<answer>" * 10**5, "</answer>" * 10**5, "<think>" * 10**5 + "<answer>B"]
    for text in long_texts:
        assert tool_accuracy_reward(text, "B", OPTIONS) == 0.0
        assert lfpc_format_reward([text], max_answer_chars=100) == -1.0


def test_mgpo_reward_reads_the_last_turn_of_a_trajectory():
    sample = SimpleNamespace(answer="B", options=OPTIONS)
    box_turn = '```json\n[{"bbox_2d": [1, 2, 30, 40], "label": "car"}]\n```'
    traj = lambda *texts: SimpleNamespace(sample=sample, texts=list(texts))
    assert mgpo_reward(traj(box_turn, r"It is blue: \boxed{B}"), None) == 1.0
    assert mgpo_reward(traj(r"\boxed{B}", r"\boxed{A}"), None) == 0.0  # only the answer turn counts
    assert mgpo_reward(traj(r"\boxed{blue}"), None) == 1.0  # one turn: the direct baseline's trajectories
