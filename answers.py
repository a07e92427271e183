"""
Reading the answer out of model text: the last `\\boxed{}` or `<answer>`, option letters, and whether a prediction
is the right answer (`answer_matches`). Models write anything, so every function here takes any string and never
raises: a malformed answer is None or no match, not a crashed training step.

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
# is the prediction the answer

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


# -----------------------------------------------------------------------------
# LFPC: the answer inside <answer> tags

# An <answer> pair with no answer tag inside, so "<answer>A <answer>B</answer>" holds "B", not "A <answer>B".
_ANSWER_TAG = re.compile(r"<answer>((?:(?!</?answer>).)*)</answer>", re.DOTALL)


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
