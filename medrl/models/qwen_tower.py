"""The Qwen adapter's probe encoder: the Qwen-VL towers (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), patch-merger tokens pooled.

It sits beside :mod:`medrl.models.encoders` rather than in ``families/`` because the encoders import the family
registry (an encoder module inside it would make an import circle).

Only the tower's tensors are read from the checkpoint (a 7B model costs the memory of its ~0.7B tower), and
images are sized by Qwen's pixel budget (``smart_resize``), so the token count per image is exact and recorded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch

from medrl.core.dtypes import dtype_name, resolve_dtype
from medrl.core.errors import ConfigError
from medrl.models.encoders import EncoderUnavailableError, ImageSize, _size_policy, _VLMTowerEncoder


def smart_size(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The size a Qwen2-VL image processor resizes to (its ``smart_resize``)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    return smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


def _size_bounds(image_processor) -> tuple[int, int]:
    """(min_pixels, max_pixels) of a Qwen2-VL image processor, across transformers versions."""
    size = image_processor.size
    get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
    low = get("shortest_edge") or getattr(image_processor, "min_pixels", None)
    high = get("longest_edge") or getattr(image_processor, "max_pixels", None)
    if not low or not high:
        raise ValueError(f"cannot read min/max pixels from the image processor's size {size!r}")
    return int(low), int(high)


def load_vision_tower(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    """Only the vision tower of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint, read from its safetensors files.

    The language model's tensors are never read, so a 7B checkpoint costs the memory of its ~0.7B tower.
    Checkpoints without safetensors fall back to loading the whole model and dropping the language model.
    """
    from safetensors import safe_open
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    if config.model_type == "qwen3_vl":
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel as Tower
    elif config.model_type == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
            Qwen2_5_VisionTransformerPretrainedModel as Tower,
        )
    elif config.model_type == "qwen2_vl":
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel as Tower
    else:
        raise EncoderUnavailableError(
            f"{path}: model_type {config.model_type!r} is not Qwen2-VL, Qwen2.5-VL or Qwen3-VL; use `vlm:` (any "
            "family's tower) or a timm encoder"
        )
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else []
    files = [path / f for f in files] or sorted(path.glob("*.safetensors"))
    if not files:
        from medrl.models.hub import load_vlm, vision_tower

        model, _ = load_vlm(str(path), dtype=dtype)
        tower = vision_tower(model)
        del model  # only the tower stays referenced
        return tower
    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():
                for prefix in ("model.visual.", "visual."):  # transformers >= 4.52 vs the original checkpoints
                    if key.startswith(prefix):
                        state[key[len(prefix) :]] = fh.get_tensor(key)
    if not state:
        raise EncoderUnavailableError(f"{path}: no vision tower weights (keys under `visual.`) in {len(files)} files")
    tower = Tower._from_config(config.vision_config, dtype=dtype)
    missing, unexpected = tower.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise EncoderUnavailableError(
            f"{path}: vision tower weights do not match its config (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return tower


class QwenVisionEncoder(_VLMTowerEncoder):
    """The vision tower of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL model, pooled to one vector per image.

    The tower's output is its patch-merger tokens (width = the language model's hidden size, 2048 for the 3B,
    3584 for the 7B); there is no CLS token, so tokens are pooled. ``features: pre_merger`` instead pools the
    last block's output before the merger (1280-d in the released models), taken with a forward hook.

    Args:
        model: ``tiny``, a local folder or a hub id such as ``Qwen/Qwen2.5-VL-3B-Instruct``.
        pooling: ``mean`` (default) or ``max`` over the image's tokens.
        features: ``merger`` (the tower's output) or ``pre_merger`` (the last block's output).
        image_size: resize to this many pixels (default 224: 64 merged tokens), or ``native`` to let the
            model's processor decide from the file's size (28 and 64 px become 56 px: 4 tokens).
        dtype: ``auto`` (bf16 on GPU, fp32 on CPU), ``float32`` or ``bfloat16``.
    """

    kind = "qwen-vl"

    def __init__(
        self,
        model: str = "tiny",
        pooling: Literal["mean", "max"] = "mean",
        features: Literal["merger", "pre_merger"] = "merger",
        image_size: ImageSize = 224,
        dtype: Literal["auto", "float32", "bfloat16"] = "auto",
    ) -> None:
        super().__init__()
        if pooling not in ("mean", "max"):
            raise ConfigError(f"pooling must be 'mean' or 'max', got {pooling!r}")
        if features not in ("merger", "pre_merger"):
            raise ConfigError(f"features must be 'merger' or 'pre_merger', got {features!r}")
        self.model, self.pooling, self.features = model, pooling, features
        self.image_size, self.dtype = _size_policy(image_size), dtype
        self.tower: torch.nn.Module | None = None

    def _torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype, self.device)

    def resized(self, height: int, width: int) -> tuple[int, int]:
        """The size the tower sees for an input of ``height x width`` under this encoder's policy."""
        ip = self._image_processor()
        factor = ip.patch_size * ip.merge_size
        if self.image_size == "native":
            low, high = _size_bounds(ip)
        else:
            low = high = self.image_size * self.image_size  # overrides the processor's own bounds on purpose
        return smart_size(height, width, factor, low, high)

    def tokens(self, height: int, width: int) -> int:
        """Merged tokens per image of ``height x width`` (pre-merger features have ``merge_size**2`` times more)."""
        ip = self._image_processor()
        h, w = self.resized(height, width)
        return (h // (ip.patch_size * ip.merge_size)) * (w // (ip.patch_size * ip.merge_size))

    def describe(self) -> dict[str, Any]:
        ip = self._image_processor()
        return {
            "kind": self.kind,
            "name": self.model,
            "pretrained": self._pretrained(),
            "weights": self._weights(),
            "image_size": self.image_size,
            "min_max_pixels": list(_size_bounds(ip)) if self.image_size == "native" else [self.image_size**2] * 2,
            "pooling": self.pooling,
            "features": self.features,
            "dtype": dtype_name(self._torch_dtype()),
            "mean": list(ip.image_mean),
            "std": list(ip.image_std),
        }

    @property
    def label(self) -> str:
        size = self.image_size if self.image_size == "native" else f"{self.image_size}px"
        extra = "" if self.features == "merger" else " pre-merger"
        return f"{self.model} tower ({self.pooling}{extra}, {size})"

    @property
    def dim(self) -> int:
        if self.tower is None:
            raise RuntimeError("load() the encoder before asking for its width")
        cfg = self.tower.config
        if self.features == "pre_merger":
            return int(getattr(cfg, "embed_dim", None) or cfg.hidden_size)  # Qwen2-VL: embed_dim; 2.5: hidden_size
        return int(getattr(cfg, "out_hidden_size", None) or cfg.hidden_size)

    def _load(self, device: torch.device) -> None:
        self.tower = load_vision_tower(self._resolved(), self._torch_dtype()).eval().requires_grad_(False).to(device)
        self._captured: list[torch.Tensor] = []
        # Pre-merger features: the merger's input, captured as the tower runs (one code path for both versions).
        self.tower.merger.register_forward_pre_hook(self._capture)

    def _capture(self, _module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self._captured.append(args[0])

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        ip = self._image_processor()
        batch, _, height, width = images.shape
        low, high = _size_bounds(ip) if self.image_size == "native" else (self.image_size**2,) * 2
        # The processor batches same-sized images through torchvision; the explicit bounds make the size exact.
        inputs = ip(images=images.cpu(), size={"shortest_edge": low, "longest_edge": high}, return_tensors="pt")
        grid = inputs["image_grid_thw"]
        expected = [h // ip.patch_size for h in self.resized(height, width)]
        if grid[0, 1:].tolist() != expected:
            raise RuntimeError(f"processor made a {grid[0].tolist()} grid, expected {expected}: policy mismatch")
        assert self.tower is not None
        self._captured.clear()
        out = self.tower(inputs["pixel_values"].to(self.device, self._torch_dtype()), grid_thw=grid.to(self.device))
        if self.features == "pre_merger":
            tokens = self._captured.pop()  # window order inside each image does not matter for pooling
        else:
            tokens = out.pooler_output if hasattr(out, "pooler_output") else out
        tokens = tokens.reshape(batch, -1, tokens.shape[-1])  # [B, T, D]: every image here has the same grid
        return tokens.mean(1) if self.pooling == "mean" else tokens.amax(1)
