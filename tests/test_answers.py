"""answers.py: reading the answer out of model text (\\boxed{}, <answer>) and matching it against the right one."""

import pytest

from answers import (
    answer_matches,
    extract_answer_tag,
    extract_boxed,
    extract_choice,
    normalize_answer,
    option_letters,
)
from rewards import accuracy_reward

OPTIONS = ["red", "blue", "green", "a yellow car"]


# -----------------------------------------------------------------------------
# extract_boxed

@pytest.mark.parametrize("text, expected", [
    (r"\boxed{B}", "B"),
    (r"first \boxed{A} then \boxed{C}", "C"),                  # the last one wins
    (r"\boxed{\text{B}}", r"\text{B}"),                        # nested braces
    (r"\boxed{\frac{1}{2}} end", r"\frac{1}{2}"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),                         # escaped braces do not count
    (r"\boxed{}", ""),
    (r"\boxed{A} and then \boxed{B", None),                     # last one unclosed
    (r"\boxed{\text{B}", None),
    ("no answer here", None),
    ("", None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


# -----------------------------------------------------------------------------
# letters, normalisation, choices

def test_option_letters():
    assert option_letters([]) == []
    assert option_letters(OPTIONS) == ["A", "B", "C", "D"]


@pytest.mark.parametrize("text, expected", [
    ("The Red car.", "red car"),
    (r"\text{An}  Apple!", "apple"),
    (r"\textbf{\text{B}}", "b"),
    ("  Théâtre  ", "théâtre"),
    ("{$The Red car$}", "red car"),
    ("A yellow car", "yellow car"),     # an article: a space follows it
    ("A. blue", "a blue"),              # a letter closed by punctuation is never taken for the article "a"
    ("(A) blue", "a blue"),
    ("A: blue", "a blue"),
    ("A, blue", "a blue"),
    ("the.", "the"),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize("pred", ["B", "b", "(B)", "[B]", "B.", "B)", "B:", "B) blue", "(B) blue", "B. blue",
                                  "[B] blue", r"\text{B}", r"\textbf{(B)}", " B \n", "blue", "Blue.", r"\text{blue}",
                                  "{B}", "{{B}}", r"\{B\}", "$B$", r"\text{\{B\}}", r"{\text{(B) blue}}"])
def test_extract_choice_spellings(pred):
    assert extract_choice(pred, OPTIONS) == "B"


@pytest.mark.parametrize("pred, expected", [
    ("A yellow car", "D"),      # option text starting with "A" is text, not option A
    ("yellow car", "D"),
    ("E", None),                # letter outside the options
    ("(F) purple", None),
    ("(E) red", None),          # a letter that names no option is read as text: "e red" is none
    ("purple", None),
    ("BB", None),
    ("(B", None),               # unbalanced
    ("B.blue", None),           # a letter with text needs a space after its delimiter
    ("C blue", None),           # no delimiter: the text "c blue"
    ("A blue", "B"),            # no delimiter: the article "a" and the text "blue"
    ("A, blue", None),          # "," is no delimiter, and "A" followed by "," is no article
    ("C, blue", None),
    ("", None),
])
def test_extract_choice_other(pred, expected):
    assert extract_choice(pred, OPTIONS) == expected


def test_extract_choice_without_options():
    assert extract_choice("B", None) is None
    assert extract_choice("B", []) is None


def test_extract_choice_ambiguous_text():
    assert extract_choice("red", ["red", "Red.", "blue"]) is None
    assert extract_choice("C", ["red", "Red.", "blue"]) == "C"


def test_a_letter_naming_no_option_is_read_as_text():
    assert extract_choice("K", ["K", "X", "Q"]) == "A"
    assert extract_choice("J. K. Rowling", ["Tolkien", "J. K. Rowling"]) == "B"
    assert extract_choice("B. Obama", ["B. Obama", "Lincoln"]) == "B"  # B is an option letter: the letter wins


LETTER_TEXT_FORMS = ["{L}. {T}", "({L}) {T}", "{L}) {T}", "{L}: {T}", "[{L}] {T}", "{l}. {T}", "({l}) {T}"]


@pytest.mark.parametrize("form", LETTER_TEXT_FORMS)
@pytest.mark.parametrize("letter", "ABCD")
def test_letter_with_text_is_the_letter_for_every_letter_and_text(letter, form):
    # The rule of answers.py: an explicit leading letter decides, whatever option text follows it (the text of
    # option A, B, C or D, "a yellow car" included). Before, "A. blue" and "(A) blue" were read as B.
    for text in OPTIONS:
        pred = form.format(L=letter, l=letter.lower(), T=text)
        assert extract_choice(pred, OPTIONS) == letter, pred
        assert accuracy_reward(rf"\boxed{{{pred}}}", "B", OPTIONS) == float(letter == "B"), pred
        assert accuracy_reward(rf"\boxed{{{pred}}}", "blue", OPTIONS) == float(letter == "B"), pred


# -----------------------------------------------------------------------------
# answer_matches (the core of accuracy_reward, shared with LFPC)

def test_answer_matches():
    assert answer_matches("(B) blue", "B", OPTIONS)
    assert answer_matches("blue", "B", OPTIONS)
    assert not answer_matches("E", "E", OPTIONS)
    assert answer_matches("1,000", "1000.0", None)
    assert not answer_matches(None, "B", OPTIONS)
    assert not answer_matches(None, "", None)


# -----------------------------------------------------------------------------
# LFPC: extract_answer_tag

@pytest.mark.parametrize("text, expected", [
    ("<answer>B</answer>", "B"),
    ("<think>hmm</think>\n<answer> (B) blue \n</answer>", " (B) blue \n"),  # content as written
    ("<answer>A</answer> no wait <answer>C</answer>", "C"),              # the last one wins
    ("<answer>A</answer> no wait <answer>C", "A"),                       # ... if it is closed
    ("<answer>A <answer>C</answer>", "C"),                               # the innermost pair
    ("<answer>A</answer> trailing </answer>", "A"),
    ("<answer>multi\nline</answer>", "multi\nline"),
    ("<answer></answer>", ""),
    ("</answer>B<answer>", None),
    ("<answer>B", None),
    ("B</answer>", None),
    ("<Answer>B</Answer>", None),                                        # tags are case-sensitive
    (r"\boxed{B}", None),
    ("", None),
])
def test_extract_answer_tag(text, expected):
    assert extract_answer_tag(text) == expected
