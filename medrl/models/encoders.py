"""Frozen image encoders behind one interface: uint8 images ``[B, 3, H, W]`` in, one float vector per image out.

Kinds: any timm model by name (:class:`TimmEncoder`), the vision tower of a VLM of any family
(:class:`VLMTowerEncoder`, ``vlm:``), and the kinds family adapters add (:func:`encoder_kinds`; one reads
only the tower's tensors). Constructing an encoder loads
nothing; :meth:`Encoder.describe` says everything that determines its features (the feature cache keys on it)
and :meth:`Encoder.load` reads the weights on first use, so a cache hit never touches the model.

Image size is always an explicit, recorded policy: a timm encoder's ``image_size`` (224 by default, or
``"native"``), a family encoder's own resolution control, or the processor's fixed size.
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


class _VLMTowerEncoder(Encoder):
    """What the towers of a VLM share: the model argument resolved to a folder once, its image processor."""

    model: str
    _path: Path | None = None
    _processor: Any = None
    _weights_memo: dict[str, str] | None = None
    _family_memo: Any = None

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

    def _family(self):
        """The model's family (read from its config.json once)."""
        if self._family_memo is None:
            from medrl.models.families import family_of_folder

            self._family_memo = family_of_folder(self._resolved())
        return self._family_memo

    def _weights(self) -> dict[str, str]:
        """Fingerprints of the checkpoint's weight files (computed once: shards of a 7B model are large)."""
        if self._weights_memo is None:
            path = self._resolved()
            files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
            self._weights_memo = {f.name: file_fingerprint(f) for f in files}
        return self._weights_memo

    def _pretrained(self) -> bool:
        """False for the offline tiny models (by id, or as their saved ``tiny-*`` folders): random weights."""
        return not (str(self.model).startswith("tiny") or self._resolved().name.startswith("tiny-"))


class VLMTowerEncoder(_VLMTowerEncoder):
    """The vision tower of a VLM of any family, pooled to one vector per image (the ``vlm:`` encoder; a spec
    ``vlm:MODEL`` of a family that has an encoder of its own gets that one, see :func:`encoder_from_spec`).

    Features are the tower's last hidden state (after its final norm, before the family's projector), mean-
    or max-pooled over the image's patch tokens; a class token, where the family's tower has one (InternViT),
    is left out. Each image is resized whole to the processor's size, without tiling or splitting (the
    family's ``image_options``), as the model sees its global image. The whole model is read once and all but
    the tower dropped; a family may add its own encoder kind that reads only the tower's tensors.

    Args:
        model: a tiny id (``tiny:gemma3``), a local folder or a hub id such as ``google/medgemma-4b-it``.
        pooling: ``mean`` (default) or ``max`` over the patches.
        dtype: ``auto`` (bf16 on GPU, fp32 on CPU), ``float32`` or ``bfloat16``.
    """

    kind = "vlm"

    def __init__(
        self, model: str = "tiny:smolvlm", pooling: Literal["mean", "max"] = "mean",
        dtype: Literal["auto", "float32", "bfloat16"] = "auto",
    ) -> None:  # fmt: skip
        super().__init__()
        if pooling not in ("mean", "max"):
            raise ConfigError(f"pooling must be 'mean' or 'max', got {pooling!r}")
        self.model, self.pooling, self.dtype = model, pooling, dtype
        self.tower: torch.nn.Module | None = None

    def _image_size(self) -> int:
        ip = self._image_processor()
        size = getattr(ip, "max_image_size", None) or ip.size
        get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
        return int(get("longest_edge") or get("height"))

    def describe(self) -> dict[str, Any]:
        ip = self._image_processor()
        family = self._family()
        skipped = ", class token dropped" if family.cls_tokens else ""
        return {
            "kind": self.kind,
            "family": family.name,
            "name": self.model,
            "pretrained": self._pretrained(),
            "weights": self._weights(),
            "image_size": self._image_size(),
            "features": f"{family.tower} last_hidden_state (pre {family.projector}{skipped})",
            "pooling": self.pooling,
            "dtype": dtype_name(resolve_dtype(self.dtype, self.device)),
            "mean": list(ip.image_mean),
            "std": list(ip.image_std),
        }

    @property
    def label(self) -> str:
        return f"{self.model} {self._family().name} tower ({self.pooling})"

    @property
    def dim(self) -> int:
        if self.tower is None:
            raise RuntimeError("load() the encoder before asking for its width")
        return int(self.tower.config.hidden_size)

    def _load(self, device: torch.device) -> None:
        from transformers import AutoModelForImageTextToText

        from medrl.models.hub import vision_tower

        full = AutoModelForImageTextToText.from_pretrained(self._resolved(), dtype=resolve_dtype(self.dtype, device))
        self.tower = vision_tower(full).eval().requires_grad_(False).to(device)
        del full  # the language model is not needed for features

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        family = self._family()
        inputs = self._image_processor()(images=[[im] for im in images.cpu()], return_tensors="pt",
                                         **family.image_options)  # fmt: skip
        pixels = inputs["pixel_values"]
        pixels = pixels.flatten(0, 1) if pixels.ndim == 5 else pixels  # Idefics3: [B, 1 image, 3, S, S]
        assert self.tower is not None
        out = self.tower(pixel_values=pixels.to(self.device, resolve_dtype(self.dtype, self.device)))
        tokens = out.last_hidden_state[:, family.cls_tokens :]
        return tokens.mean(1) if self.pooling == "mean" else tokens.amax(1)


def encoder_kinds() -> dict[str, type[Encoder]]:
    """Encoder kind -> class: ``timm``, ``vlm`` (any family's tower) and those the family adapters add."""
    import importlib

    from medrl.models.families import families

    kinds: dict[str, type[Encoder]] = {"timm": TimmEncoder, "vlm": VLMTowerEncoder}
    for family in families().values():
        if family.encoder_class:
            module, _, name = family.encoder_class.partition(":")
            kinds[family.encoder] = getattr(importlib.import_module(module), name)
    return kinds


def encoder_from_spec(spec: str) -> Encoder:
    """An encoder from a short spec: ``KIND:NAME[,key=value...]``.

    ``timm:resnet18,pretrained=false``, ``vlm:google/medgemma-4b-it,pooling=max``, a family kind's spec,
    ``timm:vit_base_patch16_224.dino,image_size=native``. Keys are the encoder's constructor arguments.
    """
    kind, _, rest = spec.partition(":")
    kinds = encoder_kinds()
    if kind not in kinds or not rest:
        raise ConfigError(f"encoder spec {spec!r}: expected KIND:NAME[,key=value...] with KIND in {list(kinds)}")
    cls = kinds[kind]
    name, *options = rest.split(",")
    if cls is VLMTowerEncoder:  # a family with an encoder of its own (tower-only loading) uses it
        from medrl.models.families import family_of_folder
        from medrl.models.hub import resolve_model

        family = family_of_folder(resolve_model(name))
        cls = kinds.get(family.encoder, cls)
    params = inspect.signature(cls.__init__).parameters
    first = next(iter(list(params)[1:]))  # `name` for timm, `model` for the VLM towers
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
