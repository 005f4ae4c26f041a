"""Images by name from a folder or a zip archive, as PMC-VQA and the evaluation exports ship them.

PMC-VQA's CSVs name a figure (``PMC1064097_F1.jpg``) while its ``images.zip`` stores it under a folder
(``images/PMC1064097_F1.jpg``), and people unzip it in different ways. A store therefore looks a name up
as given, under ``images/``, and (zip only) by its base name, so the official files work however they
were unpacked.

A data file never makes a store read outside its location: a name that is absolute or climbs out of it
(``../x.png``, ``/etc/passwd``) is not looked up at all, and :meth:`ImageStore.check` drops its row as
``outside_folder``. (Symbolic links the user put inside the folder are followed: they are the user's choice,
not the data file's.) An image too large to decode safely (Pillow's decompression-bomb limit) is dropped as
``image_too_large`` instead of ending the run.
"""

from __future__ import annotations

import io
import os
import re
import threading
import zipfile
from pathlib import Path, PurePosixPath
from typing import Literal

from PIL import Image, UnidentifiedImageError

from medrl.core.errors import ConfigError

ImageCheck = Literal["decode", "exists", "none"]
_SUBFOLDERS = ("", "images")


class ImageStore:
    """Read-only access to images in a folder or a ``.zip``.

    Args:
        location: a folder or a zip file.
    """

    def __init__(self, location: str | os.PathLike) -> None:
        self.location = Path(location).expanduser()
        if not self.location.exists():
            raise FileNotFoundError(f"image folder or zip {self.location} does not exist")
        self.is_zip = self.location.is_file()
        if self.is_zip and not zipfile.is_zipfile(self.location):
            raise ConfigError(f"{self.location} is a file but not a zip archive: pass an image folder or images.zip")
        self._members: dict[str, str] | None = None
        self._by_base: dict[str, str | None] | None = None
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid: int | None = None
        self._lock = threading.Lock()

    @classmethod
    def find(cls, root: str | os.PathLike) -> ImageStore:
        """The image store of a dataset folder: ``root/images`` (folder), else ``root/images.zip``, else ``root``."""
        root = Path(root).expanduser()
        for candidate in (root / "images", root / "images.zip"):
            if candidate.exists():
                return cls(candidate)
        return cls(root)

    def __repr__(self) -> str:
        return f"ImageStore({str(self.location)!r})"

    def __getstate__(self) -> dict:
        # DataLoader workers get their own zip handle: a shared file position across processes corrupts reads.
        state = dict(self.__dict__)
        state.update(_zip=None, _zip_pid=None, _lock=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _archive(self) -> zipfile.ZipFile:
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip, self._zip_pid = zipfile.ZipFile(self.location), os.getpid()
        return self._zip

    def _index(self) -> tuple[dict[str, str], dict[str, str | None]]:
        if self._members is None:
            with self._lock:
                names = [n for n in self._archive().namelist() if not n.endswith("/")]
                by_base: dict[str, str | None] = {}
                for name in names:
                    base = PurePosixPath(name).name
                    # A base name that occurs twice is ambiguous: never guess between two files.
                    by_base[base] = None if base in by_base else name
                self._members, self._by_base = {n: n for n in names}, by_base
        return self._members, self._by_base  # type: ignore[return-value]

    @staticmethod
    def is_outside(name: str) -> bool:
        """True when ``name`` is absolute or leads out of the store's folder (``..`` after normalising)."""
        name = str(name).strip().replace("\\", "/")
        if os.path.isabs(name) or PurePosixPath(name).is_absolute() or re.match(r"^[A-Za-z]:", name):
            return True
        return os.path.normpath(name).split(os.sep)[0] == ".."

    def resolve(self, name: str) -> str | None:
        """Where ``name`` lives in the store (a path or a zip member), or None when it is not there (or names a
        file outside the store, which is never looked up)."""
        name = str(name).strip()
        if not name or self.is_outside(name):
            return None
        if not self.is_zip:
            for sub in _SUBFOLDERS:
                path = self.location / sub / name
                if path.is_file():
                    return str(path)
            return None
        members, by_base = self._index()
        clean = name.removeprefix("./")
        for sub in _SUBFOLDERS:
            key = f"{sub}/{clean}" if sub else clean
            if key in members:
                return key
        return by_base.get(PurePosixPath(clean).name)

    def read_bytes(self, name: str) -> bytes:
        """The raw bytes of image ``name``; FileNotFoundError names the store when it is absent."""
        if self.is_outside(name):
            raise ConfigError(f"image {name!r} is outside {self.location}: image paths must be relative to it")
        where = self.resolve(name)
        if where is None:
            raise FileNotFoundError(f"image {name!r} is not in {self.location}")
        if self.is_zip:
            with self._lock:
                return self._archive().read(where)
        return Path(where).read_bytes()

    def open(self, name: str) -> Image.Image:
        """Image ``name`` decoded and converted to RGB."""
        with Image.open(io.BytesIO(self.read_bytes(name))) as image:
            return image.convert("RGB")

    def size(self, name: str) -> tuple[int, int]:
        """``(height, width)`` of image ``name``, read from its header (the pixels are not decoded)."""
        with Image.open(io.BytesIO(self.read_bytes(name))) as image:
            return image.height, image.width

    def check(self, name: str, level: ImageCheck = "decode") -> tuple[str, str] | None:
        """None when image ``name`` passes ``level``; else ``(reason, detail)`` for a validation report."""
        if level == "none":
            return None
        if self.is_outside(name):
            return "outside_folder", f"{name!r} is outside {self.location}; image paths must be relative to it"
        if self.resolve(name) is None:
            return "missing_image", f"{name!r} not found in {self.location}"
        if level == "exists":
            return None
        try:
            with Image.open(io.BytesIO(self.read_bytes(name))) as image:
                image.load()
        except Image.DecompressionBombError as exc:
            return "image_too_large", f"{name!r} is too large to decode safely ({exc})"
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, zipfile.BadZipFile) as exc:
            return "bad_image", f"{name!r} cannot be decoded ({type(exc).__name__}: {exc})"
        return None


def tiled_size(sizes: list[tuple[int, int]], max_side: int = 1344) -> tuple[int, int]:
    """``(height, width)`` that :func:`tile` gives images of these ``(height, width)`` sizes, without them.

    >>> tiled_size([(100, 50)]), tiled_size([(100, 100), (50, 50)])
    ((100, 50), (100, 202))
    """
    if len(sizes) == 1:
        return sizes[0]
    height = max(h for h, _ in sizes)
    width = sum(max(1, round(w * height / h)) for h, w in sizes) + max(2, height // 50) * (len(sizes) - 1)
    longest = max(height, width)
    if longest > max_side:
        factor = max_side / longest
        height, width = max(1, round(height * factor)), max(1, round(width * factor))
    return height, width


def tile(images: list[Image.Image], max_side: int = 1344) -> Image.Image:
    """Several images side by side as one RGB image (the tallest one's height), for items with several images.

    MMMU and MedXpertQA items can have several; a model that takes one image per prompt gets them tiled
    (``images: tiled``) rather than dropped. The result is scaled down so its longer side is at most ``max_side``.
    """
    if len(images) == 1:
        return images[0]
    height = max(im.height for im in images)  # scale up to the tallest: no image loses detail
    scaled = [im.resize((max(1, round(im.width * height / im.height)), height)) for im in images]
    gap = max(2, height // 50)
    canvas = Image.new("RGB", (sum(im.width for im in scaled) + gap * (len(scaled) - 1), height), "white")
    x = 0
    for im in scaled:
        canvas.paste(im, (x, 0))
        x += im.width + gap
    longest = max(canvas.size)
    if longest > max_side:
        factor = max_side / longest
        canvas = canvas.resize((max(1, round(canvas.width * factor)), max(1, round(canvas.height * factor))))
    return canvas
