"""Atomic writes for every artefact medrl produces: a file appears whole or not at all."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from medrl.core.env import CACHE_ENV, cache_dir
from medrl.core.errors import UserError

# What to do when a run's save finds its disk full.
RUN_DIR_FIX = (
    "free space there or point trainer.default_root_dir (or the checkpoint dirpath) at a disk with room, then "
    "resume from the last checkpoint, which is intact"
)


def _umask() -> int:
    # Reading it from /proc avoids os.umask's set-and-restore, during which another thread's files would
    # be created with no mask at all.
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file in the same folder, fsync, then rename."""
    return atomic_write_with(path, lambda fh: fh.write(data), len(data))


def atomic_write_with(
    path: str | os.PathLike,
    write: Callable[[BinaryIO], object],
    needed: int,
    what: str | None = None,
    fix: str | None = None,
) -> Path:
    """``write(fh)`` into a temp file beside ``path``, fsync, rename: ``path`` appears whole or not at all, and
    a full disk is one line naming the folder, ``what`` was saved and about ``needed`` bytes (then ``fix``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        fsync_replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if is_no_space(exc):
            raise no_space_error(path.parent, what or path.name, needed, fix) from exc
        raise
    return path


def fsync_replace(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Put the complete, fsynced temp file ``tmp`` at ``path`` (same folder) with the umask's mode, and make
    the rename itself durable by syncing the folder."""
    # mkstemp makes the file private (0600); give it the mode a plain open() would, so shared run
    # directories stay readable by the group as the user's umask intends.
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
    try:
        fd = os.open(Path(path).parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a folder; the rename is still atomic
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomic UTF-8 text write."""
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomic JSON write (indented, keys in insertion order, non-JSON values via ``str``)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Atomic JSON-lines write, one object per line."""
    return atomic_write_text(path, "".join(json.dumps(row, default=str) + "\n" for row in rows))


def no_space_error(folder: str | os.PathLike, what: str, needed: int, fix: str | None = None) -> UserError:
    """The one-line message for a save that ran out of disk: the folder, what was saved, needed and free MB,
    and ``fix`` (by default: free space, or for a folder in medrl's cache, move ``MEDRL_CACHE``)."""
    if fix is None:
        in_cache = Path(os.path.abspath(folder)).is_relative_to(os.path.abspath(cache_dir()))
        fix = (
            f"it is in {CACHE_ENV} ({cache_dir()}): free space there or point {CACHE_ENV} at a disk with room"
            if in_cache
            else "free space there or write to a folder on a disk with room"
        )
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = -1
    left = f"{free / 2**20:.1f} MB free" if free >= 0 else "free space unknown"
    size = f"needs about {needed / 2**20:.1f} MB, " if needed > 0 else ""
    return UserError(f"no space left in {folder} to save {what} ({size}{left}); {fix}")


def is_no_space(exc: BaseException) -> bool:
    """True for the errors a full disk (or quota) raises, also when a library wraps them (safetensors raises its
    own error with the OS message in it)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(words in str(current) for words in ("No space left on device", "Disk quota exceeded")):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def umask_modes(root: str | os.PathLike) -> Path:
    """Give a folder built through ``mkdtemp`` (0700) and everything in it the modes a plain ``mkdir`` and
    ``open`` would: folders ``0777``, files ``0666``, less the umask. Exported and cached models then share
    like every other output."""
    root = Path(root)
    mask = _umask()
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
    return root


def load_yaml(path: str | os.PathLike) -> Any:
    """A YAML file's content; a syntax error names the file, line and column (yaml alone says
    ``<unicode string>`` when given the text)."""
    import yaml

    from medrl.core.errors import ConfigError

    text = Path(path).read_text()
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}; fix the file and rerun") from exc
