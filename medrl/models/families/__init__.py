"""One adapter per VLM family: everything medrl needs to know that differs between architectures.

A family is a :class:`Family` record in one small module (``qwen_vl``, ``idefics3``, ``gemma3``, ``internvl``):
the ``model_type`` values it covers, its special tokens (the image placeholders a model must never generate,
the tokens that end an assistant turn), where its vision tower and projector live in the parameter names
(for ``vision: frozen | projector | all`` and LoRA's language-model-only targets), how its transformers
parameter names map onto vLLM's loader, its probe encoder, and its offline tiny models. The rest of medrl
asks this package, never a family by name, so a new family is one new module listed in :data:`ADAPTERS`
(see ``docs/architecture.md``, "Adding a VLM family").
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from medrl.core.errors import UserError

# What each family runs in medrl, as the test suite checks it on the family's tiny model: "tested",
# "tested (slow)", "untested" (the code path exists, no test runs it) or "no". `medrl models` prints it.
FEATURES = ("probe", "SFT", "GRPO (hf)", "GRPO (vLLM)", "vLLM weight sync", "LoRA", "FSDP2", "multi-image")


class UnsupportedModelError(UserError, ValueError):
    """A model of no family medrl knows; the message names the families and their ``model_type`` values."""


@dataclass(frozen=True)
class Family:
    """The model-specific facts of one VLM family (see the module docstring).

    Args:
        name: the family's id (``gemma3``), shown by ``medrl models``.
        model_types: the ``config.model_type`` values it covers.
        architectures: the architectures in words, with the models the field uses.
        examples: hub ids of real models of the family.
        placeholders: image placeholder tokens, banned in generation.
        turn_ends: tokens that end an assistant turn (generation stops at them).
        tower: the vision tower's module name, as a component of parameter names.
        projector: the vision-to-text projector's module name.
        support: feature -> "tested" / "tested (slow)" / "untested" / "no", for every name in FEATURES.
        tiny: tiny id -> ``module:function`` that returns the saved folder for a seed.
        encoder: the encoder kind the family adds for probes (``qwen``), with ``encoder_class``
            (``module:Class``); every family's tower also works with the generic ``vlm:`` kind.
        image_options: image-processor arguments that give one whole image, unsplit (probes use them).
        cls_tokens: leading class tokens of the tower's output, left out of the pooled probe features.
        vllm_renames: ``(HF prefix, vLLM prefix)`` pairs applied to parameter names before vLLM loads them,
            where transformers' names (in memory, and as ``save_pretrained`` writes them) and vLLM's loader
            disagree; a name that already has the vLLM prefix is kept.
        multi_image: the family takes several images in one prompt (else they are tiled into one).
    """

    name: str
    model_types: tuple[str, ...]
    architectures: str
    examples: str
    placeholders: tuple[str, ...]
    turn_ends: tuple[str, ...]
    tower: str
    projector: str
    support: Mapping[str, str]
    tiny: Mapping[str, str] = field(default_factory=dict)
    encoder: str = ""
    encoder_class: str = ""
    image_options: Mapping[str, Any] = field(default_factory=dict)
    cls_tokens: int = 0
    vllm_renames: tuple[tuple[str, str], ...] = ()
    multi_image: bool = True

    def vllm_name(self, name: str) -> str:
        """``name`` (a transformers parameter name) as vLLM's loader for this family expects it."""
        for hf_prefix, vllm_prefix in self.vllm_renames:
            if name.startswith(hf_prefix) and not name.startswith(vllm_prefix):
                return vllm_prefix + name[len(hf_prefix) :]
        return name


# The adapter modules, in the order `medrl models` lists them. A new family: one module here.
ADAPTERS = ("qwen_vl", "idefics3", "gemma3", "internvl")


@functools.cache
def families() -> Mapping[str, Family]:
    """Every family, by name (each adapter module exposes ``FAMILIES``: one or more records); read once."""
    found: dict[str, Family] = {}
    for module in ADAPTERS:
        for family in importlib.import_module(f"{__name__}.{module}").FAMILIES:
            found[family.name] = family
    return MappingProxyType(found)


def family_of(model_or_config: Any) -> Family:
    """The family of a transformers model (PEFT-wrapped or not), its config, or a ``model_type`` string;
    UnsupportedModelError else."""
    if isinstance(model_or_config, str):
        model_type = model_or_config
    else:
        base = model_or_config.get_base_model() if hasattr(model_or_config, "get_base_model") else model_or_config
        model_type = str(getattr(getattr(base, "config", base), "model_type", ""))
    for family in families().values():
        if model_type in family.model_types:
            return family
    known = ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in families().values())
    raise UnsupportedModelError(
        f"model_type {model_type!r} is of no VLM family medrl supports; the families are {known}. "
        "`medrl models` lists them; docs/architecture.md says how to add one"
    )


def family_of_folder(path: str | os.PathLike) -> Family:
    """The family of a saved model folder, read from its ``config.json`` alone."""
    import json

    return family_of(json.loads((Path(path) / "config.json").read_text()).get("model_type", ""))


def vision_placeholders() -> list[str]:
    """Every family's image placeholder tokens, in a fixed order (banned wherever a tokenizer has them)."""
    return list(dict.fromkeys(t for f in families().values() for t in f.placeholders))


def turn_end_tokens() -> list[str]:
    """Every family's end-of-turn tokens, in a fixed order."""
    return list(dict.fromkeys(t for f in families().values() for t in f.turn_ends))


def vision_modules(parameter_names: list[str]) -> tuple[str, str]:
    """``(tower, projector)`` module names of the family whose tower appears in ``parameter_names``;
    UnsupportedModelError naming the known towers when none does."""
    parts = {part for name in parameter_names for part in name.split(".")}
    for family in families().values():
        if family.tower in parts:
            return family.tower, family.projector
    towers = sorted({f.tower for f in families().values()})
    raise UnsupportedModelError(
        f"no vision tower among the model's modules: medrl knows the families {sorted(families())} (towers {towers})"
    )


def tiny_ids() -> dict[str, tuple[Family, str]]:
    """Every offline tiny model id -> (its family, the ``module:function`` that builds it)."""
    return {tiny: (family, builder) for family in families().values() for tiny, builder in family.tiny.items()}


def tiny_model_dir(name: str) -> Path | None:
    """The saved folder of a tiny id (``tiny``, ``tiny:7``, ``tiny:gemma3``, ``tiny:gemma3:2``,
    ``tiny-instruct``), built on first use; None when ``name`` is no tiny id."""
    base, _, seed = name.partition(":")
    if base not in ("tiny", "tiny-instruct"):
        return None
    if base == "tiny" and seed and not seed.isdigit():  # tiny:<family>[:seed]
        family, _, seed = seed.partition(":")
        base = f"tiny:{family}"
    ids = tiny_ids()
    if base not in ids:
        raise UnsupportedModelError(f"model {name!r}: the tiny models are {', '.join(sorted(ids))}, each "
                                    "optionally with :SEED")  # fmt: skip
    if seed and not seed.isdigit():
        raise UnsupportedModelError(f"model {name!r}: the seed after {base}: must be a number")
    module, _, function = ids[base][1].partition(":")
    build: Callable[[int], Path] = getattr(importlib.import_module(module), function)
    return build(int(seed or 0))
