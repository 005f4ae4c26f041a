"""The prompt budget: how many tokens (text and image) a model can take before its completion, and the
check every reader applies, so one very long row is dropped and reported instead of exhausting memory.

Neither data nor models know each other: a :class:`PromptBudget` carries the counting functions, built from the
model's processor by :func:`medrl.models.budget.prompt_budget`. Text is counted on a bounded prefix, so a
pathological 80,000-character question costs a prefix's tokenisation, never the whole.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

# Characters per token no real tokenizer exceeds on text: a prefix this many times the budget holds more
# tokens than the budget whenever the whole text does.
CHARS_PER_TOKEN_BOUND = 16


@dataclass(frozen=True)
class PromptBudget:
    """At most ``max_tokens`` prompt tokens: the chat template's own (``overhead``), the text's, the images'.

    Args:
        max_tokens: the limit (the model's context minus the completion budget, unless set).
        count_text: tokens of a piece of text (no special tokens).
        count_image: tokens of one image of ``(height, width)`` pixels.
        overhead: tokens the chat template adds around the text (system turn, role markers, image markers).
        max_image_tokens: the most tokens any one image can take (the processor resizes larger ones down), or
            None when unbounded; with it, a row that fits even at that size needs no image read.
    """

    max_tokens: int
    count_text: Callable[[str], int]
    count_image: Callable[[int, int], int]
    overhead: int = 0
    max_image_tokens: int | None = None

    def tokens(self, text: str, image_sizes: Sequence[tuple[int, int]] = ()) -> int:
        """The prompt's tokens, counted exactly while they can fit; once the text alone is known to be over
        the budget, the count of a prefix (already more than ``max_tokens``)."""
        cap = CHARS_PER_TOKEN_BOUND * (self.max_tokens + 1)
        counted = self.count_text(text[:cap])
        if len(text) > cap and counted <= self.max_tokens:  # a text of unusually long tokens: count it all
            counted = self.count_text(text)
        return self.overhead + counted + sum(self.count_image(h, w) for h, w in image_sizes)

    def problem_of_row(
        self, text: str, n_images: int, image_sizes: Callable[[], Sequence[tuple[int, int]]]
    ) -> tuple[str, str] | None:
        """:meth:`problem`, reading the images' sizes (``image_sizes()``) only when the text and the largest
        possible images do not already decide: the usual row costs one bounded text count and no image I/O."""
        if self.max_image_tokens is not None:
            text_tokens = self.tokens(text)
            if text_tokens + n_images * self.max_image_tokens <= self.max_tokens:
                return None
            if text_tokens > self.max_tokens:
                return self.problem(text)
        return self.problem(text, image_sizes())

    def problem(self, text: str, image_sizes: Sequence[tuple[int, int]] = ()) -> tuple[str, str] | None:
        """``("too_long", detail)`` for a validation report when the prompt is over the budget, else None."""
        used = self.tokens(text, image_sizes)
        if used <= self.max_tokens:
            return None
        return "too_long", (
            f"the prompt takes at least {used} tokens (text {len(text)} characters, {len(image_sizes)} image(s)), "
            f"over the budget of {self.max_tokens}"
        )
