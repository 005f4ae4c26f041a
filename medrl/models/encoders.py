"""Frozen image encoders behind one interface: uint8 images ``[B, 3, H, W]`` in, one float vector per image out.

Two kinds: any timm model by name (:class:`TimmEncoder`) and the vision tower of any Qwen2-VL / Qwen2.5-VL
checkpoint (:class:`QwenVisionEncoder`, from ``tiny``, a folder or a hub id). Constructing an encoder loads
nothing; :meth:`Encoder.describe` says everything that determines its features (the feature cache keys on it)
and :meth:`Encoder.load` reads the weights on first use, so a cache hit never touches the model.

Image size is always an explicit, recorded policy: ``image_size=224`` (the default) resizes every image to
224 px, where a Qwen tower makes 8x8 = 64 merged tokens; ``"native"`` keeps the file's size (for a Qwen tower
the processor's own min/max pixels then apply: 28 and 64 px images become 56 px, i.e. only 4 tokens).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from medrl.core.dtypes import dtype_name, resolve_dtype
from medrl.core.errors import ConfigError, UserError
from medrl.core.hashing import json_digest

ImageSize = int | Literal["native"]
_SMALL_FILE = 64 << 20  # weight files up to this size are hashed whole; larger ones by size, head and tail


class EncoderUnavailableError(UserError, RuntimeError):
    """The encoder's weights cannot be found or loaded; the message says what to do instead."""


def file_fingerprint(path: Path) -> str:
    """A content hash of a weight file, cheap even for multi-GB shards (size + first and last 4 MiB)."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    digest.update(str(size).encode())
    with open(path, "rb") as fh:
        if size <= _SMALL_FILE:
            while block := fh.read(1 << 20):
                digest.update(block)
        else:
            digest.update(fh.read(4 << 20))
            fh.seek(size - (4 << 20))
            digest.update(fh.read())
    return digest.hexdigest()[:16]


class Encoder(ABC):
    """A frozen image encoder. Subclasses are cheap to construct; weights load on the first :meth:`encode`."""

    kind: str = ""

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self._loaded = False

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Everything that determines the features (JSON-able); recorded in every output and the cache key."""

    @property
    @abstractmethod
    def dim(self) -> int:
        """Width of the feature vector (known after :meth:`load`)."""

    @abstractmethod
    def _load(self, device: torch.device) -> None:
        """Read the weights onto ``device``."""

    @abstractmethod
    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, 3, H, W]`` on ``self.device`` -> float ``[B, D]``."""

    @property
    def label(self) -> str:
        """A short name for tables and charts."""
        return self.describe()["name"]

    def load(self, device: str | torch.device = "cpu") -> Encoder:
        """Load the weights (once) onto ``device``, frozen and in eval mode."""
        device = torch.device(device)
        if not self._loaded or device != self.device:
            self.device = device
            self._load(device)
            self._loaded = True
        return self

    @torch.no_grad()  # not inference_mode: callers may feed the features to a head that trains
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Features of a batch: uint8 ``[B, 3, H, W]`` (any device) -> float32 ``[B, D]`` on CPU."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected uint8 images [B, 3, H, W] (or [B, 1, H, W]), got {tuple(images.shape)}")
        if images.shape[1] == 1:  # grey files: every encoder here takes RGB
            images = images.expand(-1, 3, -1, -1)
        if not self._loaded:
            self.load(self.device)
        return self._encode(images.to(self.device)).float().cpu()

    def fingerprint(self) -> str:
        """A short hash of :meth:`describe`."""
        return json_digest(self.describe(), length=16)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({json.dumps(self.describe(), sort_keys=True)})"


def _size_policy(image_size: ImageSize) -> ImageSize:
    if image_size != "native" and (not isinstance(image_size, int) or image_size < 8):
        raise ConfigError(f"image_size must be 'native' or a size in pixels (>= 8), got {image_size!r}")
    return image_size


class TimmEncoder(Encoder):
    """Any timm model as a frozen encoder: its pooled pre-classifier features (``num_classes=0``).

    Args:
        name: timm model name, optionally with a weight tag (``resnet18``, ``vit_base_patch16_224.dino``).
        pretrained: load the pretrained weights (needs the hub or a local cache); ``false`` gives random
            weights, which every output records.
        checkpoint: a local weights file (.safetensors or .pth) to load instead of the hub's.
        image_size: resize images to this many pixels (default 224), or ``native`` to keep the file's size.
        global_pool: override timm's default pooling (``avg``, ``max``, ``token``, ...); None keeps the model's.
        seed: seeds random weights (``pretrained: false``), so the same spec always gives the same features.
    """

    kind = "timm"

    def __init__(
        self,
        name: str = "resnet18",
        pretrained: bool = True,
        checkpoint: str | None = None,
        image_size: ImageSize = 224,
        global_pool: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.name, self.pretrained, self.checkpoint = name, pretrained, checkpoint
        self.image_size, self.global_pool, self.seed = _size_policy(image_size), global_pool, seed
        self.model: torch.nn.Module | None = None

    def _cfg(self) -> dict[str, Any]:
        import timm

        cfg = timm.models.get_pretrained_cfg(self.name)
        if cfg is None and not timm.is_model(self.name.split(".")[0]):
            raise EncoderUnavailableError(f"timm has no model {self.name!r}; see `timm.list_models('*resnet*')`")
        return cfg.to_dict() if cfg is not None else {}

    def describe(self) -> dict[str, Any]:
        import timm

        cfg = self._cfg()
        weights = f"random init, seed {self.seed}"
        if self.checkpoint:
            weights = f"file {Path(self.checkpoint).name} sha {file_fingerprint(Path(self.checkpoint))}"
        elif self.pretrained:
            weights = cfg.get("hf_hub_id") or cfg.get("url") or "timm default"
        return {
            "kind": self.kind,
            "name": self.name,
            "pretrained": bool(self.pretrained or self.checkpoint),
            "weights": weights,
            "image_size": self.image_size,
            "interpolation": cfg.get("interpolation", "bilinear"),
            "mean": list(cfg.get("mean", (0.485, 0.456, 0.406))),
            "std": list(cfg.get("std", (0.229, 0.224, 0.225))),
            "pooling": self.global_pool or "timm default",
            "timm": timm.__version__,
        }

    @property
    def label(self) -> str:
        return f"{self.name}{'' if self.pretrained or self.checkpoint else ' (random init)'}"

    @property
    def dim(self) -> int:
        if self.model is None:
            raise RuntimeError("load() the encoder before asking for its width")
        return int(self.model.num_features)

    def _load(self, device: torch.device) -> None:
        import timm

        kwargs: dict[str, Any] = {"num_classes": 0}
        if self.global_pool is not None:
            kwargs["global_pool"] = self.global_pool
        if self.checkpoint:
            kwargs["pretrained_cfg_overlay"] = {"file": str(Path(self.checkpoint).expanduser())}
        default_size = tuple(self._cfg().get("input_size", (3, 224, 224)))[1:]
        if self.image_size == "native" or (self.image_size,) * 2 != default_size:
            # ViTs take other sizes (and sizes that are not a multiple of the patch) only with these flags;
            # models without them reject the keywords, hence the retry below.
            kwargs.update(dynamic_img_size=True, dynamic_img_pad=True)
        pretrained = bool(self.pretrained or self.checkpoint)
        try:
            # Random weights drawn from `seed` (without moving the caller's RNG): the cache keys on the spec.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                try:
                    model = timm.create_model(self.name, pretrained=pretrained, **kwargs)
                except TypeError:
                    kwargs.pop("dynamic_img_size", None), kwargs.pop("dynamic_img_pad", None)
                    model = timm.create_model(self.name, pretrained=pretrained, **kwargs)
        except (OSError, RuntimeError) as exc:
            if not pretrained:
                raise
            raise EncoderUnavailableError(
                f"pretrained weights of timm model {self.name!r} could not be loaded ({type(exc).__name__}: {exc}). "
                "Offline there is no hub: download them where it is reachable (they land in the Hugging Face "
                f"cache; point HF_HOME at it), or pass a local file with `checkpoint: PATH`, or use "
                "`pretrained: false` for random weights (recorded as such in every output)."
            ) from exc
        self.model = model.eval().requires_grad_(False).to(device)
        cfg = self.describe()
        self._mean = torch.tensor(cfg["mean"], device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(cfg["std"], device=device).view(1, 3, 1, 1)
        self._mode = "bicubic" if cfg["interpolation"] == "bicubic" else "bilinear"

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0
        if self.image_size != "native" and tuple(x.shape[-2:]) != (self.image_size,) * 2:
            x = F.interpolate(x, size=(self.image_size,) * 2, mode=self._mode, align_corners=False, antialias=True)
        assert self.model is not None
        return self.model((x - self._mean) / self._std)


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
    """Only the vision tower of a Qwen2-VL / Qwen2.5-VL checkpoint, read from its safetensors files.

    The language model's tensors are never read, so a 7B checkpoint costs the memory of its ~0.7B tower.
    Checkpoints without safetensors fall back to loading the whole model and dropping the language model.
    """
    from safetensors import safe_open
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    if config.model_type == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
            Qwen2_5_VisionTransformerPretrainedModel as Tower,
        )
    elif config.model_type == "qwen2_vl":
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel as Tower
    else:
        raise EncoderUnavailableError(
            f"{path}: model_type {config.model_type!r} is not Qwen2-VL or Qwen2.5-VL; use a timm encoder instead"
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


class _VLMTowerEncoder(Encoder):
    """What the towers of a VLM share: the model argument resolved to a folder once, its image processor."""

    model: str
    _path: Path | None = None
    _processor: Any = None

    def _resolved(self) -> Path:
        if self._path is None:
            from medrl.models.hub import resolve_model

            self._path = resolve_model(self.model)
        return self._path

    def _image_processor(self):
        if self._processor is None:
            from transformers import AutoImageProcessor

            self._processor = AutoImageProcessor.from_pretrained(self._resolved())
        return self._processor


class QwenVisionEncoder(_VLMTowerEncoder):
    """The vision tower of a Qwen2-VL / Qwen2.5-VL model, pooled to one vector per image.

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
        self._path: Path | None = None
        self._processor = None
        self._weights_memo: dict[str, str] | None = None

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

    def _weights(self) -> dict[str, str]:
        """Fingerprints of the checkpoint's weight files (computed once: shards of a 7B model are large)."""
        if self._weights_memo is None:
            path = self._resolved()
            files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
            self._weights_memo = {f.name: file_fingerprint(f) for f in files}
        return self._weights_memo

    def describe(self) -> dict[str, Any]:
        path = self._resolved()
        ip = self._image_processor()
        return {
            "kind": self.kind,
            "name": self.model,
            # tiny (by name or as its saved folder) is random weights by construction.
            "pretrained": not (
                str(self.model).startswith("tiny") or path.name.startswith(("tiny-qwen", "tiny-instruct"))
            ),
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


class Idefics3VisionEncoder(_VLMTowerEncoder):
    """The SigLIP vision tower of an Idefics3 / SmolVLM model, pooled to one vector per image.

    Features are the tower's last hidden state (after its final layer norm, before the pixel-shuffle
    connector), mean- or max-pooled over the image's patches; each image is resized whole to the processor's
    ``max_image_size`` (no image splitting), as the model sees its global image.

    Args:
        model: ``tiny:smolvlm``, a local folder or a hub id such as ``HuggingFaceTB/SmolVLM-256M-Instruct``.
        pooling: ``mean`` (default) or ``max`` over the patches.
        dtype: ``auto`` (bf16 on GPU, fp32 on CPU), ``float32`` or ``bfloat16``.
    """

    kind = "idefics3"

    def __init__(
        self, model: str = "tiny:smolvlm", pooling: Literal["mean", "max"] = "mean",
        dtype: Literal["auto", "float32", "bfloat16"] = "auto",
    ) -> None:  # fmt: skip
        super().__init__()
        if pooling not in ("mean", "max"):
            raise ConfigError(f"pooling must be 'mean' or 'max', got {pooling!r}")
        self.model, self.pooling, self.dtype = model, pooling, dtype
        self.tower: torch.nn.Module | None = None
        self._path: Path | None = None
        self._processor = None

    def describe(self) -> dict[str, Any]:
        ip = self._image_processor()
        path = self._resolved()
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        return {
            "kind": self.kind,
            "name": self.model,
            "pretrained": not (str(self.model).startswith("tiny") or path.name.startswith("tiny-")),
            "weights": {f.name: file_fingerprint(f) for f in files},
            "image_size": int(ip.max_image_size["longest_edge"]),
            "features": "vision_model last_hidden_state (post layer norm, pre connector)",
            "pooling": self.pooling,
            "dtype": dtype_name(resolve_dtype(self.dtype, self.device)),
            "mean": list(ip.image_mean),
            "std": list(ip.image_std),
        }

    @property
    def label(self) -> str:
        return f"{self.model} SigLIP tower ({self.pooling})"

    @property
    def dim(self) -> int:
        if self.tower is None:
            raise RuntimeError("load() the encoder before asking for its width")
        return int(self.tower.config.hidden_size)

    def _load(self, device: torch.device) -> None:
        from transformers import AutoModelForImageTextToText

        full = AutoModelForImageTextToText.from_pretrained(self._resolved(), dtype=resolve_dtype(self.dtype, device))
        self.tower = full.model.vision_model.eval().requires_grad_(False).to(device)
        del full  # the language model is not needed for features

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        ip = self._image_processor()
        inputs = ip(images=[[im] for im in images.cpu()], do_image_splitting=False, return_tensors="pt")
        pixels = inputs["pixel_values"][:, 0]  # [B, 3, S, S]: one global image each
        assert self.tower is not None
        tokens = self.tower(
            pixel_values=pixels.to(self.device, resolve_dtype(self.dtype, self.device))
        ).last_hidden_state
        return tokens.mean(1) if self.pooling == "mean" else tokens.amax(1)


ENCODER_KINDS: dict[str, type[Encoder]] = {"timm": TimmEncoder, "qwen": QwenVisionEncoder,
                                           "idefics3": Idefics3VisionEncoder}  # fmt: skip


def encoder_from_spec(spec: str) -> Encoder:
    """An encoder from a short spec: ``KIND:NAME[,key=value...]``.

    ``timm:resnet18,pretrained=false``, ``qwen:tiny``, ``qwen:Qwen/Qwen2.5-VL-3B-Instruct,pooling=max``,
    ``timm:vit_base_patch16_224.dino,image_size=native``. Keys are the encoder's constructor arguments.
    """
    kind, _, rest = spec.partition(":")
    if kind not in ENCODER_KINDS or not rest:
        raise ConfigError(
            f"encoder spec {spec!r}: expected KIND:NAME[,key=value...] with KIND in {list(ENCODER_KINDS)}"
        )
    cls = ENCODER_KINDS[kind]
    name, *options = rest.split(",")
    params = inspect.signature(cls.__init__).parameters
    first = next(iter(list(params)[1:]))  # `name` for timm, `model` for qwen
    kwargs: dict[str, Any] = {first: name}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key not in params:
            raise ConfigError(f"encoder spec {spec!r}: bad option {option!r}; known keys: {list(params)[1:]}")
        lowered = value.lower()
        kwargs[key] = (
            lowered == "true" if lowered in ("true", "false") else int(value) if value.isdigit() else value or None
        )
    return cls(**kwargs)
