"""GRPO with the CARE consistency bonus, as a LightningModule with manual optimization.

One training step is six named, timed stages (logged as ``time/<stage>``):

1. ``generate``: G completions per prompt from the rollout engine (``hf`` or ``vllm``);
2. ``reward``: the weighted reward functions, plus the CARE bonus scored by the EMA reference;
3. ``advantage``: group-normalised advantages; optional dynamic sampling drops zero-signal groups and waits
   for the next batch to refill;
4. ``logprobs``: old-policy log-probs (the engine's, or recomputed when ``mu > 1``) and reference log-probs
   when ``beta > 0``;
5. ``update``: ``mu`` optimizer steps of the clipped loss over the same rollouts, in micro-batches, with
   gradient clipping; a non-finite loss or gradient skips the step and is counted, never applied;
6. ``sync``: the new weights go to the engine (a no-op for ``hf``, which generates with the policy itself).

The maths live in :mod:`medrl.rl`; this module only orchestrates. Each step runs under a seed derived from
(seed, epoch, batch, step, rank), so generation and dropout replay exactly after a resume; checkpoints add
the EMA reference, RNG states and any dynamic-sampling buffer to Lightning's optimizer, scheduler and loop
state (the data position comes from :class:`medrl.data.resumable.ResumableLoader`).
"""

from __future__ import annotations

import logging
import random
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch import nn

from medrl.core.dtypes import DType, resolve_dtype
from medrl.core.seeds import derive_seed
from medrl.lit.grpo_stages import GRPOStages
from medrl.models.hub import load_vlm
from medrl.models.lora import LoRAConfig, VisionTraining, apply_lora, count_parameters, is_peft, set_full_finetune
from medrl.models.sharding import shard_like, shard_module
from medrl.rl.advantages import Scale
from medrl.rl.distributed import gather_objects, rank
from medrl.rl.ema import EMAReference
from medrl.rl.losses import Aggregation
from medrl.rl.policy import reward_columns
from medrl.rl.rewards import load_reward, score_completions
from medrl.rl.types import Trajectory
from medrl.rollout.base import Engine, SamplingParams, make_engine

log = logging.getLogger(__name__)
# Lightning 2.6 warns that a checkpoint taken under manual optimization holds the weights after the step.
# That is the state exact resume needs: the loader, batch counter and EMA are all past the step too.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization", category=UserWarning)


class GRPOModule(GRPOStages, L.LightningModule):
    """Group Relative Policy Optimization of a VLM on verifiable VQA, with the CARE consistency bonus.

    Defaults are the study authors' recipe (GRPO-CARE fork): G = 8, temperature 1.0, lr 5e-7, beta 0, one
    update per batch, token mean per sequence, advantage eps 1e-4, CARE bonus 0.5 with margin 0.01 and a
    0.95 confidence cap, EMA reference decay 0.995 every 10 steps, gradient norm clipped at 5.

    Args:
        model: ``tiny`` (or ``tiny:SEED``), a local model folder, or a Hugging Face id.
        finetune: ``full`` trains every language-model weight (the authors' choice); ``lora`` trains adapters.
        lora: LoRA rank, alpha, dropout and targets (when finetune is ``lora``; null: defaults).
        vision: ``frozen`` (default), ``projector`` or ``all``.
        engine: rollout engine, ``hf`` (transformers generate) or ``vllm`` (colocated vLLM).
        engine_options: keyword arguments of the engine (e.g. ``max_model_len``, ``kv_cache_gib`` for vLLM).
        num_generations: G, completions sampled per prompt.
        temperature: sampling temperature.
        top_p: nucleus sampling mass (1.0: off).
        max_completion_length: most tokens per completion (also dr_grpo's fixed length).
        rewards: reward name (``accuracy``, ``format``, or an import path ``pkg.mod:fn``) -> weight.
        care: add the CARE consistency bonus (needs the ``accuracy`` reward).
        care_bonus: bonus coefficient: a consistent correct sample earns ``care_bonus x accuracy``.
        care_margin: samples within this much below the selected set's mean confidence still earn it.
        care_confidence_cap: reference confidences are capped here.
        ema_decay: EMA decay of the reference model.
        ema_every: apply one EMA update every this many optimizer steps.
        advantage_scale: divide centred rewards by the ``group`` std, the ``batch`` std, or ``none``.
        advantage_eps: added to the std in the advantage's denominator.
        dynamic_sampling: drop groups whose rewards are all equal and refill from the next batches.
        max_sampling_rounds: with dynamic sampling, train on what was kept after this many batches.
        loss_aggregation: ``grpo`` (token mean per sequence), ``dr_grpo`` (sum / fixed length), ``dapo``
            (token mean over the whole batch, across processes).
        epsilon_low: lower clip range of the ratio (1 - epsilon_low).
        epsilon_high: upper clip range of the ratio (1 + epsilon_high; > epsilon_low is DAPO's clip-higher).
        beta: weight of the k3 KL penalty to the reference (0: no KL, no reference pass).
        kl_reference: full fine-tuning's KL reference: ``initial`` weights (reloaded, frozen) or the ``ema``
            model (LoRA always uses the base model, adapters disabled).
        mu: optimizer steps over each batch of rollouts (1: on-policy, the ratio is 1 and clipping is idle).
        old_logprobs: ``engine`` uses the engine's log-probs of the sampled tokens when it returns them;
            ``recompute`` runs the policy before the update (needed only when mu > 1).
        micro_batch_size: sequences per forward/backward pass (memory bound; the loss does not depend on it).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear learning-rate warm-up over this many optimizer steps, constant afterwards.
        max_grad_norm: clip the gradient norm to this (0: no clipping).
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        dtype: weight dtype; ``auto`` is bfloat16 when a GPU is visible, float32 otherwise.
        attn_implementation: transformers attention kernel; null: default.
        val_max_new_tokens: greedy completion length for validation (null: max_completion_length).
        seed: seeds each step's sampling and dropout.
    """

    def __init__(
        self,
        model: str = "tiny",
        finetune: Literal["full", "lora"] = "full",
        lora: LoRAConfig | None = None,
        vision: VisionTraining = "frozen",
        engine: Literal["hf", "vllm"] = "hf",
        engine_options: dict[str, Any] | None = None,
        num_generations: int = 8,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_completion_length: int = 2048,
        rewards: dict[str, float] | None = None,
        care: bool = True,
        care_bonus: float = 0.5,
        care_margin: float = 0.01,
        care_confidence_cap: float = 0.95,
        ema_decay: float = 0.995,
        ema_every: int = 10,
        advantage_scale: Scale = "group",
        advantage_eps: float = 1e-4,
        dynamic_sampling: bool = False,
        max_sampling_rounds: int = 4,
        loss_aggregation: Aggregation = "grpo",
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        beta: float = 0.0,
        kl_reference: Literal["initial", "ema"] = "initial",
        mu: int = 1,
        old_logprobs: Literal["engine", "recompute"] = "engine",
        micro_batch_size: int = 8,
        lr: float = 5e-7,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        max_grad_norm: float = 5.0,
        gradient_checkpointing: bool = False,
        dtype: DType = "auto",
        attn_implementation: str | None = None,
        val_max_new_tokens: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        rewards = {"accuracy": 1.0, "format": 1.0} if rewards is None else dict(rewards)
        self._check_args(finetune, lora, num_generations, rewards, care, mu, micro_batch_size, beta)
        self.save_hyperparameters(ignore=["lora"])
        self.hparams["lora"] = None if lora is None else vars(lora).copy()
        self.automatic_optimization = False
        base, self.processor = load_vlm(
            model, device="cpu", dtype=resolve_dtype(dtype), attn_implementation=attn_implementation
        )
        base.config.use_cache = False  # training forwards need no KV cache; generate() turns it on itself
        if gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = (
            apply_lora(base, lora or LoRAConfig(), vision) if finetune == "lora" else set_full_finetune(base, vision)
        )
        self.model.train()
        self.reward_fns = {name: load_reward(name) for name in rewards}
        self.reward_weights = rewards
        needs_ema = care or (beta > 0 and kl_reference == "ema" and finetune == "full")
        self.ema = EMAReference(self.model, ema_decay, ema_every) if needs_ema else None
        self.engine: Engine | None = None
        self._reference_model: nn.Module | None = None
        self._buffer: list[Trajectory] = []
        self._sampling_rounds = 0
        self._rollouts = 0  # training batches generated so far: the step seed's counter, restored on resume
        self.strict_loading = False  # checkpoints hold the trained weights only (see on_save_checkpoint)
        trainable, total = count_parameters(self.model)
        log.info("GRPO %s on %s: %s of %s parameters train", finetune, model, f"{trainable:,}", f"{total:,}")

    @staticmethod
    def _check_args(finetune, lora, num_generations, rewards, care, mu, micro_batch_size, beta) -> None:
        if finetune not in ("full", "lora"):
            raise ValueError(f"finetune must be 'full' or 'lora', got {finetune!r}")
        if finetune == "full" and lora is not None:
            raise ValueError("lora settings were given but finetune is 'full': drop one of them")
        if num_generations < 2:
            raise ValueError(
                f"GRPO compares samples within a group: num_generations must be >= 2, got {num_generations}"
            )
        if not rewards:
            raise ValueError("rewards is empty: give at least one reward function and its weight")
        if care and "accuracy" not in rewards:
            raise ValueError("the CARE bonus rewards consistent *correct* samples: it needs the 'accuracy' reward")
        if mu < 1 or micro_batch_size < 1 or beta < 0:
            raise ValueError(f"need mu >= 1, micro_batch_size >= 1 and beta >= 0; got {mu}, {micro_batch_size}, {beta}")

    # ------------------------------------------------------------------ setup
    def configure_model(self) -> None:
        # Under FSDP (configs/strategy/fsdp.yaml) shard the policy, and the EMA reference with it.
        if shard_module(self) and self.ema is not None:
            self.ema.shard_like(self.model)

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        warmup = max(self.hparams.warmup_steps, 0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _ensure_engine(self) -> Engine:
        if self.engine is None:
            options = dict(self.hparams.engine_options or {})
            if self.hparams.engine == "vllm":
                options.setdefault("seed", self.hparams.seed)
            self.engine = make_engine(self.hparams.engine, self.model, self.processor, **options)
        return self.engine

    def on_fit_start(self) -> None:
        if self.ema is not None:
            self.ema.to(self.device)
        if self.hparams.beta > 0 and not is_peft(self.model) and self.hparams.kl_reference == "initial":
            # Reloaded, not copied: after a resume the live weights are no longer the initial ones.
            ref, _ = load_vlm(self.hparams.model, device=self.device, dtype=next(self.model.parameters()).dtype)
            self._reference_model = shard_like(self.model, ref.eval().requires_grad_(False))

    def on_train_start(self) -> None:
        # Here, not in on_fit_start: some strategies restore a checkpoint's weights after on_fit_start, and a
        # vLLM engine copies the policy's weights when it starts.
        self._ensure_engine()

    def on_validation_start(self) -> None:
        self._ensure_engine()

    def teardown(self, stage: str) -> None:
        if self.engine is not None and self.hparams.engine == "vllm":
            self.engine.close()
            self.engine = None

    @contextmanager
    def _eval_mode(self) -> Iterator[None]:
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    @contextmanager
    def reference(self) -> Iterator[nn.Module]:
        """The KL reference model, in eval mode, for the duration of the block."""
        with self._eval_mode():
            if is_peft(self.model):
                with self.model.disable_adapter():
                    yield self.model
            elif self.hparams.kl_reference == "ema":
                with self.ema.swapped_in(self.model):
                    yield self.model
            else:
                yield self._reference_model

    # ------------------------------------------------------------------ steps
    def _step_seed(self) -> int:
        """A pure function of (seed, rollouts so far, rank): sampling and dropout replay exactly on resume."""
        return derive_seed([self.hparams.seed, self._rollouts, self.global_rank])

    def sampling_params(self, seed: int) -> SamplingParams:
        """The training rollouts' sampling parameters for one step."""
        h = self.hparams
        return SamplingParams(
            n=h.num_generations,
            temperature=h.temperature,
            top_p=h.top_p,
            max_new_tokens=h.max_completion_length,
            seed=seed,
            logprobs=h.old_logprobs == "engine",
        )

    def training_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            seed = self._step_seed()
            torch.manual_seed(seed)
            self.run_stages(batch, seed)
        self._rollouts += 1

    def validation_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        max_new = self.hparams.val_max_new_tokens or self.hparams.max_completion_length
        params = SamplingParams(n=0, greedy=True, max_new_tokens=max_new, seed=self.hparams.seed)
        results = self._generate(batch, params)
        texts = [r.greedy.text for r in results]
        for name, values in score_completions(texts, reward_columns(batch, 1), self.reward_fns).items():
            self.log(f"val/{name}", values.mean(), batch_size=len(batch), sync_dist=True)

    # ------------------------------------------------------------------ checkpoints
    def _trained_keys(self) -> set[str]:
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The frozen weights are the `model` argument on disk; keeping them out keeps LoRA checkpoints small.
        keep = self._trained_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["grpo"] = {
            "ema": None if self.ema is None else self.ema.state_dict(),
            # Each process's own dynamic-sampling buffer: the checkpoint is written by rank 0 alone.
            "buffers": gather_objects([t.to("cpu").state_dict() for t in self._buffer]),
            "sampling_rounds": self._sampling_rounds,
            "rollouts": self._rollouts,
            "rng": _rng_states(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        missing = sorted(self._trained_keys() - set(checkpoint["state_dict"]))
        if missing:
            raise KeyError(
                f"the checkpoint lacks {len(missing)} trained weights of this module (first: {missing[0]}); "
                "it was written with other finetune/lora/vision settings than this run's"
            )
        state = checkpoint.get("grpo")
        if state is None:
            raise KeyError("the checkpoint has no 'grpo' section: it was not written by GRPOModule")
        if self.ema is not None:
            if state["ema"] is None:
                raise KeyError("this run keeps an EMA reference (care or kl_reference=ema) but the checkpoint has none")
            self.ema.load_state_dict(state["ema"])
        buffers = state["buffers"] if "buffers" in state else [state["buffer"]]
        if len(buffers) > 1 and len(buffers) != self.trainer.world_size:
            raise ValueError(
                f"the checkpoint holds dynamic-sampling buffers of {len(buffers)} processes but this run has "
                f"{self.trainer.world_size}: resume on {len(buffers)} processes (or without dynamic_sampling)"
            )
        self._buffer = [Trajectory.from_state_dict(s) for s in buffers[rank() if len(buffers) > 1 else 0]]
        self._sampling_rounds = int(state["sampling_rounds"])
        self._rollouts = int(state["rollouts"])
        _set_rng_states(state["rng"])


def _rng_states() -> dict[str, Any]:
    """Every global RNG state, in types a ``weights_only`` load accepts."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.random.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_states(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.random.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
