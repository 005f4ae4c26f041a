"""A small, balanced PMC-VQA training subset (the paper trains on about 8k items, ``pmc_vqa_8k.jsonl``).

The paper does not publish its balancing rule, so medrl's is stated here (ours): the gold letter is
balanced exactly (A-D equally; when ``n`` is not a multiple of 4 the first letters get one more), every
question text and every image that appears in a test file is excluded, and, optionally, items are
stratified by a CSV column or by a pass-rate band measured by an earlier evaluation. Within a letter,
strata get equal shares (``stratify="equal"``) or shares proportional to the pool (``"proportional"``);
a stratum with too few items gives its shortfall to the others, so letters stay exact.

Images are checked lazily: only the items the draw reaches are opened, in seeded order, and an item
whose image is missing or broken is replaced by the next one. The output is a JSONL in the unified
evaluation format (readable by ``PMCVQADataModule(train_file=...)``) and a manifest with the counts per
letter and stratum, the seed, the parameters and SHA-256 hashes of the source files.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medrl.core.budget import PromptBudget
from medrl.core.errors import ConfigError
from medrl.core.hashing import file_digest
from medrl.core.io import atomic_write_json, atomic_write_jsonl
from medrl.data import vqa
from medrl.data.image_store import ImageCheck, ImageStore
from medrl.data.mcq_items import MCQItem, ValidationReport, check_images
from medrl.data.pmc_vqa import PMC_LETTERS, PMCVQAError, csv_header, read_pmc_csv, read_pmc_rows

Stratify = Literal["equal", "proportional"]
# Count fields an evaluation JSONL may carry: medrl's own per-question files and the MedVLThinker format.
_CORRECT_KEYS = ("num_correct", "correct", "n_correct", "c")
_TOTAL_KEYS = ("num_rollouts", "n_samples", "num_samples", "n")


def normalise_question(text: str) -> str:
    """The form questions are compared in: case-folded, whitespace collapsed, trailing punctuation dropped.

    >>> normalise_question("  What is  shown? ") == normalise_question("what is shown")
    True
    """
    return re.sub(r"\s+", " ", str(text)).strip().rstrip("?.!: ").casefold()


def image_key(name: str) -> str:
    """The form image names are compared in: the base name, case-folded."""
    return str(name).strip().replace("\\", "/").rsplit("/", 1)[-1].casefold()


def read_pass_rates(path: str | os.PathLike, key: str = "dataset_index") -> dict[str, float]:
    """Per-item pass rates from an evaluation JSONL, keyed by ``str(row[key])``.

    A row gives ``pass_rate`` directly, or a correct count (``num_correct``/``correct``/``n_correct``/``c``)
    and a sample count (``num_rollouts``/``n_samples``/``num_samples``/``n``); repeated keys pool their counts.
    """
    correct: Counter[str] = Counter()
    total: Counter[str] = Counter()
    rates: dict[str, float] = {}
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if key not in row:
                raise PMCVQAError(f"{path} line {line_no}: no {key!r} field (fields: {sorted(row)}); set pass_rate_key")
            item = str(row[key])
            c = next((row[k] for k in _CORRECT_KEYS if k in row), None)
            n = next((row[k] for k in _TOTAL_KEYS if k in row), None)
            if c is not None and n is not None:
                correct[item] += int(c)
                total[item] += int(n)
            elif "pass_rate" in row:
                rates[item] = float(row["pass_rate"])
            else:
                raise PMCVQAError(
                    f"{path} line {line_no}: no pass_rate and no correct/sample counts "
                    f"(one of {_CORRECT_KEYS} with one of {_TOTAL_KEYS}); fields: {sorted(row)}"
                )
    rates.update({item: correct[item] / total[item] for item in total if total[item] > 0})
    return rates


def band_of(rate: float, edges: list[float]) -> str:
    """The pass-rate band holding ``rate``: ``[lo, hi)``, the last band closed on the right.

    >>> [band_of(r, [0.0, 0.5, 1.0]) for r in (0.0, 0.49, 0.5, 1.0)]
    ['pass[0,0.5)', 'pass[0,0.5)', 'pass[0.5,1]', 'pass[0.5,1]']
    """
    for i, (lo, hi) in enumerate(zip(edges, edges[1:], strict=False)):
        last = i == len(edges) - 2
        if lo <= rate < hi or (last and rate == hi):
            return f"pass[{lo:g},{hi:g}{']' if last else ')'}"
    raise ValueError(f"pass rate {rate} is outside the bands {edges}")


def split_by_weight(total: int, weights: dict[str, float]) -> dict[str, int]:
    """``total`` split in proportion to ``weights`` (largest remainder; ties to the earlier key).

    >>> split_by_weight(10, {"a": 1, "b": 1, "c": 1})
    {'a': 4, 'b': 3, 'c': 3}
    """
    keys = list(weights)
    mass = sum(weights.values())
    exact = [total * weights[k] / mass for k in keys]
    shares = [int(x) for x in exact]
    order = sorted(range(len(keys)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in order[: total - sum(shares)]:
        shares[i] += 1
    return dict(zip(keys, shares, strict=True))


def allocate(total: int, capacity: dict[str, int], weights: dict[str, float]) -> dict[str, int]:
    """``total`` items over strata by weight, none above its capacity; shortfalls go to the others.

    >>> allocate(12, {"easy": 2, "mid": 9, "hard": 9}, {"easy": 1, "mid": 1, "hard": 1})
    {'easy': 2, 'mid': 5, 'hard': 5}
    """
    if total > sum(capacity.values()):
        raise ConfigError(f"cannot place {total} items in strata holding {sum(capacity.values())}")
    alloc = dict.fromkeys(capacity, 0)
    remaining = total
    open_ = [s for s in capacity if capacity[s] > 0 and weights.get(s, 0) > 0]
    while remaining > 0:
        if not open_:  # only zero-weight strata have room left: fill them in order
            open_ = [s for s in capacity if alloc[s] < capacity[s]]
            weights = dict.fromkeys(open_, 1.0)
        for s, share in split_by_weight(remaining, {s: weights[s] for s in open_}).items():
            give = min(share, capacity[s] - alloc[s])
            alloc[s] += give
            remaining -= give
        open_ = [s for s in open_ if alloc[s] < capacity[s]]
    return alloc


def _letter_quotas(n: int) -> dict[str, int]:
    return {letter: n // 4 + (1 if i < n % 4 else 0) for i, letter in enumerate(PMC_LETTERS)}


class _LazyImages:
    """Image checks run only on the items the draw reaches, in batches on a few threads."""

    def __init__(self, store: ImageStore | None, level: ImageCheck) -> None:
        self.store, self.level = store, level
        self.problems: dict[int, list[tuple[str, str]]] = {}

    def good(self, items: list[MCQItem], k: int) -> list[MCQItem]:
        """The first ``k`` items of ``items`` whose images pass (fewer when the list runs out)."""
        picked: list[MCQItem] = []
        pos = 0
        while len(picked) < k and pos < len(items):
            batch = items[pos : pos + (k - len(picked))]
            pos += len(batch)
            todo = [it for it in batch if it.dataset_index not in self.problems]
            for it, problems in zip(
                todo, check_images(self.store, [it.images for it in todo], self.level), strict=True
            ):
                self.problems[it.dataset_index] = problems
            picked += [it for it in batch if not self.problems[it.dataset_index]]
        return picked

    def bad(self) -> dict[int, list[tuple[str, str]]]:
        """Items found with broken or missing images."""
        return {i: p for i, p in self.problems.items() if p}


def _draw(
    cells: dict[str, dict[str, list[MCQItem]]], n: int, stratify: Stratify, images: _LazyImages, seed: int
) -> tuple[list[MCQItem], dict[str, dict[str, int]]]:
    """Draw the balanced subset from ``cells[letter][stratum]``; returns the items and the counts."""
    strata = sorted({s for by_stratum in cells.values() for s in by_stratum})
    pool = Counter({s: sum(len(cells[L].get(s, [])) for L in cells) for s in strata})
    weights = {s: 1.0 if stratify == "equal" else float(pool[s]) for s in strata}
    orders = {
        (L, s): [group[i] for i in np.random.default_rng([seed, li, si]).permutation(len(group))]
        for li, L in enumerate(PMC_LETTERS)
        for si, s in enumerate(strata)
        if (group := sorted(cells[L].get(s, []), key=lambda it: it.dataset_index))
    }
    chosen: list[MCQItem] = []
    counts: dict[str, dict[str, int]] = {}
    for L, quota in _letter_quotas(n).items():
        known_bad = dict.fromkeys(strata, 0)
        while True:  # re-plan until every stratum's allocation is met by items with good images
            capacity = {s: len(orders.get((L, s), [])) - known_bad[s] for s in strata}
            if sum(capacity.values()) < quota:
                raise PMCVQAError(
                    f"only {sum(capacity.values())} eligible items have gold letter {L}, {quota} needed for n={n}; "
                    f"lower n or relax the filters (eligible per stratum: {capacity})"
                )
            alloc = allocate(quota, capacity, weights)
            picks = {s: images.good(orders.get((L, s), []), alloc[s]) for s in strata}
            short = {s for s in strata if len(picks[s]) < alloc[s]}
            if not short:
                break
            for s in short:  # every item of the stratum has been checked: its good ones are all there is
                known_bad[s] = len(orders[(L, s)]) - len(picks[s])
        counts[L] = {s: len(picks[s]) for s in strata}
        chosen += [it for s in strata for it in picks[s]]
    shuffled = [chosen[i] for i in np.random.default_rng(seed).permutation(len(chosen))]
    return shuffled, counts


def _source(path: Path) -> dict[str, Any]:
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": file_digest(path)}


def build_subset(
    train: str | os.PathLike,
    tests: list[str | os.PathLike],
    store: ImageStore | None,
    out: str | os.PathLike,
    n: int = 8000,
    seed: int = 0,
    stratify_by: str | None = None,
    pass_rates: str | os.PathLike | None = None,
    pass_rate_key: str = "dataset_index",
    bands: list[float] | None = None,
    min_pass_rate: float | None = None,
    max_pass_rate: float | None = None,
    stratify: Stratify = "equal",
    image_check: ImageCheck = "decode",
    budget: PromptBudget | None = None,
) -> dict[str, Any]:
    """Write the subset JSONL at ``out`` and its manifest next to it (``<stem>.manifest.json``); return the manifest.

    See :func:`pmc_subset` for the arguments; with a ``budget``, rows whose question and options take more
    prompt tokens than it allows are dropped as ``too_long`` (the text only: the images are read just for the
    items drawn, and training applies the whole budget again). Both files are written atomically, the
    manifest last, and it records the JSONL's own SHA-256, so a manifest always describes the JSONL beside it.
    """
    if n < 4:
        raise ConfigError(f"n must be at least 4 (one item per letter), got {n}")
    train, out = Path(train), Path(out)
    bands = sorted(bands or [0.0, 0.25, 0.5, 0.75, 1.0])
    items, report = read_pmc_csv(train, None, "none")  # images are checked lazily, on the items drawn
    header = csv_header(train)
    if stratify_by is not None and stratify_by not in header:
        raise PMCVQAError(f"stratify_by={stratify_by!r} is not a column of {train} (columns: {list(header)})")

    test_questions: set[str] = set()
    test_images: set[str] = set()
    for test in map(Path, tests):
        for _, _, row in read_pmc_rows(test):  # every test row counts, valid or not
            test_questions.add(normalise_question(row.get("Question") or ""))
            test_images.add(image_key(row.get("Figure_path") or ""))
    rates = read_pass_rates(pass_rates, pass_rate_key) if pass_rates else None

    pool_counts: Counter[str] = Counter()
    cells: dict[str, dict[str, list[MCQItem]]] = {L: {} for L in PMC_LETTERS}
    for item in items:
        reasons = []
        if normalise_question(item.question) in test_questions:
            reasons.append("test_question")
        if image_key(item.images[0]) in test_images:
            reasons.append("test_image")
        pool_counts.update(reasons)
        if reasons:
            pool_counts["excluded_as_test"] += 1
            continue
        if budget is not None and (problem := budget.problem(vqa.format_prompt(item.question, item.options))):
            report.drop(item.dataset_index, int(item.meta.get("_line", 0)), [problem])
            report.kept -= 1
            pool_counts["too_long"] += 1
            continue
        parts = []
        if stratify_by is not None:
            parts.append(f"{stratify_by}={str(item.meta.get(stratify_by) or '').strip() or '(empty)'}")
        if rates is not None:
            ident = item.dataset_index if pass_rate_key == "dataset_index" else item.meta.get(pass_rate_key)
            rate = rates.get(str(ident))
            if rate is None:
                pool_counts["no_pass_rate"] += 1
                continue
            if (min_pass_rate is not None and rate < min_pass_rate) or (
                max_pass_rate is not None and rate > max_pass_rate
            ):
                pool_counts["outside_pass_rate_range"] += 1
                continue
            parts.append(band_of(rate, bands))
            item.meta["pass_rate"] = rate
        stratum = "|".join(parts) or "all"
        item.meta["stratum"] = stratum
        cells[item.answer_label].setdefault(stratum, []).append(item)
        pool_counts["eligible"] += 1

    lines = {it.dataset_index: it.meta["_line"] for it in items}
    lazy = _LazyImages(store, image_check)
    chosen, counts = _draw(cells, n, stratify, lazy, seed)
    rows = [{**it.to_row(), "source_file": train.name} for it in chosen]
    atomic_write_jsonl(out, rows)

    image_report = ValidationReport(f"{train} (images of the items drawn)", rows=len(lazy.problems))
    for index, problems in sorted(lazy.bad().items()):
        image_report.drop(index, lines[index], problems)
    image_report.kept = len(lazy.problems) - len(lazy.bad())
    strata = sorted({s for by in counts.values() for s in by})
    manifest = {
        "what": "balanced PMC-VQA training subset (medrl data pmc-subset)",
        "n": len(chosen),
        "seed": seed,
        "params": {
            "n": n,
            "stratify_by": stratify_by,
            "stratify": stratify,
            "pass_rate_key": pass_rate_key,
            "bands": bands if rates is not None else None,
            "min_pass_rate": min_pass_rate,
            "max_pass_rate": max_pass_rate,
            "image_check": image_check,
        },  # fmt: skip
        "counts": {
            "per_letter": {L: sum(c.values()) for L, c in counts.items()},
            "per_stratum": {s: sum(counts[L].get(s, 0) for L in counts) for s in strata},
            "per_letter_and_stratum": counts,
        },
        "pool": {
            "train_rows": report.rows,
            "valid_rows": report.kept,
            **{k: pool_counts.get(k, 0) for k in ("test_question", "test_image", "excluded_as_test")},
            **{k: pool_counts.get(k, 0) for k in ("no_pass_rate", "outside_pass_rate_range", "eligible")},
            "eligible_per_letter_and_stratum": {L: {s: len(v) for s, v in sorted(c.items())} for L, c in cells.items()},
        },
        "validation": {"rows": report.to_dict(examples=50), "images": image_report.to_dict(examples=50)},
        "sources": {
            "train": _source(train),
            "tests": [_source(Path(t)) for t in tests],
            "pass_rates": _source(Path(pass_rates)) if pass_rates else None,
            "images": {"path": str(store.location), "kind": "zip" if store.is_zip else "folder"} if store else None,
        },
        "output": {"jsonl": out.name, "sha256": file_digest(out)},
    }
    atomic_write_json(manifest_path(out), manifest)
    return manifest


def manifest_path(out: str | os.PathLike) -> Path:
    """Where the manifest of subset ``out`` goes: ``<stem>.manifest.json`` beside it."""
    out = Path(out)
    return out.with_name(f"{out.stem}.manifest.json")
