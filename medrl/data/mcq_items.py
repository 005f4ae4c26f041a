"""Multiple-choice items read from files (PMC-VQA CSVs, evaluation exports), the report of rows dropped on
the way, and the dataset that turns items into the VQA items every model-facing part of medrl takes.

An item comes out in exactly the format of ``MedMNISTDataModule(mode="vqa")``: ``{"image": PIL RGB,
"prompt", "messages", "answer" (gold letter), "options" {letter: text}, "label" (gold position),
"index", "flag"}``, plus ``"dataset_name"``. ``flag`` is the benchmark's short name (``PMC``,
``PathVQA``, ...), so anything that reports per modality reports per benchmark here.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from rich.progress import track
from torch.utils.data import Dataset

from medrl.core.budget import PromptBudget
from medrl.core.errors import ConfigError
from medrl.data import vqa
from medrl.data.image_store import ImageCheck, ImageStore, tile, tiled_size


@dataclass(frozen=True)
class MCQItem:
    """One validated multiple-choice question, in the unified evaluation format's terms.

    Attributes:
        images: image names, resolved by an :class:`ImageStore`.
        question: the question text.
        options: letter -> option text, letters in order (``A``, ``B``, ...).
        answer_label: the gold letter (a key of ``options``).
        answer: the gold option's text.
        dataset_name: the source's name for its dataset (``pmc_vqa``, ``MMMU-medical``, ...).
        dataset_index: the item's id within its source.
        benchmark: the short name used for reporting (``PMC``, ``MMMU``, ``MedX-M``, ...).
        meta: other fields of the source row (e.g. a column to stratify by).
    """

    images: tuple[str, ...]
    question: str
    options: dict[str, str]
    answer_label: str
    answer: str
    dataset_name: str
    dataset_index: int
    benchmark: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_row(self) -> dict[str, Any]:
        """The item as a row of the unified evaluation export (``meta`` fields follow the standard ones)."""
        row = {
            "images": list(self.images),
            "question": self.question,
            "options": dict(self.options),
            "answer_label": self.answer_label,
            "answer": self.answer,
            "dataset_name": self.dataset_name,
            "dataset_index": self.dataset_index,
        }
        # Keys starting with "_" are medrl's own bookkeeping (e.g. the source file), not source fields.
        row.update({k: v for k, v in self.meta.items() if k not in row and not k.startswith("_")})
        return row


@dataclass(frozen=True)
class DroppedRow:
    """A source row that did not become an item: where it is and every reason why.

    Attributes:
        row: 0-based data row (header excluded).
        line: 1-based line of the file where the row ends.
        reasons: short reason codes, e.g. ``("bad_prefix", "missing_image")``.
        detail: a readable explanation naming the offending values.
    """

    row: int
    line: int
    reasons: tuple[str, ...]
    detail: str


@dataclass
class ValidationReport:
    """What reading one file kept and dropped; printed instead of failing the run or skipping silently."""

    file: str
    rows: int = 0
    kept: int = 0
    dropped: list[DroppedRow] = field(default_factory=list)

    def drop(self, row: int, line: int, problems: list[tuple[str, str]]) -> None:
        """Record that ``row`` was dropped for ``problems`` (``(reason, detail)`` pairs)."""
        reasons = tuple(dict.fromkeys(reason for reason, _ in problems))
        self.dropped.append(DroppedRow(row, line, reasons, "; ".join(detail for _, detail in problems)))

    def counts(self) -> dict[str, int]:
        """Dropped rows per reason (a row with two problems counts under both)."""
        return dict(Counter(reason for d in self.dropped for reason in d.reasons).most_common())

    def summary(self, examples: int = 3) -> str:
        """A few readable lines: totals, counts per reason and the first rows of each reason."""
        lines = [f"{self.file}: {self.rows} rows, {self.kept} kept, {len(self.dropped)} dropped"]
        for reason, count in self.counts().items():
            lines.append(f"  {reason}: {count}")
            for d in [d for d in self.dropped if reason in d.reasons][:examples]:
                lines.append(f"    row {d.row} (line {d.line}): {d.detail}")
        return "\n".join(lines)

    def to_dict(self, examples: int | None = None) -> dict[str, Any]:
        """JSON-ready form; ``examples`` limits the dropped rows listed (None lists them all)."""
        listed = self.dropped if examples is None else self.dropped[:examples]
        return {
            "file": self.file,
            "rows": self.rows,
            "kept": self.kept,
            "dropped": len(self.dropped),
            "dropped_by_reason": self.counts(),
            "dropped_rows": [
                {"row": d.row, "line": d.line, "reasons": list(d.reasons), "detail": d.detail} for d in listed
            ],
        }


def check_images(
    store: ImageStore | None,
    names_per_row: list[tuple[str, ...]],
    level: ImageCheck,
    workers: int | None = None,
    description: str = "checking images",
) -> list[list[tuple[str, str]]]:
    """Image problems of each row (``[]`` when its images pass ``level``), decoded on a few threads.

    PIL releases the GIL while decoding, so threads help; a progress bar shows on long runs. A name outside the
    image folder is dropped as ``outside_folder`` at every level, ``none`` included (no file is touched).
    """
    if level == "none" or not names_per_row:
        return [
            [("outside_folder", f"{n!r} is outside the image folder") for n in names if ImageStore.is_outside(n)]
            for names in names_per_row
        ]
    if store is None:
        raise ConfigError(f"checking images at level {level!r} needs an image folder or zip")
    workers = workers or min(8, os.cpu_count() or 1)

    def one(names: tuple[str, ...]) -> list[tuple[str, str]]:
        if not names:
            return [("no_image", "the row names no image")]
        return [p for p in (store.check(n, level) for n in names) if p is not None]

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(one, names_per_row)
        return list(track(results, description, total=len(names_per_row), disable=len(names_per_row) < 500))


# How a question with several images reaches the model: separately (one placeholder each), or tiled into one.
MultiImage = Literal["native", "tiled"]


class MCQItemsDataset(Dataset):
    """Items as VQA dicts (the format of ``MedMNISTDataModule(mode="vqa")``), images read on access.

    Args:
        items: the validated items.
        store: where their images are; or one store per source file, keyed by ``item.meta["_file"]``.
        instruction: overrides the think/answer instruction.
        system_prompt: an optional system message.
        images: ``native`` passes an item's several images as separate images (one placeholder each, the
            item's ``images`` list); ``tiled`` tiles them into one picture, for models that take one image.
    """

    def __init__(
        self,
        items: list[MCQItem],
        store: ImageStore | dict[str, ImageStore],
        instruction: str | None = None,
        system_prompt: str | None = None,
        images: MultiImage = "native",
    ) -> None:
        if images not in ("native", "tiled"):
            raise ValueError(f"images must be 'native' or 'tiled', got {images!r}")
        self.items, self.store = items, store
        self.instruction, self.system_prompt, self.images = instruction, system_prompt, images

    def __len__(self) -> int:
        return len(self.items)

    def store_of(self, item: MCQItem) -> ImageStore:
        """The store holding ``item``'s images."""
        return self.store if isinstance(self.store, ImageStore) else self.store[item.meta["_file"]]

    def prompt_text(self, item: MCQItem) -> str:
        """The text the model reads for ``item`` (system prompt, question, options, instruction)."""
        prompt = vqa.format_prompt(item.question, item.options, self.instruction or vqa.INSTRUCTION)
        return vqa.readable_text(prompt, self.system_prompt)

    def _shown(self, item: MCQItem) -> int:
        """How many images the model sees for ``item``: each one, or the one tiled picture."""
        return min(len(item.images), 1) if self.images == "tiled" else len(item.images)

    def max_images(self) -> int:
        """The most images any item passes to the model (1 when tiled)."""
        return max((self._shown(item) for item in self.items), default=0)

    def _seen_sizes(self, item: MCQItem) -> list[tuple[int, int]]:
        """The sizes of the images the model sees for ``item``: each one, or the one tiled picture."""
        sizes = self._image_sizes(item)
        return [tiled_size(sizes)] if sizes and self.images == "tiled" else sizes

    def _image_sizes(self, item: MCQItem) -> list[tuple[int, int]]:
        """Sizes of the item's images that can be read; a bad one is the image check's to report."""
        store, sizes = self.store_of(item), []
        for name in item.images:
            try:
                sizes.append(store.size(name))
            except (OSError, ValueError, SyntaxError):
                continue
        return sizes

    def apply_budget(self, budget: PromptBudget, reports: list[ValidationReport]) -> int:
        """Drop the items whose prompt is over ``budget`` (reason ``too_long``, in the report of their file);
        returns how many were dropped."""
        kept = []
        for item in self.items:
            problem = budget.problem_of_row(
                self.prompt_text(item), self._shown(item), lambda it=item: self._seen_sizes(it)
            )
            if problem is None:
                kept.append(item)
                continue
            report = next((r for r in reports if r.file == item.meta.get("_file", r.file)), None)
            if report is not None:
                report.drop(item.dataset_index, int(item.meta.get("_line", 0)), [problem])
                report.kept -= 1
        dropped, self.items = len(self.items) - len(kept), kept
        return dropped

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.items[i]
        store = self.store_of(item)
        opened = [store.open(name) for name in item.images]
        native = self.images == "native" and len(opened) > 1
        prompt = vqa.format_prompt(item.question, item.options, self.instruction or vqa.INSTRUCTION)
        return {
            # One image stays `image`; several are `images` (one placeholder each) unless tiled into one.
            "image": None if native else tile(opened),
            **({"images": opened} if native else {}),
            "prompt": prompt,
            "messages": vqa.chat_messages(prompt, self.system_prompt, len(opened) if native else 1),
            "answer": item.answer_label,
            "options": dict(item.options),
            # Benchmarks and PMC-VQA ask for a letter, as the paper does; the key keeps one item format.
            "answer_with": "letter",
            "label": list(item.options).index(item.answer_label),
            "index": item.dataset_index,
            "flag": item.benchmark,
            "dataset_name": item.dataset_name,
        }


def seeded_subset(items: list[MCQItem], limit: int | None, seed: int, salt: Iterable[int] = ()) -> list[MCQItem]:
    """A seeded random subset of ``limit`` items in their original order (all of them when ``limit`` is None)."""
    import numpy as np

    if limit is None or limit >= len(items):
        return items
    keep = np.sort(np.random.default_rng([seed, *salt]).choice(len(items), limit, replace=False))
    return [items[i] for i in keep]
