"""Answer parsing: the fallback chain and the known ways a model can cheat a letter match."""

from __future__ import annotations

import pytest

from medrl.metrics.answers import UNPARSEABLE, parse_answer, text_options


def is_correct(text: str, gold: str, letters: str = "ABCD") -> bool:
    """What the accuracy reward and Pass@K count as correct: the parsed letter is the gold one, any case."""
    return parse_answer(text, letters) == gold.upper()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>x</think><answer>B</answer>", "B"),
        ("<answer> c </answer>", "C"),  # lower case and spaces are normalised
        ("<answer>(A)</answer>", "A"),
        ("<answer>A.</answer>", "A"),
        ("<answer>D. lymphocytes</answer>", "D"),
        ("<answer>A</answer> wait <answer>B</answer>", "B"),  # the last block counts
        ("<think>so</think><answer>C", "C"),  # unclosed block
        ("The answer: b", "B"),
        ("Final: D", "D"),
        ("I would pick B because", "B"),  # first standalone option letter; 'I' is not an option
        ("<ANSWER>A</ANSWER>", "A"),
    ],
)
def test_parses(text: str, expected: str) -> None:
    assert parse_answer(text, "ABCD") == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "<answer></answer>",  # empty block
        "<answer>   </answer> but A is right",  # empty block never falls back to letters elsewhere
        "<answer>A, B</answer>",  # several letters at once
        "<answer>A or C</answer>",
        "<answer>B/D</answer>",
        "<answer>pneumonia</answer>",  # a word, not a letter
        "no letters here at all",
    ],
)
def test_cheats_and_failures_are_unparseable(text: str) -> None:
    assert parse_answer(text, "ABCD") == UNPARSEABLE


def test_letter_outside_options_is_returned_and_scores_wrong() -> None:
    assert parse_answer("<answer>E</answer>", "ABCD") == "E"
    assert not is_correct("<answer>E</answer>", "A", "ABCD")
    # The last-resort search ignores letters that are not options.
    assert parse_answer("X marks Z", "AB") == UNPARSEABLE


def test_is_correct_is_case_insensitive_on_gold() -> None:
    assert is_correct("<answer>b</answer>", "b")


def test_an_option_named_by_its_text_counts_only_when_the_question_asked_for_text() -> None:
    options = {"A": "basophil", "B": "a lesion", "C": "immature granulocytes(myelocytes, metamyelocytes)"}
    asked = text_options({"options": options, "answer_with": "text"})
    assert parse_answer("<think>x</think><answer> Basophil. </answer>", "ABC", asked) == "A"
    assert parse_answer("<answer>a lesion</answer>", "ABC", asked) == "B"  # the text, not the letter "a"
    assert parse_answer(f"<answer>{options['C']}</answer>", "ABC", asked) == "C"
    assert parse_answer("<answer>C</answer>", "ABC", asked) == "C"  # a letter is still a letter
    assert parse_answer("<answer>monocyte</answer>", "ABC", asked) == UNPARSEABLE  # not an option
    assert parse_answer("<answer>basophil a lesion</answer>", "ABC", asked) == UNPARSEABLE
    # Letter questions are read as the authors' evaluation reads them: by letter only.
    assert text_options({"options": options, "answer_with": "letter"}) is None
    assert parse_answer("<answer>basophil</answer>", "ABC", text_options({"options": options})) == UNPARSEABLE


def test_two_options_with_the_same_text_are_not_guessed_between() -> None:
    assert parse_answer("<answer>duct</answer>", "AB", {"A": "duct", "B": "Duct"}) == UNPARSEABLE
