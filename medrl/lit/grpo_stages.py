"""The six stages of one GRPO step, each timed; mixed into :class:`medrl.lit.grpo.GRPOModule`.

Kept apart from the module's setup and checkpointing so the step reads top to bottom in one place.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from medrl.models.sharding import full_tensor, gathered, is_sharded
from medrl.rl.advantages import as_groups, group_advantages, group_stats, signal_groups
from medrl.rl.distributed import global_max, global_min, global_std, world_size
from medrl.rl.losses import global_token_count, is_finite, policy_loss
from medrl.rl.policy import answer_window_mask, batched_logprobs, build_trajectory, forward_logprobs, reward_columns
from medrl.rl.rewards import answer_confidence, care_bonus, score_completions
from medrl.rl.types import Trajectory
from medrl.rollout.base import PromptResult, SamplingParams

STAGES = ("generate", "reward", "advantage", "logprobs", "update", "sync")


class StageTimer:
    """Wall time per named stage; waits for the GPU so a stage is charged for its own kernels."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - start


class GRPOStages:
    """generate -> reward -> advantage -> logprobs -> update -> sync (see :mod:`medrl.lit.grpo`)."""

    def run_stages(self, batch: list[dict[str, Any]], seed: int) -> None:
        """One training step on a batch of VQA items."""
        timer = StageTimer(self.device)
        metrics: dict[str, float] = {}
        with timer("generate"):
            results = self._generate(batch, self.sampling_params(seed))
            traj = build_trajectory(self.processor, batch, results)
        with timer("reward"):
            self._reward(traj, batch, metrics)
        with timer("advantage"):
            traj = self._advantage(traj, len(batch), metrics)
        if traj is not None:
            with timer("logprobs"):
                self._logprobs(traj)
            with timer("update"):
                self._update(traj, metrics)
            with timer("sync"):
                self.engine.sync(self.model)
        metrics.update({f"time/{name}": timer.seconds.get(name, 0.0) for name in STAGES})
        metrics["time/step"] = sum(timer.seconds.values())
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=len(batch))

    # ------------------------------------------------------------------ reward
    def _reward(self, traj: Trajectory, batch: list[dict[str, Any]], metrics: dict[str, float]) -> None:
        h = self.hparams
        parts = score_completions(traj.texts, reward_columns(batch, traj.group_size), self.reward_fns)
        total = sum(self.reward_weights[name] * parts[name] for name in parts)
        if h.care:
            bonus, confidence = self._care_bonus(traj, parts["accuracy"])
            total = total + bonus
            parts["care_bonus"] = bonus
            if confidence.numel():
                metrics["care/confidence"] = confidence.mean().item()
        traj.rewards, traj.reward_parts = total, parts
        for name, values in parts.items():
            metrics[f"reward/{name}"] = values.mean().item()
        groups = as_groups(total, traj.group_size)
        metrics["reward/mean"] = total.mean().item()
        metrics["reward/std"] = groups.std(dim=1).mean().item()
        lengths = traj.completion_mask.sum(1).float()
        metrics["completion/length"] = lengths.mean().item()
        metrics["completion/truncated"] = (lengths >= h.max_completion_length).float().mean().item()
        if "accuracy" in parts:
            for key, value in group_stats(as_groups(parts["accuracy"], traj.group_size)).items():
                metrics[f"groups/{key}"] = value

    def _care_bonus(self, traj: Trajectory, accuracy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[N]`` CARE bonus, and the confidences of the samples that could earn it."""
        h = self.hparams
        acc = as_groups(accuracy, traj.group_size)
        selected = ((acc > 0) & (acc >= acc.mean(dim=1, keepdim=True))).flatten()
        rows = selected.nonzero().flatten().tolist()
        confidence = torch.zeros(traj.num_rows)
        # Under FSDP every forward gathers weights collectively, so every process runs as many forwards.
        calls = -(-len(rows) // h.micro_batch_size)
        padding = global_max(calls, self.device) - calls if is_sharded(self.model) else 0
        if rows or padding:
            # Only samples that can earn the bonus are scored: the others never need a confidence.
            with self._eval_mode(), self.ema.swapped_in(self.model):
                ref = batched_logprobs(self.model, traj, h.micro_batch_size, rows).cpu()
                for _ in range(padding):
                    batched_logprobs(self.model, traj, 1, [0])
            if rows:
                mask = answer_window_mask(self.processor.tokenizer, traj, rows)
                confidence[rows] = answer_confidence(ref, mask, h.care_confidence_cap)
        bonus = care_bonus(acc, as_groups(confidence, traj.group_size), h.care_bonus, h.care_margin).flatten()
        return bonus, confidence[rows]

    # ------------------------------------------------------------------ advantage
    def _advantage(self, traj: Trajectory, num_prompts: int, metrics: dict[str, float]) -> Trajectory | None:
        """Fill advantages; with dynamic sampling return None while the batch is still being refilled."""
        h = self.hparams
        groups = as_groups(traj.rewards, traj.group_size)
        # Groups never straddle processes; only the `batch` scale looks beyond a group, at the global batch.
        batch_std = global_std(groups, self.device) if h.advantage_scale == "batch" and world_size() > 1 else None
        traj.advantages = group_advantages(groups, h.advantage_scale, h.advantage_eps, batch_std).flatten()
        if not h.dynamic_sampling:
            return traj
        keep = signal_groups(groups)
        metrics["sampling/kept_groups"] = keep.float().mean().item()
        if keep.any():
            self._buffer.append(traj.select_groups(keep.nonzero().flatten()))
        self._sampling_rounds += 1
        # Every process waits or trains together, on as many groups as the shortest has (else DDP/FSDP hang).
        have = global_min(sum(t.num_groups for t in self._buffer), self.device)
        if have < num_prompts and self._sampling_rounds < h.max_sampling_rounds:
            metrics["sampling/waiting"] = 1.0
            return None
        buffered, self._buffer, self._sampling_rounds = self._buffer, [], 0
        metrics["sampling/waiting"] = 0.0
        if have == 0:
            return None
        merged = Trajectory.cat(buffered, self.processor.tokenizer.pad_token_id)
        return merged.select_groups(list(range(min(num_prompts, have))))

    def _generate(self, batch: list[dict[str, Any]], params: SamplingParams) -> list[PromptResult]:
        """Sample with the engine; under FSDP the hf engine decodes with the policy itself, so its weights are
        gathered once around the whole call rather than at every token."""
        engine = self._ensure_engine()
        with gathered(self.model) if engine.name == "hf" else nullcontext():
            return engine.generate(batch, params)

    # ------------------------------------------------------------------ logprobs
    def _logprobs(self, traj: Trajectory) -> None:
        h = self.hparams
        if h.old_logprobs == "recompute":
            traj.old_logprobs = None
        if traj.old_logprobs is None and h.mu > 1:
            # With mu == 1 the update's own log-probs, detached, are exactly the sampling policy's: no extra pass.
            with self._eval_mode():
                traj.old_logprobs = batched_logprobs(self.model, traj, h.micro_batch_size).cpu()
        if h.beta > 0:
            with self.reference() as ref_model:
                traj.ref_logprobs = batched_logprobs(ref_model, traj, h.micro_batch_size).cpu()

    # ------------------------------------------------------------------ update
    def _all_finite(self, value: torch.Tensor) -> bool:
        """True when the value is finite on every process (all must agree, or DDP's backward would hang)."""
        flag = torch.tensor(float(is_finite(value)), device=self.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    def _accumulate(self, traj: Trajectory, n: int, num_tokens: torch.Tensor | None) -> dict[str, float] | None:
        """Forward and backward over every micro-batch; None (gradients to be dropped) on a non-finite loss."""
        h = self.hparams
        sums: dict[str, float] = defaultdict(float)
        for start in range(0, n, h.micro_batch_size):
            rows = list(range(start, min(n, start + h.micro_batch_size)))
            logp, entropy = forward_logprobs(self.model, traj, rows, entropy=True)
            mask = traj.completion_mask[rows].to(self.device)
            old = logp.detach() if traj.old_logprobs is None else traj.old_logprobs[rows].to(self.device)
            ref = None if traj.ref_logprobs is None else traj.ref_logprobs[rows].to(self.device)
            out = policy_loss(
                logp,
                old,
                traj.advantages[rows].to(self.device),
                mask,
                epsilon_low=h.epsilon_low,
                epsilon_high=h.epsilon_high,
                aggregation=h.loss_aggregation,
                max_length=h.max_completion_length,
                ref_logprobs=ref,
                beta=h.beta,
                num_sequences=n,
                num_tokens=num_tokens,
            )
            if not self._all_finite(out.loss):
                return None
            self.manual_backward(out.loss)
            tokens = mask.sum().item()
            sums["loss"] += out.loss.item()  # micro-batch losses add up: their normalisers are the batch's
            for key in ("kl", "clip_fraction", "ratio_mean"):
                sums[key] += getattr(out, key).item() * tokens
            sums["entropy"] += (entropy * mask).sum().item()
            sums["tokens"] += tokens
        return sums

    def _update(self, traj: Trajectory, metrics: dict[str, float]) -> None:
        h = self.hparams
        opt, sched = self.optimizers(), self.lr_schedulers()
        params = [p for p in self.model.parameters() if p.requires_grad]
        n = traj.num_rows
        num_tokens = global_token_count(traj.completion_mask).to(self.device) if h.loss_aggregation == "dapo" else None
        totals: dict[str, float] = defaultdict(float)
        skipped = 0
        for _ in range(h.mu):
            step = self._accumulate(traj, n, num_tokens)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, h.max_grad_norm if h.max_grad_norm > 0 else float("inf"))
            grad_norm = full_tensor(grad_norm)  # FSDP: the norm over every shard
            if step is None or not self._all_finite(grad_norm):
                # Never applied: the weights, optimizer moments and schedule stay as they were.
                opt.zero_grad(set_to_none=True)
                skipped += 1
                continue
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            if self.ema is not None:
                self.ema.maybe_update(self.model, self.global_step)
            step["grad_norm"] = grad_norm.item()
            for key, value in step.items():
                totals[key] += value
        steps = h.mu - skipped
        tokens = max(totals["tokens"], 1.0)
        metrics["train/skipped_nonfinite"] = float(skipped)
        metrics["train/lr"] = opt.param_groups[0]["lr"]
        if steps:
            metrics["train/loss"] = totals["loss"] / steps
            metrics["train/grad_norm"] = totals["grad_norm"] / steps
            for key in ("kl", "clip_fraction", "ratio_mean", "entropy"):
                metrics[f"train/{key}"] = totals[key] / tokens
