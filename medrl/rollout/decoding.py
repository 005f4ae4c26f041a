"""Decoding helpers both engines share, so their completions end and read the same way."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from medrl.models.families import turn_end_tokens, vision_placeholders
from medrl.rollout.types import Completion, FinishReason, Item


def prompt_texts(processor: Any, items: Sequence[Item]) -> list[str]:
    """The chat-templated prompt of each item, ending with the assistant turn's opening."""
    texts = []
    for i, item in enumerate(items):
        if "messages" not in item:
            raise KeyError(f"item {i} has no 'messages' (keys: {sorted(item)}); build items with mode='vqa'")
        texts.append(processor.apply_chat_template(item["messages"], add_generation_prompt=True, tokenize=False))
    return texts


def end_token_ids(tokenizer: Any, extra: Iterable[int] = ()) -> list[int]:
    """Token ids that end a completion: the chat end token, the tokenizer's EOS and pad, plus ``extra``.

    Each family's end-of-turn tokens (:func:`medrl.models.families.turn_end_tokens`: ``<|im_end|>``
    and ``<|endoftext|>``, Idefics3's ``<end_of_utterance>``, Gemma 3's ``<end_of_turn>``) stop generation
    where the tokenizer has them.
    """
    ids: list[int] = [*_known_ids(tokenizer, turn_end_tokens())]
    for tid in (tokenizer.eos_token_id, *extra):
        if isinstance(tid, int):
            ids.append(tid)
    return list(dict.fromkeys(ids))


def banned_token_ids(tokenizer: Any) -> list[int]:
    """Ids of the vision placeholder tokens (every family's that the tokenizer has), which no engine may
    generate."""
    return _known_ids(tokenizer, vision_placeholders())


def _known_ids(tokenizer: Any, tokens: Sequence[str]) -> list[int]:
    """The ids of those ``tokens`` the tokenizer has as whole tokens (not its unknown token)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    ids = (tokenizer.convert_tokens_to_ids(t) for t in tokens)  # one lookup each: no copy of a 150k vocabulary
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
