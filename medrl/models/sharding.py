"""FSDP2 for medrl's VLMs: the wrap policy, mixed precision, and the Lightning strategy that carries them.

``configs/strategy/fsdp.yaml`` selects :class:`FSDP2Strategy`; the LightningModules call :func:`shard_module`
from ``configure_model``, which does nothing under any other strategy, so one module runs unchanged on one
process, under DDP and under FSDP.

The wrap units are the classes a transformers model lists in ``_no_split_modules`` (for every family here:
the decoder layers and the vision blocks); the rest (embeddings, final norm, the tied LM head,
the vision patch embedding and merger) is sharded as one root unit on the transformers model itself. The
root is the transformers model, not a PEFT wrapper around it, because ``generate`` calls the transformers
model directly and FSDP gathers a unit's weights only in that unit's own forward.

FSDP2 (``torch.distributed.fsdp.fully_shard``) and not Lightning's ``strategy: fsdp`` (FSDP1): FSDP1 refuses
a CPU accelerator, so the CPU tests could not run the code path GPUs run; FSDP2 runs on CPU with gloo.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.tensor import DTensor

from medrl.core.errors import ConfigError

MixedPrecision = Literal["auto", "bf16", "none"]
# Set on a transformers model so its generate() keeps ranks in step (transformers reads this attribute).
_HF_FSDP_FLAG = "_is_fsdp_managed_module"
_RESHARD_ATTR = "_medrl_reshard_after_forward"
_SETTINGS_ATTR = "_medrl_fsdp_settings"  # on the root: (mesh, compute dtype, reshard_after_forward)
_REPLACED_ATTR = "_medrl_replaced_parameters"  # on the LightningModule: id(old parameter) -> sharded one


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a sharded ``DTensor`` is all-gathered (every rank must call), others pass through."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def is_sharded(model: nn.Module) -> bool:
    """True when FSDP2 manages some of ``model``'s modules."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def wrap_units(model: nn.Module) -> list[nn.Module]:
    """The modules sharded as units of their own: instances of the model's ``_no_split_modules`` classes.

    Raises a ``ValueError`` when the model declares none or none is found: one root unit would gather the
    whole model in every forward, which is no saving at all.
    """
    names = set(getattr(hf_model(model), "_no_split_modules", None) or [])
    if not names:
        raise ValueError(f"{type(hf_model(model)).__name__} declares no _no_split_modules: no FSDP wrap units")
    units = [m for m in model.modules() if type(m).__name__ in names]
    if not units:
        raise ValueError(f"none of {sorted(names)} occurs in {type(hf_model(model)).__name__}")
    return units


def mixed_precision_dtype(mode: MixedPrecision, device: torch.device) -> torch.dtype | None:
    """The compute dtype of FSDP's mixed precision: ``auto`` is bf16 on GPU and off on CPU (no bf16 units).

    >>> mixed_precision_dtype("auto", torch.device("cpu")) is None
    True
    >>> mixed_precision_dtype("bf16", torch.device("cpu"))
    torch.bfloat16
    """
    if mode not in ("auto", "bf16", "none"):
        raise ConfigError(f"mixed_precision must be 'auto', 'bf16' or 'none', got {mode!r}")
    if mode == "bf16" or (mode == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def shard_model(
    model: nn.Module, mesh: Any, compute_dtype: torch.dtype | None = None, reshard_after_forward: bool = True
) -> nn.Module:
    """Apply FSDP2 in place: each wrap unit, then the transformers model as the root unit.

    Args:
        model: a transformers VLM, or a PEFT model wrapping one.
        mesh: the 1-D data-parallel ``DeviceMesh`` to shard over.
        compute_dtype: dtype weights are gathered and computed in (gradients are reduced in float32); None
            computes in the stored dtype.
        reshard_after_forward: free each unit's gathered weights after its forward (ZeRO-3); False keeps
            them until the backward (ZeRO-2: more memory, one all-gather less per unit and step).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if compute_dtype is not None:
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for unit in wrap_units(model):
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
        setattr(unit, _RESHARD_ATTR, reshard_after_forward)
    root = hf_model(model)
    # The root resharded like the units: a root kept whole after forward would stay whole after every no-grad
    # forward too (generation, scoring), leaving a mix of whole and sharded parameters between steps.
    fully_shard(root, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    setattr(root, _RESHARD_ATTR, reshard_after_forward)
    setattr(root, _HF_FSDP_FLAG, True)
    setattr(root, _SETTINGS_ATTR, (mesh, compute_dtype, reshard_after_forward))
    return model


def shard_module(module: L.LightningModule, attribute: str = "model") -> bool:
    """Shard ``module.<attribute>`` when the trainer runs :class:`FSDP2Strategy` (or Lightning's
    ``ModelParallelStrategy``); call it from ``configure_model``. Returns True when it sharded now."""
    trainer = module._trainer
    strategy = None if trainer is None else trainer.strategy
    model = getattr(module, attribute)
    if not isinstance(strategy, ModelParallelStrategy) or is_sharded(model):
        return False
    mesh = strategy.device_mesh["data_parallel"]
    mode = strategy.mixed_precision if isinstance(strategy, FSDP2Strategy) else "none"
    reshard = strategy.reshard_after_forward if isinstance(strategy, FSDP2Strategy) else True
    before = list(module.parameters())
    shard_model(model, mesh, mixed_precision_dtype(mode, strategy.root_device), reshard)
    after = list(module.parameters())
    # fully_shard registers new Parameter objects (DTensors) in place of the old ones, in the same order. An
    # optimizer built before this (LightningCLI builds `optimizer:` when it parses the config) still points
    # at the old ones: FSDP2Strategy.setup_optimizers re-points it through this map.
    if len(before) != len(after) or any(b.shape != a.shape for b, a in zip(before, after, strict=True)):
        raise RuntimeError("sharding changed the model's parameter list; optimizers built before it cannot follow")
    setattr(module, _REPLACED_ATTR, {id(b): a for b, a in zip(before, after, strict=True) if b is not a})
    return True


def shard_like(policy: nn.Module, other: nn.Module) -> nn.Module:
    """Shard ``other`` (e.g. a frozen reference model) the way ``policy`` is sharded; unchanged if it isn't."""
    settings = getattr(hf_model(policy), _SETTINGS_ATTR, None)
    return other if settings is None else shard_model(other, *settings)


@contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every FSDP unit of ``model`` holds its full weights: gathered once, freed on exit.

    Generation runs one forward per new token; without this, each of those forwards would all-gather every
    unit again. The block costs one unsharded copy of the model (in the compute dtype) per rank. A no-op for
    a model FSDP does not manage.
    """
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(getattr(unit, _RESHARD_ATTR, True), recurse=False)


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallelism (FSDP2) over every process, for any medrl LightningModule.

    Lightning's ``ModelParallelStrategy`` with its mesh set to pure data parallelism (one shard per process,
    on every node) and the settings :func:`shard_module` reads. Checkpoints are folders of per-rank shards
    that resume on any number of processes; a module that saves only its trained weights (LoRA) resumes
    from such a partial checkpoint, the frozen weights coming from its ``model`` argument.

    Args:
        mixed_precision: ``auto`` computes in bf16 with float32 gradient reduction on GPU and in the stored
            dtype on CPU; ``bf16`` always; ``none`` never. Load the model in float32 (``dtype: float32``) so
            the optimizer updates full-precision weights.
        reshard_after_forward: free each unit's gathered weights after its forward (ZeRO-3, least memory);
            False keeps them for the backward (ZeRO-2).
        save_distributed_checkpoint: write a folder of shards (True) or gather one full file on rank 0.
        process_group_backend: ``nccl`` / ``gloo``; null picks by device.
    """

    def __init__(
        self,
        mixed_precision: MixedPrecision = "auto",
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
    ) -> None:
        mixed_precision_dtype(mixed_precision, torch.device("cpu"))  # validate early, at config time
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
        )
        self.mixed_precision: MixedPrecision = mixed_precision
        self.reshard_after_forward = reshard_after_forward

    def setup_optimizers(self, trainer: L.Trainer) -> None:
        """Lightning's, then any optimizer built before sharding is re-pointed at the sharded parameters."""
        super().setup_optimizers(trainer)
        module = self.lightning_module
        replaced = getattr(module, _REPLACED_ATTR, None) or {}
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["params"] = [replaced.get(id(p), p) for p in group["params"]]
        if replaced:
            delattr(module, _REPLACED_ATTR)  # the old, whole parameters can be freed now

    def setup_environment(self) -> None:
        # The parent's "auto" would shard over the nodes only and treat a node's devices as tensor parallel.
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def load_checkpoint(self, checkpoint_path: str | Path, weights_only: bool | None = None) -> dict[str, Any]:
        """Load a checkpoint folder that may hold only some of the weights (the trained ones).

        Lightning's loader asks the shards for every weight of the model and fails on a partial checkpoint.
        Here only the weights the checkpoint holds are read; the returned ``state_dict`` lists them, so the
        module's ``on_load_checkpoint`` can check that every weight it trains was restored.
        """
        from lightning.fabric.strategies.fsdp import _is_sharded_checkpoint
        from lightning.fabric.utilities.load import _METADATA_FILENAME

        path = Path(self.broadcast(checkpoint_path))
        if not _is_sharded_checkpoint(path):
            # A one-file checkpoint (one process, DDP): Lightning loads it into the shards and drops its
            # `state_dict`; list the keys it held again for the module's checks (mmap: nothing is read twice).
            held = torch.load(path, mmap=True, map_location="cpu", weights_only=True)["state_dict"]
            metadata = super().load_checkpoint(path, weights_only=weights_only)
            metadata.setdefault("state_dict", dict.fromkeys(held))
            return metadata
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        stored = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        prefix = "state_dict."
        model_state = {k: v for k, v in get_model_state_dict(self.model).items() if prefix + k in stored}
        dcp.load({"state_dict": model_state}, checkpoint_id=path)
        set_model_state_dict(self.model, model_state, options=StateDictOptions(strict=False))
        for index, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{index}"
            optim_state = {key: get_optimizer_state_dict(self.model, optimizer)}
            dcp.load(optim_state, checkpoint_id=path)
            set_optimizer_state_dict(
                self.model, optimizer, optim_state_dict=optim_state[key], options=StateDictOptions(cpu_offload=True)
            )
        metadata = torch.load(path / _METADATA_FILENAME, weights_only=True if weights_only is None else weights_only)
        metadata["state_dict"] = model_state  # already in the model; listed for the module's own checks
        return metadata
