"""Encoder features of one MedMNIST split, extracted once and kept on disk under a content key.

The key holds everything that changes the features: the encoder's :meth:`~medrl.models.encoders.Encoder.describe`
(name, weights fingerprint, pretrained or not, image-size policy, pooling, normalisation, dtype), the flag,
size and split, whether the file is synthetic, the file's MD5 and the exact rows used. Its SHA-256 names the
file, so a changed encoder or data file can never be served stale features.

Files are safetensors (``features`` float32 ``[N, D]``, ``labels`` int64 ``[N, L]``, ``indices`` int64 ``[N]``)
whose metadata carries the key and a SHA-256 of the tensors; a file whose checksum or key does not match is
treated as absent and rebuilt. Extraction writes fixed-size chunks into ``<name>.partial/`` (each atomically),
so an interrupted run resumes from its last whole chunk; the final file appears by rename, whole or not at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch.utils.data import DataLoader, Subset

from medrl.core.env import cache_dir, show_progress
from medrl.core.hashing import bytes_digest, file_digest, json_digest
from medrl.core.io import atomic_write_bytes
from medrl.data.medmnist import MedMNISTDataset
from medrl.models.encoders import Encoder

log = logging.getLogger(__name__)
CACHE_VERSION = 1  # bump when the file layout or the extraction itself changes


def default_cache_dir() -> Path:
    """``$MEDRL_CACHE/features`` (default ``~/.cache/medrl/features``)."""
    return cache_dir() / "features"


_MD5_MEMO: dict[tuple[str, int, int], str] = {}


def file_md5(path: Path) -> str:
    """MD5 of a data file, memoised on (path, size, mtime) so every split and run does not re-read it."""
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo not in _MD5_MEMO:
        _MD5_MEMO[memo] = file_digest(path, "md5")
    return _MD5_MEMO[memo]


def feature_key(encoder: Encoder, dataset: MedMNISTDataset, size: int, data_path: Path) -> dict[str, Any]:
    """The content key of ``encoder``'s features for ``dataset`` (one split, maybe a subset, of ``data_path``)."""
    indices = np.ascontiguousarray(dataset.indices, dtype=np.int64)
    full = len(indices) == len(dataset.images) and bool((indices == np.arange(len(indices))).all())
    return {
        "version": CACHE_VERSION,
        "encoder": encoder.describe(),
        "flag": dataset.flag,
        "size": size,
        "split": dataset.split,
        "synthetic": bool(dataset.synthetic),
        "file_md5": file_md5(data_path),
        "rows": "all" if full else f"{len(indices)} rows, sha {bytes_digest(indices.tobytes(), length=16)}",
    }


def _digest(key: dict[str, Any]) -> str:
    return json_digest(key)


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class CachedFeatures:
    """One split's features, as read from (or just written to) the cache."""

    features: torch.Tensor  # [N, D] float32
    labels: torch.Tensor  # [N, L] int64
    indices: torch.Tensor  # [N] int64, rows of the split in the data file
    key: dict[str, Any]
    path: Path
    hit: bool  # True when read from disk, False when extracted now
    seconds: float  # extraction time (0 for a hit)


class FeatureCache:
    """A folder of feature files named by content key (see the module docstring).

    Args:
        root: the folder (default ``$MEDRL_CACHE/features``).
        chunk_size: images per resumable chunk during extraction.
    """

    def __init__(self, root: str | Path | None = None, chunk_size: int = 2048) -> None:
        self.root = Path(root).expanduser() if root else default_cache_dir()
        self.chunk_size = chunk_size

    def path(self, key: dict[str, Any]) -> Path:
        """The file for ``key``: readable prefix, then the key's hash."""
        name = str(key["encoder"]["name"]).replace("/", "--").replace(":", "-")[-48:]
        return self.root / f"{key['flag']}_{key['size']}_{key['split']}_{name}_{_digest(key)[:20]}.safetensors"

    def load(self, key: dict[str, Any]) -> CachedFeatures | None:
        """The cached features for ``key``, or None when absent; a corrupt or mismatched file is removed."""
        path = self.path(key)
        if not path.is_file():
            return None
        problem = None
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
            if meta.get("complete") != "1" or json.loads(meta.get("key", "null")) != key:
                problem = "its recorded key differs or it is marked incomplete"
            elif meta.get("sha256") != _checksum(tensors):
                problem = "its checksum does not match its contents"
            elif not len(tensors["features"]) == len(tensors["labels"]) == len(tensors["indices"]):
                problem = "its tensors have different lengths"
        except (SafetensorError, OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
            problem = f"it cannot be read ({type(exc).__name__}: {exc})"
        if problem:
            log.warning("feature cache %s is corrupt (%s): removing it and extracting again", path, problem)
            path.unlink(missing_ok=True)
            return None
        return CachedFeatures(tensors["features"], tensors["labels"], tensors["indices"], key, path, True, 0.0)

    def get(
        self,
        key: dict[str, Any],
        encoder: Encoder,
        dataset: MedMNISTDataset,
        batch_size: int = 64,
        device: str | torch.device = "cpu",
        num_workers: int = 0,
        progress: bool = True,
    ) -> CachedFeatures:
        """The features for ``key``: from disk when cached, else extracted (resuming any partial run) and stored."""
        cached = self.load(key)
        if cached is not None:
            return cached
        # DataLoaders draw from the global RNG: without the fork a run's later shuffling (so its result)
        # would depend on whether its features were cached.
        with torch.random.fork_rng(devices=[]):
            return self.extract(key, encoder, dataset, batch_size, device, num_workers, progress)

    def extract(
        self,
        key: dict[str, Any],
        encoder: Encoder,
        dataset: MedMNISTDataset,
        batch_size: int = 64,
        device: str | torch.device = "cpu",
        num_workers: int = 0,
        progress: bool = True,
    ) -> CachedFeatures:
        """Run ``encoder`` over ``dataset`` in batches, chunk by chunk, and write the cache file atomically."""
        from tqdm.auto import tqdm

        start = time.perf_counter()
        path = self.path(key)
        partial = path.with_suffix(".partial")
        partial.mkdir(parents=True, exist_ok=True)
        digest, n = _digest(key), len(dataset)
        bounds = [(lo, min(lo + self.chunk_size, n)) for lo in range(0, n, self.chunk_size)]
        chunks: list[torch.Tensor | None] = [self._read_chunk(partial / f"{i:05d}.safetensors", digest, hi - lo)
                                             for i, (lo, hi) in enumerate(bounds)]  # fmt: skip
        done = sum(hi - lo for (lo, hi), c in zip(bounds, chunks, strict=True) if c is not None)
        desc = f"features {key['flag']} {key['split']} {encoder.label}"
        with tqdm(
            total=n, initial=done, desc=desc, unit="img", disable=not show_progress(progress), mininterval=1.0
        ) as bar:
            for i, (lo, hi) in enumerate(bounds):
                if chunks[i] is not None:
                    continue
                encoder.load(device)
                loader = DataLoader(Subset(dataset, range(lo, hi)), batch_size=batch_size, num_workers=num_workers)
                parts = []
                for batch in loader:
                    parts.append(encoder.encode(batch["image"]))
                    bar.update(len(batch["image"]))
                chunks[i] = torch.cat(parts)
                meta = {"key_sha256": digest, "rows": str(hi - lo)}
                atomic_write_bytes(partial / f"{i:05d}.safetensors", save({"features": chunks[i]}, metadata=meta))
        rows = np.asarray(dataset.indices, dtype=np.int64)
        tensors = {
            "features": torch.cat(chunks).float().contiguous() if chunks else torch.zeros(0, 0),
            "labels": torch.from_numpy(np.ascontiguousarray(dataset.labels[rows], dtype=np.int64)),
            "indices": torch.from_numpy(rows.copy()),
        }
        meta = {"key": json.dumps(key, sort_keys=True), "sha256": _checksum(tensors), "complete": "1"}
        atomic_write_bytes(path, save(tensors, metadata=meta))
        shutil.rmtree(partial, ignore_errors=True)
        seconds = time.perf_counter() - start
        log.info("extracted %d %s features in %.1fs -> %s", n, key["split"], seconds, path)
        return CachedFeatures(tensors["features"], tensors["labels"], tensors["indices"], key, path, False, seconds)

    @staticmethod
    def _read_chunk(path: Path, digest: str, rows: int) -> torch.Tensor | None:
        """A finished chunk of an interrupted extraction, or None if absent or not for this key."""
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                if meta.get("key_sha256") == digest and meta.get("rows") == str(rows):
                    return fh.get_tensor("features")
        except (SafetensorError, OSError, ValueError) as exc:
            log.warning("ignoring unreadable chunk %s (%s)", path, exc)
        path.unlink(missing_ok=True)
        return None
