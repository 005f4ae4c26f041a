"""The environment variables medrl reads, each read in one place.

- ``MEDRL_DATA_DIR``: the folder of MedMNIST files (and ``pmc_vqa/``, ``benchmarks/`` below it);
- ``MEDRL_CACHE``: where built artefacts (the tiny models, feature caches) live, default ``~/.cache/medrl``;
- ``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``, ``MEDRL_OFFLINE``: any of them true means "never download";
- ``MEDRL_DEBUG``: show full tracebacks for errors the CLI would otherwise print as one line;
- ``MEDRL_PROGRESS``: ``1`` forces progress bars on, ``0`` off (default: on only when stderr is a terminal).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DATA_DIR_ENV = "MEDRL_DATA_DIR"
CACHE_ENV = "MEDRL_CACHE"
OFFLINE_ENVS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MEDRL_OFFLINE")
DEBUG_ENV = "MEDRL_DEBUG"
PROGRESS_ENV = "MEDRL_PROGRESS"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
# medrl's own on/off variables: a value outside _TRUE and _FALSE is refused (check_switches), not read as off.
SWITCHES = (DEBUG_ENV, PROGRESS_ENV, "MEDRL_OFFLINE")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def check_switches() -> None:
    """Refuse a value of medrl's on/off variables that is neither on nor off (``MEDRL_PROGRESS=maybe``)."""
    from medrl.core.errors import ConfigError

    for name in SWITCHES:
        value = os.environ.get(name, "").strip().lower()
        if value and value not in _TRUE + _FALSE:
            raise ConfigError(
                f"{name}={os.environ[name]} is neither on nor off: set it to 1 (on) or 0 (off) "
                f"(also {'/'.join(_TRUE[1:])} or {'/'.join(_FALSE[1:])}), or unset it"
            )


def is_offline() -> bool:
    """True when any offline variable is set to a true value (``1``, ``true``, ``yes``, ``on``)."""
    return any(_flag(name) for name in OFFLINE_ENVS)


def is_debug() -> bool:
    """True when ``MEDRL_DEBUG`` asks for full tracebacks."""
    return _flag(DEBUG_ENV)


def data_dir() -> Path | None:
    """``$MEDRL_DATA_DIR`` as a path, or None when it is unset or empty."""
    value = os.environ.get(DATA_DIR_ENV, "").strip()
    return Path(value).expanduser() if value else None


def cache_dir() -> Path:
    """Where medrl keeps built artefacts: ``$MEDRL_CACHE`` or ``~/.cache/medrl``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "medrl").expanduser()


def show_progress(requested: bool = True) -> bool:
    """Whether to draw a progress bar: ``requested``, and a person is watching (``$MEDRL_PROGRESS`` decides
    when set; else stderr is a terminal). CI logs and ``> file`` redirections get no bar lines."""
    if not requested:
        return False
    value = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if value:
        return value in _TRUE
    return sys.stderr.isatty()
