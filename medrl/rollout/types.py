"""The types every rollout engine speaks: sampling parameters, completions, per-prompt results, items.

See :mod:`medrl.rollout.engine` for the conventions both engines follow (what ``token_ids``, ``text`` and
``logprobs`` hold), so their outputs are interchangeable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from medrl.core.errors import ConfigError
from medrl.core.prompts import PASS_AT_K_TEMPERATURE, PASS_AT_K_TOP_P

__all__ = ["PASS_AT_K_TEMPERATURE", "PASS_AT_K_TOP_P"]  # re-exported: the study's Pass@K sampling

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample completions; one set for a whole ``generate`` call.

    Args:
        n: sampled completions per prompt (0 for greedy-only calls).
        temperature: softmax temperature of the sampled completions (> 0; use ``greedy`` for argmax).
        top_p: nucleus sampling mass (1.0 disables it).
        top_k: keep only the ``top_k`` most likely tokens (0 disables it).
        max_new_tokens: most tokens generated per completion, end token included.
        stop: strings that end a completion (kept in its text); the chat end token always stops.
        seed: makes the call repeatable; None draws fresh randomness.
        logprobs: also return per-token log-probabilities of the generated tokens.
        greedy: also return one greedy (argmax) completion per prompt, for Acc@1.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = 0
    logprobs: bool = False
    greedy: bool = False

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ConfigError(f"n must be >= 0, got {self.n}")
        if self.n == 0 and not self.greedy:
            raise ConfigError("n=0 and greedy=False asks for nothing: set n >= 1 or greedy=True")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0 (set greedy=True for argmax decoding), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if isinstance(self.stop, str):  # a bare string would be split into characters
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))

    def with_(self, **changes: Any) -> SamplingParams:
        """A copy with some fields changed, e.g. ``params.with_(n=8, seed=step)``."""
        return replace(self, **changes)


@dataclass
class Completion:
    """One generated completion of one prompt.

    Attributes:
        text: the decoded completion, special tokens removed.
        token_ids: generated token ids, ``[T]``; the end token is included when it ended the completion.
        logprobs: ``[T]`` log-probability of each generated token (see module docstring), or None when
            not asked for.
        finish_reason: ``"stop"`` (end token or stop string) or ``"length"`` (hit ``max_new_tokens``).
    """

    text: str
    token_ids: list[int]
    logprobs: list[float] | None = None
    finish_reason: FinishReason = "length"

    def __len__(self) -> int:
        return len(self.token_ids)


@dataclass
class PromptResult:
    """Everything generated for one prompt.

    Attributes:
        prompt: the chat-templated prompt text the model saw (image placeholder not yet expanded).
        samples: ``[n]`` sampled completions, in a fixed order for a fixed seed.
        greedy: the greedy completion when ``SamplingParams.greedy`` was set, else None.
    """

    prompt: str
    samples: list[Completion] = field(default_factory=list)
    greedy: Completion | None = None

    @property
    def texts(self) -> list[str]:
        """``[n]`` texts of the sampled completions."""
        return [c.text for c in self.samples]


@runtime_checkable
class PolicyModule(Protocol):
    """What a LightningModule exposes so engines and the Pass@K callback can use its policy.

    ``model`` is a transformers VLM (possibly a PEFT model wrapping one) and ``processor`` its processor.
    A module that runs an engine of its own (GRPO) may also offer it as ``rollout_engine() -> Engine``, so the
    Pass@K callback samples with it instead of starting a second one.
    """

    model: torch.nn.Module
    processor: Any


# A VQA item: at least "messages" (chat with one image placeholder) and "image" (PIL, or None for text only).
Item = Mapping[str, Any]
