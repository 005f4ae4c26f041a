"""The six-benchmark medical VQA suite, read from the unified evaluation export.

The export is a JSONL file, one row per item: ``images`` (list of paths, relative to the file's folder or
an image root), ``question``, ``options`` (letter -> text, as an object or a JSON string),
``answer_label`` (gold letter), ``answer`` (gold text), ``dataset_name`` and ``dataset_index``. Closed
yes/no items that carry no options become 2-option questions ``A. yes`` / ``B. no`` (ours: a fixed
order). Every row is validated; rows that cannot be scored are dropped and listed in a report, never
skipped silently. Reports follow the paper's column order: PMC, MMMU, MedX-M, PathVQA, SLAKE, VQA-RAD.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

from medrl.core.budget import PromptBudget
from medrl.core.errors import UserError
from medrl.data.image_store import ImageCheck, ImageStore
from medrl.data.mcq_items import MCQItem, MCQItemsDataset, MultiImage, ValidationReport, check_images, seeded_subset
from medrl.data.medmnist import vqa_collate
from medrl.data.vqa import LETTERS

log = logging.getLogger(__name__)

# The paper's column order.
BENCHMARKS: tuple[str, ...] = ("PMC", "MMMU", "MedX-M", "PathVQA", "SLAKE", "VQA-RAD")
# Prefixes of a dataset_name with case, spaces, dashes and underscores removed -> the short name.
_ALIASES: tuple[tuple[str, str], ...] = (
    ("pmc", "PMC"),
    ("mmmu", "MMMU"),
    ("medxpertqa", "MedX-M"),
    ("medxm", "MedX-M"),
    ("pathvqa", "PathVQA"),
    ("slake", "SLAKE"),
    ("vqarad", "VQA-RAD"),
)
YES_NO = {"A": "yes", "B": "no"}
SUITE_SUBDIR = "medvqa_suite"


class SuiteError(UserError, ValueError):
    """A suite that cannot be read at all (no file, no usable row); row-level problems go to the report."""


def benchmark_of(dataset_name: str) -> str:
    """The short benchmark name of a ``dataset_name``; unknown names are returned unchanged.

    >>> [benchmark_of(n) for n in ("pmc_vqa", "MMMU-medical", "MedXpertQA-MM", "path_vqa", "SLAKE", "vqa-rad")]
    ['PMC', 'MMMU', 'MedX-M', 'PathVQA', 'SLAKE', 'VQA-RAD']
    """
    key = re.sub(r"[^a-z0-9]", "", str(dataset_name).lower())
    return next((short for prefix, short in _ALIASES if key.startswith(prefix)), str(dataset_name))


def benchmark_order(names: Iterable[str]) -> list[str]:
    """Benchmark names in the paper's order, any others after them alphabetically."""
    names = set(names)
    return [b for b in BENCHMARKS if b in names] + sorted(names - set(BENCHMARKS))


def per_benchmark_subset(items: list[MCQItem], limit: int | None, seed: int) -> list[MCQItem]:
    """Items grouped by benchmark in the paper's order, each group cut to a seeded subset of ``limit``."""
    groups: dict[str, list[MCQItem]] = {}
    for item in items:
        groups.setdefault(item.benchmark, []).append(item)
    return [
        it for bench in benchmark_order(groups) for it in seeded_subset(groups[bench], limit, seed, map(ord, bench))
    ]


def parse_options(value: Any) -> dict[str, str]:
    """Options given as an object, a JSON string, a list, or ``A. text`` lines -> ``{letter: text}``.

    >>> parse_options('{"A": "CT", "B": " MRI "}')
    {'A': 'CT', 'B': 'MRI'}
    >>> parse_options(["yes", "no"])
    {'A': 'yes', 'B': 'no'}
    >>> parse_options("A. left\\nB) right")
    {'A': 'left', 'B': 'right'}
    """
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            return parse_options(json.loads(value))
        except json.JSONDecodeError:
            lines = [line for line in value.splitlines() if line.strip()]
            pairs = [re.match(r"^\s*([A-Za-z])\s*[.):]\s*(.*?)\s*$", line) for line in lines]
            if not pairs or not all(pairs):
                raise ValueError(f"options {value!r} are neither JSON nor 'A. text' lines") from None
            return parse_options({m.group(1): m.group(2) for m in pairs})  # type: ignore[union-attr]
    if isinstance(value, list | tuple):
        return {LETTERS[i]: str(text).strip() for i, text in enumerate(value)}
    if isinstance(value, dict):
        options = {str(k).strip().upper(): str(v).strip() for k, v in value.items()}
        bad = [k for k in options if len(k) != 1 or k not in LETTERS]
        if bad:
            raise ValueError(f"option keys must be single letters, got {bad}")
        return dict(sorted(options.items()))
    raise ValueError(f"options of type {type(value).__name__} are not understood")


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", str(text)).strip().rstrip(".").casefold()


def _gold(row: dict, options: dict[str, str]) -> tuple[str, str] | tuple[None, str]:
    """``(letter, answer text)``, or ``(None, why)`` when the row's gold cannot be placed among its options."""
    label = str(row.get("answer_label") or "").strip()
    answer = str(row.get("answer") or "").strip()
    if len(label) == 1 and label.upper() in LETTERS:
        label = label.upper()
        if label not in options:
            return None, f"answer_label {label!r} is not one of the options {list(options)}"
    else:  # no letter: find the labelled (or answered) text among the options
        wanted = label or answer
        matches = [k for k, text in options.items() if _norm(text) == _norm(wanted)]
        if len(matches) != 1:
            return None, f"answer_label {label!r} / answer {answer!r} match no single option of {options}"
        label = matches[0]
    gold = options[label]
    accepted = {_norm(gold), _norm(label), _norm(f"{label}. {gold}"), _norm(f"{label}: {gold}")}
    if answer and _norm(answer) not in accepted:
        return None, f"answer {answer!r} differs from option {label} {gold!r}"
    return label, gold


def parse_row(row: Any) -> tuple[MCQItem | None, list[tuple[str, str]]]:
    """One export row -> ``(item, [])`` or ``(None, problems)``; ``dataset_index`` must already be set."""
    if not isinstance(row, dict):
        return None, [("bad_row", f"a row must be a JSON object, got {type(row).__name__}")]
    question = str(row.get("question") or "").strip()
    if not question:
        return None, [("missing_field", "no question")]
    try:
        options = parse_options(row.get("options"))
    except ValueError as exc:
        return None, [("bad_options", str(exc))]
    if not options:
        said = str(row.get("answer") or row.get("answer_label") or "").strip().casefold()
        if said not in ("yes", "no"):
            return None, [("bad_options", f"no options and the answer {said!r} is not yes/no")]
        options = dict(YES_NO)
    if len(options) < 2:
        return None, [("bad_options", f"a multiple-choice question needs 2+ options, got {options}")]
    label, gold = _gold(row, options)
    if label is None:
        return None, [("answer_mismatch" if "differs" in gold else "unknown_label", gold)]
    images = row.get("images")
    images = [images] if isinstance(images, str) else list(images or [])
    names = tuple(str(im.get("path") if isinstance(im, dict) else im) for im in images)
    standard = {"images", "question", "options", "answer_label", "answer", "dataset_name", "dataset_index"}
    name = str(row.get("dataset_name") or "unknown")
    item = MCQItem(
        images=names,
        question=question,
        options=options,
        answer_label=label,
        answer=gold,
        dataset_name=name,
        dataset_index=int(row["dataset_index"]),
        benchmark=benchmark_of(name),
        meta={k: v for k, v in row.items() if k not in standard},
    )
    return item, []


def resolve_suite(suite: str | os.PathLike | None) -> Path:
    """The suite's location: ``suite``, else ``$MEDRL_DATA_DIR/medvqa_suite``."""
    if suite:
        return Path(suite).expanduser()
    if os.environ.get("MEDRL_DATA_DIR"):
        return Path(os.environ["MEDRL_DATA_DIR"]).expanduser() / SUITE_SUBDIR
    raise SuiteError(
        f"no benchmark suite: pass `suite` (--data.suite DIR) or put the export in $MEDRL_DATA_DIR/{SUITE_SUBDIR}"
    )


def suite_files(suite: str | os.PathLike | None) -> list[Path]:
    """The JSONL files of a suite: the file itself, or every ``*.jsonl`` in a folder (sorted)."""
    path = resolve_suite(suite)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise SuiteError(f"benchmark suite {path} does not exist: pass the export's JSONL file or its folder")
    files = sorted(p for p in path.glob("*.jsonl") if not p.name.startswith("."))
    if not files:
        raise SuiteError(f"no *.jsonl in {path}: export the suite there (see docs/pmc_vqa.md)")
    return files


def read_jsonl_items(
    path: str | os.PathLike,
    store: ImageStore | None,
    image_check: ImageCheck = "decode",
    benchmarks: Iterable[str] | None = None,
) -> tuple[list[MCQItem], ValidationReport]:
    """Read and validate one export file; rows that fail go to the report with their reasons.

    Args:
        path: the JSONL file.
        store: where the images are (None only with ``image_check="none"``).
        image_check: ``decode`` (open every image), ``exists`` or ``none``.
        benchmarks: keep only these short names (None keeps all); others are not counted as dropped.
    """
    path = Path(path)
    wanted = None if benchmarks is None else {benchmark_of(b) for b in benchmarks}
    report = ValidationReport(str(path))
    parsed: list[tuple[int, int, MCQItem]] = []
    seen: dict[tuple[str, int], int] = {}
    with path.open("rb") as fh:
        for row_no, raw in enumerate(fh):
            try:
                # -sig on the first line: an editor's byte-order mark must not cost row 0. JSON is UTF-8, so a
                # line in another encoding is that row's problem, not the whole suite's.
                line = raw.decode("utf-8-sig" if row_no == 0 else "utf-8")
            except UnicodeDecodeError as exc:
                report.rows += 1
                problem = ("not_utf8", f"byte {exc.start}: {exc.reason}; save the file as UTF-8")
                report.drop(row_no, row_no + 1, [problem])
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                report.rows += 1
                report.drop(row_no, row_no + 1, [("bad_json", f"not JSON: {exc}")])
                continue
            if isinstance(row, dict) and wanted is not None and benchmark_of(row.get("dataset_name", "")) not in wanted:
                continue
            report.rows += 1
            if isinstance(row, dict):
                row.setdefault("dataset_index", row_no)
            item, problems = parse_row(row)
            if item is not None:
                key = (item.dataset_name, item.dataset_index)
                if key in seen:
                    problems = [("duplicate", f"dataset_index {key[1]} of {key[0]} already on row {seen[key]}")]
                seen.setdefault(key, row_no)
            if problems:
                report.drop(row_no, row_no + 1, problems)
            else:
                item.meta["_line"] = row_no + 1  # type: ignore[union-attr]
                parsed.append((row_no, row_no + 1, item))  # type: ignore[arg-type]
    image_problems = check_images(store, [it.images for _, _, it in parsed], image_check, description=path.name)
    items = []
    for (row_no, line_no, item), problems in zip(parsed, image_problems, strict=True):
        if problems:
            report.drop(row_no, line_no, problems)
        else:
            items.append(item)
    report.kept = len(items)
    return items, report


class BenchmarkSuiteDataModule(L.LightningDataModule):
    """The evaluation suite as VQA items, for ``medrl validate`` / ``test`` (there is no training split).

    Items carry ``flag`` = the benchmark's short name, so per-modality metrics come out per benchmark.

    Args:
        suite: the export's JSONL file, or a folder of them (default: $MEDRL_DATA_DIR/medvqa_suite).
        image_root: where image paths are relative to (default: each JSONL file's folder).
        benchmarks: keep only these benchmarks (short names or dataset names; None keeps all).
        samples_per_benchmark: a seeded subset of this many items per benchmark (None: all).
        image_check: check every image before use: ``decode``, ``exists`` or ``none``.
        batch_size: items per batch.
        num_workers: DataLoader worker processes.
        instruction: overrides the think/answer instruction.
        system_prompt: an optional system message.
        seed: seeds the per-benchmark subsets.
        images: ``native`` (several images of an item passed separately) or ``tiled`` (into one picture).
    """

    def __init__(
        self,
        suite: str | None = None,
        image_root: str | None = None,
        benchmarks: list[str] | None = None,
        samples_per_benchmark: int | None = None,
        image_check: ImageCheck = "decode",
        batch_size: int = 8,
        num_workers: int = 0,
        instruction: str | None = None,
        system_prompt: str | None = None,
        seed: int = 0,
        images: MultiImage = "native",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.images = images
        self.suite, self.image_root, self.benchmarks = suite, image_root, benchmarks
        self.samples_per_benchmark, self.image_check = samples_per_benchmark, image_check
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.instruction, self.system_prompt = instruction, system_prompt
        self.reports: list[ValidationReport] = []
        self._dataset: MCQItemsDataset | None = None

    def dataset(self) -> MCQItemsDataset:
        """The suite's items (read, validated and subset once); the validation report is logged."""
        if self._dataset is None:
            items, stores = load_suite(self.suite, self.image_root, self.image_check, self.benchmarks, self.reports)
            items = per_benchmark_subset(items, self.samples_per_benchmark, self.seed)
            self._dataset = MCQItemsDataset(items, stores, self.instruction, self.system_prompt, self.images)
        return self._dataset

    def apply_prompt_budget(self, budget: PromptBudget) -> int:
        """Drop the items whose prompt is over ``budget`` (reported as ``too_long``); returns how many."""
        dropped = self.dataset().apply_budget(budget, self.reports)
        if dropped:
            log.warning("%d suite item(s) over the prompt budget of %d tokens dropped", dropped, budget.max_tokens)
        return dropped

    def setup(self, stage: str | None = None) -> None:
        """Read the suite."""
        self.dataset()

    def _loader(self) -> DataLoader:
        return DataLoader(self.dataset(), batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          collate_fn=vqa_collate, persistent_workers=self.num_workers > 0)  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        raise MisconfigurationException(
            "BenchmarkSuiteDataModule is evaluation-only: use `medrl validate`/`test`, or train on PMCVQADataModule "
            "with `validate_on: suite`"
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader()


def load_suite(
    suite: str | None,
    image_root: str | None = None,
    image_check: ImageCheck = "decode",
    benchmarks: list[str] | None = None,
    reports: list[ValidationReport] | None = None,
) -> tuple[list[MCQItem], dict[str, ImageStore]]:
    """Every valid item of a suite, each tagged with its file (``meta["_file"]``), and an image store per file.

    Reports are appended to ``reports`` (when given) and logged; a suite with no usable item is an error.
    """
    items: list[MCQItem] = []
    stores: dict[str, ImageStore] = {}
    for path in suite_files(suite):
        store = ImageStore(image_root) if image_root else ImageStore(path.parent)
        stores[str(path)] = store
        file_items, report = read_jsonl_items(path, store, image_check, benchmarks)
        items += [replace(it, meta={**it.meta, "_file": str(path)}) for it in file_items]
        if reports is not None:
            reports.append(report)
        (log.warning if report.dropped else log.info)("%s", report.summary())
    if not items:
        raise SuiteError(f"no usable item in {suite} (benchmarks={benchmarks}); see the validation report above")
    return items, stores


def write_suite(rows: Iterable[dict[str, Any]], out: str | os.PathLike, name: str = "suite.jsonl") -> Path:
    """Write rows of the unified format as a suite folder: ``out/<name>`` plus ``out/images/``.

    Rows may hold their images as PIL images (as a Hugging Face dataset yields them, e.g. MedVLThinker-Eval),
    as ``{"bytes": ...}`` dicts, or as paths (copied). Each image is saved as ``images/<row>_<k>.png``; the
    JSONL is written atomically once every image is on disk, and an existing image is not written again,
    so an interrupted export can simply be rerun.
    """
    import io as _io
    import shutil

    from PIL import Image

    from medrl.core.io import atomic_write_jsonl

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, row in enumerate(rows):
        images = row.get("images") or []
        paths = []
        for k, image in enumerate([images] if isinstance(images, str | Image.Image) else images):
            if isinstance(image, dict):
                image = Image.open(_io.BytesIO(image["bytes"])) if image.get("bytes") else image["path"]
            suffix = ".png" if isinstance(image, Image.Image) else Path(str(image)).suffix or ".png"
            rel = f"images/{i}_{k}{suffix}"
            target = out / rel
            if not target.is_file():
                tmp = target.with_name(f".{target.name}.part")
                if isinstance(image, Image.Image):
                    image.convert("RGB").save(tmp, format="PNG")
                else:
                    shutil.copyfile(str(image), tmp)
                tmp.replace(target)
            paths.append(rel)
        line = {k: v for k, v in row.items() if k != "images"}
        line.setdefault("dataset_index", i)
        lines.append({"images": paths, **line})
    return atomic_write_jsonl(out / name, lines)
