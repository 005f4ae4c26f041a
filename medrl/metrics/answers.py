"""Answer parsing for multiple-choice completions.

The fallback chain of the authors' evaluation, in order: a closed ``<answer>X</answer>`` block (the last
one counts); an unclosed ``<answer>``; ``answer: X`` or ``final: X``; the first standalone capital letter
that is one of the options. When a completion contains an ``<answer>`` tag at all, only the tag decides:
an empty or ambiguous block is a format failure and never falls through to a letter found elsewhere (a
model could otherwise be rewarded for scattering letters in its reasoning).

Given the question's options, a block holding exactly one option's text (case and surrounding spaces aside)
names that option: the answer of a question asked with ``answer_with: text``. The text is compared before the
letter, so an option such as "a lesion" is not read as the letter A.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

UNPARSEABLE = "unparseable"

_CLOSED = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_OPEN = re.compile(r"<answer>(.*)\Z", re.DOTALL | re.IGNORECASE)
_LABELLED = re.compile(r"\b(?:final answer|answer|final)\s*(?:is)?\s*[:=]?\s*\(?([A-Za-z])\)?(?![A-Za-z])", re.I)
_STANDALONE = re.compile(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])")
# Inside an answer block: a single letter, optionally as "(A)", "A.", "A)", "A: text" or "A. text".
_BLOCK_LETTER = re.compile(r"^\s*\(?([A-Za-z])\s*(?:\)|\.|:|\s|$)(?P<rest>.*)$", re.DOTALL)


def _letter_of_block(block: str, letters: str) -> str:
    """The letter a single answer block names, or UNPARSEABLE for empty or several letters."""
    match = _BLOCK_LETTER.match(block)
    if not match:
        return UNPARSEABLE
    letter, rest = match.group(1).upper(), match.group("rest").strip()
    # "A, B" or "A or C": several options claimed at once is not an answer.
    if rest and re.fullmatch(r"(?:[,/&;]|\b(?:and|or)\b|\s)*\(?[A-Za-z]\)?(?:[\s,/&;]+\(?[A-Za-z]\)?)*\.?", rest):
        return UNPARSEABLE
    return letter


def _normal(text: str) -> str:
    return " ".join(text.split()).strip().rstrip(".").strip().lower()


def _read_block(block: str, letters: str, options: Mapping[str, str] | None) -> str:
    """The letter one answer block names: an option's exact text first (when options are given), then a letter."""
    if options:
        wanted = _normal(block)
        named = [letter for letter, option in options.items() if _normal(option) == wanted]
        if len(named) == 1:
            return named[0].upper()
    return _letter_of_block(block, letters)


def text_options(item: Mapping[str, object]) -> Mapping[str, str] | None:
    """The options an item's answers may name by text: its ``options`` when it was asked with
    ``answer_with: text``, else None (letter questions are read by letter only, as the authors' evaluation
    reads them).

    >>> text_options({"options": {"A": "x"}, "answer_with": "text"})
    {'A': 'x'}
    >>> text_options({"options": {"A": "x"}}) is None
    True
    """
    options = item.get("options")
    return options if item.get("answer_with") == "text" and isinstance(options, Mapping) else None


def parse_answer(text: str, letters: str = "ABCD", options: Mapping[str, str] | None = None) -> str:
    """The option letter a completion gives, or ``UNPARSEABLE``.

    ``options`` (letter to text) lets an answer block name its option by text as well as by letter.

    A letter outside ``letters`` found in an answer block is returned as is (it then scores as wrong);
    the last-resort standalone-letter search only looks for letters among ``letters``.

    >>> parse_answer("<think>dense nuclei</think> <answer>D</answer>")
    'D'
    >>> parse_answer("<answer>B</answer> then <answer>(c)</answer>")
    'C'
    >>> parse_answer("<answer></answer> the answer is A")
    'unparseable'
    >>> parse_answer("<answer>A, B</answer>")
    'unparseable'
    >>> parse_answer("Final: b")
    'B'
    >>> parse_answer("I think it is C here", "ABCD")
    'C'
    >>> parse_answer("<answer> Neutrophil </answer>", "AB", {"A": "monocyte", "B": "neutrophil"})
    'B'
    >>> parse_answer("<answer>a lesion</answer>", "AB", {"A": "normal", "B": "a lesion"})
    'B'
    """
    blocks = _CLOSED.findall(text)
    if blocks:
        return _read_block(blocks[-1], letters, options)
    unclosed = _OPEN.search(text)
    if unclosed:
        return _read_block(unclosed.group(1), letters, options)
    labelled = _LABELLED.findall(text)
    if labelled:
        return labelled[-1].upper()
    for candidate in _STANDALONE.findall(text):
        if candidate in letters:
            return candidate
    return UNPARSEABLE
