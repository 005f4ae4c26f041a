"""The generation interface every rollout engine implements, and the types it speaks.

An engine takes a batch of VQA items (an image and chat messages, as ``MedMNISTDataModule(mode="vqa")``
yields them) and returns, for each prompt, ``n`` sampled completions and optionally one greedy completion.
Two engines implement it: :class:`medrl.rollout.hf.HFEngine` (transformers ``generate`` on the policy in
memory) and :class:`medrl.rollout.vllm.VLLMEngine` (vLLM's offline ``LLM``, colocated, weights pushed in
place). Callers (the Pass@K callback, the GRPO module, the evaluation verb) only see this module.

Conventions shared by both engines, so their outputs are interchangeable:

- ``token_ids`` are the generated tokens only (no prompt), and include the end-of-turn token when the
  completion stopped on it (``finish_reason == "stop"``), so a policy-gradient loss can teach stopping.
- ``text`` is ``token_ids`` decoded without special tokens; a stop string, when one ended the completion,
  is kept in the text (``</answer>`` as a stop must still parse as an answer).
- ``logprobs[t]`` is ``log p(token_ids[t] | prompt, token_ids[:t])`` under the model's unmodified
  distribution (temperature 1, no top-k/top-p, no token bans): the quantity GRPO's ratio needs, and what
  vLLM reports by default (``logprobs_mode="raw_logprobs"``).
- The vision placeholder tokens (:data:`medrl.models.tiny.VISION_PLACEHOLDERS`) are never generated.
- A fixed ``seed`` makes a call repeatable: the same items, parameters and weights give the same samples.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol, runtime_checkable

import torch

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
            raise ValueError(f"n must be >= 0, got {self.n}")
        if self.n == 0 and not self.greedy:
            raise ValueError("n=0 and greedy=False asks for nothing: set n >= 1 or greedy=True")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (set greedy=True for argmax decoding), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
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


def pad_completions(
    completions: Sequence[Completion], pad_id: int, max_len: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Right-pad completions into tensors for a loss.

    Returns:
        ``(ids [N, T] long, mask [N, T] bool, logprobs [N, T] float32 or None)`` where ``N`` is
        ``len(completions)`` and ``T`` the longest completion (or ``max_len``); padding has mask False and
        log-prob 0. Log-probs are returned only when every completion carries them.
    """
    if not completions:
        raise ValueError("no completions to pad")
    width = max_len if max_len is not None else max(max(len(c) for c in completions), 1)
    ids = torch.full((len(completions), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(completions), width), dtype=torch.bool)
    has_lp = all(c.logprobs is not None for c in completions)
    logprobs = torch.zeros((len(completions), width), dtype=torch.float32) if has_lp else None
    for row, c in enumerate(completions):
        length = min(len(c), width)
        ids[row, :length] = torch.tensor(c.token_ids[:length], dtype=torch.long)
        mask[row, :length] = True
        if logprobs is not None:
            logprobs[row, :length] = torch.tensor(c.logprobs[:length], dtype=torch.float32)  # type: ignore[index]
    return ids, mask, logprobs


@runtime_checkable
class PolicyModule(Protocol):
    """What a LightningModule exposes so engines and the Pass@K callback can use its policy.

    ``model`` is a transformers VLM (possibly a PEFT model wrapping one) and ``processor`` its processor.
    """

    model: torch.nn.Module
    processor: Any


# A VQA item: at least "messages" (chat with one image placeholder) and "image" (PIL, or None for text only).
Item = Mapping[str, Any]


class Engine(abc.ABC):
    """A rollout engine: prompts in, completions out; weights can be refreshed from the training policy."""

    name: str = "engine"

    @abc.abstractmethod
    def generate(self, items: Sequence[Item], params: SamplingParams) -> list[PromptResult]:
        """Sample ``params.n`` completions (plus a greedy one if asked) for each item.

        Args:
            items: ``[B]`` VQA items; each needs ``"messages"`` and ``"image"``.
            params: sampling parameters for the whole call.

        Returns:
            ``[B]`` results, in the order of ``items``.
        """

    @abc.abstractmethod
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the engine's weights in place with ``(name, tensor)`` pairs named as in the HF model.

        Names follow ``model.state_dict()`` of the transformers model (PEFT prefixes removed); pass the full
        set, as :func:`medrl.rollout.weights.policy_weights` yields it (vLLM reprocesses layer by layer).
        """

    def sync(self, policy: torch.nn.Module) -> None:
        """Make the engine generate with ``policy``'s current weights (call after each optimizer step).

        Full models send every weight; PEFT LoRA models send their merged weights (base + scaled B A)
        without changing the policy. Engines that share the policy's memory override this with a no-op.
        """
        from medrl.rollout.weights import policy_weights

        self.load_weights(policy_weights(policy))

    def close(self) -> None:  # noqa: B027 - optional hook: only engines holding processes need it
        """Free what the engine holds (processes, caches); the engine is unusable afterwards."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def prompt_texts(processor: Any, items: Sequence[Item]) -> list[str]:
    """The chat-templated prompt of each item, ending with the assistant turn's opening."""
    texts = []
    for i, item in enumerate(items):
        if "messages" not in item:
            raise KeyError(f"item {i} has no 'messages' (keys: {sorted(item)}); build items with mode='vqa'")
        texts.append(processor.apply_chat_template(item["messages"], add_generation_prompt=True, tokenize=False))
    return texts


def make_engine(kind: Literal["hf", "vllm"], model: Any, processor: Any = None, **kwargs: Any) -> Engine:
    """Build an engine by name: ``hf`` wraps an in-memory model; ``vllm`` starts vLLM on ``model``'s weights.

    Args:
        kind: ``hf`` or ``vllm``.
        model: for ``hf`` the transformers model; for ``vllm`` a model argument (``tiny``, folder, hub id)
            or the in-memory policy whose config and weights vLLM should start from.
        processor: the model's processor (required for ``hf``).
        kwargs: engine-specific options.
    """
    if kind == "hf":
        from medrl.rollout.hf import HFEngine

        return HFEngine(model, processor, **kwargs)
    if kind == "vllm":
        from medrl.rollout.vllm import VLLMEngine

        return VLLMEngine(model, processor=processor, **kwargs)
    raise ValueError(f"unknown engine {kind!r}: use 'hf' or 'vllm'")


def end_token_ids(tokenizer: Any, extra: Iterable[int] = ()) -> list[int]:
    """Token ids that end a completion: the chat end token, the tokenizer's EOS and pad, plus ``extra``.

    Qwen models end a turn with ``<|im_end|>`` and may emit ``<|endoftext|>``; both stop generation.
    """
    ids: list[int] = []
    for token in ("<|im_end|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != getattr(tokenizer, "unk_token_id", None):
            ids.append(tid)
    for tid in (tokenizer.eos_token_id, *extra):
        if isinstance(tid, int):
            ids.append(tid)
    return list(dict.fromkeys(ids))


def banned_token_ids(tokenizer: Any) -> list[int]:
    """Ids of the vision placeholder tokens, which no engine may generate."""
    from medrl.models.tiny import VISION_PLACEHOLDERS

    unk = getattr(tokenizer, "unk_token_id", None)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in VISION_PLACEHOLDERS]
    return [i for i in ids if isinstance(i, int) and i != unk]


def finish_completion(
    tokenizer: Any,
    token_ids: Sequence[int],
    end_ids: Sequence[int],
    stop: Sequence[str] = (),
    logprobs: Sequence[float] | None = None,
) -> Completion:
    """Cut raw generated tokens where the completion ended and decode them, the same way for every engine.

    The completion ends after the first end token (kept, ``"stop"``), or after the first token whose
    prefix decodes to text containing a stop string (``"stop"``; the text is cut right after the stop
    string), else it ran to the length limit (``"length"``). Anything after the end (HF pads finished
    rows) is dropped.

    Args:
        tokenizer: the model's tokenizer.
        token_ids: ``[T_raw]`` generated ids, possibly padded after the end.
        end_ids: ids that end a completion.
        stop: stop strings.
        logprobs: ``[T_raw]`` log-probs aligned with ``token_ids`` or None.
    """
    ids = [int(t) for t in token_ids]
    ends = set(end_ids)
    end = next((i for i, t in enumerate(ids) if t in ends), None)
    body_len = len(ids) if end is None else end
    reason: FinishReason = "length" if end is None else "stop"
    cut = None if end is None else end + 1
    text_limit: int | None = None
    if stop:
        body_text = tokenizer.decode(ids[:body_len], skip_special_tokens=True)
        hits = [(body_text.find(s), s) for s in stop if s and s in body_text]
        if hits:
            # The shortest prefix containing a stop string: monotone in the prefix length, so bisect.
            lo, hi = 1, body_len
            while lo < hi:
                mid = (lo + hi) // 2
                prefix = tokenizer.decode(ids[:mid], skip_special_tokens=True)
                if any(s in prefix for _, s in hits):
                    hi = mid
                else:
                    lo = mid + 1
            cut, reason = lo, "stop"
            prefix = tokenizer.decode(ids[:cut], skip_special_tokens=True)
            text_limit = min(prefix.find(s) + len(s) for _, s in hits if s in prefix)
    ids = ids[:cut] if cut is not None else ids
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if text_limit is not None:
        text = text[:text_limit]
    lps = None if logprobs is None else [float(x) for x in list(logprobs)[: len(ids)]]
    return Completion(text=text, token_ids=ids, logprobs=lps, finish_reason=reason)
