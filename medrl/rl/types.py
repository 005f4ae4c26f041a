"""The trajectory: everything one GRPO step knows about its sampled completions, with every shape written down.

Conventions: ``B`` prompts, ``G`` completions per prompt, ``N = B * G`` rows, each prompt's rows adjacent
(rows ``b*G .. b*G+G-1`` are group ``b``); ``T`` tokens per full sequence, ``L`` completion columns.

Sequences are left-padded as a whole (``medrl.data.collate.encode_chat``'s layout: prompt, then the sampled
completion, ending in the last column), so every row's completion lies inside the last ``L`` columns, aligned
to the right; ``completion_mask`` marks which of those columns are completion tokens. All per-token tensors
(``completion_mask``, log-probs) use that ``[N, L]`` window.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor
from torch.nn import functional as F

# Vision inputs whose first dimension counts patches, not rows, when their grid is there (families that pack
# patches): sliced through the grid's patch counts. Without a grid (Idefics3 / SmolVLM: pixel_values
# [N, images, C, H, W], pixel_attention_mask [N, images, H, W]; Gemma 3, InternVL: [N, C, H, W]) every vision
# input is per row.
_PATCH_KEYS = {"pixel_values": "image_grid_thw", "pixel_values_videos": "video_grid_thw"}


@dataclass
class Trajectory:
    """G sampled completions for each of B prompts, and what the step computed about them.

    The optional fields are filled stage by stage (reward, advantage, log-probs).
    """

    # Model forward kwargs: input_ids [N, T] and attention_mask [N, T] (plus mm_token_type_ids [N, T] where the
    # processor makes it), pixel_values [sum of patches, D], image_grid_thw [N, 3]
    inputs: dict[str, Tensor]
    completion_mask: Tensor  # [N, L] bool, True on completion tokens (the end-of-turn token included)
    group_size: int  # G
    texts: list[str]  # N decoded completions (special tokens removed)
    old_logprobs: Tensor | None = None  # [N, L] float32, sampling policy's log-probs (engine or recomputed)
    ref_logprobs: Tensor | None = None  # [N, L] float32, reference model's log-probs (KL term only)
    engine_logprobs: Tensor | None = None  # [N, L] float32, the rollout engine's own (mismatch logging/correction)
    rewards: Tensor | None = None  # [N] float32, weighted sum of the reward parts plus the CARE bonus
    reward_parts: dict[str, Tensor] = field(default_factory=dict)  # name -> [N] float32, unweighted
    advantages: Tensor | None = None  # [N] float32

    def __post_init__(self) -> None:
        n = self.num_rows
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if self.completion_mask.shape[0] != n or self.completion_mask.shape[1] > self.inputs["input_ids"].shape[1]:
            raise ValueError(
                f"completion_mask {tuple(self.completion_mask.shape)} does not fit input_ids "
                f"{tuple(self.inputs['input_ids'].shape)}"
            )
        if len(self.texts) != n:
            raise ValueError(f"Trajectory.texts has {len(self.texts)} entries for {n} rows")

    @property
    def num_rows(self) -> int:
        """N = B * G."""
        return self.inputs["input_ids"].shape[0]

    @property
    def num_groups(self) -> int:
        """B (the rows must be whole groups)."""
        if self.num_rows % self.group_size:
            raise ValueError(f"{self.num_rows} rows is not a whole number of groups of {self.group_size}")
        return self.num_rows // self.group_size

    @property
    def completion_length(self) -> int:
        """L, the width of the completion window."""
        return self.completion_mask.shape[1]

    @property
    def completion_ids(self) -> Tensor:
        """``[N, L]`` the last L columns of ``input_ids`` (prompt tokens where the mask is False)."""
        return self.inputs["input_ids"][:, -self.completion_length :]

    def token_keys(self) -> list[str]:
        """The per-token inputs (``[N, T]`` like ``input_ids``: mask, token types); the rest are per image."""
        shape = self.inputs["input_ids"].shape
        return [k for k, v in self.inputs.items() if v.shape == shape]

    def select_rows(self, rows: Tensor | list[int]) -> Trajectory:
        """The trajectory restricted to ``rows`` (in the order given), vision patches included.

        Rows need not form whole groups (micro-batches do not); ``group_size`` is kept as it is.
        """
        rows_t = torch.as_tensor(rows, dtype=torch.long)
        rows_l = rows_t.tolist()

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[rows_t.to(t.device)]

        inputs = {}
        for key, value in self.inputs.items():
            grid_key = _PATCH_KEYS.get(key)
            if grid_key is None or grid_key not in self.inputs:
                inputs[key] = value[rows_t.to(value.device)]
                continue
            counts = self.inputs[grid_key].prod(-1).tolist()  # patches of each row's image
            starts = [0]
            for c in counts:
                starts.append(starts[-1] + c)
            inputs[key] = torch.cat([value[starts[r] : starts[r + 1]] for r in rows_l])
        return replace(
            self,
            inputs=inputs,
            completion_mask=self.completion_mask[rows_t],
            texts=[self.texts[r] for r in rows_l],
            old_logprobs=pick(self.old_logprobs),
            ref_logprobs=pick(self.ref_logprobs),
            engine_logprobs=pick(self.engine_logprobs),
            rewards=pick(self.rewards),
            reward_parts={k: v[rows_t.to(v.device)] for k, v in self.reward_parts.items()},
            advantages=pick(self.advantages),
        )

    def select_groups(self, groups: Tensor | list[int]) -> Trajectory:
        """The trajectory restricted to whole groups (e.g. those dynamic sampling keeps)."""
        g = self.group_size
        rows = [i * g + j for i in torch.as_tensor(groups, dtype=torch.long).tolist() for j in range(g)]
        return self.select_rows(rows)

    @staticmethod
    def cat(parts: list[Trajectory], pad_token_id: int) -> Trajectory:
        """Trajectories one after another; sequences and completion windows re-padded on the left."""
        if not parts:
            raise ValueError("Trajectory.cat needs at least one trajectory")
        if len({p.group_size for p in parts}) != 1:
            raise ValueError("Trajectory.cat: all parts must have the same group size")
        keys = set(parts[0].inputs)
        if any(set(p.inputs) != keys for p in parts):
            raise ValueError("Trajectory.cat: parts carry different model inputs")
        token_keys = parts[0].token_keys()
        width = max(p.inputs["input_ids"].shape[1] for p in parts)
        window = max(p.completion_length for p in parts)

        def left(t: Tensor, to: int, value: float) -> Tensor:
            return F.pad(t, (to - t.shape[1], 0), value=value)

        def cat_window(name: str) -> Tensor | None:
            values = [getattr(p, name) for p in parts]
            return None if any(v is None for v in values) else torch.cat([left(v, window, 0.0) for v in values])

        def cat_rows(name: str) -> Tensor | None:
            values = [getattr(p, name) for p in parts]
            return None if any(v is None for v in values) else torch.cat(values)

        inputs = {}
        for key in keys:
            if key in token_keys:
                fill = pad_token_id if key == "input_ids" else 0
                inputs[key] = torch.cat([left(p.inputs[key], width, fill) for p in parts])
            else:
                inputs[key] = torch.cat(_pad_to_common([p.inputs[key] for p in parts]))
        shared_parts = set.intersection(*(set(p.reward_parts) for p in parts))
        return Trajectory(
            inputs=inputs,
            completion_mask=torch.cat([left(p.completion_mask, window, False) for p in parts]),
            group_size=parts[0].group_size,
            texts=[t for p in parts for t in p.texts],
            old_logprobs=cat_window("old_logprobs"),
            ref_logprobs=cat_window("ref_logprobs"),
            engine_logprobs=cat_window("engine_logprobs"),
            rewards=cat_rows("rewards"),
            reward_parts={k: torch.cat([p.reward_parts[k] for p in parts]) for k in sorted(shared_parts)},
            advantages=cat_rows("advantages"),
        )

    def to(self, device: torch.device | str) -> Trajectory:
        """The same trajectory with every tensor on ``device``."""

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return replace(
            self,
            inputs={k: v.to(device) for k, v in self.inputs.items()},
            completion_mask=self.completion_mask.to(device),
            old_logprobs=move(self.old_logprobs),
            ref_logprobs=move(self.ref_logprobs),
            engine_logprobs=move(self.engine_logprobs),
            rewards=move(self.rewards),
            reward_parts={k: v.to(device) for k, v in self.reward_parts.items()},
            advantages=move(self.advantages),
        )

    def state_dict(self) -> dict:
        """Tensors, strings and numbers only, so a checkpoint holding it loads with ``weights_only=True``."""
        return {f.name: (dict(v) if isinstance(v := getattr(self, f.name), dict) else v) for f in fields(self)}

    @classmethod
    def from_state_dict(cls, state: dict) -> Trajectory:
        """The inverse of :meth:`state_dict` (also of one saved before a field was added)."""
        return cls(**{f.name: state[f.name] for f in fields(cls) if f.name in state})


def _pad_to_common(values: list[Tensor]) -> list[Tensor]:
    """Per-row vision inputs padded with zeros to one shape past the first dimension: parts whose rows carry
    different numbers of image tiles (Idefics3's image splitting) can then be stacked. Zero images are the
    padding those models already skip."""
    if len({v.shape[1:] for v in values}) == 1:
        return values
    if len({v.dim() for v in values}) != 1:
        raise ValueError(f"cannot stack vision inputs of shapes {[tuple(v.shape) for v in values]}")
    target = [max(v.shape[d] for v in values) for d in range(1, values[0].dim())]
    out = []
    for v in values:
        pad: list[int] = []
        for d in reversed(range(1, v.dim())):
            pad += [0, target[d - 1] - v.shape[d]]
        out.append(F.pad(v, pad, value=0))
    return out
