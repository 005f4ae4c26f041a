"""One GRPO step: six timed stages with explicit inputs and outputs, composed by :class:`GRPOStep`.

``generate -> reward -> advantage -> logprobs -> update -> sync``. Each stage is a method that takes what
the previous one returned and returns what the next needs; everything else a stage reads is a field of
:class:`StepContext`, which :class:`medrl.lit.grpo.GRPOModule` fills. The maths are in :mod:`medrl.rl`.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from medrl.lit.grpo_args import CareArgs, LossArgs, OptimArgs, SamplingArgs
from medrl.lit.trajectory import (
    answer_window_mask,
    batched_logprobs,
    build_trajectory,
    forward_logprobs,
    reward_columns,
)
from medrl.models.sharding import full_tensor, is_sharded
from medrl.rl.advantages import as_groups, compute_advantages, group_stats, signal_groups
from medrl.rl.distributed import gather_objects, global_max, global_min, global_std, world_size
from medrl.rl.ema import EMAReference
from medrl.rl.entropy import entropy_threshold, high_entropy_mask
from medrl.rl.losses import global_token_count, is_finite, policy_loss
from medrl.rl.mismatch import engine_weights, mismatch_stats
from medrl.rl.rewards import RewardFn, answer_confidence, care_bonus, score_completions
from medrl.rl.types import Trajectory
from medrl.rollout.types import Item, PromptResult, SamplingParams

STAGES = ("generate", "reward", "advantage", "logprobs", "update", "sync")
Metrics = dict[str, float]


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


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode (no dropout) for the block, its previous mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@dataclass
class RefillBuffer:
    """Dynamic sampling's kept groups, waiting until a full batch is there (checkpointed with the module)."""

    parts: list[Trajectory] = field(default_factory=list)
    rounds: int = 0  # batches sampled since the last update

    @property
    def groups(self) -> int:
        """Groups held."""
        return sum(t.num_groups for t in self.parts)


@dataclass
class StepContext:
    """Everything a GRPO step reads or drives; nothing else is reached for.

    Attributes:
        policy: the trained model (PEFT-wrapped under LoRA, sharded under FSDP).
        processor: its processor (the tokenizer decodes answer spans).
        device: where the update runs.
        sampling, loss, care, optim: the option groups (:mod:`medrl.lit.grpo_args`).
        reward_fns: name -> reward function; reward_weights: name -> weight.
        ema: the EMA reference (CARE's scorer, or the ``ema`` KL reference), None when neither is on.
        generate: ``(items, params) -> results`` with the rollout engine.
        sync: pushes the policy's weights to the engine.
        reference: a context giving the KL reference model in eval mode.
        optimizers: ``() -> (optimizer, scheduler)``, asked for only by the update.
        backward: the trainer's backward (``manual_backward``: precision and strategy hooks).
        global_step: ``() -> optimizer steps so far`` (the EMA's clock).
        engine_name: ``hf`` or ``vllm`` (the mismatch correction's default depends on it).
        end_ids: token ids that end a completion (a completion at the length cap without one was truncated).
        engine_sleep: frees the engine's memory before the update (vLLM's sleep mode; a no-op otherwise).
    """

    policy: nn.Module
    processor: Any
    device: torch.device
    sampling: SamplingArgs
    loss: LossArgs
    care: CareArgs
    optim: OptimArgs
    reward_fns: Mapping[str, RewardFn]
    reward_weights: Mapping[str, float]
    ema: EMAReference | None
    generate: Callable[[Sequence[Item], SamplingParams], list[PromptResult]]
    sync: Callable[[], None]
    reference: Callable[[], AbstractContextManager[nn.Module]]
    optimizers: Callable[[], tuple[Any, Any]]
    backward: Callable[[Tensor], None]
    global_step: Callable[[], int]
    engine_name: str = "hf"
    end_ids: Sequence[int] = ()
    engine_sleep: Callable[[], None] = lambda: None


class GRPOStep:
    """generate -> reward -> advantage -> logprobs -> update -> sync, on one batch of VQA items."""

    def __init__(self, ctx: StepContext) -> None:
        self.ctx = ctx
        self.sampled: Trajectory | None = None  # this step's rollouts with rewards and advantages (for tables)

    def __call__(self, batch: list[dict[str, Any]], params: SamplingParams, buffer: RefillBuffer) -> Metrics:
        """Run the six stages; returns the step's metrics, ``time/<stage>`` included."""
        timer = StageTimer(self.ctx.device)
        metrics: Metrics = {}
        with timer("generate"):
            traj = self.generate(batch, params)
        with timer("reward"):
            traj, found = self.reward(traj, batch)
            metrics |= found
        with timer("advantage"):
            ready, found = self.advantage(traj, len(batch), buffer)
            metrics |= found
        self.sampled = traj
        if ready is not None:
            self.ctx.engine_sleep()  # vLLM's memory to the update; the sync stage wakes its weights
            with timer("logprobs"):
                ready = self.logprobs(ready)
            with timer("update"):
                metrics |= self.update(ready)
            with timer("sync"):
                self.ctx.sync()
        metrics |= {f"time/{name}": timer.seconds.get(name, 0.0) for name in STAGES}
        metrics["time/step"] = sum(timer.seconds.values())
        return metrics

    # ------------------------------------------------------------------ generate
    def generate(self, batch: list[dict[str, Any]], params: SamplingParams) -> Trajectory:
        """G completions per prompt from the engine, as one left-padded trajectory.

        The engine's log-probs are kept apart (``engine_logprobs``) for the mismatch metrics; with a mismatch
        correction the ratio's old log-probs are the trainer's own instead (the update's, or recomputed).
        """
        traj = build_trajectory(self.ctx.processor, batch, self.ctx.generate(batch, params))
        traj.engine_logprobs = traj.old_logprobs
        if self.ctx.loss.correction_for(self.ctx.engine_name) != "none":
            traj.old_logprobs = None
        return traj

    # ------------------------------------------------------------------ reward
    def reward(self, traj: Trajectory, batch: list[dict[str, Any]]) -> tuple[Trajectory, Metrics]:
        """The weighted rewards (plus the CARE bonus) of every completion, and what they look like."""
        ctx, metrics = self.ctx, {}
        lengths_t = traj.completion_mask.sum(1)
        lengths = lengths_t.tolist()
        budget = ctx.sampling.max_completion_length
        buffer = ctx.sampling.overlong_buffer if ctx.sampling.overlong_buffer is not None else budget // 4
        columns = reward_columns(batch, traj.group_size) | {
            "completion_length": lengths,
            "max_completion_length": [budget] * len(lengths),
            "overlong_buffer": [buffer] * len(lengths),
        }
        parts = score_completions(traj.texts, columns, ctx.reward_fns)
        total = sum(ctx.reward_weights[name] * parts[name] for name in parts)
        if ctx.care.enabled:
            bonus, confidence = self.care_bonus(traj, parts["accuracy"])
            total = total + bonus
            parts["care_bonus"] = bonus
            if confidence.numel():
                metrics["care/confidence"] = confidence.mean().item()
        traj.rewards, traj.reward_parts = total, parts
        for name, values in parts.items():
            metrics[f"reward/{name}"] = values.mean().item()
        metrics["reward/mean"] = total.mean().item()
        metrics["reward/std"] = as_groups(total, traj.group_size).std(dim=1).mean().item()
        lengths_t = lengths_t.float()
        metrics["completion/length"] = lengths_t.mean().item()
        metrics["completion/length_max"] = lengths_t.max().item()
        metrics["completion/truncated"] = self.truncated(traj).float().mean().item()
        if "accuracy" in parts:
            for key, value in group_stats(as_groups(parts["accuracy"], traj.group_size)).items():
                metrics[f"groups/{key}"] = value
        return traj, metrics

    def care_bonus(self, traj: Trajectory, accuracy: Tensor) -> tuple[Tensor, Tensor]:
        """``[N]`` CARE bonus, and the reference confidences of the samples that could earn it."""
        ctx, micro, share = self.ctx, self.ctx.optim.micro_batch_size, self.ctx.loss.share_prompt
        acc = as_groups(accuracy, traj.group_size)
        selected = ((acc > 0) & (acc >= acc.mean(dim=1, keepdim=True))).flatten()
        rows = selected.nonzero().flatten().tolist()
        confidence = torch.zeros(traj.num_rows)
        # Under FSDP every forward gathers weights collectively, so every process runs as many forwards.
        calls = -(-len(rows) // micro)
        padding = global_max(calls, ctx.device) - calls if is_sharded(ctx.policy) else 0
        if rows or padding:
            # Only samples that can earn the bonus are scored: the others never need a confidence.
            with eval_mode(ctx.policy), ctx.ema.swapped_in(ctx.policy):
                ref = batched_logprobs(ctx.policy, traj, micro, rows, share).cpu()
                for _ in range(padding):
                    batched_logprobs(ctx.policy, traj, 1, [0], share)
            if rows:
                mask = answer_window_mask(ctx.processor.tokenizer, traj, rows)
                confidence[rows] = answer_confidence(ref, mask, ctx.care.confidence_cap)
        bonus = care_bonus(acc, as_groups(confidence, traj.group_size), ctx.care.bonus, ctx.care.margin).flatten()
        return bonus, confidence[rows]

    # ------------------------------------------------------------------ advantage
    def advantage(self, traj: Trajectory, num_prompts: int, buffer: RefillBuffer) -> tuple[Trajectory | None, Metrics]:
        """Group-normalised advantages; with dynamic sampling, None while ``buffer`` is still refilling."""
        ctx, metrics = self.ctx, {}
        groups = as_groups(traj.rewards, traj.group_size)
        # Groups never straddle processes; only the `batch` scale looks beyond a group, at the global batch.
        scale = ctx.loss.advantage_scale
        batch_std = global_std(groups, ctx.device) if scale == "batch" and world_size() > 1 else None
        estimator = ctx.loss.advantage_estimator
        traj.advantages = compute_advantages(groups, estimator, scale, ctx.loss.advantage_eps, batch_std).flatten()
        metrics["groups/no_signal"] = (~signal_groups(groups)).float().mean().item()
        if not ctx.sampling.dynamic_sampling:
            return traj, metrics
        keep = signal_groups(groups)
        metrics["sampling/kept_groups"] = keep.float().mean().item()
        if keep.any():
            buffer.parts.append(traj.select_groups(keep.nonzero().flatten()))
        buffer.rounds += 1
        # Every process waits or trains together, on as many groups as the shortest has (else DDP/FSDP hang).
        have = global_min(buffer.groups, ctx.device)
        if have < num_prompts and buffer.rounds < ctx.sampling.max_sampling_rounds:
            metrics["sampling/waiting"] = 1.0
            return None, metrics
        parts, buffer.parts, buffer.rounds = buffer.parts, [], 0
        metrics["sampling/waiting"] = 0.0
        if have == 0:
            return None, metrics
        merged = Trajectory.cat(parts, ctx.processor.tokenizer.pad_token_id)
        return merged.select_groups(list(range(min(num_prompts, have)))), metrics

    def truncated(self, traj: Trajectory) -> Tensor:
        """``[N]`` bool: completions that reached max_completion_length without an end token."""
        lengths = traj.completion_mask.sum(1)
        ended = torch.isin(traj.completion_ids[:, -1], torch.tensor(list(self.ctx.end_ids), dtype=torch.long))
        return (lengths >= self.ctx.sampling.max_completion_length) & ~ended

    # ------------------------------------------------------------------ logprobs
    def logprobs(self, traj: Trajectory) -> Trajectory:
        """Old-policy log-probs when the update needs them, reference log-probs when ``beta > 0``."""
        ctx, loss = self.ctx, self.ctx.loss
        if loss.old_logprobs == "recompute":
            traj.old_logprobs = None
        if traj.old_logprobs is None and loss.mu > 1:
            # With mu == 1 the update's own log-probs, detached, are exactly the sampling policy's: no extra pass.
            with eval_mode(ctx.policy):
                traj.old_logprobs = batched_logprobs(
                    ctx.policy, traj, ctx.optim.micro_batch_size, share_prompt=loss.share_prompt
                ).cpu()
        if loss.beta > 0:
            with ctx.reference() as ref_model:
                traj.ref_logprobs = batched_logprobs(
                    ref_model, traj, ctx.optim.micro_batch_size, share_prompt=loss.share_prompt
                ).cpu()
        return traj

    # ------------------------------------------------------------------ update
    def update(self, traj: Trajectory) -> Metrics:
        """``mu`` optimizer steps of the clipped loss; a non-finite loss or gradient skips a step, counted."""
        ctx = self.ctx
        opt, sched = ctx.optimizers()
        params = [p for p in ctx.policy.parameters() if p.requires_grad]
        mask = self.loss_mask(traj)
        dapo = ctx.loss.aggregation == "dapo"
        num_tokens = global_token_count(mask).to(ctx.device) if dapo or ctx.loss.entropy_coef > 0 else None
        clip = ctx.optim.max_grad_norm if ctx.optim.max_grad_norm > 0 else float("inf")
        totals: Metrics = defaultdict(float)
        skipped = 0
        for iteration in range(ctx.loss.mu):
            step = self._accumulate(traj, mask, num_tokens if dapo else None, num_tokens, first=iteration == 0)
            grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(params, clip))  # FSDP: the norm over every shard
            if step is None or not self._all_finite(grad_norm):
                # Never applied: the weights, optimizer moments and schedule stay as they were.
                opt.zero_grad(set_to_none=True)
                skipped += 1
                continue
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            if ctx.ema is not None:
                ctx.ema.maybe_update(ctx.policy, ctx.global_step())
            step["grad_norm"] = grad_norm.item()
            for key, value in step.items():
                if key == "ratio_min":
                    totals[key] = min(totals.get(key, value), value)
                elif key == "ratio_max":
                    totals[key] = max(totals.get(key, value), value)
                else:
                    totals[key] += value
        steps = ctx.loss.mu - skipped
        metrics = {"train/skipped_nonfinite": float(skipped), "train/lr": opt.param_groups[0]["lr"]}
        if steps:
            tokens = max(totals["tokens"], 1.0)
            metrics["train/loss"] = totals["loss"] / steps
            metrics["train/grad_norm"] = totals["grad_norm"] / steps
            for key in ("kl", "clip_fraction", "clip_fraction_low", "clip_fraction_high", "ratio_mean", "entropy",
                        "approx_kl"):  # fmt: skip
                metrics[f"train/{key}"] = totals[key] / tokens
            metrics["train/ratio_min"], metrics["train/ratio_max"] = totals["ratio_min"], totals["ratio_max"]
            metrics["train/entropy_bonus"] = totals["entropy_bonus"] / steps
        if "engine_diff_tokens" in totals:
            count = max(totals["engine_diff_tokens"], 1.0)
            metrics["train/engine_logprob_diff"] = totals["engine_diff_sum"] / count
            metrics["train/engine_logprob_diff_max"] = totals["engine_diff_max"]
            metrics["train/engine_outside_band"] = totals["engine_outside"] / count
        return metrics

    def loss_mask(self, traj: Trajectory) -> Tensor:
        """``[N, L]`` tokens that carry the loss: the completion's, less truncated ones when so asked."""
        mask = traj.completion_mask
        if self.ctx.loss.mask_truncated_completions:
            mask = mask & ~self.truncated(traj).unsqueeze(1)
        return mask

    def _accumulate(
        self, traj: Trajectory, loss_mask: Tensor, num_tokens: Tensor | None, batch_tokens: Tensor | None, first: bool
    ) -> Metrics | None:
        """Forward and backward over every micro-batch; None (gradients to be dropped) on a non-finite loss."""
        ctx, loss, n = self.ctx, self.ctx.loss, traj.num_rows
        correction = loss.correction_for(ctx.engine_name)
        sums: Metrics = defaultdict(float)
        for start in range(0, n, ctx.optim.micro_batch_size):
            rows = list(range(start, min(n, start + ctx.optim.micro_batch_size)))
            logp, entropy = forward_logprobs(
                ctx.policy, traj, rows, entropy=True, entropy_grad=loss.entropy_coef > 0, share_prompt=loss.share_prompt
            )
            mask = loss_mask[rows].to(ctx.device)
            old = logp.detach() if traj.old_logprobs is None else traj.old_logprobs[rows].to(ctx.device)
            ref = None if traj.ref_logprobs is None else traj.ref_logprobs[rows].to(ctx.device)
            weights = None
            if traj.engine_logprobs is not None:
                engine = traj.engine_logprobs[rows].to(ctx.device)
                if first:  # the trainer's log-probs of the sampled tokens (before any update) against the engine's
                    found = mismatch_stats(logp.detach(), engine, mask, loss.mismatch_low, loss.mismatch_cap)
                    tokens_here = float(mask.sum())
                    sums["engine_diff_sum"] += found["mean"] * tokens_here
                    sums["engine_diff_max"] = max(sums["engine_diff_max"], found["max"])
                    sums["engine_outside"] += found["outside"] * tokens_here
                    sums["engine_diff_tokens"] += tokens_here
                weights = engine_weights(
                    old, engine, mask, correction, loss.mismatch_level, loss.mismatch_low, loss.mismatch_cap
                )
            if loss.top_entropy_quantile < 1:
                values = entropy.detach()[mask.bool()].cpu()
                pooled = torch.cat(gather_objects(values)) if world_size() > 1 else values
                keep = high_entropy_mask(entropy.detach(), mask, entropy_threshold(pooled, loss.top_entropy_quantile))
                weights = keep.to(logp.dtype) if weights is None else weights * keep.to(logp.dtype)
            out = policy_loss(
                logp,
                old,
                traj.advantages[rows].to(ctx.device),
                mask,
                epsilon_low=loss.epsilon_low,
                epsilon_high=loss.epsilon_high,
                aggregation=loss.aggregation,
                max_length=ctx.sampling.max_completion_length,
                ref_logprobs=ref,
                beta=loss.beta,
                num_sequences=n,
                num_tokens=num_tokens,
                importance_sampling=loss.importance_sampling,
                kl_estimator=loss.kl_estimator,
                kl_bias_correction=loss.kl_bias_correction,
                token_weights=weights,
                entropy=entropy,
                entropy_coef=loss.entropy_coef,
                entropy_tokens=batch_tokens,
            )
            if not self._all_finite(out.loss):
                return None
            ctx.backward(out.loss)
            tokens = mask.sum().item()
            sums["loss"] += out.loss.item()  # micro-batch losses add up: their normalisers are the batch's
            for key in ("kl", "clip_fraction", "clip_fraction_low", "clip_fraction_high", "ratio_mean", "approx_kl"):
                sums[key] += getattr(out, key).item() * tokens
            if tokens:
                sums["ratio_min"] = min(sums.get("ratio_min", math.inf), out.ratio_min.item())
                sums["ratio_max"] = max(sums.get("ratio_max", -math.inf), out.ratio_max.item())
            sums["entropy"] += (entropy.detach() * mask).sum().item()
            sums["entropy_bonus"] += out.entropy_bonus.item()
            sums["tokens"] += tokens
        sums.setdefault("ratio_min", 1.0)
        sums.setdefault("ratio_max", 1.0)
        return sums

    def _all_finite(self, value: Tensor) -> bool:
        """True when the value is finite on every process (all must agree, or DDP's backward would hang)."""
        flag = torch.tensor(float(is_finite(value)), device=self.ctx.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())
