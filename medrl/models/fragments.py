"""Model fragments (``configs/models/*.yaml``) as the model argument of the evaluation verbs.

A fragment is a config piece that any ``medrl fit`` adds with one more ``--config``; ``medrl eval`` and
``medrl bench-eval`` take the same file as ``--model`` and read the settings that concern them: the model
(``model.init_args.model``: a hub id, a folder or a tiny id), its weight dtype and its image options.
"""

from __future__ import annotations

from pathlib import Path

from medrl.core.errors import ConfigError
from medrl.core.io import load_yaml


def is_fragment(model: str) -> bool:
    """Whether a model argument names a YAML fragment rather than a model."""
    return str(model).endswith((".yaml", ".yml"))


def model_and_dtype(model: str, dtype: str = "auto") -> tuple[str, str]:
    """``(model, dtype)``: ``model`` itself, or the model and dtype a fragment names (an explicit ``dtype``
    other than ``auto`` wins over the fragment's)."""
    if not is_fragment(model):
        return model, dtype
    init = fragment_init_args(model)
    return init["model"], dtype if dtype != "auto" else str(init.get("dtype", "auto"))


def image_options_of(model: str, given: dict | None = None) -> dict | None:
    """The image options to use: ``given`` when set, else the fragment's (``model.init_args.image_options``)."""
    if given is not None or not is_fragment(model):
        return given
    return fragment_init_args(model).get("image_options")


def fragment_init_args(model: str) -> dict:
    """The ``model.init_args`` a fragment sets (its ``model`` checked to be a model argument)."""
    path = Path(model)
    if not path.is_file():
        raise ConfigError(f"--model {path}: no such model fragment (configs/models/*.yaml lists them)")
    init = ((load_yaml(path) or {}).get("model") or {}).get("init_args") or {}
    if not isinstance(init.get("model"), str):
        raise ConfigError(f"--model {path}: a model fragment sets model.init_args.model (a hub id, folder or tiny)")
    return init
