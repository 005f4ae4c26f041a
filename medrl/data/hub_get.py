"""PMC-VQA and the six-benchmark suite from the Hugging Face hub (``datasets``), in the layouts medrl reads.

``medrl data get pmc-vqa`` writes ``$MEDRL_DATA_DIR/pmc_vqa/{train.csv,test_clean.csv,images/}`` in the
official PMC-VQA columns (what :class:`~medrl.data.pmc_vqa.PMCVQADataModule` reads); ``medrl data get
medvqa-suite`` writes ``$MEDRL_DATA_DIR/medvqa_suite/{suite.jsonl,images/}`` (what
:class:`~medrl.data.benchmarks.BenchmarkSuiteDataModule` reads). Both go through ``datasets.load_dataset``:
a hub id, or a local folder of parquet files (or of ``save_to_disk``) for a copy made elsewhere.

Hub PMC-VQA copies come in two shapes, and a row of either is converted: the official columns
(``Figure_path``, ``Question``, ``Answer``, ``Choice A``..``D``, ``Answer_label``, with an ``image`` column),
or the VQA shape (``image``, ``question``, ``options`` as a list, object or ``A. text`` lines, and
``answer_label`` and/or ``answer`` as a letter, ``B: text`` or the option's text). A row that fits neither is
left out and listed with its reason; nothing is dropped silently. Images are written one file each,
atomically, and an image already on disk is not written again, so an interrupted ``get`` resumes.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from medrl.core.env import DATA_DIR_ENV, data_dir, is_offline, show_progress
from medrl.core.errors import UserError
from medrl.core.io import atomic_write_json, atomic_write_text
from medrl.data.benchmarks import SUITE_SUBDIR, parse_options, write_suite
from medrl.data.pmc_vqa import PMC_LETTERS, PMC_SUBDIR, REQUIRED_COLUMNS

_PREFIXED = re.compile(r"^\s*([A-Da-d])\s*[:.)]\s*(.*?)\s*$", re.DOTALL)


class HubDatasetError(UserError, RuntimeError):
    """A hub dataset that cannot be fetched or read (offline, no such id, unknown columns)."""


@dataclass(frozen=True)
class HubSource:
    """One dataset ``medrl data get`` knows: its hub id, the folder it goes to, and its splits' files."""

    name: str
    dataset_id: str
    subdir: str
    splits: dict[str, str]  # hub split -> file written
    layout: str  # what a manual copy must look like
    convert: str = "pmc"  # "pmc" (official CSV columns) or "suite" (the unified JSONL)


SOURCES: dict[str, HubSource] = {
    # OctoMed's copy of PMC-VQA: the official train rows and the 2,000-question test_clean split, images inline.
    "pmc-vqa": HubSource(
        "pmc-vqa", "OctoMed/PMC-VQA", PMC_SUBDIR, {"train": "train.csv", "test": "test_clean.csv"},
        "the official train.csv and test_clean.csv and images/ (or images.zip) from xmcmic/PMC-VQA",
    ),
    # The unified six-benchmark evaluation export (PMC, MMMU, MedXpertQA-MM, PathVQA, SLAKE, VQA-RAD).
    "medvqa-suite": HubSource(
        "medvqa-suite", "UCSC-VLAA/MedVLThinker-Eval", SUITE_SUBDIR, {"test": "suite.jsonl"},
        "a suite.jsonl in the unified format (images, question, options, answer_label, answer, dataset_name) "
        "beside its images/", convert="suite",
    ),
}  # fmt: skip


@dataclass
class GetReport:
    """What one split's conversion kept and left out (row index -> reason)."""

    split: str
    file: Path
    rows: int = 0
    kept: int = 0
    left_out: dict[int, str] = field(default_factory=dict)

    def summary(self) -> str:
        """One line: kept/rows, and the first reasons for what was left out."""
        line = f"{self.split}: {self.kept}/{self.rows} rows -> {self.file}"
        if self.left_out:
            first = "; ".join(f"row {i}: {why}" for i, why in list(self.left_out.items())[:3])
            line += f"; {len(self.left_out)} left out ({first}{' ...' if len(self.left_out) > 3 else ''})"
        return line


def target_folder(source: HubSource, out: str | os.PathLike | None) -> Path:
    """``out``, else ``$MEDRL_DATA_DIR/<subdir>``."""
    if out:
        return Path(out).expanduser()
    if data_dir() is None:
        raise HubDatasetError(f"{source.name}: pass --out DIR or set {DATA_DIR_ENV}")
    return data_dir() / source.subdir


def load_split(dataset_id: str, split: str, source: HubSource, folder: Path) -> Any:
    """``datasets.load_dataset(dataset_id, split=split)`` (or ``load_from_disk`` for a saved copy), with one
    clear line when it cannot be had: offline, unreachable or unknown, naming the id and the manual route."""
    local = Path(dataset_id).expanduser()
    if is_offline() and not local.is_dir():
        # MEDRL_OFFLINE alone: tell datasets too (read when it is first imported), so it fails at once
        # instead of retrying the hub; a copy in its cache still loads.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    try:
        if local.is_dir() and ((local / "dataset_dict.json").is_file() or (local / "state.json").is_file()):
            saved = datasets.load_from_disk(str(local))
            return saved[split] if isinstance(saved, datasets.DatasetDict) else saved
        return datasets.load_dataset(str(local) if local.is_dir() else dataset_id, split=split)
    except (ConnectionError, OSError, ValueError, KeyError) as exc:
        why = "offline (HF_HUB_OFFLINE / MEDRL_OFFLINE is set)" if is_offline() else type(exc).__name__
        raise HubDatasetError(
            f"{source.name}: cannot load split {split!r} of {dataset_id} ({why}: "
            f"{str(exc).splitlines()[0][:160]}); download it where the hub is reachable, or place {source.layout} "
            f"in {folder} by hand, or pass --source DIR (a local copy: parquet files or a save_to_disk folder)"
        ) from exc


def _image(value: Any) -> Image.Image | None:
    """A PIL image from a ``datasets`` image value (PIL, ``{"bytes"}``/``{"path"}``, or a list of them)."""
    if isinstance(value, list | tuple):
        value = value[0] if value else None
    if isinstance(value, dict):
        value = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else value.get("path")
    if isinstance(value, str | os.PathLike):
        value = Image.open(value)
    return value if isinstance(value, Image.Image) else None


def _gold(row: dict[str, Any], options: dict[str, str]) -> str:
    """The gold letter of a VQA-shaped row, from ``answer_label`` or ``answer``; ValueError if none fits."""
    for key in ("answer_label", "answer"):
        value = str(row.get(key) or "").strip()
        if not value:
            continue
        if len(value) == 1 and value.upper() in options:
            return value.upper()
        if (m := _PREFIXED.match(value)) and m.group(1).upper() in options:
            return m.group(1).upper()
        same = [
            k for k, text in options.items() if " ".join(text.split()).casefold() == " ".join(value.split()).casefold()
        ]
        if len(same) == 1:
            return same[0]
    raise ValueError(f"answer {row.get('answer')!r} / answer_label {row.get('answer_label')!r} is none of {options}")


def pmc_row(row: dict[str, Any], name: str) -> dict[str, str]:
    """A hub row as an official PMC-VQA CSV row (``Figure_path`` = ``name``); ValueError says why not."""
    if "Choice A" in row:
        out = {c: str(row.get(c) or "").strip() for c in REQUIRED_COLUMNS}
        return {**out, "Figure_path": name}
    if not str(row.get("question") or "").strip():
        raise ValueError("no question")
    options = parse_options(row.get("options"))
    # Listed options often carry their letter ("A: text"): keep the text once.
    options = {
        k: (m.group(2) if (m := _PREFIXED.match(v)) and m.group(1).upper() == k else v) for k, v in options.items()
    }
    if sorted(options) != list(PMC_LETTERS):
        raise ValueError(f"PMC-VQA questions have options A-D, this one {sorted(options)}")
    label = _gold(row, options)
    return {
        "Figure_path": name, "Question": str(row["question"]).strip(), "Answer": options[label],
        **{f"Choice {k}": f"{k}:{options[k]}" for k in PMC_LETTERS}, "Answer_label": label,
    }  # fmt: skip


def _save_image(image: Image.Image, path: Path) -> None:
    if path.is_file():
        return  # written by an earlier, interrupted get
    tmp = path.with_name(f".{path.name}.part")
    image.convert("RGB").save(tmp, format="PNG")
    tmp.replace(path)


def _progress(rows: Iterable[Any], total: int, desc: str) -> Iterable[Any]:
    from tqdm.auto import tqdm

    return tqdm(rows, total=total, desc=desc, unit="row", disable=not show_progress(), mininterval=1.0)


def write_pmc_split(dataset: Any, split: str, folder: Path, file: str) -> GetReport:
    """Convert one split into ``folder/file`` (official columns) and ``folder/images/``."""
    report = GetReport(split, folder / file)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines: list[dict[str, str]] = []
    for i, row in enumerate(_progress(dataset, len(dataset), f"pmc-vqa {split}")):
        report.rows += 1
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(row.get("Figure_path") or row.get("id") or f"{split}_{i}"))
        name = name if name.lower().endswith((".jpg", ".jpeg", ".png")) else f"{name}.png"
        try:
            line = pmc_row(row, name)
            image = _image(row.get("image", row.get("images")))
            if image is None and not (folder / "images" / name).is_file():
                raise ValueError("no image in the row (column `image`)")
        except (ValueError, OSError) as exc:
            report.left_out[i] = str(exc)
            continue
        if image is not None:
            _save_image(image, folder / "images" / name)
        lines.append(line)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(REQUIRED_COLUMNS))
    writer.writeheader()
    writer.writerows(lines)
    atomic_write_text(folder / file, buffer.getvalue())  # last: a present CSV means a finished split
    report.kept = len(lines)
    return report


def write_suite_split(dataset: Any, split: str, folder: Path, file: str) -> GetReport:
    """Write one split of the unified export as ``folder/file`` and ``folder/images/`` (rows as they are:
    the suite reader validates them and reports any it cannot score)."""
    rows = [dict(row) for row in _progress(dataset, len(dataset), f"medvqa-suite {split}")]
    write_suite(rows, folder, file)
    return GetReport(split, folder / file, rows=len(rows), kept=len(rows))


def get(
    name: str, out: str | os.PathLike | None = None, source: str | None = None, splits: list[str] | None = None
) -> list[GetReport]:
    """Fetch and convert dataset ``name`` (a key of :data:`SOURCES`); returns one report per split."""
    if name not in SOURCES:
        raise HubDatasetError(f"unknown dataset {name!r}; choose one of {sorted(SOURCES)}")
    spec = SOURCES[name]
    folder = target_folder(spec, out)
    wanted = splits or list(spec.splits)
    unknown = [s for s in wanted if s not in spec.splits]
    if unknown:
        raise HubDatasetError(f"{name}: no split {unknown}; it has {list(spec.splits)}")
    write: Callable[[Any, str, Path, str], GetReport] = write_pmc_split if spec.convert == "pmc" else write_suite_split
    reports = []
    for split in wanted:
        dataset = load_split(source or spec.dataset_id, split, spec, folder)
        report = write(dataset, split, folder, spec.splits[split])
        if report.left_out:  # every row left out is listed, with its reason, beside the file
            listed = {str(i): why for i, why in report.left_out.items()}
            atomic_write_json(report.file.with_suffix(".left_out.json"), {"rows": report.rows, "left_out": listed})
        if report.rows and not report.kept:
            raise HubDatasetError(f"{name}: no row of split {split!r} of {source or spec.dataset_id} could be "
                                  f"converted ({report.summary()}); is it a PMC-VQA copy?")  # fmt: skip
        reports.append(report)
    return reports
