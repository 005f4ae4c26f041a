"""``medrl data ...``: verify, synthesise and fetch MedMNIST files; get PMC-VQA and the benchmark suite from the
hub; draw a balanced PMC-VQA subset."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from rich.console import Console
from rich.table import Table

from medrl.core.errors import ConfigError
from medrl.data import medmnist_files as mf
from medrl.data.image_store import ImageCheck, ImageStore


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
        raise ConfigError(f"medrl data verify: {root_path} is not a directory")
    if flag is not None:
        sizes = [size] if size is not None else [s for s in mf.SIZES if (root_path / mf.file_name(flag, s)).exists()]
        names = [mf.file_name(flag, s) for s in sizes or [28]]
        names += [mf.file_name(flag, s, synthetic=True) for s in sizes or [28]]
        paths = [root_path / n for n in names if (root_path / n).exists()] or [root_path / names[0]]
    else:
        paths = sorted(p for p in root_path.glob("*.npz") if mf.parse_file_name(p.name))
        paths = [p for p in paths if size is None or mf.parse_file_name(p.name)[1] == size]
    if not paths:
        raise ConfigError(f"medrl data verify: no MedMNIST 2D files in {root_path}")
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
    path = mf.fetch(flag, size, root)  # offline or failed: a MedMNISTFileError saying what to place by hand
    print(f"{path}: official, MD5 {mf.md5sum(Path(path))}")
    return 0


def get(
    dataset: Literal["pmc-vqa", "medvqa-suite"],
    out: str | None = None,
    source: str | None = None,
    splits: list[str] | None = None,
) -> int:
    """Fetch PMC-VQA or the six-benchmark suite with `datasets` and write it where medrl reads it.

    pmc-vqa (OctoMed/PMC-VQA) -> OUT/train.csv, OUT/test_clean.csv and OUT/images/, in the official columns;
    medvqa-suite (UCSC-VLAA/MedVLThinker-Eval) -> OUT/suite.jsonl and OUT/images/. The hub's download is
    cached by `datasets` (HF_HOME); an interrupted get resumes (images already written are kept). Offline,
    or with the hub out of reach, it stops at once naming the dataset and where to place a manual copy.

    Args:
        dataset: pmc-vqa or medvqa-suite.
        out: the folder to write (default: $MEDRL_DATA_DIR/pmc_vqa or $MEDRL_DATA_DIR/medvqa_suite).
        source: another hub id, or a local copy: a folder of parquet files or a `save_to_disk` folder.
        splits: only these hub splits (pmc-vqa: train, test; medvqa-suite: test).
    """
    from medrl.data.hub_get import get as get_dataset

    reports = get_dataset(dataset, out, source, splits)
    for report in reports:
        print(report.summary())
    return 0


def pmc_subset(
    n: int = 8000,
    root: str | None = None,
    train: str = "train.csv",
    tests: list[str] | None = None,
    images: str | None = None,
    out: str | None = None,
    seed: int = 0,
    stratify_by: str | None = None,
    pass_rates: str | None = None,
    pass_rate_key: str = "dataset_index",
    bands: list[float] | None = None,
    min_pass_rate: float | None = None,
    max_pass_rate: float | None = None,
    stratify: Literal["equal", "proportional"] = "equal",
    image_check: ImageCheck = "decode",
    model: str | None = None,
    max_prompt_length: int | None = None,
    max_completion_length: int = 2048,
) -> int:
    """Build a balanced PMC-VQA training subset: gold letters A-D equal, test questions and images excluded.

    Writes a JSONL in the unified evaluation format (train with it through
    ``PMCVQADataModule(train_file=...)``) and ``<stem>.manifest.json`` beside it.

    Args:
        n: items in the subset (a multiple of 4 balances the letters exactly).
        root: the PMC-VQA folder (default: $MEDRL_DATA_DIR/pmc_vqa).
        train: the training CSV, relative to root.
        tests: CSVs whose questions and images are excluded (default: test.csv and test_clean.csv).
        images: image folder or zip (default: root/images, else root/images.zip).
        out: output JSONL (default: root/pmc_vqa_<n/1000>k.jsonl, or pmc_vqa_<n>.jsonl).
        seed: seeds the draw and the output order.
        stratify_by: a CSV column to stratify by (e.g. a modality column you added).
        pass_rates: an evaluation JSONL with per-item pass rates (or correct/sample counts) to stratify by.
        pass_rate_key: the field of pass_rates rows naming the item (dataset_index = row of train.csv).
        bands: pass-rate band edges (default 0, 0.25, 0.5, 0.75, 1).
        min_pass_rate: keep only items measured at or above this rate.
        max_pass_rate: keep only items measured at or below this rate.
        stratify: strata get equal shares (equal) or shares proportional to the pool (proportional).
        image_check: check the drawn items' images: decode, exists or none.
        model: the model the subset is for; its tokenizer drops rows whose prompt it cannot take (``too_long``).
        max_prompt_length: that prompt budget in tokens (default: the model's context minus max_completion_length).
        max_completion_length: the completion budget the model's context must leave room for.
    """
    # An absolute train path needs no PMC-VQA folder setting: the other files default to its folder.
    # Imported here: they bring torch and Lightning, which `medrl data --help` and `data verify` do not need.
    from medrl.data.pmc_subset import build_subset, manifest_path
    from medrl.data.pmc_vqa import resolve_pmc_root
    from medrl.models.budget import model_prompt_budget

    base = Path(train).parent if Path(train).is_absolute() and not root else resolve_pmc_root(root)
    train_path = Path(train) if Path(train).is_absolute() else base / train
    test_paths = [Path(t) if Path(t).is_absolute() else base / t for t in (tests or ["test.csv", "test_clean.csv"])]
    store = None if image_check == "none" else (ImageStore(images) if images else ImageStore.find(base))
    name = f"pmc_vqa_{n // 1000}k.jsonl" if n % 1000 == 0 else f"pmc_vqa_{n}.jsonl"
    out_path = Path(out) if out else base / name
    if max_prompt_length is not None and model is None:
        raise ConfigError("--max_prompt_length counts tokens with a model's tokenizer: pass --model too")
    budget = model_prompt_budget(model, max_completion_length, max_prompt_length) if model else None
    manifest = build_subset(
        train_path, test_paths, store, out_path, n, seed, stratify_by, pass_rates, pass_rate_key, bands,
        min_pass_rate, max_pass_rate, stratify, image_check, budget,
    )  # fmt: skip
    pool, counts = manifest["pool"], manifest["counts"]
    print(f"wrote {out_path} ({manifest['n']} items) and {manifest_path(out_path).name}")
    print(f"  per letter: {counts['per_letter']}")
    if len(counts["per_stratum"]) > 1:
        print(f"  per stratum: {counts['per_stratum']}")
    print(
        f"  train rows {pool['train_rows']}, valid {pool['valid_rows']}, excluded as test {pool['excluded_as_test']} "
        f"(question {pool['test_question']}, image {pool['test_image']}), eligible {pool['eligible']}"
    )
    dropped = manifest["validation"]["rows"]["dropped_by_reason"]
    bad_images = manifest["validation"]["images"]["dropped_by_reason"]
    if dropped or bad_images:
        print(f"  dropped rows: {dropped}; drawn items replaced for their images: {bad_images}")
    return 0
