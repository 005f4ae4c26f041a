"""Content digests: of files (streamed), of JSON-able objects (key order ignored) and of bytes."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any


def file_digest(path: str | os.PathLike, algorithm: str = "sha256", chunk: int = 1 << 20) -> str:
    """Hex digest of a file's bytes, read in ``chunk``-sized blocks (``md5`` for MedMNIST's official sums)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def bytes_digest(data: bytes, algorithm: str = "sha256", length: int | None = None) -> str:
    """Hex digest of ``data``, cut to its first ``length`` characters when given.

    >>> bytes_digest(b"medrl", length=8)
    'c7d974fc'
    """
    return hashlib.new(algorithm, data).hexdigest()[:length]


def json_digest(obj: Any, length: int | None = None) -> str:
    """SHA-256 of ``obj`` as canonical JSON (sorted keys; non-JSON values through ``str``).

    Two dicts with the same items in another order get the same digest:

    >>> json_digest({"a": 1, "b": [2]}) == json_digest({"b": [2], "a": 1})
    True
    """
    return bytes_digest(json.dumps(obj, sort_keys=True, default=str).encode(), length=length)
