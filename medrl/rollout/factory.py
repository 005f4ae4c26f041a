"""Building an engine: by name around an in-memory policy (:func:`make_engine`), or on a model argument
(:func:`open_engine`, what every evaluation command uses)."""

from __future__ import annotations

from typing import Any, Literal

from medrl.core.dtypes import DType, resolve_dtype
from medrl.rollout.engine import Engine

EngineName = Literal["hf", "vllm"]


def make_engine(kind: EngineName, model: Any, processor: Any = None, **kwargs: Any) -> Engine:
    """Build an engine by name: ``hf`` wraps an in-memory model; ``vllm`` starts vLLM on ``model``'s weights.

    Args:
        kind: ``hf`` or ``vllm``.
        model: for ``hf`` the transformers model; for ``vllm`` a model argument (``tiny``, folder, hub id)
            or the in-memory policy whose config and weights vLLM should start from.
        processor: the model's processor (required for ``hf``).
        kwargs: engine-specific options.
    """
    if kind == "hf":
        from medrl.rollout.hf import HFEngine

        return HFEngine(model, processor, **kwargs)
    if kind == "vllm":
        from medrl.rollout.vllm import VLLMEngine

        return VLLMEngine(model, processor=processor, **kwargs)
    raise ValueError(f"unknown engine {kind!r}: use 'hf' or 'vllm'")


def open_engine(
    engine: EngineName,
    model: str,
    seed: int = 0,
    device: str = "auto",
    dtype: DType = "auto",
    options: dict[str, Any] | None = None,
    image_options: dict[str, Any] | None = None,
) -> Engine:
    """An engine on a model argument (``tiny``, a folder, a hub id); the caller closes it.

    ``vllm`` loads the weights itself (the model is never also loaded into transformers); ``hf`` loads the
    policy on ``device`` (``auto``: the GPU when one is visible) in ``dtype`` (``auto``: bf16 on GPU, fp32
    on CPU). ``options`` are the engine's own keyword arguments (e.g. ``max_model_len`` or ``max_images`` for
    vLLM); ``image_options`` the family's image-processor settings, for both engines.
    """
    import torch

    from medrl.models.hub import load_vlm, resolve_model

    options = dict(options or {})
    if engine == "vllm":
        options.setdefault("seed", seed)
        return make_engine("vllm", resolve_model(model), image_options=image_options, **options)
    if engine != "hf":
        raise ValueError(f"unknown engine {engine!r}: use 'hf' or 'vllm'")
    where = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    options.pop("max_images", None)  # transformers' generate takes any number of images
    policy, processor = load_vlm(model, device=where, dtype=resolve_dtype(dtype, where), image_options=image_options)
    return make_engine("hf", policy, processor, **options)
