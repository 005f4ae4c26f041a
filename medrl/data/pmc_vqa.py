"""PMC-VQA from its official files: ``train.csv``, ``test.csv``, ``test_clean.csv`` and the images.

Each CSV row has ``Figure_path``, ``Question``, ``Answer``, ``Choice A``..``Choice D`` (values such as
``A:Diffuse uptake pattern``, often padded with spaces) and ``Answer_label``. A row becomes a 4-option
question only when every choice carries its own letter's prefix, ``Answer_label`` is one of A-D,
``Answer`` equals the labelled choice and the image is there and decodes; any other row is dropped and
listed, with its reasons, in a :class:`~medrl.data.mcq_items.ValidationReport`. Items come out in the
VQA format of ``MedMNISTDataModule(mode="vqa")``, so SFT, GRPO and the Pass@K callback take them as is.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import string
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from medrl.core.budget import PromptBudget
from medrl.core.env import DATA_DIR_ENV, data_dir
from medrl.core.errors import ConfigError, UserError
from medrl.core.io import atomic_write_json
from medrl.data.benchmarks import load_suite, per_benchmark_subset, read_jsonl_items
from medrl.data.image_store import ImageCheck, ImageStore
from medrl.data.mcq_items import MCQItem, MCQItemsDataset, ValidationReport, check_images, seeded_subset
from medrl.data.medmnist import vqa_collate
from medrl.data.resumable import ResumableLoader

PMC_SUBDIR = "pmc_vqa"
PMC_LETTERS = "ABCD"
REQUIRED_COLUMNS = ("Figure_path", "Question", "Answer", *(f"Choice {c}" for c in PMC_LETTERS), "Answer_label")
_REQUIRED = frozenset(REQUIRED_COLUMNS)
DATASET_NAME = "pmc_vqa"
# The official files pad values with spaces, and some with stray quotes or non-breaking spaces.
_PAD = string.whitespace + "'\"\xa0\u200a"
_PREFIX = re.compile(r"^([A-Za-z])\s*:(.*)$", re.DOTALL)


log = logging.getLogger(__name__)


class PMCVQAError(UserError, ValueError):
    """A PMC-VQA file that cannot be read at all (missing, wrong columns); bad rows go to the report instead."""


def resolve_pmc_root(root: str | os.PathLike | None) -> Path:
    """The PMC-VQA folder: ``root``, else ``$MEDRL_DATA_DIR/pmc_vqa``."""
    if root:
        return Path(root).expanduser()
    if data_dir() is not None:
        return data_dir() / PMC_SUBDIR
    raise PMCVQAError(
        f"no PMC-VQA folder: pass `root` (--data.root DIR) or set {DATA_DIR_ENV} and put the files in "
        f"${DATA_DIR_ENV}/{PMC_SUBDIR}: the official train.csv, test.csv, test_clean.csv and images/ (or images.zip)."
    )


def _clean(value: Any) -> str:
    return str(value or "").strip(_PAD)


def _same(a: str, b: str) -> bool:
    return " ".join(a.split()).casefold() == " ".join(b.split()).casefold()


def parse_pmc_row(row: dict[str, Any], index: int, dataset_name: str = DATASET_NAME) -> tuple[MCQItem | None, list]:
    """One CSV row -> ``(item, [])``, or ``(None, [(reason, detail), ...])`` naming everything wrong with it.

    >>> row = {"Figure_path": "f.jpg", "Question": "Which?", "Answer": "Focal ", "Answer_label": "B",
    ...        "Choice A": " A:Diffuse", "Choice B": "B:Focal ", "Choice C": "C:None", "Choice D": "D:Both"}
    >>> item, problems = parse_pmc_row(row, 0)
    >>> item.options, item.answer_label, problems
    ({'A': 'Diffuse', 'B': 'Focal', 'C': 'None', 'D': 'Both'}, 'B', [])
    >>> parse_pmc_row({**row, "Choice C": "D:None"}, 0)[1]
    [('bad_prefix', "Choice C 'D:None' is prefixed 'D', not 'C'")]
    """
    problems: list[tuple[str, str]] = []
    for column in ("Figure_path", "Question", "Answer_label"):
        if not _clean(row.get(column)):
            problems.append(("missing_field", f"{column} is empty"))
    options: dict[str, str] = {}
    for letter in PMC_LETTERS:
        raw = _clean(row.get(f"Choice {letter}"))
        match = _PREFIX.match(raw)
        if not match:
            problems.append(("bad_prefix", f"Choice {letter} {raw!r} lacks the '{letter}:' prefix"))
        elif match.group(1).upper() != letter:
            problems.append(("bad_prefix", f"Choice {letter} {raw!r} is prefixed {match.group(1)!r}, not {letter!r}"))
        else:
            options[letter] = _clean(match.group(2))
    label = _clean(row.get("Answer_label")).upper()
    answer = _clean(row.get("Answer"))
    if label and label not in PMC_LETTERS:
        problems.append(("unknown_label", f"Answer_label {label!r} is not one of A-D"))
    elif label in options:
        prefixed = _PREFIX.match(answer)
        bare = _clean(prefixed.group(2)) if prefixed and prefixed.group(1).upper() == label else answer
        if not _same(bare, options[label]):
            problems.append(("answer_mismatch", f"Answer {answer!r} differs from Choice {label} {options[label]!r}"))
    if problems:
        return None, problems
    extra = {k: v for k, v in row.items() if k and k not in _REQUIRED}
    item = MCQItem(
        images=(_clean(row["Figure_path"]),),
        question=str(row["Question"]).strip(),
        options=options,
        answer_label=label,
        answer=options[label],
        dataset_name=dataset_name,
        dataset_index=index,
        benchmark="PMC",
        meta={**extra, "figure_path": _clean(row["Figure_path"])},
    )
    return item, []


def csv_header(path: str | os.PathLike) -> list[str]:
    """The column names of a CSV (stripped of the padding the official files have)."""
    with Path(path).open(encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        return [_recode(h).strip() for h in next(csv.reader(fh), [])]


def _recode(value: str) -> str:
    """A field read with ``surrogateescape``: bytes that were not UTF-8 are read again as Windows-1252 (what a
    spreadsheet saves), so one stray byte costs neither the row nor the file."""
    if not any("\udc80" <= c <= "\udcff" for c in value):
        return value
    return value.encode("utf-8", "surrogateescape").decode("cp1252", errors="replace")


def read_pmc_rows(path: str | os.PathLike) -> list[tuple[int, int, dict[str, str]]]:
    """``(row index, line, row)`` for every data row of a PMC-VQA CSV, after checking its header."""
    path = Path(path)
    if not path.is_file():
        raise PMCVQAError(f"{path} does not exist: put the official PMC-VQA CSV there or pass its path")
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in reader.fieldnames or []]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise PMCVQAError(
                f"{path} lacks the PMC-VQA columns {missing} (found {header}); expected the official train.csv / "
                f"test.csv / test_clean.csv with columns {list(REQUIRED_COLUMNS)}"
            )
        reader.fieldnames = header  # the official headers are sometimes padded with spaces too
        rows, recoded = [], []
        for i, row in enumerate(reader):
            fixed = {k: _recode(v) if isinstance(v, str) else v for k, v in row.items()}
            if fixed != row:
                recoded.append(reader.line_num)
            rows.append((i, reader.line_num, fixed))
    if recoded:
        log.warning(
            "%s: %d row(s) are not UTF-8 (line %s); read as Windows-1252. Save the file as UTF-8 to silence this",
            path,
            len(recoded),
            ", ".join(map(str, recoded[:10])) + (" ..." if len(recoded) > 10 else ""),
        )
    return rows


def read_pmc_csv(
    path: str | os.PathLike, store: ImageStore | None, image_check: ImageCheck = "decode"
) -> tuple[list[MCQItem], ValidationReport]:
    """Read and validate a PMC-VQA CSV: ``(items, report)``; rows that fail any check are in the report.

    Args:
        path: ``train.csv``, ``test.csv`` or ``test_clean.csv`` (or any CSV with the official columns).
        store: the image folder or zip (None only with ``image_check="none"``).
        image_check: ``decode`` (open every image), ``exists`` or ``none``.
    """
    report = ValidationReport(str(path))
    parsed: list[tuple[int, int, MCQItem]] = []
    for index, line, row in read_pmc_rows(path):
        report.rows += 1
        item, problems = parse_pmc_row(row, index)
        if item is None:
            report.drop(index, line, problems)
        else:
            item.meta["_line"] = line
            parsed.append((index, line, item))
    image_problems = check_images(store, [it.images for *_, it in parsed], image_check, description=Path(path).name)
    items = []
    for (index, line, item), problems in zip(parsed, image_problems, strict=True):
        if problems:
            report.drop(index, line, problems)
        else:
            items.append(item)
    report.kept = len(items)
    return items, report


class PMCVQADataModule(L.LightningDataModule):
    """PMC-VQA multiple choice (4 options) as VQA items, from the official CSVs or a balanced subset.

    Training reads ``train_file`` (the official CSV or a JSONL written by ``medrl data pmc-subset``);
    validation reads ``val_file``, or the six-benchmark suite with ``validate_on="suite"``. Every split is
    validated when set up and its report of dropped rows is printed (and written to ``report_dir``).

    Args:
        root: folder of the official files (default: $MEDRL_DATA_DIR/pmc_vqa).
        train_file: training rows: a CSV in the official format or a subset JSONL; relative to ``root``.
        val_file: validation rows (CSV or JSONL), relative to ``root``.
        test_file: test rows (CSV or JSONL), relative to ``root``.
        images: image folder or zip (default: ``root/images``, else ``root/images.zip``).
        validate_on: validate on ``val_file`` (``file``) or on the benchmark ``suite`` (``suite``).
        suite: the benchmark suite's export, JSONL or folder (default: $MEDRL_DATA_DIR/medvqa_suite).
        train_samples: a seeded subset of this many training items (None: all).
        val_samples: the same for validation (per benchmark on the suite).
        test_samples: the same for test.
        image_check: check every image when a split is set up: ``decode``, ``exists`` or ``none``.
        report_dir: also write each split's validation report there as JSON.
        batch_size: items per batch.
        num_workers: DataLoader worker processes.
        instruction: overrides the think/answer instruction.
        system_prompt: an optional system message.
        seed: seeds the subsets and the training order.
    """

    def __init__(
        self,
        root: str | None = None,
        train_file: str = "train.csv",
        val_file: str = "test_clean.csv",
        test_file: str = "test_clean.csv",
        images: str | None = None,
        validate_on: Literal["file", "suite"] = "file",
        suite: str | None = None,
        train_samples: int | None = None,
        val_samples: int | None = None,
        test_samples: int | None = None,
        image_check: ImageCheck = "decode",
        report_dir: str | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        instruction: str | None = None,
        system_prompt: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if validate_on not in ("file", "suite"):
            raise ConfigError(f"validate_on must be 'file' or 'suite', got {validate_on!r}")
        self.root, self.images, self.validate_on, self.suite = root, images, validate_on, suite
        self.files = {"train": train_file, "val": val_file, "test": test_file}
        self.samples = {"train": train_samples, "val": val_samples, "test": test_samples}
        self.image_check, self.report_dir = image_check, report_dir
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.instruction, self.system_prompt = instruction, system_prompt
        self.reports: dict[str, list[ValidationReport]] = {}
        self.datasets: dict[str, MCQItemsDataset] = {}
        self._store: ImageStore | None = None

    def path(self, split: str) -> Path:
        """The file a split reads."""
        name = Path(self.files[split]).expanduser()
        return name if name.is_absolute() else resolve_pmc_root(self.root) / name

    @property
    def store(self) -> ImageStore:
        """The image folder or zip."""
        if self._store is None:
            self._store = ImageStore(self.images) if self.images else ImageStore.find(resolve_pmc_root(self.root))
        return self._store

    def _read(self, split: str) -> MCQItemsDataset:
        limit, salt = self.samples[split], (len(split),)
        if split == "val" and self.validate_on == "suite":
            reports: list[ValidationReport] = []
            items, stores = load_suite(self.suite, image_check=self.image_check, reports=reports)
            items = per_benchmark_subset(items, limit, self.seed)
            self.reports[split] = reports
            return MCQItemsDataset(items, stores, self.instruction, self.system_prompt)
        path = self.path(split)
        if not path.is_file():
            build = " (build a subset with `medrl data pmc-subset`)" if path.suffix == ".jsonl" else ""
            raise PMCVQAError(f"{split} file {path} does not exist{build}; set --data.{split}_file or --data.root")
        store = None if self.image_check == "none" else self.store
        if path.suffix == ".jsonl":
            items, report = read_jsonl_items(path, store, self.image_check)
        else:
            items, report = read_pmc_csv(path, store, self.image_check)
        self.reports[split] = [report]
        items = seeded_subset(items, limit, self.seed, salt)
        return MCQItemsDataset(items, self.store, self.instruction, self.system_prompt)

    def dataset(self, split: str) -> MCQItemsDataset:
        """The dataset of one split (``train``, ``val`` or ``test``), read and validated once."""
        if split not in self.datasets:
            self.datasets[split] = self._read(split)
            for report in self.reports[split]:
                rank_zero_info(f"PMC-VQA {split}: {report.summary()}")
                if self.report_dir:
                    name = f"{split}_{Path(report.file).stem}_report.json"
                    atomic_write_json(Path(self.report_dir) / name, report.to_dict())
        return self.datasets[split]

    def apply_prompt_budget(self, budget: PromptBudget) -> None:
        """Drop the items of every read split whose prompt is over ``budget`` (reported as ``too_long``)."""
        for split, dataset in self.datasets.items():
            if dataset.apply_budget(budget, self.reports[split]):
                for report in self.reports[split]:
                    rank_zero_info(f"PMC-VQA {split}, over the prompt budget: {report.summary()}")

    def setup(self, stage: str | None = None) -> None:
        """Read the splits the stage needs."""
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in splits.get(stage or "", ("train", "val", "test")):
            self.dataset(split)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(self.dataset(split), batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, collate_fn=vqa_collate,
                          persistent_workers=self.num_workers > 0)  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        # A seeded order per epoch that Lightning checkpoints, so a mid-epoch resume continues exactly.
        return ResumableLoader(self.dataset("train"), batch_size=self.batch_size, seed=self.seed,
                               num_workers=self.num_workers, collate_fn=vqa_collate,
                               persistent_workers=self.num_workers > 0)  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
