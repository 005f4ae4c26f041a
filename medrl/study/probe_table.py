"""``medrl probe-table``: linear probes over a grid of encoders x MedMNIST flags x sizes, as one results table.

Each encoder x flag x size extracts (or reuses) the encoder's cached features once, then fits every head
asked for on them (each probe optimiser, and for sgd/adamw each learning rate of a sweep), each a
:class:`~medrl.lit.probe.LinearProbe` scored on the test split exactly as the medmnist Evaluator, one row per
head. After every head the table is rewritten atomically as CSV and markdown, and at the end the bar chart
PNG; a rerun skips the heads already in the CSV (a row's identity is a hash of everything that determines its
result), so an interrupted grid resumes.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import time
from pathlib import Path
from typing import Any, Literal

from medrl.core.errors import ConfigError
from medrl.core.hashing import json_digest
from medrl.core.tables import markdown_table
from medrl.data.medmnist_files import atomic_write_bytes

COLUMNS = [
    "encoder", "pretrained", "flag", "size", "image_size", "probe", "lr", "acc", "auc", "mae", "kappa", "majority",
    "collapsed", "n_train", "n_test", "extract_seconds", "seconds", "synthetic", "spec", "cell",
]  # fmt: skip


def _cell_id(spec: dict[str, Any]) -> str:
    return json_digest(spec, length=16)


def read_rows(path: Path) -> list[dict[str, str]]:
    """Rows of an existing results CSV (empty when there is none)."""
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if rows and "cell" not in rows[0]:
        raise ConfigError(f"{path} is not a probe-table CSV (no `cell` column); pick another --out")
    return rows


def _fmt(value: str, digits: int = 3) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return value or "-"
    return "-" if math.isnan(number) else f"{number:.{digits}f}"


def render(rows: list[dict[str, Any]], out: Path, chart: bool = True) -> None:
    """Write ``results.csv``, ``results.md`` and (``chart``) ``results.png`` under ``out``, each atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out / "results.csv", buffer.getvalue().encode())
    shown = ["encoder", "pretrained", "flag", "size", "image_size", "probe", "lr", "acc", "auc", "mae", "kappa",
             "majority", "collapsed", "n_train", "n_test", "seconds"]  # fmt: skip
    numeric = ("acc", "auc", "mae", "kappa", "majority")
    cells = [
        [*(_fmt(row.get(c, "")) if c in numeric else str(row.get(c, "")) for c in shown[:-1]), _fmt(row["seconds"], 1)]
        for row in rows
    ]
    lines = markdown_table(shown, cells)
    notes = [
        "",
        "ACC/AUC as the medmnist Evaluator; `majority` is the test ACC of always answering the most frequent class; "
        "`collapsed` says whether the probe gave every test image the same class (its ACC is then exactly the "
        "majority rate). `pretrained: False` means random weights.",
    ]
    if any(str(r["synthetic"]) == "True" for r in rows):
        notes.append("Rows with synthetic=True come from synthetic files, not the official release.")
    atomic_write_bytes(out / "results.md", ("\n".join(lines + notes) + "\n").encode())
    if chart:
        _chart(rows, out / "results.png")


def _chart(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["flag"], int(r["size"])) for r in rows})
    encoders = list(dict.fromkeys(_bar(r) for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 1.6 * len(groups) * max(1, len(encoders)) / 2 + 3), 4))
    width = 0.8 / max(1, len(encoders))
    for ax, metric in zip(axes, ("acc", "auc"), strict=True):
        for k, name in enumerate(encoders):
            values = []
            for flag, size in groups:
                match = [r for r in rows if (r["flag"], int(r["size"])) == (flag, size)
                         and _bar(r) == name]  # fmt: skip
                values.append(float(match[0][metric]) if match else math.nan)
            ax.bar([g + k * width - 0.4 + width / 2 for g in range(len(groups))], values, width, label=name)
        if metric == "acc":
            for g, (flag, size) in enumerate(groups):
                floor = [float(r["majority"]) for r in rows if (r["flag"], int(r["size"])) == (flag, size)]
                label = None if g else "majority"
                ax.hlines(floor[0], g - 0.45, g + 0.45, colors="k", linestyles="dashed", label=label)
        ax.set_xticks(range(len(groups)), [f"{f.removesuffix('mnist')} {s}px" for f, s in groups])
        ax.set_ylim(0, 1)
        ax.set_title(metric.upper())
    axes[0].legend(fontsize=7, loc="lower left")
    if any(str(r["synthetic"]) == "True" for r in rows):
        fig.suptitle("includes synthetic data files (not the official release)", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def _bar(row: dict[str, Any]) -> str:
    lr = f" lr {_fmt(row['lr'], 4)}" if row.get("lr") not in (None, "") else ""
    return f"{row['encoder']} [{row['probe']}{lr}]"


Probe = Literal["sgd", "adamw", "lbfgs", "knn"]
TRAINED = ("sgd", "adamw")  # the probes a learning rate applies to


def probe_heads(optimizer: str | list[str], lr: float | list[float] | None) -> list[tuple[str, float | None]]:
    """The heads every encoder x flag x size gets, as ``(probe, lr)``: each probe once, and sgd/adamw once per
    learning rate (``None``: the probe's default). ConfigError on a rate that is not positive."""
    optimizers = [optimizer] if isinstance(optimizer, str) else list(dict.fromkeys(optimizer))
    rates = [lr] if lr is None or isinstance(lr, int | float) else list(dict.fromkeys(lr))
    if bad := [r for r in rates if r is not None and not r > 0]:
        raise ConfigError(f"lr must be positive, got {bad}")
    return [(o, r) for o in optimizers for r in (rates if o in TRAINED else [None])]


def probe_table(
    encoders: list[str],
    flags: list[str] | None = None,
    sizes: list[int] | None = None,
    out: str = "runs/probe_table",
    root: str | None = None,
    synthetic: bool = False,
    optimizer: Probe | list[Probe] = "sgd",
    lr: float | list[float] | None = None,
    max_epochs: int = 20,
    batch_size: int = 1024,
    train_samples: int | None = None,
    val_samples: int | None = None,
    test_samples: int | None = None,
    cache_dir: str | None = None,
    device: str = "auto",
    seed: int = 0,
) -> int:
    """Probe every encoder on every flag and size; write results.csv, results.md and results.png to --out.

    Encoders are specs ``KIND:NAME[,key=value...]``: ``timm:resnet18``, ``timm:resnet18,pretrained=false``,
    ``vlm:MODEL`` (the vision tower of a model of any family, e.g. ``vlm:tiny:gemma3,pooling=max``), or a
    family's own kind (``medrl models`` lists them, with their options); keys are the encoder's arguments
    (timm: image_size=224 by default; image_size=native keeps the file's size). A rerun skips cells already
    in results.csv.

    Args:
        encoders: encoder specs, e.g. '["timm:resnet18,pretrained=false", "vlm:tiny:smolvlm"]'.
        flags: MedMNIST flags (default: breastmnist and pneumoniamnist).
        sizes: data file sizes in pixels (default: 28).
        out: output folder.
        root: folder of the .npz files (default: $MEDRL_DATA_DIR).
        synthetic: use synthetic files (written if absent) instead of the official ones.
        optimizer: probe: sgd (the authors'), adamw (MedMNIST+, early stop on val loss), lbfgs (C on val) or knn
            (weighted cosine kNN, k in 10/20/100/200 on val, T = 0.07; the authors' knn.py); a list such as
            '[sgd, knn]' probes each cell with each, on features extracted once (one row per probe).
        lr: learning rate of sgd/adamw (default 0.1 / 1e-4); a list such as '[0.3, 0.1, 0.03]' is a sweep: one
            head and one row per rate, all on the cell's features extracted once (lbfgs and knn ignore it).
        max_epochs: epochs for sgd/adamw.
        batch_size: probe batch size.
        train_samples: seeded subset of training images per flag (None: all).
        val_samples: the same for validation.
        test_samples: the same for test (None: all; published numbers use the full test split).
        cache_dir: feature cache folder (default: $MEDRL_CACHE/features).
        device: where encoders run: auto, cpu, cuda.
        seed: seeds subsets and probe initialisation.
    """
    from medrl.features import FeatureDataModule
    from medrl.features.cache import file_md5
    from medrl.models.encoders import encoder_from_spec

    out_dir = Path(out)
    rows = read_rows(out_dir / "results.csv")
    done = {r["cell"] for r in rows}
    heads = probe_heads(optimizer, lr)
    samples = {"train_samples": train_samples, "val_samples": val_samples, "test_samples": test_samples}
    for flag, size, spec in itertools.product(flags or ["breastmnist", "pneumoniamnist"], sizes or [28], encoders):
        encoder = encoder_from_spec(spec)
        dm = FeatureDataModule(
            flag, encoder, size=size, root=root, synthetic=synthetic, batch_size=batch_size, cache_dir=cache_dir,
            device=device, seed=seed, **samples,
        )  # fmt: skip
        dm.prepare_data()
        identity = {"encoder": encoder.describe(), "flag": flag, "size": size, "file": file_md5(dm.images.path)}
        for probe, rate in heads:  # every head of this cell on the same DataModule: features read once
            settings = {"optimizer": probe, "max_epochs": max_epochs, "batch_size": batch_size, "seed": seed}
            if rate is not None:  # absent when unset, so tables from before the sweep keep their cell ids
                settings["lr"] = rate
            cell = _cell_id({**identity, **settings, **samples})
            name = f"{flag} {size}px {encoder.label} ({probe}{'' if rate is None else f', lr {rate:g}'})"
            if cell in done:
                print(f"skip {name}: already in {out_dir / 'results.csv'}")
                continue
            print(f"cell {name}")
            row = run_head(dm, probe, rate, max_epochs, seed, out_dir / "cells" / cell)
            rows.append({**row, "spec": spec, "cell": cell})
            done.add(cell)
            render(rows, out_dir, chart=False)  # a kill loses at most the head in progress
    if rows:  # the chart once, from the whole table (a rerun that skips every head redraws it)
        render(rows, out_dir)
        print(f"wrote {out_dir / 'results.csv'}, {out_dir / 'results.md'} and {out_dir / 'results.png'}")
    return 0


def run_head(dm, optimizer: str, lr: float | None, max_epochs: int, seed: int, cell_dir: Path) -> dict[str, Any]:
    """Fit and test one probe head; the row of the results table (without spec and cell id).

    ``extract_seconds`` is what this head spent getting its features: the extraction (or cache read) for a
    cell's first head, about nothing for the heads after it, which reuse the DataModule's features.
    """
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping

    from medrl.lit.probe import LinearProbe

    start = time.perf_counter()
    L.seed_everything(seed, verbose=False)
    dm.setup("fit")
    dm.setup("test")
    extract = time.perf_counter() - start
    model = LinearProbe(optimizer=optimizer, lr=lr, output_dir=str(cell_dir))
    trainer = L.Trainer(
        max_epochs=1 if optimizer in ("lbfgs", "knn") else max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[EarlyStopping("val/loss", patience=10)] if optimizer == "adamw" else [],
    )
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
    m, described = model.last_metrics["test"], dm.encoder.describe()
    return {
        "encoder": dm.encoder.label,
        "pretrained": described["pretrained"],
        "flag": dm.flag,
        "size": dm.size,
        "image_size": described["image_size"],
        "probe": optimizer,
        "lr": "" if lr is None else lr,
        "acc": m["acc"],
        "auc": m["auc"],
        "mae": m.get("mae", math.nan),
        "kappa": m.get("kappa", math.nan),
        "majority": m["majority_rate"],
        "collapsed": m["collapsed"],
        "n_train": len(dm.splits["train"].indices),
        "n_test": m["n"],
        "extract_seconds": round(extract, 2),
        "seconds": round(time.perf_counter() - start, 2),
        "synthetic": dm.images.arrays.synthetic,
    }
