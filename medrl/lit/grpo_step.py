"""One GRPO step: six timed stages with explicit inputs and outputs, composed by :class:`GRPOStep`.

``generate -> reward -> advantage -> logprobs -> update -> sync``. Each stage is a method that takes what
the previous one returned and returns what the next needs; everything else a stage reads is a field of
:class:`StepContext`, which :class:`medrl.lit.grpo.GRPOModule` fills. The maths are in :mod:`medrl.rl`.
"""

from __future__ import annotations

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
from medrl.rl.advantages import as_groups, group_advantages, group_stats, signal_groups
from medrl.rl.distributed import global_max, global_min, global_std, world_size
from medrl.rl.ema import EMAReference
from medrl.rl.losses import global_token_count, is_finite, policy_loss
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


class GRPOStep:
    """generate -> reward -> advantage -> logprobs -> update -> sync, on one batch of VQA items."""

    def __init__(self, ctx: StepContext) -> None:
        self.ctx = ctx

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
        if ready is not None:
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
        """G completions per prompt from the engine, as one left-padded trajectory."""
        return build_trajectory(self.ctx.processor, batch, self.ctx.generate(batch, params))

    # ------------------------------------------------------------------ reward
    def reward(self, traj: Trajectory, batch: list[dict[str, Any]]) -> tuple[Trajectory, Metrics]:
        """The weighted rewards (plus the CARE bonus) of every completion, and what they look like."""
        ctx, metrics = self.ctx, {}
        parts = score_completions(traj.texts, reward_columns(batch, traj.group_size), ctx.reward_fns)
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
        lengths = traj.completion_mask.sum(1).float()
        metrics["completion/length"] = lengths.mean().item()
        metrics["completion/truncated"] = (lengths >= ctx.sampling.max_completion_length).float().mean().item()
        if "accuracy" in parts:
            for key, value in group_stats(as_groups(parts["accuracy"], traj.group_size)).items():
                metrics[f"groups/{key}"] = value
        return traj, metrics

    def care_bonus(self, traj: Trajectory, accuracy: Tensor) -> tuple[Tensor, Tensor]:
        """``[N]`` CARE bonus, and the reference confidences of the samples that could earn it."""
        ctx, micro = self.ctx, self.ctx.optim.micro_batch_size
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
                ref = batched_logprobs(ctx.policy, traj, micro, rows).cpu()
                for _ in range(padding):
                    batched_logprobs(ctx.policy, traj, 1, [0])
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
        traj.advantages = group_advantages(groups, scale, ctx.loss.advantage_eps, batch_std).flatten()
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

    # ------------------------------------------------------------------ logprobs
    def logprobs(self, traj: Trajectory) -> Trajectory:
        """Old-policy log-probs when the update needs them, reference log-probs when ``beta > 0``."""
        ctx, loss = self.ctx, self.ctx.loss
        if loss.old_logprobs == "recompute":
            traj.old_logprobs = None
        if traj.old_logprobs is None and loss.mu > 1:
            # With mu == 1 the update's own log-probs, detached, are exactly the sampling policy's: no extra pass.
            with eval_mode(ctx.policy):
                traj.old_logprobs = batched_logprobs(ctx.policy, traj, ctx.optim.micro_batch_size).cpu()
        if loss.beta > 0:
            with ctx.reference() as ref_model:
                traj.ref_logprobs = batched_logprobs(ref_model, traj, ctx.optim.micro_batch_size).cpu()
        return traj

    # ------------------------------------------------------------------ update
    def update(self, traj: Trajectory) -> Metrics:
        """``mu`` optimizer steps of the clipped loss; a non-finite loss or gradient skips a step, counted."""
        ctx = self.ctx
        opt, sched = ctx.optimizers()
        params = [p for p in ctx.policy.parameters() if p.requires_grad]
        dapo = ctx.loss.aggregation == "dapo"
        num_tokens = global_token_count(traj.completion_mask).to(ctx.device) if dapo else None
        clip = ctx.optim.max_grad_norm if ctx.optim.max_grad_norm > 0 else float("inf")
        totals: Metrics = defaultdict(float)
        skipped = 0
        for _ in range(ctx.loss.mu):
            step = self._accumulate(traj, num_tokens)
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
                totals[key] += value
        steps = ctx.loss.mu - skipped
        metrics = {"train/skipped_nonfinite": float(skipped), "train/lr": opt.param_groups[0]["lr"]}
        if steps:
            tokens = max(totals["tokens"], 1.0)
            metrics["train/loss"] = totals["loss"] / steps
            metrics["train/grad_norm"] = totals["grad_norm"] / steps
            for key in ("kl", "clip_fraction", "ratio_mean", "entropy"):
                metrics[f"train/{key}"] = totals[key] / tokens
        return metrics

    def _accumulate(self, traj: Trajectory, num_tokens: Tensor | None) -> Metrics | None:
        """Forward and backward over every micro-batch; None (gradients to be dropped) on a non-finite loss."""
        ctx, loss, n = self.ctx, self.ctx.loss, traj.num_rows
        sums: Metrics = defaultdict(float)
        for start in range(0, n, ctx.optim.micro_batch_size):
            rows = list(range(start, min(n, start + ctx.optim.micro_batch_size)))
            logp, entropy = forward_logprobs(ctx.policy, traj, rows, entropy=True)
            mask = traj.completion_mask[rows].to(ctx.device)
            old = logp.detach() if traj.old_logprobs is None else traj.old_logprobs[rows].to(ctx.device)
            ref = None if traj.ref_logprobs is None else traj.ref_logprobs[rows].to(ctx.device)
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
            )
            if not self._all_finite(out.loss):
                return None
            ctx.backward(out.loss)
            tokens = mask.sum().item()
            sums["loss"] += out.loss.item()  # micro-batch losses add up: their normalisers are the batch's
            for key in ("kl", "clip_fraction", "ratio_mean"):
                sums[key] += getattr(out, key).item() * tokens
            sums["entropy"] += (entropy * mask).sum().item()
            sums["tokens"] += tokens
        return sums

    def _all_finite(self, value: Tensor) -> bool:
        """True when the value is finite on every process (all must agree, or DDP's backward would hang)."""
        flag = torch.tensor(float(is_finite(value)), device=self.ctx.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())
