"""The trajectory: everything one GRPO step knows about its sampled completions, with every shape written down.

Conventions: ``B`` prompts, ``G`` completions per prompt, ``N = B * G`` rows, prompt rows repeated ``G`` times
in a row (rows ``g*G .. g*G+G-1`` are group ``g``), ``P`` prompt tokens (left-padded), ``L`` completion tokens
(right-padded; the mask covers tokens up to and including the first end-of-sequence token).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor
from torch.nn import functional as F

# Vision inputs whose first dimension counts patches, not rows: sliced through ``image_grid_thw``.
_PATCH_KEYS = {"pixel_values": "image_grid_thw", "pixel_values_videos": "video_grid_thw"}


@dataclass
class Trajectory:
    """G sampled completions for each of B prompts, and what the step computed about them.

    Everything is per row (``N = B * G``); the optional fields are filled stage by stage.
    """

    prompt_ids: Tensor  # [N, P] int64, left-padded
    prompt_mask: Tensor  # [N, P] int64, 1 on real prompt tokens
    completion_ids: Tensor  # [N, L] int64, right-padded
    completion_mask: Tensor  # [N, L] int64, 1 up to and including the first end-of-sequence token
    group_size: int  # G
    texts: list[str]  # N decoded completions (special tokens skipped)
    vision: dict[str, Tensor] = field(default_factory=dict)  # pixel_values [sum of patches, D], image_grid_thw [N, 3]
    old_logprobs: Tensor | None = None  # [N, L] float, log-probs of the sampling policy (engine or recomputed)
    ref_logprobs: Tensor | None = None  # [N, L] float, log-probs of the reference model (KL term only)
    rewards: Tensor | None = None  # [N] float, weighted sum of the reward parts plus the CARE bonus
    reward_parts: dict[str, Tensor] = field(default_factory=dict)  # name -> [N] float, unweighted
    advantages: Tensor | None = None  # [N] float

    def __post_init__(self) -> None:
        n = self.prompt_ids.shape[0]
        if self.group_size < 1 or n % self.group_size:
            raise ValueError(f"{n} rows is not a whole number of groups of {self.group_size}")
        for name in ("prompt_mask", "completion_ids", "completion_mask"):
            if getattr(self, name).shape[0] != n:
                raise ValueError(f"Trajectory.{name} has {getattr(self, name).shape[0]} rows, prompt_ids has {n}")
        if len(self.texts) != n:
            raise ValueError(f"Trajectory.texts has {len(self.texts)} entries for {n} rows")

    @property
    def num_rows(self) -> int:
        """N = B * G."""
        return self.prompt_ids.shape[0]

    @property
    def num_groups(self) -> int:
        """B."""
        return self.num_rows // self.group_size

    def input_ids(self) -> Tensor:
        """Prompt and completion side by side: ``[N, P + L]``."""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    def attention_mask(self) -> Tensor:
        """``[N, P + L]``; padding after the end of a completion is masked out."""
        return torch.cat([self.prompt_mask, self.completion_mask.to(self.prompt_mask.dtype)], dim=1)

    def select_rows(self, rows: Tensor | list[int], group_size: int | None = None) -> Trajectory:
        """The trajectory restricted to ``rows`` (row order kept as given), vision patches included."""
        rows_t = torch.as_tensor(rows, dtype=torch.long)
        rows_l = rows_t.tolist()

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[rows_t.to(t.device)]

        vision = {}
        for key, value in self.vision.items():
            grid_key = _PATCH_KEYS.get(key)
            if grid_key is None:
                vision[key] = value[rows_t.to(value.device)]
                continue
            counts = self.vision[grid_key].prod(-1).tolist()  # patches per row
            starts = [0]
            for c in counts:
                starts.append(starts[-1] + c)
            vision[key] = torch.cat([value[starts[r] : starts[r + 1]] for r in rows_l])
        return replace(
            self,
            prompt_ids=self.prompt_ids[rows_t],
            prompt_mask=self.prompt_mask[rows_t],
            completion_ids=self.completion_ids[rows_t],
            completion_mask=self.completion_mask[rows_t],
            group_size=group_size or self.group_size,
            texts=[self.texts[r] for r in rows_l],
            vision=vision,
            old_logprobs=pick(self.old_logprobs),
            ref_logprobs=pick(self.ref_logprobs),
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
        """Trajectories one after another, prompts re-padded on the left and completions on the right."""
        if not parts:
            raise ValueError("Trajectory.cat needs at least one trajectory")
        if len({p.group_size for p in parts}) != 1:
            raise ValueError("Trajectory.cat: all parts must have the same group size")
        p_len = max(p.prompt_ids.shape[1] for p in parts)
        c_len = max(p.completion_ids.shape[1] for p in parts)

        def left(t: Tensor, width: int, value: float) -> Tensor:
            return F.pad(t, (width - t.shape[1], 0), value=value)

        def right(t: Tensor | None, width: int, value: float) -> Tensor | None:
            return None if t is None else F.pad(t, (0, width - t.shape[1]), value=value)

        def cat_optional(name: str, width: int | None = None) -> Tensor | None:
            values = [getattr(p, name) for p in parts]
            if any(v is None for v in values):
                return None
            if width is not None:
                values = [right(v, width, 0.0) for v in values]
            return torch.cat(values)

        keys = set(parts[0].vision)
        if any(set(p.vision) != keys for p in parts):
            raise ValueError("Trajectory.cat: parts carry different vision inputs")
        reward_keys = set(parts[0].reward_parts)
        return Trajectory(
            prompt_ids=torch.cat([left(p.prompt_ids, p_len, pad_token_id) for p in parts]),
            prompt_mask=torch.cat([left(p.prompt_mask, p_len, 0) for p in parts]),
            completion_ids=torch.cat([right(p.completion_ids, c_len, pad_token_id) for p in parts]),
            completion_mask=torch.cat([right(p.completion_mask, c_len, 0) for p in parts]),
            group_size=parts[0].group_size,
            texts=[t for p in parts for t in p.texts],
            vision={k: torch.cat([p.vision[k] for p in parts]) for k in keys},
            old_logprobs=cat_optional("old_logprobs", c_len),
            ref_logprobs=cat_optional("ref_logprobs", c_len),
            rewards=cat_optional("rewards"),
            reward_parts={
                k: torch.cat([p.reward_parts[k] for p in parts])
                for k in reward_keys
                if all(k in p.reward_parts for p in parts)
            },
            advantages=cat_optional("advantages"),
        )

    def state_dict(self) -> dict:
        """Plain tensors, strings and numbers only, so a checkpoint holding it loads with ``weights_only=True``."""
        out: dict = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = dict(value) if isinstance(value, dict) else value
        return out

    @classmethod
    def from_state_dict(cls, state: dict) -> Trajectory:
        """The inverse of :meth:`state_dict`."""
        return cls(**state)
