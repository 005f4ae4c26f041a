"""Each prompt forwarded once per micro-batch: its completions attend to its key/value cache, kept in the graph.

A GRPO group is one prompt (question and image) with G sampled completions. The unshared pass forwards the
prompt G times; here the distinct prompts of a micro-batch go through the model once, with a cache
(``use_cache=True``), the cache is indexed out to one copy per completion (an indexing op, so the gradient of
every copy flows back into the one prompt pass), and the completions are forwarded on top of it. The first
completion token's log-prob comes from the prompt pass's last position, the others from the completion pass.

Positions stay those of the unshared pass up to a shift shared by every token of a row (left padding differs),
which rotary attention does not see: models with 1-D positions count from the cache's length; the Qwen-VL
family's 3-D positions continue from the prompt's own rotary offset (``rope_deltas``), as ``generate`` does.
Images live only in the prompt, so Gemma 3's bidirectional image blocks and every family's image splitting
happen in the prompt pass unchanged. The equality with the unshared pass is tested per family.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from medrl.rl.types import Trajectory

_LOG = logging.getLogger(__name__)
_SAID: set[str] = set()


def say_once(reason: str) -> None:
    """Log why a pass does not share its prompts, once per reason and process."""
    if reason not in _SAID:
        _SAID.add(reason)
        _LOG.warning("share_prompt: %s; these passes forward every completion with its own prompt copy", reason)


def unshareable(model: nn.Module) -> str | None:
    """Why ``model`` cannot run the shared pass (None when it can).

    Gradient checkpointing drops the key/value cache inside every checkpointed layer (transformers sets
    ``past_key_values=None`` there), so the completions would not see their prompt.
    """
    if model.training and any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        return "gradient checkpointing drops the prompt's key/value cache in training"
    return None


def prompt_groups(traj: Trajectory, rows: Sequence[int]) -> list[list[int]]:
    """Positions in ``rows`` grouped by prompt (``row // group_size``: trajectories are prompt-major)."""
    groups: dict[int, list[int]] = {}
    for pos, row in enumerate(rows):
        groups.setdefault(row // traj.group_size, []).append(pos)
    return list(groups.values())


def _prompt_span(sub: Trajectory, pos: int) -> tuple[int, int]:
    """``(start, end)`` columns of row ``pos``'s prompt (rows are left-padded, the completion ends the row)."""
    width = sub.inputs["input_ids"].shape[1]
    end = width - int(sub.completion_mask[pos].sum())
    return end - int(sub.inputs["attention_mask"][pos, :end].sum()), end


def _images(sub: Trajectory, pos: int) -> dict[str, Tensor]:
    """Row ``pos``'s per-image inputs (pixels, grids), cut out the way micro-batches cut them."""
    token_keys = set(sub.token_keys())
    return {k: v for k, v in sub.select_rows([pos]).inputs.items() if k not in token_keys}


def checked_groups(sub: Trajectory, groups: list[list[int]]) -> list[list[int]]:
    """``groups`` (positions in ``sub``) with each member checked to hold its group's first row's prompt tokens
    and images; a row that does not gets a group of its own, and this is said (shared wrongly, it would be
    silently wrong)."""
    ids = sub.inputs["input_ids"]
    out: list[list[int]] = []
    for group in groups:
        first = group[0]
        start, end = _prompt_span(sub, first)
        tokens, images = ids[first, start:end], _images(sub, first)
        same = [first]
        for p in group[1:]:
            s, e = _prompt_span(sub, p)
            if torch.equal(ids[p, s:e], tokens) and all(torch.equal(v, images[k]) for k, v in _images(sub, p).items()):
                same.append(p)
            else:
                say_once("a row holds another prompt than the first row of its group")
                out.append([p])
        out.append(same)
    return out


def _prompt_inputs(sub: Trajectory, reps: list[int], device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
    """The representatives' prompts as one left-padded batch, with their images."""
    inputs = sub.inputs
    token_keys = sub.token_keys()
    spans = [_prompt_span(sub, r) for r in reps]
    width = max(e - s for s, e in spans)
    ids = inputs["input_ids"]
    pad_cols = ids[inputs["attention_mask"] == 0]
    pad_id = int(pad_cols[0]) if pad_cols.numel() else 0  # the collator's own pad id, when it padded anything
    out: dict[str, Tensor] = {}
    for key in token_keys:
        value = inputs[key]
        filled = torch.full((len(reps), width, *value.shape[2:]), pad_id if key == "input_ids" else 0,
                            dtype=value.dtype)  # fmt: skip
        for i, (r, (s, e)) in enumerate(zip(reps, spans, strict=True)):
            filled[i, width - (e - s) :] = value[r, s:e]
        out[key] = filled
    images = sub.select_rows(reps).inputs
    out |= {k: v for k, v in images.items() if k not in token_keys}
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in out.items()}


def _completion_ids(sub: Trajectory) -> tuple[Tensor, Tensor]:
    """``([n, C] ids, [n, C] mask)``: each row's completion moved to the left, padded on the right."""
    window = sub.completion_length
    lengths = sub.completion_mask.sum(1)
    width = max(int(lengths.max()), 1) if lengths.numel() else 1
    tail = sub.inputs["input_ids"][:, -window:]
    source = torch.arange(width)[None, :] + (window - lengths)[:, None]  # column j of row i: tail[i, window-len+j]
    valid = torch.arange(width)[None, :] < lengths[:, None]
    ids = torch.where(valid, tail.gather(1, source.clamp(max=window - 1)), torch.zeros_like(source))
    return ids, valid


def to_window(values: Tensor, lengths: Tensor, window: int) -> Tensor:
    """``[n, C]`` left-aligned per-token values -> ``[n, window]`` right-aligned (the trajectory's layout), 0 before."""
    cols = torch.arange(window, device=values.device)[None, :] - (window - lengths.to(values.device))[:, None]
    valid = cols >= 0
    picked = values.gather(1, cols.clamp(min=0, max=values.shape[1] - 1))
    return torch.where(valid, picked, torch.zeros_like(picked))


def shared_logits(model: nn.Module, sub: Trajectory, groups: list[list[int]]) -> tuple[Tensor, Tensor, Tensor]:
    """``(logits [n, C, V], completion ids [n, C], completion lengths [n])`` for every row of ``sub``,
    each group's prompt forwarded once; row i's logits at column j predict its completion token j."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    reps = [g[0] for g in groups]
    index = torch.empty(sub.num_rows, dtype=torch.long)
    for gi, group in enumerate(groups):
        index[group] = gi
    prompts = _prompt_inputs(sub, reps, device, dtype)
    head = model(**prompts, use_cache=True, logits_to_keep=1)
    first = head.logits[:, -1]  # [U, V]: the first completion token's distribution
    ids, valid = _completion_ids(sub)
    lengths = valid.sum(1)
    index_d = index.to(device)
    # The completion pass runs even when every completion is empty (one masked column): under FSDP every
    # process must run as many forwards as the others, whatever its rows hold.
    cache = head.past_key_values
    cache.batch_select_indices(index_d)  # one copy per completion; indexing keeps the gradient's path
    width = prompts["input_ids"].shape[1]
    mask = torch.cat([prompts["attention_mask"][index_d], valid.to(device, prompts["attention_mask"].dtype)], 1)
    extra: dict[str, Any] = {}
    deltas = getattr(head, "rope_deltas", None)
    if deltas is not None:  # Qwen-VL: text after the prompt continues from its 3-D rotary offset
        text = (width + torch.arange(ids.shape[1], device=device))[None, :].expand(len(index), -1)
        spatial = text + deltas.to(device)[index_d].reshape(-1, 1)
        extra["position_ids"] = torch.stack([text, spatial, spatial, spatial])
    tail = model(input_ids=ids.to(device), attention_mask=mask, past_key_values=cache, use_cache=True, **extra)
    logits = torch.cat([first[index_d].unsqueeze(1), tail.logits[:, :-1]], dim=1)
    return logits, ids.to(device), lengths
