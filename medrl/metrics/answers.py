"""Answer parsing for multiple-choice completions.

The fallback chain of the authors' evaluation, in order: a closed ``<answer>X</answer>`` block (the last
one counts); an unclosed ``<answer>``; ``answer: X`` or ``final: X``; the first standalone capital letter
that is one of the options. When a completion contains an ``<answer>`` tag at all, only the tag decides:
an empty or ambiguous block is a format failure and never falls through to a letter found elsewhere (a
model could otherwise be rewarded for scattering letters in its reasoning).
"""

from __future__ import annotations

import re

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


def parse_answer(text: str, letters: str = "ABCD") -> str:
    """The option letter a completion gives, or ``UNPARSEABLE``.

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
    """
    blocks = _CLOSED.findall(text)
    if blocks:
        return _letter_of_block(blocks[-1], letters)
    unclosed = _OPEN.search(text)
    if unclosed:
        return _letter_of_block(unclosed.group(1), letters)
    labelled = _LABELLED.findall(text)
    if labelled:
        return labelled[-1].upper()
    for candidate in _STANDALONE.findall(text):
        if candidate in letters:
            return candidate
    return UNPARSEABLE
