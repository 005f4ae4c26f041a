"""``medrl data ...``: verify, synthesise and fetch MedMNIST files."""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from medrl.data import medmnist_files as mf


def verify(root: str | None = None, flag: str | None = None, size: int | None = None) -> int:
    """Check MedMNIST files against the official MD5, keys, dtypes, shapes and per-split counts.

    Prints a table and returns a non-zero exit status naming every bad file and what is wrong with it.

    Args:
        root: directory holding the .npz files (default: $MEDRL_DATA_DIR).
        flag: check only this flag (default: every MedMNIST 2D file present).
        size: check only this size (default: every size present).
    """
    root_path = mf.resolve_root(root)
    if not root_path.is_dir():
        raise SystemExit(f"medrl data verify: {root_path} is not a directory")
    if flag is not None:
        sizes = [size] if size is not None else [s for s in mf.SIZES if (root_path / mf.file_name(flag, s)).exists()]
        names = [mf.file_name(flag, s) for s in sizes or [28]]
        names += [mf.file_name(flag, s, synthetic=True) for s in sizes or [28]]
        paths = [root_path / n for n in names if (root_path / n).exists()] or [root_path / names[0]]
    else:
        paths = sorted(p for p in root_path.glob("*.npz") if mf.parse_file_name(p.name))
        paths = [p for p in paths if size is None or mf.parse_file_name(p.name)[1] == size]
    if not paths:
        raise SystemExit(f"medrl data verify: no MedMNIST 2D files in {root_path}")
    reports = []
    for path in paths:
        parsed = mf.parse_file_name(path.name)
        reports.append(mf.verify_file(path, flag or parsed[0], size or parsed[1]))
    table = Table(title=f"MedMNIST files in {root_path}")
    for column in ("file", "flag", "size", "train", "val", "test", "md5", "status"):
        table.add_column(column)
    colours = {"official": "green", "synthetic": "yellow", "bad": "red"}
    for r in reports:
        table.add_row(
            r.path.name, r.flag, str(r.size), *(str(r.counts.get(s, "-")) for s in mf.SPLITS), r.md5[:12] or "-",
            f"[{colours[r.status]}]{r.status}[/]",
        )  # fmt: skip
    console = Console(width=None if sys.stdout.isatty() else 140)
    console.print(table)
    bad = [r for r in reports if not r.ok]
    for r in bad:
        console.print(f"[red]BAD[/] {r.path}: " + "; ".join(r.problems))
    return 1 if bad else 0


def synth(
    flag: str,
    size: int = 28,
    out: str | None = None,
    n_train: int = 256,
    n_val: int = 64,
    n_test: int = 64,
    seed: int = 0,
) -> int:
    """Write a synthetic file in the exact MedMNIST format, for offline runs and tests.

    The file is named ``<flag>[_size].synthetic.npz`` and marked inside, so ``verify`` reports it as
    synthetic and it is never taken for the official release.

    Args:
        flag: MedMNIST 2D flag (e.g. pathmnist).
        size: image size (28, 64, 128, 224).
        out: output directory (default: $MEDRL_DATA_DIR).
        n_train: training items.
        n_val: validation items.
        n_test: test items.
        seed: random seed.
    """
    path = mf.synthesize(flag, size, mf.resolve_root(out), n_train, n_val, n_test, seed)
    print(f"wrote {path} (synthetic: {n_train}/{n_val}/{n_test} train/val/test)")
    return 0


def fetch(flag: str, size: int = 28, root: str | None = None) -> int:
    """Download an official MedMNIST file and check its MD5; offline, say what to place by hand.

    Args:
        flag: MedMNIST 2D flag (e.g. pneumoniamnist).
        size: image size (28, 64, 128, 224).
        root: destination directory (default: $MEDRL_DATA_DIR).
    """
    try:
        path = mf.fetch(flag, size, root)
    except mf.MedMNISTFileError as exc:
        print(f"medrl data fetch: {exc}")
        return 1
    print(f"{path}: official, MD5 {mf.md5sum(Path(path))}")
    return 0
