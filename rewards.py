"""
Reward functions on model text.

Rewards read only what the model wrote, so every function here takes any string and never raises: a malformed
answer earns 0.0, not a crashed training step.

MGPO's reward is answer correctness alone (`accuracy_reward`); `mgpo_format_ok` is logged as a metric, never
rewarded. Recipe-specific rewards follow the shared answer-matching helpers, one section per recipe.

Answer matching (`answer_matches`) first removes wrappers around the whole answer: `\\text{}` (and `\\textbf`,
`\\textrm`, `\\mathrm`, `\\mathbf`), `{}`, `\\{ \\}` and `$ $`, nested or not: `{{B}}`, `\\{B\\}` and `$B$` are B,
`{-3}` is the number -3. With options [red, blue, green, yellow] (`extract_choice`):
- A letter form names its option: "B", "b", "(B)", "[B]", "B.", "B)" or "B:" alone, or "(B)", "[B]", "B.", "B)" or
  "B:" followed by a space and any text. The letter wins over the text after it: "A. blue" and "(A) blue" are A,
  "C. blue" is C, for every letter alike. The prompt asks for the letter; the text after it is often a paraphrase
  ("(B) the blue one"), so it cannot veto the letter. A letter that names no option ("(E) blue") is read as text.
- Otherwise the option's text, normalised (case, punctuation, the articles "a", "an", "the"): "Blue." is B; two
  options with the same normalised text cannot be told apart (None).
- A letter needs its delimiter: "A cat" and "A blue" are text (the article "a", then "cat" or "blue"), so
  "A blue" is B and "C blue" names nothing. An article is dropped only where a space follows it, so a letter
  closed by punctuation ("A.", "(A)", "A:", "A,") is never taken for the article "a".

MGPO's own grader is mathruler's `grade_answer` on the last `\\boxed{}` against the letter (tests/test_rewards.py
compares the two case by case). Deliberate leniencies here, which it scores 0: a letter closed by ".", ")" or ":"
("B."); a letter with text ("B. blue", "(B) blue"); the option's text alone ("blue", "Blue."). Deliberately
stricter: "x = B", which its maths rule for "k = ..." reads as B.
"""

import math
import re
import string

from functools import partial

from crop import coverage, iou, l1_distance, parse_box

# -----------------------------------------------------------------------------
# answer extraction and normalisation

_BOXED = "\\boxed{"
# LaTeX wrappers that models put around a plain answer; the content (escaped braces allowed) is the answer.
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf)\s*\{((?:[^{}\\]|\\.)*)\}")
# Braces, escaped braces or dollars around the whole answer. Greedy: "{a} and {b}" becomes "a} and {b", whose
# stray braces normalisation drops as it did before.
_ENCLOSED = re.compile(r"\s*(?:\{(.*)\}|\\\{(.*)\\\}|\$(.*)\$)\s*", re.DOTALL)
# An article followed by a space: "A. blue" and "(A) blue" keep their letter.
_ARTICLES = re.compile(r"\b(?:a|an|the)\b(?=\s)")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
# Digits with optional thousands separators and decimals; exponents, fractions and units are left to string matching.
_NUMBER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|[+-]?\.\d+")
# An option letter with a delimiter: "(B)", "[B]", "B.", "B)", "B:".
_DELIMITED_LETTER = r"\(([A-Za-z])\)|\[([A-Za-z])\]|([A-Za-z])[.):]"
# An option letter on its own: a delimited one, or "B" alone.
_BARE_LETTER = re.compile(rf"{_DELIMITED_LETTER}|([A-Za-z])")
# An option letter followed by text: "(B) blue", "B. blue". The delimiter is required so that an answer like
# "A cat" is read as text, not as option A.
_LETTER_PREFIX = re.compile(rf"(?:{_DELIMITED_LETTER})\s")


def extract_boxed(text: str) -> str | None:
    """
    Content of the last `\\boxed{...}` in text, braces balanced; None when there is none or it is not closed.

    >>> extract_boxed(r"so \\boxed{A}, no: \\boxed{\\text{B}}")
    '\\\\text{B}'
    """
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    begin = i = start + len(_BOXED)
    depth = 1
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # an escaped brace such as \{ does not open or close a group
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i]
        i += 1
    return None


def option_letters(options) -> list[str]:
    """
    Letters naming the options, in order.

    >>> option_letters(["red", "blue", "green"])
    ['A', 'B', 'C']
    """
    return [chr(ord("A") + i) for i in range(len(options))]


def _unwrap(text: str) -> str:
    # One layer per pass, so that nested wrappers such as \textbf{\text{B}} or {$B$} are all removed.
    while True:
        enclosed = _ENCLOSED.fullmatch(text)
        if enclosed:
            unwrapped = next(group for group in enclosed.groups() if group is not None)
        else:
            unwrapped = _TEXT_WRAPPER.sub(r"\1", text)
        if unwrapped == text:
            return text
        text = unwrapped


def normalize_answer(text: str) -> str:
    """
    Lowercase, drop wrappers (`\\text{}`, `{}`, `$ $`), articles followed by a space, punctuation and extra
    whitespace (SQuAD-style, except that an article must be followed by a space).

    >>> normalize_answer(r"The \\text{Red}  car."), normalize_answer("(A) blue")
    ('red car', 'a blue')
    """
    text = _ARTICLES.sub(" ", _unwrap(text).lower())
    return " ".join(text.translate(_PUNCTUATION).split())


def _parse_number(text: str) -> float | None:
    text = _unwrap(text).strip()
    if not _NUMBER.fullmatch(text):
        return None
    value = float(text.replace(",", ""))
    # Digit strings too long for a float become inf, and all infs would compare equal.
    return value if math.isfinite(value) else None


def _same_text(pred: str, answer: str) -> bool:
    pred_norm, answer_norm = normalize_answer(pred), normalize_answer(answer)
    if not pred_norm:
        # Normalisation erased everything (e.g. "a", "..."): compare what was written instead.
        return pred.strip().lower() == answer.strip().lower()
    return pred_norm == answer_norm


def _same_answer(pred: str, answer: str) -> bool:
    pred_number, answer_number = _parse_number(pred), _parse_number(answer)
    if pred_number is not None and answer_number is not None:
        return pred_number == answer_number  # numbers only by value: "-3" must not match "3" once "-" is stripped
    return _same_text(pred, answer)


def extract_choice(pred: str, options: list[str] | None) -> str | None:
    """
    The option letter that pred names: by a letter form ("B", "(B)", "B) red", "\\text{B}"), which wins over any
    text after it, else by the option's text; None when there are no options or pred names none of them.
    The module docstring states the rules.

    >>> extract_choice("(B) blue", ["red", "blue"]), extract_choice("Blue.", ["red", "blue"])
    ('B', 'B')
    >>> extract_choice("A. blue", ["red", "blue"]), extract_choice("A blue", ["red", "blue"])
    ('A', 'B')
    """
    if not options:
        return None
    letters = option_letters(options)
    pred = _unwrap(pred).strip()
    form = _BARE_LETTER.fullmatch(pred) or _LETTER_PREFIX.match(pred)
    if form:
        letter = next(group for group in form.groups() if group).upper()
        if letter in letters:
            return letter
    pred_norm = normalize_answer(pred)
    if pred_norm:
        matches = [letter for letter, option in zip(letters, options) if normalize_answer(option) == pred_norm]
        if len(matches) == 1:  # two options with the same text cannot be told apart
            return matches[0]
    return None


# -----------------------------------------------------------------------------
# accuracy (shared by the recipes)

def answer_matches(pred: str | None, answer: str, options: list[str] | None) -> bool:
    """
    Whether an extracted prediction is the right answer; a missing prediction (None) never is.

    With options, answer is the correct letter or option text and letters are compared. Without options the
    answer is short free text: normalised string equality, or equal values when both are numbers.

    >>> answer_matches("(B) blue", "blue", ["red", "blue"]), answer_matches("1,000", "1000.0", None)
    (True, True)
    """
    if pred is None:
        return False
    if options:
        pred_letter = extract_choice(pred, options)
        return pred_letter is not None and pred_letter == extract_choice(answer, options)
    return _same_answer(pred, answer)


def accuracy_reward(text: str, answer: str, options: list[str] | None) -> float:
    """
    1.0 when the last `\\boxed{}` in text holds the right answer (see `answer_matches`), else 0.0.

    >>> accuracy_reward(r"It is red. \\boxed{A}", "A", ["red", "blue"]), accuracy_reward(r"\\boxed{3.0}", "3", None)
    (1.0, 1.0)
    """
    return float(answer_matches(extract_boxed(text), answer, options))


# -----------------------------------------------------------------------------
# MGPO: the reward is accuracy_reward alone; format is a metric

def mgpo_format_ok(turn1_text: str, turn2_text: str) -> bool:
    """
    Whether an MGPO rollout followed the template: a ```json box in turn 1 and a `\\boxed{}` answer in turn 2.

    >>> mgpo_format_ok('```json\\n[{"bbox_2d": [1, 2, 30, 40], "label": "cat"}]\\n```', r"\\boxed{B}")
    True
    """
    return parse_box(turn1_text) is not None and extract_boxed(turn2_text) is not None


# -----------------------------------------------------------------------------
# LFPC: DeepEyes-style turns (<think>, <tool_call>, <answer>), stage I reward 0.8*acc + 0.2*format + 1.2*tool,
# stage II grounding reward from nested ground-truth boxes

# An <answer> pair with no answer tag inside, so "<answer>A <answer>B</answer>" holds "B", not "A <answer>B".
_ANSWER_TAG = re.compile(r"<answer>((?:(?!</?answer>).)*)</answer>", re.DOTALL)
_LFPC_TAG_NAMES = ("think", "tool_call", "answer")
_LFPC_TAG = re.compile(rf"<(/?)({'|'.join(_LFPC_TAG_NAMES)})>")
GROUNDING_KEYS = ("coverage", "r_iou", "r_l1", "r_geo")


def extract_answer_tag(text: str) -> str | None:
    """
    Content of the last closed `<answer>...</answer>` in text, or None.

    >>> extract_answer_tag("<answer>A</answer> no: <answer> B </answer> <answer>C")
    ' B '
    """
    contents = _ANSWER_TAG.findall(text)
    return contents[-1] if contents else None


def unboxed(text: str) -> str:
    """
    The content of the last closed `\\boxed{}` in text, else text itself: models trained on boxed answers box them
    inside other formats too.

    >>> unboxed(r"\\boxed{B}"), unboxed("B"), unboxed(r"\\boxed{B")
    ('B', 'B', '\\\\boxed{B')
    """
    boxed = extract_boxed(text)
    return text if boxed is None else boxed


def tool_accuracy_reward(text: str, answer: str, options: list[str] | None) -> float:
    """
    1.0 when the last <answer> in text holds the right answer (see `answer_matches`), else 0.0. Models trained
    on `\\boxed{}` answers often write <answer>\\boxed{B}</answer>: the box is unwrapped.

    >>> tool_accuracy_reward(r"<answer>\\boxed{B}</answer>", "blue", ["red", "blue"])
    1.0
    """
    pred = extract_answer_tag(text)
    return float(answer_matches(None if pred is None else unboxed(pred), answer, options))


def _tags_balanced(text: str) -> bool:
    # Every closing tag has an opening tag before it, and every opening tag is closed.
    depth = dict.fromkeys(_LFPC_TAG_NAMES, 0)
    for closing, name in _LFPC_TAG.findall(text):
        depth[name] += -1 if closing else 1
        if depth[name] < 0:
            return False
    return not any(depth.values())


def lfpc_format_reward(turn_texts: list[str], max_answer_chars: int) -> float:
    """
    -1.0 when an LFPC rollout breaks the structure, else 0.0. turn_texts are the model's own turns, in order.
    A structure error is: unbalanced <think>, <tool_call> or <answer> tags in any turn (a closing tag before its
    opening tag included); an <answer> before the final turn; no closed <answer> in the final turn; or an answer
    longer than max_answer_chars once stripped (a reasoning dump inside the tags is not an answer).

    >>> lfpc_format_reward(["<think>zoom</think><tool_call>{}</tool_call>", "<answer>B</answer>"], 10)
    0.0
    >>> lfpc_format_reward(["<answer>B</answer>", "<answer>B</answer>"], 10), lfpc_format_reward(["</think>B"], 10)
    (-1.0, -1.0)
    """
    if not turn_texts or not all(_tags_balanced(text) for text in turn_texts):
        return -1.0
    if any("<answer>" in text for text in turn_texts[:-1]):
        return -1.0
    answer = extract_answer_tag(turn_texts[-1])
    return 0.0 if answer is not None and len(answer.strip()) <= max_answer_chars else -1.0


def tool_bonus(correct: bool, num_valid_crops: int) -> float:
    """
    1.0 for a correct answer reached with at least one valid crop, else 0.0: a crop alone earns nothing, so the
    model is not paid for calling the tool on questions it then gets wrong.

    >>> tool_bonus(True, 2), tool_bonus(True, 0), tool_bonus(False, 3)
    (1.0, 0.0, 0.0)
    """
    return float(correct and num_valid_crops >= 1)


def stage1_reward(acc: float, fmt: float, tool: float,
                  acc_weight: float = 0.8, format_weight: float = 0.2, tool_weight: float = 1.2) -> float:
    """
    LFPC stage I reward, acc_weight*acc + format_weight*fmt + tool_weight*tool (weights from the paper's Table 12).
    acc and tool are 0/1, fmt is 0 or -1, so the reward ranges from -0.2 to 2.0.

    >>> stage1_reward(1.0, 0.0, 1.0), stage1_reward(1.0, 0.0, 0.0), stage1_reward(0.0, -1.0, 0.0)
    (2.0, 0.8, -0.2)
    """
    return acc_weight * acc + format_weight * fmt + tool_weight * tool


# The LFPC paper's coverage gate: a crop covering more than this of B1 holds what answers the question
COVERAGE_THRESHOLD = 0.9


def grounding_reward(pred: list[float] | None, gt_boxes: list[list[float]], size: tuple[float, float],
                     iou_weight: float, coverage_threshold: float = COVERAGE_THRESHOLD) -> dict[str, float]:
    """
    LFPC stage II grounding reward of one predicted box. All boxes are in ORIGINAL pixels, gt_boxes nested and
    smallest first (B1 = gt_boxes[0] is the least region that answers the question), size = (W, H) of the original.

        coverage = |pred ∩ B1| / |B1|
        r_iou    = max_i IoU(pred, Bi) if coverage > coverage_threshold else 0
        r_l1     = 1 - min_i L1(pred, Bi)       (corners normalised by W and H, mean of the four)
        r_geo    = iou_weight * r_iou + (1 - iou_weight) * r_l1

    IoU alone rewards tight boxes that cut off part of B1, hence the coverage gate; r_l1 keeps a signal when the
    gate is closed. pred None (no valid crop) scores 0 on every key.

    Example, 200 x 100 image, B1 = [40, 40, 60, 60], B2 = [20, 20, 80, 80], pred = [25, 25, 75, 75]:
        coverage = 1 (B1 inside pred); IoU with B1 = 400/2500 = 0.16, with B2 = 2500/3600 = 0.694: r_iou = 0.694;
        L1 to B2 = (5/200 + 5/100 + 5/200 + 5/100) / 4 = 0.0375 (closer than B1's 0.1125): r_l1 = 0.9625;
        with iou_weight 0.5, r_geo = 0.5 * 0.694 + 0.5 * 0.9625 = 0.828.
    """
    if not gt_boxes:
        raise ValueError("grounding_reward needs at least one ground-truth box")
    if pred is None:
        return dict.fromkeys(GROUNDING_KEYS, 0.0)
    covered = coverage(pred, gt_boxes[0])
    r_iou = max(iou(pred, box) for box in gt_boxes) if covered > coverage_threshold else 0.0
    r_l1 = 1.0 - min(l1_distance(pred, box, size) for box in gt_boxes)
    r_geo = iou_weight * r_iou + (1.0 - iou_weight) * r_l1
    return {"coverage": covered, "r_iou": r_iou, "r_l1": r_l1, "r_geo": r_geo}


def score_crops(crops: list[list[float]], gt_boxes: list[list[float]], size: tuple[float, float],
                iou_weight: float, coverage_threshold: float, which: str) -> dict[str, float]:
    """
    The `grounding_reward` of one crop of a rollout. crops are its valid crops in ORIGINAL pixels, in the order
    they were made; which = "last" scores the last one (the latest view the model asked for), "best" the one with
    the highest r_geo. No crops scores 0 on every key.

    Example with the boxes of `grounding_reward` and iou_weight 0.5, crops [[25, 25, 75, 75], [0, 0, 200, 100]]:
        "best" is the first crop, r_geo 0.828 as there;
        "last" is the whole image: it covers B1, r_iou = IoU with B2 = 3600/20000 = 0.18,
        L1 to B2 = (20/200 + 20/100 + 120/200 + 20/100) / 4 = 0.275, r_l1 = 0.725, r_geo = 0.09 + 0.3625 = 0.4525.
    """
    if which not in ("last", "best"):
        raise ValueError(f"which must be 'last' or 'best', got {which!r}")
    score = partial(grounding_reward, gt_boxes=gt_boxes, size=size, iou_weight=iou_weight,
                    coverage_threshold=coverage_threshold)
    if not crops:
        return score(None)
    if which == "last":
        return score(crops[-1])
    return max(map(score, crops), key=lambda scores: scores["r_geo"])
