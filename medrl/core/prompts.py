"""The prompt format every medrl question uses: options as ``A. text`` lines and the think/answer instruction.

Shared by the data layer (which builds the questions) and the models layer (which teaches ``tiny-instruct``
the answer format), so it sits below both.
"""

from __future__ import annotations

import string

from medrl.core.errors import ConfigError

LETTERS = string.ascii_uppercase
INSTRUCTION = (
    "Think step by step inside <think> </think> tags, then give ONLY the letter of the correct option "
    "inside <answer> </answer> tags."
)
# The instruction when a question is answered with the option's text (``answer_with: text``): the answer is
# then a direct function of the image, with no "find the option, read its letter" hop (see
# docs/reproducing.md for why the CPU plan asks for it).
TEXT_INSTRUCTION = (
    "Think step by step inside <think> </think> tags, then give ONLY the text of the correct option "
    "inside <answer> </answer> tags."
)
ANSWER_WITH = ("letter", "text")


def instruction_for(answer_with: str) -> str:
    """The default instruction for questions answered with the option's ``letter`` or its ``text``.

    >>> instruction_for("text") == TEXT_INSTRUCTION
    True
    """
    if answer_with not in ANSWER_WITH:
        raise ConfigError(f"answer_with must be one of {ANSWER_WITH}, got {answer_with!r}")
    return TEXT_INSTRUCTION if answer_with == "text" else INSTRUCTION


def format_prompt(question: str, options: dict[str, str], instruction: str = INSTRUCTION) -> str:
    """The user turn of the authors' format.

    >>> print(format_prompt("What is shown?", {"A": "normal", "B": "pneumonia"}, "Answer."))
    What is shown?
    <BLANKLINE>
    Options:
    A. normal
    B. pneumonia
    <BLANKLINE>
    Answer.
    """
    lines = [question, "", "Options:", *(f"{letter}. {text}" for letter, text in options.items())]
    return "\n".join([*lines, "", instruction]) if instruction else "\n".join(lines)


def chat_messages(prompt: str, system: str | None = None, images: int = 1) -> list[dict]:
    """Chat messages with ``images`` image placeholders, then the prompt text (the content format every
    family's chat template reads; each template writes its own image markers)."""
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    content = [*({"type": "image"} for _ in range(images)), {"type": "text", "text": prompt}]
    messages.append({"role": "user", "content": content})
    return messages


# The study's sampling for Pass@K (the authors' evaluation): temperature 0.7, nucleus 0.9. Every command and
# callback that samples for Pass@K defaults to these (here, below torch, so a command's --help needs no torch).
PASS_AT_K_TEMPERATURE = 0.7
PASS_AT_K_TOP_P = 0.9
