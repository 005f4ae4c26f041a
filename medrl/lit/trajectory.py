"""From an engine's completions to a :class:`Trajectory`, and the policy's forward passes over one.

The engine returns token ids; :func:`medrl.data.collate.encode_chat` appends them to the chat-templated
prompts exactly as generated (no re-tokenisation, which could merge tokens across the boundary) and pads
whole sequences on the left, so every completion ends in the last column.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from medrl.data.collate import encode_chat, item_images
from medrl.lit.shared_prompt import checked_groups, prompt_groups, say_once, shared_logits, to_window, unshareable
from medrl.rl.logprobs import token_entropy, token_logprobs
from medrl.rl.rewards import answer_mask, answer_token_span
from medrl.rl.types import Trajectory
from medrl.rollout.types import PromptResult

# Item fields that are model inputs, not columns a reward function could use.
_NOT_COLUMNS = ("image", "messages")


def build_trajectory(processor: Any, items: Sequence[Mapping[str, Any]], results: Sequence[PromptResult]) -> Trajectory:
    """One row per sampled completion (prompt-major), with the engine's log-probs when it returned them."""
    if len(items) != len(results):
        raise ValueError(f"{len(items)} prompts but {len(results)} engine results")
    sizes = {len(r.samples) for r in results}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"every prompt needs the same number (>= 1) of samples, got {sorted(sizes)}")
    group = sizes.pop()
    completions = [c for r in results for c in r.samples]
    messages = [item["messages"] for item in items for _ in range(group)]
    per_item = [item_images(item) for item in items]
    if several := [i for i, row in enumerate(per_item) if len(row) > 1]:
        # A trajectory slices its vision tensors one image per row (Trajectory.select_rows); a question with
        # several images would be cut wrongly, so it is refused rather than trained on the wrong pixels.
        raise ValueError(
            f"GRPO rollouts take one image per question; question {several[0]} of this batch has "
            f"{len(per_item[several[0]])}: keep one image per item (the MedMNIST and PMC-VQA datasets do)"
        )
    images = [row for row in per_item for _ in range(group)] if all(per_item) else None
    batch = encode_chat(processor, messages, images, completions=[c.token_ids for c in completions])
    lengths = [len(c.token_ids) for c in completions]
    window = max(max(lengths), 1)
    mask = batch.assistant_mask[:, -window:]
    old = None
    if all(c.logprobs is not None for c in completions):
        old = torch.zeros(len(completions), window, dtype=torch.float32)
        for row, c in enumerate(completions):
            if c.token_ids:
                old[row, window - len(c.token_ids) :] = torch.tensor(c.logprobs, dtype=torch.float32)
    return Trajectory(
        inputs=batch.inputs,
        completion_mask=mask,
        group_size=group,
        texts=[c.text for c in completions],
        old_logprobs=old,
    )


def reward_columns(items: Sequence[Mapping[str, Any]], group_size: int) -> dict[str, list[Any]]:
    """The items' fields (answer, options, prompt, ...) repeated per row, for reward functions."""
    keys = [k for k in items[0] if k not in _NOT_COLUMNS]
    return {k: [item.get(k) for item in items for _ in range(group_size)] for k in keys}


def completion_rows(
    items: Sequence[Mapping[str, Any]], traj: Trajectory, prompts: int, step: int
) -> list[dict[str, Any]]:
    """JSON rows for the first ``prompts`` prompts' completions: what each wrote, its parsed answer, every
    reward part, the total and the advantage (``traj`` after the reward and advantage stages)."""
    from medrl.metrics.answers import parse_answer, text_options

    g = traj.group_size
    rows = []
    for row in range(min(prompts, len(items)) * g):
        item = items[row // g]
        letters = "".join(item.get("options") or {}) or "ABCD"
        answer = parse_answer(traj.texts[row], letters, text_options(item))
        rows.append({
            "step": step, "prompt": row // g, "image": f"{item.get('flag', '')}/{item.get('index', '')}",
            "gold": item.get("answer"), "completion": traj.texts[row], "answer": answer,
            "rewards": {k: float(v[row]) for k, v in traj.reward_parts.items()},
            "reward": float(traj.rewards[row]) if traj.rewards is not None else None,
            "advantage": float(traj.advantages[row]) if traj.advantages is not None else None,
        })  # fmt: skip
    return rows


def answer_window_mask(tokenizer: Any, traj: Trajectory, rows: Sequence[int]) -> Tensor:
    """``[len(rows), L]`` bool: the answer tokens (inside the last ``<answer>`` block) of the given rows."""
    window = traj.completion_length
    out = torch.zeros(len(rows), window, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids = traj.completion_ids[row][traj.completion_mask[row]].tolist()
        pieces = tokenizer.batch_decode([[t] for t in ids], skip_special_tokens=True)
        span = answer_token_span(pieces)
        if span is not None:
            out[i, window - len(ids) :] = answer_mask([span], len(ids))[0]
    return out


def _trim_left(inputs: dict[str, Tensor], keep: int) -> dict[str, Tensor]:
    """Drop leading columns that are padding in every row (never the last ``keep``)."""
    attention = inputs["attention_mask"]
    real = attention.any(0).nonzero()
    first = int(real[0]) if len(real) else 0
    first = min(first, attention.shape[1] - keep)
    if first <= 0:
        return inputs
    shape = attention.shape
    return {k: (v[:, first:] if v.shape == shape else v) for k, v in inputs.items()}


def forward_logprobs(
    model: nn.Module,
    traj: Trajectory,
    rows: Sequence[int] | None = None,
    entropy: bool = False,
    entropy_grad: bool = False,
    share_prompt: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs ``[n, L]`` of the completion tokens of ``rows`` (all rows by default) under ``model``.

    Gradients flow when enabled by the caller. With ``entropy`` also returns the per-token entropy ``[n, L]``
    (with gradient when ``entropy_grad``: the entropy bonus), else None. Values before a row's completion
    (its left padding inside the window) carry no meaning.

    With ``share_prompt`` each distinct prompt of ``rows`` is forwarded once and its completions attend to its
    key/value cache (:mod:`medrl.lit.shared_prompt`); a model that cannot (gradient checkpointing) takes the
    unshared pass, said once. Unshared, only the last ``L + 1`` positions' logits are computed.
    """
    if share_prompt:
        reason = unshareable(model)
        if reason is None:
            return _shared_logprobs(model, traj, range(traj.num_rows) if rows is None else rows, entropy, entropy_grad)
        say_once(reason)
    sub = traj if rows is None else traj.select_rows(list(rows))
    window = sub.completion_length
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    inputs = {
        k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
        for k, v in _trim_left(sub.inputs, window + 1).items()
    }
    logits = model(**inputs, logits_to_keep=window + 1, use_cache=False).logits[:, :-1]  # [n, L, V]
    ids = inputs["input_ids"][:, -window:]
    logp = token_logprobs(logits, ids)
    ent = token_entropy(logits, grad=entropy_grad) if entropy else None
    return logp, ent


def _shared_logprobs(
    model: nn.Module, traj: Trajectory, rows: Sequence[int], entropy: bool, entropy_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """:func:`forward_logprobs` with each prompt forwarded once, in the trajectory's right-aligned layout."""
    sub = traj.select_rows(list(rows))
    groups = checked_groups(sub, prompt_groups(traj, rows))
    logits, ids, lengths = shared_logits(model, sub, groups)
    window = sub.completion_length
    logp = to_window(token_logprobs(logits, ids), lengths, window)
    ent = to_window(token_entropy(logits, grad=entropy_grad), lengths, window) if entropy else None
    return logp, ent


@torch.no_grad()
def batched_logprobs(
    model: nn.Module,
    traj: Trajectory,
    micro_batch: int,
    rows: Sequence[int] | None = None,
    share_prompt: bool = False,
) -> Tensor:
    """``[n, L]`` log-probs without gradients, ``micro_batch`` rows per forward (see :func:`forward_logprobs`)."""
    rows = list(range(traj.num_rows)) if rows is None else list(rows)
    out = [
        forward_logprobs(model, traj, rows[i : i + micro_batch], share_prompt=share_prompt)[0]
        for i in range(0, len(rows), micro_batch)
    ]
    if not out:
        return torch.zeros(0, traj.completion_length)
    return torch.cat(out)
