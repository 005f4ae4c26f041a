"""Read a study run directory into plain Python values; nothing here computes a new number."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medrl.core.errors import UserError
from medrl.metrics.intervals import Questions


@dataclass
class RunResults:
    """Everything the report shows, as read from disk.

    Attributes:
        plan: the study plan (empty when absent).
        runcard: versions, hardware, seeds.
        stages: per-stage status and seconds.
        probe_rows: rows of the probe table.
        evals: ``evals[model][flag]`` is the ``summary.json`` of that evaluation.
        recipes: ``recipes[flag]`` is that flag's ``recipe.json``.
        rl_logs: ``rl_logs[model]`` is the per-step training log (``metrics.csv`` rows) of an RL model.
    """

    root: Path
    plan: dict[str, Any] = field(default_factory=dict)
    runcard: dict[str, Any] = field(default_factory=dict)
    stages: dict[str, Any] = field(default_factory=dict)
    probe_rows: list[dict[str, str]] = field(default_factory=list)
    evals: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    recipes: dict[str, dict[str, Any]] = field(default_factory=dict)
    rl_logs: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    log_dirs: dict[str, Path] = field(default_factory=dict)
    questions: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    # Arrays built once per evaluation: every table cell, finding and rung of the report asks again.
    _sets: dict[tuple[str, str], Questions | None] = field(default_factory=dict, repr=False)

    @property
    def flags(self) -> list[str]:
        """Every flag evaluated, in plan order when the plan lists them."""
        seen = {flag for by_flag in self.evals.values() for flag in by_flag}
        ordered = [f for f in self.plan.get("flags", []) if f in seen]
        return ordered + sorted(seen - set(ordered))

    def k_for(self, flag: str, k: int | str) -> int:
        """The k a flag's support is read at: ``k`` itself, or for ``"room"`` the k that leaves room above chance
        for the flag's option count (:func:`medrl.metrics.chance.room_k`; 2 for 2 options, 4 for 4)."""
        if k != "room":
            return int(k)
        for model in ("base", *sorted(self.evals)):
            sets = self.question_sets(model, flag)
            if sets:
                ks = sorted(int(v) for v in set(sets[0].room_ks().tolist()))
                return ks[len(ks) // 2]  # questions of one flag share an option count; the middle one otherwise
        return 1

    @property
    def stand_in_flags(self) -> list[str]:
        """Flags that ran on a synthetic stand-in (their evaluations say ``synthetic``): no verdict rests on them."""
        return [f for f in self.flags if any(by_flag.get(f, {}).get("meta", {}).get("synthetic")
                                             for by_flag in self.evals.values())]  # fmt: skip

    def metric(self, model: str, flag: str, name: str) -> float | None:
        """One number of one evaluation (over all its questions), or None when it was not run."""
        summary = self.evals.get(model, {}).get(flag)
        if summary is None:
            return None
        value = summary["metrics"]["all"].get(name)
        return None if value is None else float(value)

    def question_set(self, model: str, flag: str) -> Questions | None:
        """The per-question arrays of one evaluation (for intervals), or None when its rows are absent."""
        if (model, flag) not in self._sets:
            rows = self.questions.get(model, {}).get(flag)
            self._sets[model, flag] = Questions.from_rows(rows) if rows else None
        return self._sets[model, flag]

    def seed_labels(self, model: str, flag: str) -> list[str]:
        """A model's label for each training seed the plan ran (``sft_x``, ``sft_x-s1``, ...) that was
        evaluated on ``flag``; the base model has one."""
        seeds = list(self.plan.get("seeds") or [])
        labels = [model, *(f"{model}-s{s}" for s in seeds[1:])]
        return [label for label in labels if flag in self.questions.get(label, {})]

    def question_sets(self, model: str, flag: str) -> list[Questions]:
        """The per-question arrays of a model's evaluation on ``flag``, one per training seed."""
        return [q for label in self.seed_labels(model, flag) if (q := self.question_set(label, flag)) is not None]

    def ks(self, model: str, flag: str) -> list[int]:
        """The k values an evaluation measured."""
        return list(self.evals.get(model, {}).get(flag, {}).get("ks", []))


def read_json(path: Path) -> Any:
    """A JSON file of the run; one line naming it when it is damaged."""
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); delete it and rerun the stage that writes it") from exc


def check_stages(stages: Any, path: Path) -> dict[str, dict[str, Any]]:
    """``stages.json`` as medrl writes it (stage name -> record with a ``status``), else one line naming it."""
    if not isinstance(stages, dict) or not all(isinstance(r, dict) and "status" in r for r in stages.values()):
        raise UserError(
            f"{path} is not a medrl stages file (stage name -> {{status, ...}}): {path.parent} is not a study run "
            "folder written by `medrl reproduce`; pass that folder"
        )
    return stages


def load_run(root: str | Path) -> RunResults:
    """Read a run directory (see the package docstring for the layout)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such run directory")
    results = RunResults(root=root)
    for name in ("plan", "runcard", "stages"):
        if (root / f"{name}.json").is_file():
            setattr(results, name, read_json(root / f"{name}.json"))
    if (root / "stages.json").is_file():
        check_stages(results.stages, root / "stages.json")
    probe_csv = root / "vision" / "results.csv"
    if probe_csv.is_file():
        with open(probe_csv, newline="") as fh:
            results.probe_rows = list(csv.DictReader(fh))
    for summary in sorted((root / "eval").glob("*/*/summary.json")):
        model, flag = summary.parent.parent.name, summary.parent.name
        results.evals.setdefault(model, {})[flag] = read_json(summary)
        rows = summary.parent / "questions.jsonl"
        if rows.is_file():  # per-question counts: what the intervals resample
            lines = rows.read_text().splitlines()
            results.questions.setdefault(model, {})[flag] = [json.loads(line) for line in lines if line.strip()]
    for recipe in sorted((root / "recipe").glob("*/recipe.json")):
        results.recipes[recipe.parent.name] = read_json(recipe)
    for train in sorted(p for p in (root / "train").glob("*") if p.is_dir()):
        logs = sorted(train.glob("lightning_logs/version_*/metrics.csv"), key=lambda p: p.stat().st_mtime)
        if not logs:
            continue
        # The latest version: an interrupted and rerun stage leaves older ones behind.
        results.log_dirs[train.name] = logs[-1].parent.relative_to(root)
        if train.name.startswith("rl_"):
            with open(logs[-1], newline="") as fh:
                results.rl_logs[train.name] = [row for row in csv.DictReader(fh) if row.get("reward/mean")]
    return results
