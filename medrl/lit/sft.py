"""Supervised fine-tuning of a VLM of any supported family on chat-formatted multiple-choice VQA.

In the study SFT is the bridge: it widens what the model can produce at all (Pass@K) so that RL has
something to sharpen. The loss covers the assistant's answer tokens only (the prompt, the image tokens and
the padding carry none); the target is the gold answer in the ``<answer>X</answer>`` format, preceded by a
``<think>`` trace when the data has one.

LoRA on the language model by default, full fine-tuning as an option; the vision tower and projector stay
frozen unless ``vision`` says otherwise. The optimizer and schedule come from LightningCLI's ``optimizer:``
and ``lr_scheduler:`` keys. :class:`medrl.callbacks.hf_checkpoint.HFCheckpoint` writes, next to each
Lightning checkpoint, the adapter in PEFT's format (and on request a merged model).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import lightning as L
import torch

from medrl.core.dtypes import DType, resolve_dtype
from medrl.core.errors import ConfigError
from medrl.core.seeds import derive_seed
from medrl.data.collate import SFTCollator
from medrl.lit.budget import apply_prompt_budget
from medrl.models.hub import is_hub_id, load_vlm, resolve_model
from medrl.models.lora import LoRAConfig, VisionTraining, apply_lora, count_parameters, set_full_finetune
from medrl.models.sharding import shard_module

log = logging.getLogger(__name__)


class SFTModule(L.LightningModule):
    """Fine-tune a VLM on VQA items (``MedMNISTDataModule(mode="vqa")`` batches) with answer-only loss.

    ``self.model`` is the policy (PEFT-wrapped under LoRA) and ``self.processor`` its processor, so callbacks
    (Pass@K, checkpoint export) can generate with and save it.

    Args:
        model: ``tiny`` (or ``tiny:SEED``), a local model folder, or a Hugging Face id.
        finetune: ``lora`` trains adapters on the language model; ``full`` trains every language-model weight.
        lora: LoRA rank, alpha, dropout and target modules (used when finetune is ``lora``; null: defaults).
        vision: ``frozen`` (default), ``projector`` (train the vision-to-language projector) or ``all``.
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        dtype: weight dtype; ``auto`` is bfloat16 when a GPU is visible, float32 otherwise.
        think_key: item field holding a reasoning trace to train on before the answer.
        max_completion_tokens: cut targets to this many tokens (null: no limit).
        attn_implementation: transformers attention kernel (``sdpa``, ``eager``, ``flash_attention_2``); null: default.
        image_options: image-processor settings, passed to the family's processor: resolution
            (``{max_pixels: 802816}``, the paper's cap, for pixel-budget families), splitting
            (``{do_image_splitting: true}`` for SmolVLM / Idefics3, ``{crop_to_patches: true}`` for InternVL,
            ``{do_pan_and_scan: true}`` for Gemma 3); null: the model's own. The rollout engines use the same.
        max_prompt_length: prompt tokens (text and image) a row may take; longer rows are dropped and reported
            as ``too_long`` (null: the model's context minus max_completion_tokens).
        seed: seeds the dropout of each training step, so a resumed run draws the same masks.
    """

    def __init__(
        self,
        model: str = "tiny",
        finetune: Literal["lora", "full"] = "lora",
        lora: LoRAConfig | None = None,
        vision: VisionTraining = "frozen",
        gradient_checkpointing: bool = False,
        dtype: DType = "auto",
        think_key: str = "think",
        max_completion_tokens: int | None = 512,
        attn_implementation: str | None = None,
        image_options: dict[str, Any] | None = None,
        max_prompt_length: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if finetune not in ("lora", "full"):
            raise ConfigError(f"finetune must be 'lora' or 'full', got {finetune!r}")
        if finetune == "full" and lora is not None:
            raise ConfigError("lora settings were given but finetune is 'full': drop one of them")
        if isinstance(lora, dict):  # as stored in a checkpoint's hyper_parameters (see below)
            lora = LoRAConfig(**lora)
        self.save_hyperparameters()
        # Plain types only: checkpoints must load with torch.load(weights_only=True).
        self.hparams["lora"] = None if lora is None else dict(vars(lora))
        torch_dtype = resolve_dtype(dtype)
        # Weights load here, not in configure_model: LightningCLI builds the optimizer from model.parameters()
        # right after instantiation. Lightning moves them to the device later; the Parameters stay the same.
        base, self.processor = load_vlm(
            model, device="cpu", dtype=torch_dtype, attn_implementation=attn_implementation, image_options=image_options
        )
        base.config.use_cache = False  # no KV cache in a training forward; generate() turns it on itself
        if gradient_checkpointing:
            # Non-reentrant checkpointing needs no input grads (frozen embeddings) and replays dropout exactly.
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if finetune == "lora":
            self.model = apply_lora(base, lora or LoRAConfig(), vision)
            # Record the model argument, not the local snapshot path, so the adapter names a portable base.
            self.model.peft_config["default"].base_model_name_or_path = (
                model if is_hub_id(model) else str(resolve_model(model))
            )
        else:
            self.model = set_full_finetune(base, vision)
        self.model.train()
        self.collator = SFTCollator(self.processor, think_key, max_completion_tokens)
        # Checkpoints hold only the trained weights; the frozen rest is reloaded from `model` (see on_load).
        self.strict_loading = False
        trainable, total = count_parameters(self.model)
        log.info("SFT %s on %s: %s of %s parameters train", finetune, model, f"{trainable:,}", f"{total:,}")

    def setup(self, stage: str) -> None:
        completion = self.hparams.max_completion_tokens or 512
        apply_prompt_budget(self, completion, self.hparams.max_prompt_length)

    def configure_model(self) -> None:
        shard_module(self)  # under FSDP (configs/strategy/fsdp.yaml); nothing under any other strategy

    def _step_seed(self, batch_idx: int) -> int:
        """A seed that is a pure function of (seed, epoch, batch, rank): dropout replays exactly on resume."""
        return derive_seed([self.hparams.seed, self.current_epoch, batch_idx, self.global_rank], bits=32)

    def _loss(self, items: list[dict[str, Any]]) -> tuple[torch.Tensor, int]:
        batch = self.collator(items).to(self.device)
        out = self.model(**batch.inputs, labels=batch.labels)  # mean over the answer tokens of the batch
        return out.loss, int(batch.assistant_mask.sum())

    def training_step(self, batch: list[dict[str, Any]], batch_idx: int) -> torch.Tensor:
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self._step_seed(batch_idx))
            loss, tokens = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        self.log("train/answer_tokens", float(tokens), reduce_fx="sum", batch_size=len(batch))
        return loss

    def validation_step(self, batch: list[dict[str, Any]], batch_idx: int) -> torch.Tensor:
        loss, _ = self._loss(batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch), sync_dist=True)
        return loss

    def _trained_keys(self) -> set[str]:
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Frozen base weights are a copy of `model` on disk: keeping them out makes a LoRA checkpoint of a
        # 7B model a few MB instead of 15 GB. Optimizer state and trained weights are all exact resume needs.
        keep = self._trained_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        missing = sorted(self._trained_keys() - set(checkpoint["state_dict"]))
        if missing:
            raise KeyError(
                f"the checkpoint lacks {len(missing)} trained weights of this module (first: {missing[0]}); "
                "it was written with other finetune/lora/vision settings than this run's"
            )
