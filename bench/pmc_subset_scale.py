"""Wall time of the PMC-VQA data path at the real files' size, on synthetic files in the official format.

Writes a ``train.csv`` with as many rows as the official one (176,948), a ``test.csv`` (33,430 rows) and a
``test_clean.csv`` (2,000 rows), and an ``images.zip`` holding one small JPEG per figure under
``images/`` as the release does; then times, each in this process:

1. ``medrl data pmc-subset --n 8000`` (read + validate every row, exclude test questions and images,
   balanced draw, decode-check the drawn items' images, write the JSONL and manifest);
2. ``PMCVQADataModule(train_file=<subset>).setup("fit")`` (read the subset, decode-check its 8,000 images,
   and test_clean.csv's 2,000 as the validation split).

Wall and CPU seconds are both printed: on a shared machine the wall time depends on the load.

    python bench/pmc_subset_scale.py                 # files in a temp folder, removed afterwards
    python bench/pmc_subset_scale.py --keep DIR      # keep the files in DIR

Rows repeat a small pool of questions, so the test files overlap the training file as the real ones do.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

SIZES = {"train.csv": 176_948, "test.csv": 33_430, "test_clean.csv": 2_000}
HEADER = ["Figure_path", "Question", "Answer", "Choice A", "Choice B", "Choice C", "Choice D", "Answer_label"]


def _jpeg(i: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (i % 251, (i * 7) % 253, 90)).save(buffer, "JPEG", quality=80)
    return buffer.getvalue()


def write_files(root: Path) -> dict[str, float]:
    """The synthetic release in ``root``; returns seconds spent per part."""
    started = time.perf_counter()
    rows_done = 0
    for name, count in SIZES.items():
        with (root / name).open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(HEADER)
            for i in range(rows_done, rows_done + count):
                letter = "ABCD"[(i * 7) % 4]
                texts = {c: f"finding {c.lower()} {i % 97}" for c in "ABCD"}
                # One question in three comes from a shared pool of 5,000 generic questions (as in the release).
                question = f"What does panel {i % 5000} show?" if i % 3 == 0 else f"What is shown in figure {i}?"
                writer.writerow([f"PMC{i}_F1.jpg", f" {question} ", f"{texts[letter]} ",
                                 *(f" {c}:{texts[c]} " for c in "ABCD"), letter])  # fmt: skip
        rows_done += count
    csv_seconds = time.perf_counter() - started
    started = time.perf_counter()
    pool = [_jpeg(i) for i in range(64)]
    with zipfile.ZipFile(root / "images.zip", "w", zipfile.ZIP_STORED) as zf:
        for i in range(rows_done):
            zf.writestr(f"images/PMC{i}_F1.jpg", pool[i % len(pool)])
    return {"write_csvs_s": csv_seconds, "write_zip_s": time.perf_counter() - started}


def run(root: Path) -> dict[str, float]:
    from medrl.data.pmc_vqa import PMCVQADataModule
    from medrl.study.data_commands import pmc_subset

    out: dict[str, float] = write_files(root)
    started, cpu = time.perf_counter(), time.process_time()
    assert pmc_subset(n=8000, root=str(root), out=str(root / "pmc_vqa_8k.jsonl")) == 0
    out["pmc_subset_8k_s"] = time.perf_counter() - started
    out["pmc_subset_8k_cpu_s"] = time.process_time() - cpu
    manifest = json.loads((root / "pmc_vqa_8k.manifest.json").read_text())
    out["excluded_as_test"] = manifest["pool"]["excluded_as_test"]
    out["images_checked"] = manifest["validation"]["images"]["rows"]
    started, cpu = time.perf_counter(), time.process_time()
    dm = PMCVQADataModule(root=str(root), train_file="pmc_vqa_8k.jsonl")
    dm.setup("fit")
    out["datamodule_setup_fit_s"] = time.perf_counter() - started
    out["datamodule_setup_fit_cpu_s"] = time.process_time() - cpu
    started = time.perf_counter()
    for i in range(0, len(dm.dataset("train")), 80):  # 100 items spread over the subset
        dm.dataset("train")[i]
    out["item_from_zip_ms"] = (time.perf_counter() - started) / 100 * 1000
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, default=None, help="write the files here and keep them")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="pmc_scale_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        results = run(root)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    for key, value in results.items():
        print(f"{key:>24}: {value:,.2f}" if isinstance(value, float) else f"{key:>24}: {value:,}")


if __name__ == "__main__":
    main()
