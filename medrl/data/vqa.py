"""MedMNIST as multiple-choice VQA: options, letters, seeded shuffling and the prompt format.

The prompt follows the authors' evaluation: the question, a blank line, ``Options:``, one ``A. <option>``
line each, then an instruction to think inside ``<think> </think>`` and put only the letter inside
``<answer> </answer>``. Option choice and order are deterministic functions of (seed, item index), so a
rerun builds the same questions, and the gold letter is balanced across the split by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medrl.core.errors import ConfigError
from medrl.core.prompts import INSTRUCTION, LETTERS, TEXT_INSTRUCTION, chat_messages, format_prompt, instruction_for

# The prompt format lives in core.
__all__ = ["INSTRUCTION", "LETTERS", "TEXT_INSTRUCTION", "chat_messages", "format_prompt", "instruction_for"]

# The label a multi-label item with no positive finding gets (ChestMNIST); 'ours', the paper is silent.
NO_FINDING = "no finding"

# One question per modality (ours: the paper does not publish its MedMNIST question wording).
QUESTIONS: dict[str, str] = {
    "pathmnist": "Which tissue type is shown in this colorectal histology patch?",
    "chestmnist": "Which finding is present in this chest X-ray?",
    "dermamnist": "What is the diagnosis of the skin lesion in this dermatoscopic image?",
    "octmnist": "What does this retinal OCT scan show?",
    "pneumoniamnist": "What does this paediatric chest X-ray show?",
    "retinamnist": "What is the diabetic retinopathy grade (0 = none, 4 = proliferative) of this fundus image?",
    "breastmnist": "What does this breast ultrasound image show?",
    "bloodmnist": "Which blood cell type is shown in this microscopy image?",
    "tissuemnist": "Which kidney cortex cell type is shown in this microscopy image?",
    "organamnist": "Which organ is shown in this axial abdominal CT slice?",
    "organcmnist": "Which organ is shown in this coronal abdominal CT slice?",
    "organsmnist": "Which organ is shown in this sagittal abdominal CT slice?",
}

# Readable option texts where the official label names are codes (ours).
CLASS_NAME_OVERRIDES: dict[str, dict[int, str]] = {
    "retinamnist": {i: f"grade {i}" for i in range(5)},
}


@dataclass(frozen=True)
class MCQ:
    """One multiple-choice question: ``options`` maps letters to texts; ``answer`` is the gold letter."""

    question: str
    options: dict[str, str]
    answer: str

    @property
    def letters(self) -> str:
        """The option letters, e.g. ``"ABCD"``."""
        return "".join(self.options)


def gold_positions(n_items: int, n_options: int, seed: int) -> np.ndarray:
    """Where the gold option goes for each item: a seeded permutation so every letter is gold equally often.

    >>> np.bincount(gold_positions(100, 4, seed=0), minlength=4).tolist()
    [25, 25, 25, 25]
    """
    return np.random.default_rng(seed).permutation(n_items) % n_options


def build_mcq(
    question: str,
    class_names: list[str],
    gold: int,
    gold_position: int,
    num_options: int | None,
    seed: int,
    index: int,
) -> MCQ:
    """Build the question for one item.

    ``num_options`` None (or >= the number of classes) offers every class; otherwise the gold class plus
    ``num_options - 1`` distractors drawn with ``(seed, index)``. Distractor order is shuffled with the same
    generator and the gold goes to ``gold_position``.
    """
    k = len(class_names) if num_options is None else min(num_options, len(class_names))
    if k < 2:
        raise ConfigError(f"a multiple-choice question needs at least 2 options, got {k}")
    rng = np.random.default_rng([seed, index])
    others = [c for c in range(len(class_names)) if c != gold]
    distractors = list(rng.choice(others, size=k - 1, replace=False)) if k - 1 < len(others) else others
    rng.shuffle(distractors)
    order = distractors[:]
    order.insert(gold_position % k, gold)
    options = {LETTERS[i]: class_names[c] for i, c in enumerate(order)}
    return MCQ(question=question, options=options, answer=LETTERS[gold_position % k])


def class_names(flag: str, label_map: dict[str, str]) -> list[str]:
    """Option texts for a flag, in label order (with the readable overrides applied)."""
    overrides = CLASS_NAME_OVERRIDES.get(flag, {})
    return [overrides.get(int(i), name) for i, name in sorted(label_map.items(), key=lambda kv: int(kv[0]))]


def readable_text(prompt: str, system: str | None = None) -> str:
    """All the text a model reads for one question (the system message, then the prompt): what the prompt
    budget counts, the chat template's own tokens aside.

    >>> readable_text("Q?", "Be brief.")
    'Be brief.\\nQ?'
    """
    return f"{system}\n{prompt}" if system else prompt
