"""GRPO's options in five typed groups: sampling, loss, CARE, engine, optimisation.

Each group is a frozen dataclass that checks itself on construction, so a bad value fails when the config is
read, naming the option. LightningCLI exposes the fields as nested options, e.g.
``--model.init_args.loss.beta 0.04`` or, in YAML, ``loss: {beta: 0.04}``; a group given in part keeps the
defaults of the fields it leaves out. Defaults are the study authors' recipe (their GRPO-CARE fork).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, TypeVar

from medrl.core.errors import ConfigError
from medrl.rl.advantages import Estimator, Scale
from medrl.rl.kl import KLEstimator
from medrl.rl.losses import Aggregation
from medrl.rl.mismatch import Correction, CorrectionLevel
from medrl.rl.ratios import ImportanceLevel

EngineName = Literal["hf", "vllm"]


@dataclass(frozen=True)
class SamplingArgs:
    """How the training rollouts are sampled.

    Args:
        num_generations: G, completions sampled per prompt (>= 2: GRPO compares samples within a group).
        temperature: sampling temperature (the authors': 1.0).
        top_p: nucleus sampling mass (1.0: off).
        max_completion_length: most tokens per completion (also dr_grpo's fixed length).
        dynamic_sampling: drop groups whose rewards are all equal and refill from the next batches (DAPO).
        max_sampling_rounds: with dynamic sampling, train on what was kept after this many batches.
        val_max_new_tokens: greedy completion length for validation (null: max_completion_length).
        max_prompt_length: prompt tokens (text and image) a row may take; longer rows are dropped and reported
            as ``too_long`` (null: the model's context minus max_completion_length).
        overlong_buffer: tokens before max_completion_length over which the ``overlong`` reward ramps from 0
            to -1 (DAPO's soft overlong punishment; null: a quarter of max_completion_length).
    """

    num_generations: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_completion_length: int = 2048
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 4
    val_max_new_tokens: int | None = None
    max_prompt_length: int | None = None
    overlong_buffer: int | None = None

    def __post_init__(self) -> None:
        if self.num_generations < 2:
            raise ConfigError(
                "GRPO compares samples within a group: sampling.num_generations must be >= 2, "
                f"got {self.num_generations}"
            )
        if self.max_completion_length < 1 or self.max_sampling_rounds < 1:
            raise ConfigError("sampling.max_completion_length and sampling.max_sampling_rounds must be >= 1")


@dataclass(frozen=True)
class LossArgs:
    """The advantage and the clipped policy loss.

    Args:
        aggregation: ``grpo`` (token mean per sequence), ``dr_grpo`` (sum / fixed length), ``dapo`` (token mean
            over the whole batch, across processes).
        epsilon_low: lower clip range of the ratio (1 - epsilon_low).
        epsilon_high: upper clip range of the ratio (1 + epsilon_high; > epsilon_low is DAPO's clip-higher).
        beta: weight of the k3 KL penalty to the reference (0: no KL, no reference pass).
        kl_reference: full fine-tuning's KL reference: ``initial`` weights (reloaded, frozen) or the ``ema``
            model (LoRA always uses the base model, adapters disabled).
        mu: optimizer steps over each batch of rollouts (1: on-policy, the ratio is 1 and clipping is idle).
        old_logprobs: ``engine`` uses the engine's log-probs of the sampled tokens when it returns them;
            ``recompute`` runs the policy before the update (needed only when mu > 1).
        advantage_scale: divide centred rewards by the ``group`` std, the ``batch`` std, or ``none``.
        advantage_eps: added to the std in the advantage's denominator.
        advantage_estimator: ``grpo`` (group-normalised), ``rloo`` (leave-one-out) or ``grpo_passk`` (only each
            group's best sample moves, by ``r_max - r_second_max``: Pass@k-aware, verl/EasyR1).
        importance_sampling: ``token`` ratios, or ``sequence`` (GSPO: one length-normalised ratio a sequence).
        mismatch_correction: reweight the policy gradient by the engine/trainer log-prob ratio: ``tis``
            (truncated at mismatch_cap), ``mis`` (masked outside [mismatch_low, mismatch_cap]) or ``none``;
            null: ``tis`` with the vllm engine, ``none`` with hf (which samples from the policy itself).
        mismatch_level: the correction's ratio per ``token`` or per ``sequence`` (the product over it).
        mismatch_cap: TIS's cap C, MIS's upper bound.
        mismatch_low: MIS's lower bound (null: none).
        kl_estimator: ``k1``, ``k2``, ``k3`` (default, as TRL) or ``low_var_kl`` (k3 clamped to +-10, as verl).
        kl_bias_correction: weigh the KL by the importance ratio (TRL's use_bias_correction_kl; off as there).
        entropy_coef: entropy bonus: the loss minus this times the mean entropy of the completion tokens.
        top_entropy_quantile: only the tokens in this top share of entropy carry the policy gradient (1: all).
        mask_truncated_completions: a completion that hit max_completion_length without ending carries no loss.
        share_prompt: forward each group's prompt (question and image) once per micro-batch in every pass over
            the rollouts (update, old-policy, KL reference, CARE's scorer), its completions attending to its
            key/value cache; equal to the unshared passes (docs/grpo.md). Gradient checkpointing falls back to
            the unshared passes, said once.
    """

    aggregation: Aggregation = "grpo"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.0
    kl_reference: Literal["initial", "ema"] = "initial"
    mu: int = 1
    old_logprobs: Literal["engine", "recompute"] = "engine"
    advantage_scale: Scale = "group"
    advantage_eps: float = 1e-4
    advantage_estimator: Estimator = "grpo"
    importance_sampling: ImportanceLevel = "token"
    mismatch_correction: Correction | None = None
    mismatch_level: CorrectionLevel = "token"
    mismatch_cap: float = 2.0
    mismatch_low: float | None = None
    kl_estimator: KLEstimator = "k3"
    kl_bias_correction: bool = False
    entropy_coef: float = 0.0
    top_entropy_quantile: float = 1.0
    mask_truncated_completions: bool = False
    share_prompt: bool = True

    def correction_for(self, engine: str) -> Correction:
        """The mismatch correction in force with ``engine`` (the null default resolved)."""
        if self.mismatch_correction is not None:
            return self.mismatch_correction
        return "tis" if engine == "vllm" else "none"

    def __post_init__(self) -> None:
        if not 0 < self.top_entropy_quantile <= 1:
            raise ConfigError(f"loss.top_entropy_quantile must be in (0, 1], got {self.top_entropy_quantile}")
        if self.mismatch_cap <= 0 or (self.mismatch_low is not None and self.mismatch_low >= self.mismatch_cap):
            raise ConfigError(
                f"need 0 < loss.mismatch_low < loss.mismatch_cap; got {self.mismatch_low}, {self.mismatch_cap}"
            )
        if self.entropy_coef < 0:
            raise ConfigError(f"loss.entropy_coef must be >= 0, got {self.entropy_coef}")
        if self.mu < 1 or self.beta < 0:
            raise ConfigError(f"need loss.mu >= 1 and loss.beta >= 0; got {self.mu}, {self.beta}")
        if self.epsilon_low < 0 or self.epsilon_high < 0:
            raise ConfigError(f"loss.epsilon_low/high must be >= 0; got {self.epsilon_low}, {self.epsilon_high}")


@dataclass(frozen=True)
class CareArgs:
    """The CARE consistency bonus and the EMA reference that scores it.

    Args:
        enabled: add the bonus (needs the ``accuracy`` reward).
        bonus: a consistent correct sample earns ``bonus x accuracy``.
        margin: samples within this much below the selected set's mean confidence still earn it.
        confidence_cap: reference confidences are capped here.
        ema_decay: EMA decay of the reference model.
        ema_every: apply one EMA update every this many optimizer steps.
    """

    enabled: bool = True
    bonus: float = 0.5
    margin: float = 0.01
    confidence_cap: float = 0.95
    ema_decay: float = 0.995
    ema_every: int = 10

    def __post_init__(self) -> None:
        if not 0 <= self.ema_decay <= 1 or self.ema_every < 1:
            raise ConfigError(
                f"need 0 <= care.ema_decay <= 1 and care.ema_every >= 1; got {self.ema_decay}, {self.ema_every}"
            )


@dataclass(frozen=True)
class EngineArgs:
    """The rollout engine.

    Args:
        name: ``hf`` (transformers generate on the policy) or ``vllm`` (colocated vLLM, weights pushed each step).
        options: the engine's keyword arguments (e.g. ``max_model_len``, ``kv_cache_gib`` for vLLM).
    """

    name: EngineName = "hf"
    options: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.name not in ("hf", "vllm"):
            raise ConfigError(f"engine.name must be 'hf' or 'vllm', got {self.name!r}")


@dataclass(frozen=True)
class OptimArgs:
    """The optimizer and the memory/speed switches of the update.

    Args:
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear learning-rate warm-up over this many optimizer steps, constant afterwards.
        max_grad_norm: clip the gradient norm to this (0: no clipping).
        micro_batch_size: sequences per forward/backward pass (memory bound; the loss does not depend on it).
        gradient_checkpointing: recompute activations in the backward pass to save memory.
    """

    lr: float = 5e-7
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 5.0
    micro_batch_size: int = 8
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.micro_batch_size < 1 or self.lr < 0 or self.max_grad_norm < 0:
            raise ConfigError(
                f"need optim.micro_batch_size >= 1, optim.lr >= 0 and optim.max_grad_norm >= 0; "
                f"got {self.micro_batch_size}, {self.lr}, {self.max_grad_norm}"
            )


Group = TypeVar("Group", SamplingArgs, LossArgs, CareArgs, EngineArgs, OptimArgs)


def as_group(cls: type[Group], value: Group | dict[str, Any] | None) -> Group:
    """``value`` as a ``cls``: a dict (a checkpoint's saved hyperparameters) or None (the defaults) is built."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        unknown = sorted(set(value) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(
                f"{cls.__name__} has no option(s) {', '.join(unknown)}; it has {', '.join(f.name for f in fields(cls))}"
            )
        return cls(**value)
    raise TypeError(f"expected {cls.__name__} or a dict of its fields, got {type(value).__name__}")


def group_dict(value: Any) -> dict[str, Any]:
    """A group as a plain dict, the form saved in checkpoints and ``hparams.yaml``."""
    return asdict(value)


# Where each option of the former flat GRPOModule signature lives now, for the CLI's hint on an old config.
MOVED_OPTIONS: dict[str, str] = {
    **{f.name: f"sampling.{f.name}" for f in fields(SamplingArgs)},
    "loss_aggregation": "loss.aggregation",
    **{f.name: f"loss.{f.name}" for f in fields(LossArgs) if f.name != "aggregation"},
    "care_bonus": "care.bonus",
    "care_margin": "care.margin",
    "care_confidence_cap": "care.confidence_cap",
    "ema_decay": "care.ema_decay",
    "ema_every": "care.ema_every",
    "engine_options": "engine.options",
    **{f.name: f"optim.{f.name}" for f in fields(OptimArgs)},
}
