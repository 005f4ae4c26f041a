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

The stages are :class:`medrl.lit.grpo_step.GRPOStep`, the options typed groups (:mod:`medrl.lit.grpo_args`),
the maths :mod:`medrl.rl`; this module sets up the policy, the engine and the references, and checkpoints.
Each step runs under a seed derived from (seed, rollouts so far, rank), so generation and dropout replay
exactly after a resume; checkpoints add the EMA reference, RNG states and any dynamic-sampling buffer to
Lightning's optimizer, scheduler and loop state (the data position comes from
:class:`medrl.data.resumable.ResumableLoader`).
"""

from __future__ import annotations

import logging
import random
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch import nn

from medrl.core.dtypes import DType, resolve_dtype
from medrl.core.errors import ConfigError, NonFiniteError
from medrl.core.io import atomic_write_jsonl
from medrl.core.seeds import derive_seed
from medrl.core.trackers import log_table
from medrl.lit.budget import apply_prompt_budget
from medrl.lit.grpo_args import CareArgs, EngineArgs, LossArgs, OptimArgs, SamplingArgs, as_group, group_dict
from medrl.lit.grpo_step import GRPOStep, RefillBuffer, StepContext, eval_mode
from medrl.lit.trajectory import completion_rows, reward_columns
from medrl.models.hub import load_vlm
from medrl.models.lora import LoRAConfig, VisionTraining, apply_lora, count_parameters, is_peft, set_full_finetune
from medrl.models.sharding import gathered, shard_like, shard_module
from medrl.rl.distributed import gather_objects, rank
from medrl.rl.ema import EMAReference
from medrl.rl.rewards import load_reward, score_completions
from medrl.rl.types import Trajectory
from medrl.rollout.decoding import end_token_ids
from medrl.rollout.engine import Engine
from medrl.rollout.factory import make_engine
from medrl.rollout.types import Item, PromptResult, SamplingParams

log = logging.getLogger(__name__)
# Lightning 2.6 warns that a checkpoint taken under manual optimization holds the weights after the step.
# That is the state exact resume needs: the loader, batch counter and EMA are all past the step too.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization", category=UserWarning)
GROUPS = ("sampling", "loss", "care", "engine", "optim")  # the option groups' argument names, in order


class GRPOModule(L.LightningModule):
    """Group Relative Policy Optimization of a VLM on verifiable VQA, with the CARE consistency bonus.

    Defaults are the study authors' recipe (GRPO-CARE fork): G = 8, temperature 1.0, lr 5e-7, beta 0, one
    update per batch, token mean per sequence, advantage eps 1e-4, CARE bonus 0.5 with margin 0.01 and a
    0.95 confidence cap, EMA reference decay 0.995 every 10 steps, gradient norm clipped at 5. The options
    come in groups (:mod:`medrl.lit.grpo_args`): ``--model.init_args.loss.beta 0.04``, or in YAML
    ``loss: {beta: 0.04}``.

    Args:
        model: ``tiny`` (or ``tiny:SEED``), a local model folder, or a Hugging Face id.
        finetune: ``full`` trains every language-model weight (the authors' choice); ``lora`` trains adapters.
        lora: LoRA rank, alpha, dropout and targets (when finetune is ``lora``; null: defaults).
        vision: ``frozen`` (default), ``projector`` or ``all``.
        rewards: reward name (``accuracy``, ``format``, or an import path ``pkg.mod:fn``) -> weight.
        sampling: G, temperature, completion length, dynamic sampling.
        loss: advantage scaling, clipping, aggregation, KL, mu, old log-probs.
        care: the CARE consistency bonus and its EMA reference.
        engine: the rollout engine (``hf`` or ``vllm``) and its options.
        optim: learning rate, warm-up, clipping, micro-batch size, gradient checkpointing.
        dtype: weight dtype; ``auto`` is bfloat16 when a GPU is visible, float32 otherwise.
        attn_implementation: transformers attention kernel; null: default.
        image_options: image-processor settings, passed to the family's processor: resolution
            (``{max_pixels: 802816}``, the paper's cap, for pixel-budget families), splitting
            (``{do_image_splitting: true}`` for SmolVLM / Idefics3, ``{crop_to_patches: true}`` for InternVL,
            ``{do_pan_and_scan: true}`` for Gemma 3); null: the model's own. The rollout engines use the same.
        log_completions_every: every this many steps, write a few prompts' completions with their parsed
            answers, rewards and advantages to ``<log dir>/completions/step_NNNNNN.jsonl`` (and to the logger,
            where it takes tables); 0: never.
        log_completions_prompts: prompts per table (each with its G completions).
        seed: seeds each step's sampling and dropout.
    """

    def __init__(
        self,
        model: str = "tiny",
        finetune: Literal["full", "lora"] = "full",
        lora: LoRAConfig | None = None,
        vision: VisionTraining = "frozen",
        rewards: dict[str, float] | None = None,
        sampling: SamplingArgs = SamplingArgs(),
        loss: LossArgs = LossArgs(),
        care: CareArgs = CareArgs(),
        engine: EngineArgs = EngineArgs(),
        optim: OptimArgs = OptimArgs(),
        dtype: DType = "auto",
        attn_implementation: str | None = None,
        image_options: dict[str, Any] | None = None,
        log_completions_every: int = 0,
        log_completions_prompts: int = 2,
        seed: int = 0,
    ) -> None:
        super().__init__()
        rewards = {"accuracy": 1.0, "format": 1.0} if rewards is None else dict(rewards)
        self.sampling, self.loss, self.care = (
            as_group(SamplingArgs, sampling),
            as_group(LossArgs, loss),
            as_group(CareArgs, care),
        )
        self.engine_args, self.optim = as_group(EngineArgs, engine), as_group(OptimArgs, optim)
        self._check_args(finetune, lora, rewards, self.care)
        self.save_hyperparameters(ignore=["lora", *GROUPS])
        # Plain dicts in checkpoints and hparams.yaml: a weights-only load accepts them, and they read as YAML.
        self.hparams["lora"] = None if lora is None else vars(lora).copy()
        for name, group in zip(
            GROUPS, (self.sampling, self.loss, self.care, self.engine_args, self.optim), strict=True
        ):
            self.hparams[name] = group_dict(group)
        self.automatic_optimization = False
        base, self.processor = load_vlm(
            model,
            device="cpu",
            dtype=resolve_dtype(dtype),
            attn_implementation=attn_implementation,
            image_options=image_options,
        )
        base.config.use_cache = False  # training forwards need no KV cache; generate() turns it on itself
        if self.optim.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = (
            apply_lora(base, lora or LoRAConfig(), vision) if finetune == "lora" else set_full_finetune(base, vision)
        )
        self.model.train()
        self.reward_fns = {name: load_reward(name) for name in rewards}
        self.reward_weights = rewards
        needs_ema = self.care.enabled or (self.loss.beta > 0 and self.loss.kl_reference == "ema" and finetune == "full")
        self.ema = EMAReference(self.model, self.care.ema_decay, self.care.ema_every) if needs_ema else None
        self.engine: Engine | None = None
        self._reference_model: nn.Module | None = None
        self.buffer = RefillBuffer()
        self._rollouts = 0  # training batches generated so far: the step seed's counter, restored on resume
        self.strict_loading = False  # checkpoints hold the trained weights only (see on_save_checkpoint)
        trainable, total = count_parameters(self.model)
        log.info("GRPO %s on %s: %s of %s parameters train", finetune, model, f"{trainable:,}", f"{total:,}")

    @staticmethod
    def _check_args(finetune: str, lora: LoRAConfig | None, rewards: dict[str, float], care: CareArgs) -> None:
        if finetune not in ("full", "lora"):
            raise ConfigError(f"finetune must be 'full' or 'lora', got {finetune!r}")
        if finetune == "full" and lora is not None:
            raise ConfigError("lora settings were given but finetune is 'full': drop one of them")
        if not rewards:
            raise ConfigError("rewards is empty: give at least one reward function and its weight")
        if care.enabled and "accuracy" not in rewards:
            raise ConfigError("the CARE bonus rewards consistent *correct* samples: it needs the 'accuracy' reward")

    # ------------------------------------------------------------------ setup
    def configure_model(self) -> None:
        # Under FSDP (configs/strategy/fsdp.yaml) shard the policy, and the EMA reference with it.
        if shard_module(self) and self.ema is not None:
            self.ema.shard_like(self.model)

    def setup(self, stage: str) -> None:
        apply_prompt_budget(self, self.sampling.max_completion_length, self.sampling.max_prompt_length)

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.optim.lr, weight_decay=self.optim.weight_decay)
        warmup = max(self.optim.warmup_steps, 0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _ensure_engine(self) -> Engine:
        if self.engine is None:
            options = dict(self.engine_args.options or {})
            if self.engine_args.name == "vllm":
                options.setdefault("seed", self.hparams.seed)
            self.engine = make_engine(self.engine_args.name, self.model, self.processor, **options)
        return self.engine

    def on_fit_start(self) -> None:
        if self.ema is not None:
            self.ema.to(self.device)
        if self.loss.beta > 0 and not is_peft(self.model) and self.loss.kl_reference == "initial":
            # Reloaded, not copied: after a resume the live weights are no longer the initial ones.
            ref, _ = load_vlm(self.hparams.model, device=self.device, dtype=next(self.model.parameters()).dtype)
            self._reference_model = shard_like(self.model, ref.eval().requires_grad_(False))

    def on_train_start(self) -> None:
        # Here, not in on_fit_start: some strategies restore a checkpoint's weights after on_fit_start, and a
        # vLLM engine copies the policy's weights when it starts.
        self._ensure_engine()

    def on_validation_start(self) -> None:
        self._ensure_engine()

    def rollout_engine(self) -> Engine:
        """The module's rollout engine, started if need be; the Pass@K callback samples with it when it asks
        for the same kind, so GRPO and its evaluation share one vLLM (weights and KV cache held once)."""
        return self._ensure_engine()

    def teardown(self, stage: str) -> None:
        if self.engine is not None and self.engine_args.name == "vllm":
            self.engine.close()
            self.engine = None

    @contextmanager
    def reference(self) -> Iterator[nn.Module]:
        """The KL reference model, in eval mode, for the duration of the block."""
        with eval_mode(self.model):
            if is_peft(self.model):
                with self.model.disable_adapter():
                    yield self.model
            elif self.loss.kl_reference == "ema":
                with self.ema.swapped_in(self.model):
                    yield self.model
            else:
                yield self._reference_model

    def generate(self, batch: Sequence[Item], params: SamplingParams) -> list[PromptResult]:
        """Sample with the engine; under FSDP the hf engine decodes with the policy itself, so its weights are
        gathered once around the whole call rather than at every token."""
        engine = self._ensure_engine()
        try:
            with gathered(self.model) if engine.name == "hf" else nullcontext():
                return engine.generate(batch, params)
        except RuntimeError as exc:
            # torch.multinomial's words for NaN/inf probabilities: weights blown up by the last update.
            if "inf" in str(exc) and "nan" in str(exc):
                lr = self.optim.lr
                raise NonFiniteError(
                    f"step {self.global_step}: the policy's sampling probabilities are not finite (NaN or inf), "
                    f"so the last update broke the weights; the checkpoints on disk are from before it. Likely "
                    f"cause: the learning rate ({lr:g}) is too high for this model: lower --model.init_args.optim.lr "
                    "and restart"
                ) from exc
            raise

    # ------------------------------------------------------------------ steps
    def step(self) -> GRPOStep:
        """The GRPO step over this module's policy, engine, rewards, options and optimizer."""
        return GRPOStep(
            StepContext(
                policy=self.model,
                processor=self.processor,
                device=self.device,
                sampling=self.sampling,
                loss=self.loss,
                care=self.care,
                optim=self.optim,
                reward_fns=self.reward_fns,
                reward_weights=self.reward_weights,
                ema=self.ema,
                generate=self.generate,
                sync=lambda: self._ensure_engine().sync(self.model),
                reference=self.reference,
                optimizers=lambda: (self.optimizers(), self.lr_schedulers()),
                backward=self.manual_backward,
                global_step=lambda: self.global_step,
                engine_name=self.engine_args.name,
                end_ids=end_token_ids(self.processor.tokenizer),
                engine_sleep=lambda: self._ensure_engine().sleep(),
            )
        )

    def _step_seed(self) -> int:
        """A pure function of (seed, rollouts so far, rank): sampling and dropout replay exactly on resume."""
        return derive_seed([self.hparams.seed, self._rollouts, self.global_rank])

    def sampling_params(self, seed: int) -> SamplingParams:
        """The training rollouts' sampling parameters for one step."""
        s = self.sampling
        return SamplingParams(
            n=s.num_generations,
            temperature=s.temperature,
            top_p=s.top_p,
            max_new_tokens=s.max_completion_length,
            seed=seed,
            logprobs=self.loss.old_logprobs == "engine",
        )

    def training_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            seed = self._step_seed()
            torch.manual_seed(seed)
            step = self.step()
            metrics = step(batch, self.sampling_params(seed), self.buffer)
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=len(batch))
        every = self.hparams.log_completions_every
        if every and self.global_step % every == 0 and step.sampled is not None and self.global_rank == 0:
            self._log_completions(batch, step.sampled)
        self._rollouts += 1

    def _log_completions(self, batch: list[dict[str, Any]], traj: Trajectory) -> None:
        """A few prompts' completions, parsed answers, rewards and advantages: JSONL, and a logger table."""
        rows = completion_rows(batch, traj, self.hparams.log_completions_prompts, self.global_step)
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "completions"
        atomic_write_jsonl(folder / f"step_{self.global_step:06d}.jsonl", rows)
        columns = ["step", "prompt", "image", "completion", "answer", "reward", "advantage"]
        log_table(self.loggers, "train/completions", columns, [[r[c] for c in columns] for r in rows], self.global_step)

    def validation_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        max_new = self.sampling.val_max_new_tokens or self.sampling.max_completion_length
        params = SamplingParams(n=0, greedy=True, max_new_tokens=max_new, seed=self.hparams.seed)
        results = self.generate(batch, params)
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
            "buffers": gather_objects([t.to("cpu").state_dict() for t in self.buffer.parts]),
            "sampling_rounds": self.buffer.rounds,
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
        parts = [Trajectory.from_state_dict(s) for s in buffers[rank() if len(buffers) > 1 else 0]]
        self.buffer = RefillBuffer(parts, int(state["sampling_rounds"]))
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
