"""Acc@1 / Pass@K of the policy during validation, logged live and written per evaluation.

Works with any LightningModule exposing its policy as ``model`` and the processor as ``processor`` (see
:class:`medrl.rollout.types.PolicyModule`), and any validation data whose dataset yields VQA items
(``MedMNISTDataModule(mode="vqa")`` and the PMC-VQA/benchmark modules do). Questions are split across
ranks without padding (rank r takes every world-th question), so each is scored exactly once and the
metric's sync gives every rank the global numbers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from medrl.core.errors import ConfigError
from medrl.core.trackers import log_png
from medrl.evaluation import (
    ALL,
    add_image_reliance,
    default_ks,
    sample_and_score,
    summarise,
    swap_images,
    write_outputs,
)
from medrl.rollout.engine import Engine
from medrl.rollout.factory import make_engine
from medrl.rollout.types import PASS_AT_K_TEMPERATURE, PASS_AT_K_TOP_P, PolicyModule, SamplingParams

log = logging.getLogger(__name__)


class PassAtKCallback(L.Callback):
    """Sample ``n`` completions (plus one greedy) per validation question and log Acc@1, Pass@k and friends.

    Logged as ``val/acc@1``, ``val/pass@{k}``, ``val/gap@{k}``, ``val/majority``, ``val/format_fail``,
    ``val/unique`` (and ``val/<modality>/...`` when the data has several modalities). Each evaluation
    writes ``questions.jsonl``, ``summary.json``, ``summary.md`` and ``pass_at_k.png`` under
    ``<output_dir>/<tag>/`` (tag ``before_training``, ``epoch003``, or ``validate``).

    Args:
        engine: ``hf`` (generate with the policy in memory) or ``vllm`` (colocated vLLM, weights pushed
            before each evaluation).
        n: samples per question (the study uses 16).
        ks: the k of Pass@k (default: powers of two up to n, and n).
        temperature: sampling temperature (the study uses 0.7).
        top_p: nucleus mass (the study uses 0.9).
        top_k: top-k cut (0: off).
        max_new_tokens: completion length limit.
        every_n_epochs: evaluate at every N-th validation epoch during fit (validate always evaluates).
        before_training: also evaluate once when training starts, before any update.
        max_questions: evaluate the first N validation questions only (None: all).
        batch_size: questions per engine call.
        seed: sampling seed (each evaluation uses seed + epoch, so epochs differ but reruns repeat).
        output_dir: where evaluations go (default: ``<trainer.log_dir or default_root_dir>/pass_at_k``).
        keep_texts: also store every sampled completion's text in the JSONL.
        engine_options: keyword arguments of the engine (e.g. ``max_model_len``, ``kv_cache_gib`` for vLLM).
        image_ablation: also answer each question greedily with another question's image and log
            ``val/image_reliance`` (Acc@1 with the right image minus with the swapped one, and its interval).
    """

    def __init__(
        self,
        engine: Literal["hf", "vllm"] = "hf",
        n: int = 16,
        ks: list[int] | None = None,
        temperature: float = PASS_AT_K_TEMPERATURE,
        top_p: float = PASS_AT_K_TOP_P,
        top_k: int = 0,
        max_new_tokens: int = 256,
        every_n_epochs: int = 1,
        before_training: bool = True,
        max_questions: int | None = None,
        batch_size: int = 64,
        seed: int = 0,
        output_dir: str | None = None,
        keep_texts: bool = False,
        engine_options: dict[str, Any] | None = None,
        image_ablation: bool = False,
    ) -> None:
        super().__init__()
        self.image_ablation = image_ablation
        if engine not in ("hf", "vllm"):
            raise ConfigError(f"engine must be 'hf' or 'vllm', got {engine!r}")
        if every_n_epochs < 1:
            raise ConfigError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.ks = sorted(set(ks)) if ks else default_ks(n)
        if max(self.ks) > n:
            raise ConfigError(f"ks {self.ks} go above n={n}: pass@k needs k <= n samples")
        self.engine_kind, self.engine_options = engine, dict(engine_options or {})
        self.params = SamplingParams(
            n=n, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens, seed=seed
        )
        self.every_n_epochs, self.before_training = every_n_epochs, before_training
        self.max_questions, self.batch_size, self.keep_texts = max_questions, batch_size, keep_texts
        self.output_dir = output_dir
        self.engine: Engine | None = None
        self._owns_engine = True
        self.last_summary: dict[str, dict[str, float]] | None = None
        self.last_folder: Path | None = None

    # -- hooks ---------------------------------------------------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.before_training:
            metrics = self.evaluate(trainer, pl_module, "before_training")
            for logger in trainer.loggers:  # self.log is not available in this hook
                logger.log_metrics(metrics, step=trainer.global_step)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        validating = trainer.state.fn == "validate"
        if not validating and (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        tag = "validate" if validating else f"epoch{trainer.current_epoch:03d}"
        for name, value in self.evaluate(trainer, pl_module, tag).items():
            # Already global (the metric synced across ranks): averaging equal values changes nothing, and
            # Lightning warns about epoch-level values logged without sync_dist.
            pl_module.log(name, value, sync_dist=True)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.engine is not None and self._owns_engine:
            self.engine.close()
            self.engine = None

    def use_engine(self, engine: Engine) -> None:
        """Generate with an existing engine (e.g. the GRPO module's vLLM) instead of starting one.

        The callback still pushes the policy's weights into it before each evaluation, and leaves it open.
        """
        self.engine, self._owns_engine = engine, False

    # -- work ----------------------------------------------------------------------------------------

    def _engine(self, pl_module: L.LightningModule) -> Engine:
        if not isinstance(pl_module, PolicyModule):
            raise TypeError(
                f"{type(pl_module).__name__} has no `model` and `processor` attributes: the Pass@K callback "
                "needs the policy model and its processor (see medrl.rollout.types.PolicyModule)"
            )
        if self.engine is None:
            shared = getattr(pl_module, "rollout_engine", None)
            engine = shared() if callable(shared) else None
            if engine is not None and engine.name == self.engine_kind:
                # One engine, not two: a second vLLM would hold its own copy of the weights and its own KV cache.
                log.info("Pass@K samples with the module's own %s engine (its engine options apply)", engine.name)
                self.use_engine(engine)
            else:
                # A new engine starts from the policy's current weights: nothing to push yet.
                self.engine = make_engine(self.engine_kind, pl_module.model, pl_module.processor, **self.engine_options)
                return self.engine
        self.engine.sync(pl_module.model)  # a no-op for hf, which generates with the policy itself
        return self.engine

    def _items(self, trainer: L.Trainer) -> list[dict[str, Any]]:
        datamodule = trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "val_dataloader"):
            # Asked of the datamodule, not trainer.val_dataloaders: those are not loaded yet when training
            # starts, and under DDP they carry a padding sampler that would score some questions twice.
            loaders = datamodule.val_dataloader()
        else:
            loaders = trainer.val_dataloaders
        if loaders is None:
            raise RuntimeError("the Pass@K callback found no validation data (no datamodule, no val_dataloaders)")
        loaders = loaders if isinstance(loaders, list | tuple) else [loaders]
        items: list[dict[str, Any]] = []
        for loader in loaders:
            dataset = loader.dataset
            count = len(dataset) if self.max_questions is None else min(len(dataset), self.max_questions)
            items.extend(dataset[i] for i in range(count))
        return items

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str) -> dict[str, float]:
        """Run one evaluation; returns the metrics as logged (``val/...``), identical on every rank."""
        items = self._items(trainer)
        groups = sorted({str(item.get("flag", ALL)) for item in items})
        rank, world = trainer.global_rank, trainer.world_size
        positions = list(range(rank, len(items), world))
        params = self.params.with_(seed=None if self.params.seed is None else self.params.seed + trainer.current_epoch)
        # Donors are drawn over all questions, so every rank swaps the same way whatever its shard.
        swapped = swap_images(items, self.params.seed or 0) if self.image_ablation else None
        scored = sample_and_score(
            self._engine(pl_module),
            [items[p] for p in positions],
            params,
            self.batch_size,
            positions,
            self.keep_texts,
            progress=rank == 0,
            swapped=[swapped[p] for p in positions] if swapped is not None else None,
        )
        summary = summarise(scored, self.ks, groups, device=pl_module.device)
        rows = [row for _, row in scored]
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[list[dict[str, Any]] | None] = [None] * world
            torch.distributed.all_gather_object(gathered, rows)
            rows = sorted((r for part in gathered for r in part or []), key=lambda r: r["id"])
        add_image_reliance(summary, rows, self.params.seed or 0)  # from every rank's rows: the same everywhere
        self.last_summary = summary
        if trainer.is_global_zero:
            meta = {
                "tag": tag,
                "engine": self.engine_kind,
                "module": type(pl_module).__name__,
                "epoch": trainer.current_epoch,
                "global_step": trainer.global_step,
                **{k: getattr(self.params, k) for k in ("n", "temperature", "top_p", "top_k", "max_new_tokens")},
            }
            self.last_folder = write_outputs(self._folder(trainer) / tag, rows, summary, self.ks, meta)
            # The curve's picture to the trackers too (TensorBoard images, W&B, MLflow), not only to the folder.
            log_png(trainer.loggers, "val/pass_at_k_curve", (self.last_folder / "pass_at_k.png").read_bytes(),
                    trainer.global_step)  # fmt: skip
            overall = summary[ALL]
            rank_zero_info(
                f"pass@k [{tag}] {int(overall['questions'])} questions: acc@1 {overall['acc@1']:.3f}, "
                + ", ".join(f"pass@{k} {overall[f'pass@{k}']:.3f}" for k in self.ks if f"pass@{k}" in overall)
                + f" -> {self.last_folder}"
            )
        return {
            f"val/{name}" if group == ALL else f"val/{group}/{name}": value
            for group, metrics in summary.items()
            for name, value in metrics.items()
        }

    def _folder(self, trainer: L.Trainer) -> Path:
        if self.output_dir is not None:
            return Path(self.output_dir)
        return Path(trainer.log_dir or trainer.default_root_dir) / "pass_at_k"
