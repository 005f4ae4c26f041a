"""The probe table end to end: features extracted once for a sweep of heads, against re-extracting per probe run.

The vision axis fits many heads per encoder x flag (a learning-rate sweep, several probe kinds). medrl's
``probe-table`` extracts each cell's features once and fits every head on them. The authors' ``linprobe.py``
is one probe run per head, and every run extracts its features again.

- ``cached`` (medrl): one ``probe_table`` call over the encoders x flags, ``H`` sgd heads per cell (one per
  learning rate), timed end to end from an empty feature cache: extraction, every head's fit and test
  scoring, the table and markdown written after each head and the chart at the end.
- ``reextract`` (the authors' way): for each cell, one probe run timed end to end: the encoder built, the
  features extracted into an empty cache, one head fitted and scored, the same code as a probe-table head.
  The sweep is ``H`` such runs per cell, each doing the same work as the one timed (only the learning rate
  differs), so the side's total is ``H`` x the timed run, per cell; the per-cell timings are kept.

Both sides use the same encoders at 224 px, the same seeded subsets of the real files and the same head
(``BatchNorm1d(affine=False)`` then ``Linear``, SGD momentum 0.9, cosine, 20 epochs, batch 1024).

    python bench/probe.py                    # the make-bench grid, printed (about 5 minutes on 2 cores)
    python bench/probe.py --heads 4 --encoders '["timm:resnet18,pretrained=false"]'

Needs ``$MEDRL_DATA_DIR`` (the real .npz files).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODEL_20M = "{20m}"  # stands for bench/sizes.py's 20m Qwen2.5-VL folder, resolved in the process that runs


def learning_rates(heads: int) -> list[float]:
    """``heads`` log-spaced learning rates from 1 down to 1e-4 (3 significant digits): the sweep."""
    if heads == 1:
        return [0.1]
    return [float(f"{10 ** (-4 * i / (heads - 1)):.3g}") for i in range(heads)]


def resolve(spec: str) -> str:
    """``spec`` with :data:`MODEL_20M` replaced by the 20m model's folder (built on first use)."""
    if MODEL_20M not in spec:
        return spec
    from bench.sizes import model_dir

    return spec.replace(MODEL_20M, str(model_dir("20m")))


def warm_up(settings: dict[str, Any]) -> None:
    """Imports and one-off builds (the 20m folder, timm's modules) before any clock starts."""
    import medrl.study.probe_table  # noqa: F401
    from medrl.models.encoders import encoder_from_spec

    for spec in settings["encoders"]:
        encoder_from_spec(resolve(spec))


def _samples(settings: dict[str, Any]) -> dict[str, int | None]:
    return {k: settings[k] or None for k in ("train_samples", "val_samples", "test_samples")}


def cached_side(settings: dict[str, Any], workdir: str) -> dict[str, Any]:
    """Seconds of one probe-table call with every head, from an empty cache; and its per-row timings."""
    from medrl.study.probe_table import probe_table, read_rows

    with tempfile.TemporaryDirectory(dir=workdir, prefix="probe-table-") as tmp:
        out = Path(tmp) / "table"
        start = time.perf_counter()
        probe_table(
            encoders=[resolve(s) for s in settings["encoders"]], flags=settings["flags"], sizes=[28], out=str(out),
            optimizer="sgd", lr=learning_rates(settings["heads"]), max_epochs=settings["epochs"],
            batch_size=settings["batch_size"], cache_dir=str(Path(tmp) / "cache"), device="cpu",
            **_samples(settings),
        )  # fmt: skip
        seconds = time.perf_counter() - start
        rows = read_rows(out / "results.csv")
    extract = sum(float(r["extract_seconds"]) for r in rows)
    heads = sum(float(r["seconds"]) - float(r["extract_seconds"]) for r in rows)
    return {"seconds": [seconds], "rows": len(rows), "extract_s": extract, "heads_s": heads}


def reextract_side(settings: dict[str, Any], workdir: str) -> dict[str, Any]:
    """Seconds of the sweep run as one probe run per head, each re-extracting: H x one timed run per cell."""
    from medrl.features import FeatureDataModule
    from medrl.models.encoders import encoder_from_spec
    from medrl.study.probe_table import run_head

    heads, per_cell = settings["heads"], {}
    for flag in settings["flags"]:
        for spec in settings["encoders"]:
            with tempfile.TemporaryDirectory(dir=workdir, prefix="probe-run-") as tmp:
                start = time.perf_counter()
                dm = FeatureDataModule(flag, encoder_from_spec(resolve(spec)), batch_size=settings["batch_size"],
                                       cache_dir=str(Path(tmp) / "cache"), device="cpu", progress=False,
                                       **_samples(settings))  # fmt: skip
                dm.prepare_data()
                run_head(dm, "sgd", learning_rates(heads)[0], settings["epochs"], 0, Path(tmp) / "cell")
                per_cell[f"{spec} / {flag}"] = time.perf_counter() - start
    return {"seconds": [heads * sum(per_cell.values())], "run_seconds": per_cell, "heads": heads,
            "timed_runs_per_cell": 1}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", default=None, help="JSON list of encoder specs (default: make bench's three)")
    parser.add_argument("--flags", default='["breastmnist", "pneumoniamnist"]', help="JSON list of flags")
    parser.add_argument("--heads", type=int, default=None, help="heads per cell (learning rates of the sweep)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import torch

    from bench.settings import FULL

    settings = {**FULL["probe"], "flags": json.loads(args.flags)}
    if args.encoders:
        settings["encoders"] = json.loads(args.encoders)
    if args.heads:
        settings["heads"] = args.heads
    torch.set_num_threads(args.threads)
    warm_up(settings)
    with tempfile.TemporaryDirectory() as workdir:
        fast, slow = cached_side(settings, workdir), reextract_side(settings, workdir)
    cells = len(settings["encoders"]) * len(settings["flags"])
    print(f"\n{cells} cells x {settings['heads']} heads, {args.threads} thread(s)")
    print(f"  probe-table, extracted once : {fast['seconds'][0]:8.1f} s (extraction {fast['extract_s']:.1f} s)")
    print(f"  one run per head, each re-extracting: {slow['seconds'][0]:8.1f} s "
          f"-> {slow['seconds'][0] / fast['seconds'][0]:5.1f}x")  # fmt: skip
    for cell, seconds in slow["run_seconds"].items():
        print(f"    one run of {cell}: {seconds:.1f} s")


if __name__ == "__main__":
    main()
