"""A model's :class:`~medrl.core.budget.PromptBudget`: its context length, tokenizer and image tokens."""

from __future__ import annotations

from typing import Any

from medrl.core.budget import PromptBudget
from medrl.core.errors import ConfigError

UNBOUNDED_SIDE = 16384  # pixels: far above any processor's resolution cap


def context_length(config: Any) -> int | None:
    """The longest sequence the model's positions cover (the text model's ``max_position_embeddings``)."""
    text = getattr(config, "text_config", None) or config
    value = getattr(text, "max_position_embeddings", None) or getattr(config, "max_position_embeddings", None)
    return int(value) if value else None


def prompt_budget(
    processor: Any, config: Any, completion_tokens: int, max_prompt_length: int | None = None
) -> PromptBudget:
    """The prompt budget of a model: ``max_prompt_length``, or its context minus ``completion_tokens``.

    Text is counted with the tokenizer; images with the processor's own count for an image of that size
    (``_get_num_multimodal_tokens``, which transformers' VLM processors implement); the chat template's
    tokens around a one-image question are measured once.
    """
    if max_prompt_length is None:
        limit = context_length(config)
        if limit is None:
            raise ConfigError("the model's config names no context length: set max_prompt_length")
        max_prompt_length = limit - completion_tokens
    if max_prompt_length < 1:
        raise ConfigError(
            f"no room for a prompt: the budget is {max_prompt_length} tokens (context minus {completion_tokens} "
            "completion tokens); lower the completion length or raise max_prompt_length"
        )
    tokenizer = getattr(processor, "tokenizer", processor)

    def count_text(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def count_image(height: int, width: int) -> int:
        counter = getattr(processor, "_get_num_multimodal_tokens", None)
        if counter is None:
            return 0
        return int(counter(image_sizes=[(height, width)])["num_image_tokens"][0])

    empty = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ""}]}]
    template = processor.apply_chat_template(empty, add_generation_prompt=True, tokenize=False)
    # A processor with a resolution cap gives a huge image and a twice-huger one the same count: the most any
    # image can take. Without a cap (the counts differ) every image's size has to be read.
    largest = count_image(UNBOUNDED_SIDE, UNBOUNDED_SIDE)
    capped = largest == count_image(2 * UNBOUNDED_SIDE, 2 * UNBOUNDED_SIDE)
    return PromptBudget(max_prompt_length, count_text, count_image, count_text(template), largest if capped else None)


def model_prompt_budget(
    model: str, completion_tokens: int, max_prompt_length: int | None = None, image_options: dict | None = None
) -> PromptBudget:
    """:func:`prompt_budget` for a model argument (``tiny``, a folder, a hub id), reading only its processor
    and config (no weights)."""
    from transformers import AutoConfig

    from medrl.models.hub import load_processor, resolve_model

    path = resolve_model(model)
    processor = load_processor(path, image_options)
    return prompt_budget(processor, AutoConfig.from_pretrained(path), completion_tokens, max_prompt_length)
