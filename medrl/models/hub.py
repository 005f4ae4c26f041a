"""Load a VLM and its processor from ``tiny``, a local folder, or a Hugging Face id.

Every model argument in medrl goes through :func:`resolve_model`, so each accepts the same three forms:
an offline tiny model (``tiny``, ``tiny:SEED``, ``tiny-instruct``, ``tiny:<family>[:SEED]``: `medrl models`
lists them), a directory holding ``config.json``, or a hub id such as ``OctoMed/OctoMed-7B``. A hub id that
is neither cached nor reachable fails at once with the ways to point medrl at a local copy.

A folder may also be what training exports beside a checkpoint (``last.hf``): its ``merged/`` model, else its
``model/``, else its ``adapter/`` is used, and the choice is said once on stderr. An adapter folder (PEFT's
``adapter_config.json``) is merged onto the base it records, once, into ``$MEDRL_CACHE/merged/``, so every
engine and loader gets a plain model folder. A model folder without tokenizer files is refused by name
(transformers would otherwise fail later on a confusing image-token count).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from medrl.core.dtypes import resolve_dtype
from medrl.core.env import cache_dir, is_offline
from medrl.core.errors import UserError
from medrl.core.hashing import file_digest, json_digest
from medrl.models.families import UnsupportedModelError, family_of, family_of_folder, tiny_model_dir
from medrl.models.lora import save_merged

# The subfolders of an export (``NAME.hf``), in the order a model argument picks them.
EXPORT_PARTS = ("merged", "model", "adapter")
# A saved tokenizer has at least one of these (fast tokenizer, sentencepiece, BPE vocabulary).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tekken.json")
_said: set[str] = set()  # export folders whose choice was already said


class ModelNotFoundError(UserError, RuntimeError):
    """A model argument could not be resolved to files on disk; the message says how to fix it."""


def is_hub_id(name: str) -> bool:
    """True for an ``owner/name`` Hugging Face id; False for ``tiny``, ``tiny:SEED`` and paths.

    >>> [is_hub_id(n) for n in ("google/medgemma-4b-it", "tiny", "tiny:3", "tiny:gemma3", "./m", "/m", "a/b/c")]
    [True, False, False, False, False, False, False]
    """
    tiny = name in ("tiny", "tiny-instruct") or name.startswith(("tiny:", "tiny-instruct:"))
    return not (tiny or name.startswith((".", "/", "~"))) and name.count("/") == 1


def resolve_model(name: str | os.PathLike) -> Path:
    """The local folder for a model argument (building ``tiny`` or fetching a hub id if needed)."""
    text = str(name)
    try:
        tiny = tiny_model_dir(text)
    except UnsupportedModelError as exc:
        raise ModelNotFoundError(str(exc)) from None
    if tiny is not None:
        return tiny
    path = Path(text).expanduser()
    if path.is_dir():
        return _model_folder(path)
    if not is_hub_id(text):
        raise ModelNotFoundError(f"model {text!r}: no such folder, and it is not a hub id of the form owner/name")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, local_files_only=True))
    except Exception as cached_error:  # noqa: BLE001 - any miss here means "not in the local cache"
        offline = " and offline mode is set" if is_offline() else ""
        hint = (
            f"model {text!r} is not in the local Hugging Face cache{offline}. "
            f"Either download it where the hub is reachable (`huggingface-cli download {text} --local-dir DIR`) "
            f"and pass --model DIR, or set HF_HOME to a cache that holds it, or use `tiny` for a quick offline run."
        )
        if is_offline():
            raise ModelNotFoundError(hint) from cached_error
    try:
        return Path(snapshot_download(text, etag_timeout=10))
    except Exception as exc:  # noqa: BLE001 - network errors come in many types; the hint is what matters
        raise ModelNotFoundError(f"{hint} (download failed: {type(exc).__name__}: {exc})") from exc


def _say_once(key: str, message: str) -> None:
    if key not in _said:
        _said.add(key)
        print(f"medrl: {message}", file=sys.stderr)


def _model_folder(path: Path) -> Path:
    """A local model argument as a folder holding a whole model (see the module docstring)."""
    if (path / "config.json").is_file():
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise ModelNotFoundError(
                f"{path} has the model's weights but no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...): "
                "save the processor there too (`processor.save_pretrained(folder)`) or copy the base model's "
                "tokenizer files into it"
            )
        return path
    if (path / "adapter_config.json").is_file():
        return merged_adapter(path)
    for part in EXPORT_PARTS:
        if (path / part).is_dir():
            _say_once(str(path), f"{path} is an export: using its {part}/" + (
                " (the adapter merged onto its recorded base)" if part == "adapter" else ""))  # fmt: skip
            return _model_folder(path / part)
    raise ModelNotFoundError(
        f"{path} is a folder but has no config.json (nor the {'/, '.join(EXPORT_PARTS)}/ of an export): it is "
        "not a saved model"
    )


def merge_adapter(
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    base: str | None = None,
    dtype: torch.dtype | None = None,
    card: str | None = None,
) -> Path:
    """Merge the adapter in ``adapter_dir`` into its base (``base``, else the one its config records) at
    ``out_dir`` (with ``card`` as its README.md); the base may be any model argument."""
    adapter_dir = Path(adapter_dir)
    try:
        recorded = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"{adapter_dir}/adapter_config.json cannot be read: {exc}") from exc
    base_name = base or recorded
    if not base_name:
        raise ModelNotFoundError(f"{adapter_dir}/adapter_config.json names no base model: pass the base explicitly")
    return save_merged(adapter_dir, out_dir, resolve_model(base_name), dtype, card)


def merged_adapter(adapter_dir: Path) -> Path:
    """The adapter merged onto its recorded base, built once into ``$MEDRL_CACHE/merged/`` (keyed by the
    adapter's files, so a retrained adapter gets a new folder)."""
    files = sorted(p for p in adapter_dir.iterdir() if p.name.startswith("adapter_") and p.is_file())
    digest = json_digest({p.name: file_digest(p) for p in files}, length=12)
    out = cache_dir() / "merged" / f"{adapter_dir.parent.name}-{adapter_dir.name}-{digest}"
    if (out / "config.json").is_file():
        return out
    _say_once(str(adapter_dir), f"merging the adapter {adapter_dir} onto its base into {out} (once)")
    return merge_adapter(adapter_dir, out)


def load_processor(name: str | os.PathLike, image_options: dict[str, Any] | None = None):
    """The processor (tokenizer + image processor + chat template) of a model argument; ``image_options`` set
    the image processor's own settings (``max_pixels``, ``do_image_splitting``, ...), unknown keys fail."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(resolve_model(name), **(image_options or {}))
    _check_image_options(processor, image_options)
    processor.tokenizer.padding_side = "left"  # batched generation needs left padding
    return processor


def load_vlm(
    name: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    image_options: dict[str, Any] | None = None,
):
    """``(model, processor)`` for a model argument of any supported family, on ``device`` in eval mode.

    The family is checked from ``config.json`` first, so a model of no known family fails with one line
    naming the families before any weights are read."""
    from transformers import AutoModelForImageTextToText

    path = resolve_model(name)
    family_of_folder(path)
    kwargs = {"dtype": dtype or resolve_dtype("auto", device)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs).to(device).eval()
    return model, load_processor(path, image_options)


def _check_image_options(processor: Any, options: dict[str, Any] | None) -> None:
    """One clear error for an image option the family's image processor does not have (transformers would
    keep it silently as an unused attribute)."""
    image_processor = processor.image_processor
    known = set(getattr(getattr(image_processor, "valid_kwargs", None), "__annotations__", {}))
    known |= {k for k in vars(image_processor) if not k.startswith("_")}
    unknown = sorted(set(options or {}) - known)
    if unknown:
        raise UserError(f"image options {unknown} are not settings of {type(image_processor).__name__}; "
                        f"its settings are {sorted(known)}")  # fmt: skip


def vision_tower(model) -> torch.nn.Module:
    """The vision tower of a VLM of any supported family (the module its adapter names)."""
    tower = family_of(model).tower
    inner = getattr(model, "model", None)
    for owner in (inner, model):
        if owner is not None and hasattr(owner, tower):
            return getattr(owner, tower)
    raise TypeError(f"{type(model).__name__} has no vision tower `{tower}`")
