"""The policy's weights as ``(name, tensor)`` pairs named like a plain transformers model.

This is what a colocated engine receives after each optimizer step. A PEFT LoRA policy is sent merged
(``W + scale * B @ A`` per adapted layer) without touching the policy itself: merging in place and
unmerging afterwards would round the base weights twice in bf16 and race with an optimizer holding them.
Weights sharded by FSDP are gathered whole one tensor at a time, on every process (each one's engine gets
the full model), so every process must consume the iterator to the end, in step.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

_PEFT_PREFIX = "base_model.model."


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _is_peft(model: torch.nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency, but engines must not need it for a plain model
        return False
    return isinstance(model, PeftModel)


@torch.no_grad()
def policy_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every weight of ``model`` as a plain (non-PEFT) model would name it.

    Full models yield their ``state_dict``. PEFT LoRA models yield each adapted layer's merged weight
    under the base layer's name, drop the ``lora_*`` tensors, and yield ``modules_to_save`` copies under
    the original names. Tensors are detached views or fresh tensors; consumers copy them.
    """
    if not _is_peft(model):
        for name, tensor in model.state_dict(keep_vars=False).items():
            yield name, _whole(tensor)
        return
    from peft.tuners.lora import LoraLayer

    merged: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, LoraLayer) and hasattr(module, "get_delta_weight"):
            base = module.get_base_layer().weight
            weight = base.detach().clone()
            for adapter in module.active_adapters:
                if adapter in module.lora_A and adapter not in module.merged_adapters:
                    weight += module.get_delta_weight(adapter).to(weight.dtype)
            merged[f"{module_name}.base_layer.weight"] = weight
    for name, tensor in model.state_dict(keep_vars=False).items():
        if "lora_" in name or ".original_module." in name:
            continue
        tensor = merged.get(name, tensor)
        name = name.removeprefix(_PEFT_PREFIX).replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
        yield name, _whole(tensor)
