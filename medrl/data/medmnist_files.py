"""MedMNIST files on disk: names, official metadata, verification, loading, synthesis and download.

Metadata (labels, task type, channels, split sizes, URLs, MD5s) comes from the ``medmnist`` package's
``INFO``; this module only adds what medrl needs around it: strict validation with errors that name the
file and the fix, synthetic files in the exact official format, and an offline-aware download.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from medrl.core.env import DATA_DIR_ENV, data_dir, is_offline
from medrl.core.errors import ConfigError, UserError
from medrl.core.hashing import bytes_digest, file_digest
from medrl.core.io import atomic_write_bytes

FLAGS_2D: tuple[str, ...] = (
    "pathmnist",
    "chestmnist",
    "dermamnist",
    "octmnist",
    "pneumoniamnist",
    "retinamnist",
    "breastmnist",
    "bloodmnist",
    "tissuemnist",
    "organamnist",
    "organcmnist",
    "organsmnist",
)
SIZES: tuple[int, ...] = (28, 64, 128, 224)
SPLITS: tuple[str, ...] = ("train", "val", "test")
Split = Literal["train", "val", "test"]
# Written into every synthetic file so that no tool can take it for the official release.
SYNTHETIC_KEY = "medrl_synthetic"


# What reading a damaged .npz can raise: a bad zip directory, a CRC mismatch, a corrupt deflate stream, EOF.
_READ_ERRORS = (ValueError, zipfile.BadZipFile, OSError, EOFError, zlib.error)


class MedMNISTFileError(UserError, RuntimeError):
    """A MedMNIST file is missing, corrupt or not in the official format; the message says how to fix it.

    ``reason`` is the cause alone, for callers that give the fix in their own words (default: the message).
    """

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message


def info(flag: str) -> dict:
    """The ``medmnist`` package's INFO entry for a 2D flag, with a clear error for unknown flags."""
    if flag not in FLAGS_2D:
        raise ConfigError(f"unknown MedMNIST 2D flag {flag!r}; choose one of: {', '.join(FLAGS_2D)}")
    # Imported lazily: `import medmnist` creates ~/.medmnist as a side effect.
    from medmnist.info import INFO

    return INFO[flag]


def check_size(size: int) -> int:
    """Validate an image size against the sizes MedMNIST+ publishes."""
    if size not in SIZES:
        raise ConfigError(f"MedMNIST size must be one of {SIZES}, got {size}")
    return size


def file_name(flag: str, size: int = 28, synthetic: bool = False) -> str:
    """The official file name (``pathmnist.npz``, ``pathmnist_64.npz``); synthetic files add ``.synthetic``."""
    info(flag)
    suffix = "" if check_size(size) == 28 else f"_{size}"
    return f"{flag}{suffix}{'.synthetic' if synthetic else ''}.npz"


def official_md5(flag: str, size: int = 28) -> str:
    """The MD5 that the ``medmnist`` package lists for this file."""
    return info(flag)["MD5" if size == 28 else f"MD5_{size}"]


def official_url(flag: str, size: int = 28) -> str:
    """The Zenodo URL that the ``medmnist`` package lists for this file."""
    return info(flag)["url" if size == 28 else f"url_{size}"]


def resolve_root(root: str | os.PathLike | None) -> Path:
    """The data directory: ``root`` if given, else ``$MEDRL_DATA_DIR``; an error says how to set it."""
    value = root if root not in (None, "") else data_dir()
    if not value:
        raise MedMNISTFileError(
            f"no MedMNIST data directory: set {DATA_DIR_ENV}=DIR or name the folder (`--data.root DIR` for "
            f"`medrl fit`, `--root DIR` for the study verbs). "
            "Put the official .npz files there (`medrl data fetch`), or write synthetic ones (`medrl data synth`)."
        )
    return Path(value).expanduser()


def md5sum(path: Path) -> str:
    """MD5 of a file, streamed (the checksum MedMNIST publishes)."""
    return file_digest(path, "md5")


def expected_shapes(flag: str, size: int, split: str, n: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Image and label array shapes of one split holding ``n`` samples."""
    meta = info(flag)
    image = (n, size, size) if meta["n_channels"] == 1 else (n, size, size, 3)
    n_labels = len(meta["label"]) if meta["task"].startswith("multi-label") else 1
    return image, (n, n_labels)


@dataclass
class FileReport:
    """The outcome of verifying one file: ``status`` is official, synthetic, or bad (with ``problems``)."""

    path: Path
    flag: str
    size: int
    status: Literal["official", "synthetic", "bad"] = "bad"
    counts: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    md5: str = ""

    @property
    def ok(self) -> bool:
        """True when the file can be used (official or synthetic)."""
        return self.status != "bad"


def parse_file_name(name: str) -> tuple[str, int, bool] | None:
    """``(flag, size, synthetic)`` from a file name, or None when it is not a MedMNIST 2D file name."""
    synthetic = name.endswith(".synthetic.npz")
    stem = name.removesuffix(".npz").removesuffix(".synthetic")
    flag, _, size_text = stem.partition("_")
    if flag not in FLAGS_2D:
        return None
    if not size_text:
        return flag, 28, synthetic
    if size_text.isdigit() and int(size_text) in SIZES and int(size_text) != 28:
        return flag, int(size_text), synthetic
    return None


def not_a_file(path: Path) -> str | None:
    """Why ``path``, which is not a readable regular file, is not one, when "not found, fetch it" would mislead:
    a folder, or a symbolic link that loops or points at nothing. None when nothing is there at all."""
    if path.is_dir():
        return f"{path} is a folder, not a MedMNIST file: move it aside or point the data folder elsewhere"
    if path.is_symlink():
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        return (
            f"{path} is a symbolic link that leads nowhere (to {target}: a loop or a missing file): fix or remove "
            "the link"
        )
    return None


def unreadable(path: Path) -> str:
    """What to say about a file this process may not read."""
    return f"cannot read {path.name}: permission denied (give this user read access, e.g. `chmod a+r {path}`)"


def _open_npz(path: Path) -> np.lib.npyio.NpzFile:
    # allow_pickle=False: a user's file is data, never code.
    try:
        return np.load(path, allow_pickle=False)
    except PermissionError as exc:  # the data may be fine: never advise deleting it
        raise MedMNISTFileError(f"{path}: {unreadable(path)}") from exc
    except _READ_ERRORS as exc:
        raise MedMNISTFileError(
            f"{path}: not a readable .npz archive ({type(exc).__name__}: {exc}). The file is truncated or "
            f"corrupt: delete it and download it again (`medrl data fetch`)."
        ) from exc


def _synthetic_meta(npz: np.lib.npyio.NpzFile) -> dict | None:
    if SYNTHETIC_KEY not in npz.files:
        return None
    return json.loads(bytes(npz[SYNTHETIC_KEY]).decode())


def verify_file(path: str | os.PathLike, flag: str | None = None, size: int | None = None) -> FileReport:
    """Check one file against the official MD5, keys, dtypes, shapes and per-split counts.

    ``flag`` and ``size`` default to what the file name says. Synthetic files are checked for format and
    reported as ``synthetic``, never as official.
    """
    path = Path(path)
    parsed = parse_file_name(path.name)
    if flag is None or size is None:
        if parsed is None:
            raise MedMNISTFileError(f"{path}: cannot tell the flag and size from the name; pass them explicitly")
        flag, size = flag or parsed[0], size or parsed[1]
    report = FileReport(path=path, flag=flag, size=size)
    if not path.is_file():
        why = not_a_file(path)
        report.problems.append(why or f"missing; fetch it with `medrl data fetch --flag {flag} --size {size}`")
        return report
    try:
        report.md5 = md5sum(path)
    except PermissionError:
        report.problems.append(unreadable(path))
        return report
    try:
        npz = _open_npz(path)
    except MedMNISTFileError as exc:
        report.problems.append(str(exc).split(": ", 1)[1])
        return report
    with npz:
        synthetic = _synthetic_meta(npz)
        arrays, report.problems = _read_arrays(npz)
    report.problems += _format_problems(arrays, flag, size, report.counts, official=synthetic is None)
    if synthetic is not None:
        report.status = "synthetic" if not report.problems else "bad"
    elif report.md5 != official_md5(flag, size):
        report.problems.append(
            f"MD5 {report.md5} differs from the official {official_md5(flag, size)}: re-download it "
            f"from {official_url(flag, size)}"
        )
    elif not report.problems:
        report.status = "official"
    return report


def _read_arrays(npz: np.lib.npyio.NpzFile) -> tuple[dict[str, np.ndarray], list[str]]:
    """Decompress every split array once; a member that cannot be read becomes a problem, not a crash."""
    arrays: dict[str, np.ndarray] = {}
    problems: list[str] = []
    for split in SPLITS:
        for key in (f"{split}_images", f"{split}_labels"):
            if key not in npz.files:
                problems.append(f"missing key {key} (has {sorted(npz.files)})")
                continue
            try:
                arrays[key] = npz[key]
            except _READ_ERRORS as exc:
                problems.append(f"{key} cannot be read ({exc}); the file is truncated or corrupt")
    return arrays, problems


def _format_problems(arrays: dict[str, np.ndarray], flag: str, size: int, counts: dict[str, int], official: bool):
    problems: list[str] = []
    meta = info(flag)
    for split in SPLITS:
        ikey, lkey = f"{split}_images", f"{split}_labels"
        if ikey not in arrays or lkey not in arrays:
            continue
        images, labels = arrays[ikey], arrays[lkey]
        n = len(images)
        counts[split] = n
        want_image, want_label = expected_shapes(flag, size, split, n)
        if images.dtype != np.uint8 or images.shape != want_image:
            problems.append(f"{ikey}: {images.dtype}{images.shape}, expected uint8{want_image}")
        if labels.shape != want_label or not np.issubdtype(labels.dtype, np.integer):
            problems.append(f"{lkey}: {labels.dtype}{labels.shape}, expected integer{want_label}")
        elif labels.size and (labels.min() < 0 or labels.max() >= max(len(meta["label"]), 2)):
            problems.append(f"{lkey}: label values outside 0..{len(meta['label']) - 1}")
        if official and n != meta["n_samples"][split]:
            problems.append(f"{split}: {n} samples, the official release has {meta['n_samples'][split]}")
    return problems


@dataclass
class MedMNISTArrays:
    """All splits of one validated file: ``images[split]`` uint8, ``labels[split]`` int64 ``[N, L]``."""

    path: Path
    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    synthetic: bool


def load_file(path: Path, flag: str, size: int) -> MedMNISTArrays:
    """Load and validate every split of a file (keys, dtypes, shapes, counts) before returning any of it.

    Raises :class:`MedMNISTFileError` naming the file and the fix; nothing half-loads.
    """
    if not path.is_file() and (why := not_a_file(path)):
        raise MedMNISTFileError(why)
    if not path.is_file():
        raise MedMNISTFileError(
            f"{path}: MedMNIST file not found. Fetch it with `medrl data fetch --flag {flag} --size {size} "
            f"--root {path.parent}` (URL {official_url(flag, size)}, MD5 {official_md5(flag, size)}), or write "
            f"a synthetic one with `medrl data synth --flag {flag} --size {size} --out {path.parent}`."
        )
    with _open_npz(path) as npz:
        synthetic = _synthetic_meta(npz) is not None
        arrays, problems = _read_arrays(npz)
    problems += _format_problems(arrays, flag, size, {}, official=not synthetic)
    if problems:
        raise MedMNISTFileError(
            f"{path}: not in the MedMNIST format for {flag} at {size}px: {'; '.join(problems)}. "
            f"Check it with `medrl data verify --root {path.parent}` and re-download it."
        )
    return MedMNISTArrays(
        path=path,
        images={s: arrays[f"{s}_images"] for s in SPLITS},
        labels={s: arrays[f"{s}_labels"].astype(np.int64) for s in SPLITS},
        synthetic=synthetic,
    )


def synthesize(
    flag: str,
    size: int = 28,
    out: str | os.PathLike = ".",
    n_train: int = 256,
    n_val: int = 64,
    n_test: int = 64,
    seed: int = 0,
) -> Path:
    """Write a synthetic file in the exact MedMNIST format, with a class signal a small model can learn.

    Each class gets its own mean brightness and a class-specific stripe frequency on top of noise, so a
    linear probe or a tiny VLM can tell the classes apart. The file is named ``<flag>[_size].synthetic.npz``
    and carries a ``medrl_synthetic`` key, so ``verify`` reports it as synthetic, never as official.
    """
    meta = info(flag)
    size = check_size(size)
    rng = np.random.default_rng(seed)
    n_classes = len(meta["label"])
    multilabel = meta["task"].startswith("multi-label")
    arrays: dict[str, np.ndarray] = {}
    coords = np.linspace(0, 2 * np.pi, size, dtype=np.float32)
    for split, n in zip(SPLITS, (n_train, n_val, n_test), strict=True):
        if multilabel:
            labels = (rng.random((n, n_classes)) < 1.5 / n_classes).astype(np.uint8)
            drive = labels.argmax(1) * labels.max(1) + (1 - labels.max(1)) * n_classes
        else:
            labels = rng.integers(0, n_classes, (n, 1)).astype(np.uint8)
            drive = labels[:, 0].astype(np.int64)
        level = 40 + 170 * drive[:, None, None] / max(n_classes, 1)
        stripes = 30 * np.sin((1 + drive)[:, None, None] * coords[None, None, :])
        base = level + stripes + rng.normal(0, 12, (n, size, size))
        images = np.clip(base, 0, 255).astype(np.uint8)
        if meta["n_channels"] == 3:
            tint = np.stack([images, np.roll(images, 1, axis=1), images[:, ::-1]], axis=-1)
            images = tint.astype(np.uint8)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    marker = {"flag": flag, "size": size, "seed": seed, "generator": "medrl.data.medmnist_files.synthesize"}
    arrays[SYNTHETIC_KEY] = np.frombuffer(json.dumps(marker).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    path = Path(out) / file_name(flag, size, synthetic=True)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def fetch(flag: str, size: int = 28, root: str | os.PathLike | None = None, timeout: float = 20.0) -> Path:
    """Download the official file into ``root`` and check its MD5; offline, fail at once with what to do."""
    import urllib.error
    import urllib.request

    root_path = resolve_root(root)
    path = root_path / file_name(flag, size)
    url, md5 = official_url(flag, size), official_md5(flag, size)
    if path.is_file() and md5sum(path) == md5:
        return path
    manual = (
        f"Download {file_name(flag, size)} by hand from {url} , check that its MD5 is {md5}, "
        f"and place it in {root_path}"
    )
    if is_offline():
        raise MedMNISTFileError(f"offline mode is set. {manual}", reason="offline mode is set")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise MedMNISTFileError(f"cannot download {url} ({exc}). {manual}", reason=f"download failed: {exc}") from exc
    got = bytes_digest(data, "md5")
    if got != md5:
        raise MedMNISTFileError(
            f"downloaded {url} but its MD5 is {got}, not {md5}; nothing was written. {manual}",
            reason=f"the download's MD5 is {got}, not the official one",
        )
    atomic_write_bytes(path, data)
    return path
