"""Answer parsing: the fallback chain and the known ways a model can cheat a letter match."""

from __future__ import annotations

import pytest

from medrl.metrics.answers import UNPARSEABLE, parse_answer


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
