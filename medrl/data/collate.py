"""Chat-formatted VQA items to padded model inputs, with a mask over the assistant's tokens.

Two layers. :func:`encode_chat` turns chat prompts (plus images, plus optional assistant completions as
text or token ids) into one left-padded batch and marks which tokens the assistant produced; generation
(prompts only) and policy-gradient training (prompts + sampled completions) both use it. :class:`SFTCollator`
adds the supervised targets: the completion is the gold answer in the ``<answer>X</answer>`` format, preceded
by a ``<think>`` trace when the item carries one, and only those tokens carry loss.

A completion is tokenized on its own and appended to the tokenized prompt (which ends with the chat
template's assistant header), exactly as a model sees its own generated tokens; tokenizing the joined text
could merge tokens across the boundary and shift the mask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100  # the label value PyTorch's cross-entropy (and transformers' losses) skip


@dataclass
class ChatBatch:
    """A padded batch of chat sequences.

    Attributes:
        inputs: keyword arguments for the model's forward: ``input_ids`` [B, L], ``attention_mask`` [B, L],
            per-token fields where the processor makes them (``token_type_ids``), and the processor's vision
            inputs when there are images (``pixel_values``, and a patch grid where the family packs patches).
        assistant_mask: bool [B, L], True on the tokens of each row's completion (its closing end-of-turn
            token included); all False when no completions were given.
        prompt_lengths: int64 [B], prompt tokens per row (padding excluded).
    """

    inputs: dict[str, torch.Tensor]
    assistant_mask: torch.Tensor
    prompt_lengths: torch.Tensor

    @property
    def labels(self) -> torch.Tensor:
        """``input_ids`` where the assistant spoke, ``IGNORE_INDEX`` elsewhere (prompt, image and padding)."""
        return self.inputs["input_ids"].masked_fill(~self.assistant_mask, IGNORE_INDEX)

    def to(self, device: torch.device | str) -> ChatBatch:
        """The same batch on ``device``."""
        return ChatBatch(
            {k: v.to(device) for k, v in self.inputs.items()}, self.assistant_mask.to(device), self.prompt_lengths
        )


def end_of_turn_id(tokenizer, template_owner=None) -> int:
    """The token that closes an assistant turn under the model's own chat template.

    Read off the template: a conversation whose assistant says a sentinel is rendered, and the special
    token right after the sentinel is the end of turn (``<|im_end|>``, Idefics3 / SmolVLM's
    ``<end_of_utterance>``, Gemma 3's ``<end_of_turn>``). ``template_owner`` is whatever holds the template
    (the processor; default: the tokenizer). Without a template that says, EOS.
    """
    owner = template_owner if getattr(template_owner, "chat_template", None) else tokenizer
    sentinel = "Sentinel"
    try:
        chat = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": sentinel}]
        tail = owner.apply_chat_template(chat, tokenize=False).split(sentinel, 1)[1]
        first = tokenizer(tail, add_special_tokens=False)["input_ids"][:1]
        if first and first[0] in set(tokenizer.all_special_ids):
            return int(first[0])
    except (ValueError, TypeError, IndexError, KeyError, AttributeError):  # no template, or one that refuses this
        pass
    token_id = tokenizer.eos_token_id
    if token_id is None:
        raise ValueError("the chat template shows no end of turn and the tokenizer has no EOS token: cannot end "
                         "an assistant turn")  # fmt: skip
    return int(token_id)


def item_images(item: Mapping[str, Any]) -> list[Any]:
    """The images of one VQA item, in prompt order: its ``images`` list, else its one ``image``, else none."""
    if item.get("images") is not None:
        return list(item["images"])
    return [item["image"]] if item.get("image") is not None else []


def prompt_texts(processor, messages: Sequence[list[dict]]) -> list[str]:
    """Each conversation rendered by the chat template, ending with the assistant header."""
    return [processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]


def _completion_ids(
    tokenizer, completion: str | Sequence[int], eot: int, add_end_of_turn: bool, max_tokens: int | None
) -> list[int]:
    if isinstance(completion, str):
        ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        if add_end_of_turn:
            ids = [*ids, eot]
    else:  # token ids from a generation engine: taken as they are
        ids = [int(t) for t in completion]
    if max_tokens is not None and len(ids) > max_tokens:
        ids = ids[:max_tokens]  # a cut completion keeps no end-of-turn: the model must not learn to stop there
    return ids


def encode_chat(
    processor,
    messages: Sequence[list[dict]],
    images: Sequence[Any] | None = None,
    completions: Sequence[str | Sequence[int]] | None = None,
    add_end_of_turn: bool = True,
    max_completion_tokens: int | None = None,
) -> ChatBatch:
    """Encode conversations (and optional assistant completions) into one left-padded batch.

    Args:
        processor: a VLM processor of any family (tokenizer + image processor + chat template).
        messages: one chat per row, in the transformers content format, without the assistant's answer.
        images: the images the chats refer to (one per row, or a list per row), or None for text only.
        completions: per row, the assistant's text or token ids; None encodes prompts only (for generation).
        add_end_of_turn: append ``<|im_end|>`` to text completions (token-id completions are kept as given).
        max_completion_tokens: cut completions to this many tokens (prompts are never cut: image tokens
            must stay whole).

    Rows are left-padded, so prompts end in the same column: batched generation needs that, and a forward
    pass is indifferent because positions follow the attention mask.
    """
    if completions is not None and len(completions) != len(messages):
        raise ValueError(f"{len(messages)} conversations but {len(completions)} completions")
    if images is not None and len(images) != len(messages):
        raise ValueError(f"{len(messages)} conversations but {len(images)} images")
    texts = prompt_texts(processor, messages)
    # One list of images per row: every family's processor takes that shape (Gemma 3's takes no other).
    kwargs = {"images": [im if isinstance(im, list | tuple) else [im] for im in images]} if images is not None else {}
    encoded = processor(text=texts, padding=True, return_tensors="pt", **kwargs)
    input_ids, attention = encoded["input_ids"], encoded["attention_mask"].bool()
    # Every per-token field the processor made (attention mask, multimodal token types) is re-padded with it.
    token_keys = [k for k, v in encoded.items() if torch.is_tensor(v) and v.shape == input_ids.shape]
    tokenizer = processor.tokenizer
    eot = end_of_turn_id(tokenizer, processor)

    rows: list[dict[str, torch.Tensor]] = []
    for i in range(len(texts)):
        row = {k: encoded[k][i][attention[i]] for k in token_keys}  # strips padding wherever it was put
        prompt_len = len(row["input_ids"])
        if completions is not None:
            ids = _completion_ids(tokenizer, completions[i], eot, add_end_of_turn, max_completion_tokens)
            extra = torch.tensor(ids, dtype=input_ids.dtype)
            for k in token_keys:
                if k == "input_ids":
                    fill = extra
                elif k == "attention_mask":
                    fill = torch.ones_like(extra, dtype=row[k].dtype)
                else:  # token-type fields: completion tokens are plain text (type 0)
                    fill = torch.zeros_like(extra, dtype=row[k].dtype)
                row[k] = torch.cat([row[k], fill])
        row["_assistant"] = torch.arange(len(row["input_ids"])) >= prompt_len
        row["_prompt_len"] = torch.tensor(prompt_len)
        rows.append(row)

    width = max(len(r["input_ids"]) for r in rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot
    inputs: dict[str, torch.Tensor] = {}
    for k in token_keys:
        value = pad_id if k == "input_ids" else 0
        inputs[k] = torch.stack([_left_pad(r[k], width, value) for r in rows])
    for k, v in encoded.items():
        if k not in token_keys:
            inputs[k] = v  # pixel_values, image_grid_thw: per image, not per token
    assistant = torch.stack([_left_pad(r["_assistant"], width, False) for r in rows])
    return ChatBatch(inputs, assistant, torch.stack([r["_prompt_len"] for r in rows]))


def _left_pad(x: torch.Tensor, width: int, value: int | bool) -> torch.Tensor:
    return torch.cat([torch.full((width - len(x),), value, dtype=x.dtype), x])


def target_text(item: Mapping[str, Any], think_key: str = "think") -> str:
    """The assistant turn an item is trained to produce.

    >>> target_text({"answer": "B"})
    '<answer>B</answer>'
    >>> target_text({"answer": "B", "think": " Dense opacity in the left lobe. "})
    '<think>Dense opacity in the left lobe.</think>\\n<answer>B</answer>'
    >>> target_text({"answer": "B", "options": {"A": "normal", "B": "pneumonia"}, "answer_with": "text"})
    '<answer>pneumonia</answer>'
    """
    if "answer" not in item:
        raise KeyError(f"a VQA item needs an 'answer' (gold letter) to be a training target; it has {sorted(item)}")
    gold = item["answer"]
    if item.get("answer_with") == "text":
        gold = item["options"][gold]  # asked for the option's text, trained on it
    answer = f"<answer>{gold}</answer>"
    trace = item.get(think_key)
    if isinstance(trace, str) and trace.strip():
        return f"<think>{trace.strip()}</think>\n{answer}"
    return answer


@dataclass
class SFTCollator:
    """VQA items (``image``, ``messages``, ``answer``, optional reasoning) to a batch with answer-only labels.

    Args:
        processor: the model's processor.
        think_key: item field holding a reasoning trace; items without one get the bare answer as target.
        max_completion_tokens: cut targets to this many tokens (None: no limit).
    """

    processor: Any
    think_key: str = "think"
    max_completion_tokens: int | None = None

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> ChatBatch:
        per_row = [item_images(item) for item in items]
        images = per_row if all(per_row) else None
        return encode_chat(
            self.processor,
            [item["messages"] for item in items],
            images,
            completions=[target_text(item, self.think_key) for item in items],
            max_completion_tokens=self.max_completion_tokens,
        )
