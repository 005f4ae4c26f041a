"""The study's stages, built from a plan: data, vision, support, SFT, RL, transfer, recipe, report.

Training runs as its own ``medrl fit`` process (the experiment config plus a generated override file kept in
the run directory, so every run can be repeated by hand); measurements run in this process on the exported
Hugging Face folders. Model labels follow :mod:`medrl.report`.
"""

from __future__ import annotations

import importlib
import json
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from medrl.core.env import DATA_DIR_ENV, cache_dir, data_dir
from medrl.core.io import atomic_write_json, atomic_write_text
from medrl.data import medmnist_files as mf
from medrl.rl.recipe import Measurement, run_recipe
from medrl.study.plan import StudyPlan, merge_nested
from medrl.study.runner import Stage, child_failure, json_has_keys, run_child

LAST_HF = Path("checkpoints") / "last.hf"  # a training folder's final export (HFCheckpoint's `last`)
STEP_EXPORTS = "steps"  # a training folder's exports at chosen steps (the boundary sweep's rungs)
PMC_PREFIX = "pmc:"  # a target ``pmc:<train file>``: PMC-VQA, training on that file (e.g. a pmc-subset JSONL)


def default_data_dir() -> Path:
    """Where the study fetches MedMNIST files when no folder is named: ``$MEDRL_CACHE/medmnist``."""
    return cache_dir() / "medmnist"


def trained_by(model_label: str) -> str:
    """The stage that trains a model: ``sft_breastmnist`` -> ``sft:sft_breastmnist``, ``rl_base_x`` -> ``rl:...``,
    ``boundary-sft16_x`` -> ``boundary:boundary-sft16_x``."""
    return f"{model_label.split('_', 1)[0].split('-', 1)[0]}:{model_label}"


def seed_label(model_label: str, seed: int, first: int) -> str:
    """A model's label for one training seed: the first seed keeps the plain label, the others add ``-s<seed>``.

    >>> seed_label("rl_sft_breastmnist", 1, 0), seed_label("rl_sft_breastmnist", 0, 0)
    ('rl_sft_breastmnist-s1', 'rl_sft_breastmnist')
    """
    return model_label if seed == first else f"{model_label}-s{seed}"


def target_slug(target: str) -> str:
    """A target as a folder name: ``pmc:pmc_vqa_8k.jsonl`` -> ``pmc-pmc_vqa_8k``; MedMNIST flags unchanged."""
    if target.startswith(PMC_PREFIX):
        return "pmc-" + Path(target[len(PMC_PREFIX) :]).stem
    return target


class Study:
    """Turns a plan and a run directory into stages; holds where each model and measurement lives.

    Targets are MedMNIST flags, or (for ``medrl recipe``) ``pmc:<train file>`` read from ``pmc_root``.
    """

    def __init__(
        self, plan: StudyPlan, out: Path, root: str | None = None, repo: Path | None = None, pmc_root: str | None = None
    ) -> None:
        self.plan, self.out = plan, out
        self.root, self.pmc_root = root, pmc_root
        self.repo = repo or Path.cwd()
        self.sources: dict[str, bool] = {}  # flag -> synthetic?

    # ---- data -------------------------------------------------------------------------------------------
    def resolve_data(self) -> None:
        """Decide, per flag, whether the official file is there (or can be fetched) or a stand-in is used."""
        if self.root in (None, "") and data_dir() is None:
            # A laptop with a network needs no setup: the official files are fetched into a cache folder.
            self.root = str(default_data_dir())
            print(f"    {DATA_DIR_ENV} is not set and no --root was given: using {self.root} "
                  f"(set {DATA_DIR_ENV} or pass --root to read your own folder)")  # fmt: skip
        root = mf.resolve_root(self.root)
        root.mkdir(parents=True, exist_ok=True)
        record: dict[str, Any] = {}
        for flag in self.plan.flags:
            if flag.startswith(PMC_PREFIX):
                continue  # PMC-VQA rows and images are checked by its DataModule when read
            path = root / mf.file_name(flag, self.plan.size)
            if not path.is_file() and (why := mf.not_a_file(path)):
                raise mf.MedMNISTFileError(why)  # a folder or a dead link where the file goes: fetching won't help
            if not path.is_file():
                try:
                    mf.fetch(flag, self.plan.size, root)
                except mf.MedMNISTFileError as exc:
                    message = (
                        f"{flag}: no official file ({exc.reason}). Place {path.name} (MD5 "
                        f"{mf.official_md5(flag, self.plan.size)}, from {mf.official_url(flag, self.plan.size)}) "
                        f"in {root}."
                    )
                    if self.plan.missing_data == "error":
                        raise mf.MedMNISTFileError(message) from exc
                    print(f"    WARNING {message}\n    -> {flag} runs on a SYNTHETIC stand-in; the report says so.")
            report = mf.verify_file(path) if path.is_file() else None
            if report is not None and report.status == "official":
                record[flag] = {"source": "official", "path": str(path), "md5": report.md5}
                self.sources[flag] = False
            elif report is not None:
                raise mf.MedMNISTFileError(f"{path}: {'; '.join(report.problems)}")
            else:
                # Stand-ins live in the run directory, never beside the user's real files.
                synth = mf.synthesize(flag, self.plan.size, self.out / "data", seed=self.plan.seed)
                record[flag] = {"source": "synthetic", "path": str(synth), "md5": mf.md5sum(synth)}
                self.sources[flag] = True
        atomic_write_json(self.out / "data.json", record)

    def _load_sources(self) -> None:
        if not self.sources and (self.out / "data.json").is_file():
            for flag, rec in json.loads((self.out / "data.json").read_text()).items():
                self.sources[flag] = rec["source"] == "synthetic"

    def data_root(self, flag: str) -> str:
        """The folder a flag's file is read from (synthetic stand-ins live in the run directory)."""
        return str(Path(json.loads((self.out / "data.json").read_text())[flag]["path"]).parent)

    # ---- measuring ----------------------------------------------------------------------------------------
    def eval_dir(self, model_label: str, flag: str) -> Path:
        """Where a measurement lives."""
        return self.out / "eval" / model_label / target_slug(flag)

    def data_config(self, flag: str) -> dict[str, Any]:
        """The VQA DataModule of a target, as a ``class_path``/``init_args`` config (also written for ``medrl fit``)."""
        if flag.startswith(PMC_PREFIX):
            return {
                "class_path": "medrl.data.pmc_vqa.PMCVQADataModule",
                "init_args": {"root": self.pmc_root, "train_file": flag[len(PMC_PREFIX) :], "seed": self.plan.seed},
            }
        self._load_sources()
        return {"class_path": "medrl.data.medmnist.MedMNISTDataModule",
                "init_args": {"flag": flag, "size": self.plan.size, "root": self.data_root(flag),
                              "synthetic": self.sources[flag], "mode": "vqa", "seed": self.plan.seed,
                              "answer_with": self.plan.answer_with}}  # fmt: skip

    def evaluate(self, model: str, model_label: str, flag: str) -> None:
        """Acc@1 and Pass@k of ``model`` on ``flag``'s validation questions, written as an evaluation folder."""
        from medrl.evaluation import evaluate_items, write_outputs
        from medrl.rollout.factory import open_engine
        from medrl.rollout.types import SamplingParams

        s = self.plan.support
        data = self.data_config(flag)
        module, name = data["class_path"].rsplit(".", 1)
        dm = getattr(importlib.import_module(module), name)(**data["init_args"], val_samples=s.questions)
        dataset = dm.dataset("val")
        items = [dataset[i] for i in range(len(dataset))]
        params = SamplingParams(
            n=s.n, temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens,
            seed=self.plan.seed, greedy=True,
        )  # fmt: skip
        # The questions are read (and checked) before the model is loaded: a bad file fails in seconds.
        engine = open_engine(s.engine, model, self.plan.seed, image_options=self.plan.image_options)
        try:
            rows, summary = evaluate_items(engine, items, params, s.ks, s.batch_size, s.image_ablation)
        finally:
            engine.close()
        meta = {"model": model, "label": model_label, "flag": flag, "synthetic": self.sources.get(flag, False)}
        write_outputs(self.eval_dir(model_label, flag), rows, summary, s.ks, meta)

    def eval_stage(self, model_label: str, flag: str, model: str | None = None) -> Stage:
        """A stage measuring one model on one flag (after the stage that trained it)."""
        return Stage(
            f"eval:{model_label}:{flag}",
            f"Acc@1 and Pass@k of {model_label} on {flag}",
            [self.eval_dir(model_label, flag) / "summary.json"],
            lambda: self.evaluate(model or self.model_path(model_label), model_label, flag),
            json_has_keys("metrics", "ks"),
            after=["data"] + ([] if model_label == "base" else [trained_by(model_label)]),
        )

    # ---- training -------------------------------------------------------------------------------------------
    def train_dir(self, model_label: str) -> Path:
        """Where a training run writes."""
        return self.out / "train" / model_label

    def model_path(self, model_label: str) -> str:
        """The exported Hugging Face folder of a trained model (``base`` is the plan's model)."""
        if model_label == "base":
            return self.plan.model
        folder = self.train_dir(model_label)
        if (model := exported_model(folder)) is None:
            raise FileNotFoundError(
                f"{folder}/checkpoints/last.hf: no exported model (merged/ or model/); "
                f"rerun the stage that trains {model_label}"
            )
        return str(model)

    def train(
        self,
        kind: str,
        model_label: str,
        flag: str,
        start: str,
        extra: dict[str, Any] | None = None,
        seed: int | None = None,
        exports: list[int] | None = None,
    ) -> None:
        """Run ``medrl fit`` with the plan's config for ``kind`` (sft or rl) on ``flag`` from ``start``;
        ``extra`` is merged over the plan's overrides (e.g. the Pass@k advantage). ``seed`` (default: the
        plan's) seeds the run, the module and the training data's subset and order; evaluations keep the
        plan's seed, so every seed's model answers the same questions. ``exports``: optimizer steps after
        which the run also exports its model (``steps/step-N.hf``, :class:`StepExports`)."""
        self._load_sources()
        seed = self.plan.seed if seed is None else seed
        train = self.plan.sft if kind == "sft" else self.plan.rl
        folder = self.train_dir(model_label)
        callbacks: list[dict[str, Any]] = [{
            "class_path": "medrl.callbacks.hf_checkpoint.HFCheckpoint",
            "init_args": {"dirpath": str(folder / "checkpoints"), "save_last": True, "save_top_k": 0,
                          "merged": True, "monitor": None, "every_n_train_steps": None},
        }]  # fmt: skip
        if exports:
            callbacks.append({
                "class_path": "medrl.callbacks.step_exports.StepExports",
                "init_args": {"steps": list(exports), "dirpath": str(folder / STEP_EXPORTS), "merged": True},
            })  # fmt: skip
        override = merge_nested(
            merge_nested(train.overrides, extra or {}),
            {
                "seed_everything": seed,
                "trainer": {
                    "default_root_dir": str(folder),
                    "callbacks": callbacks,
                },
                "model": {"init_args": {"model": start, "seed": seed}},
                "data": merge_nested(self.data_config(flag), {"init_args": {"seed": seed}}),
            },
        )  # fmt: skip
        override_path = folder / "override.yaml"
        atomic_write_text(override_path, yaml.safe_dump(override, sort_keys=False))
        command = [sys.executable, "-m", "medrl.cli", "fit", "--config", train.config, "--config", str(override_path)]
        atomic_write_text(folder / "command.txt", shlex.join(command) + "\n")  # pastes back, spaces and all
        with open(folder / "fit.log", "w") as log:
            returncode = run_child(command, self.repo, log)
        if returncode != 0:
            raise child_failure(f"`medrl fit` for {model_label}", returncode, folder / "fit.log")
        self.model_path(model_label)  # fails clearly when the export is missing

    def train_stage(
        self,
        kind: str,
        flag: str,
        start: str = "base",
        label: str | None = None,
        start_label: str | None = None,
        extra: dict[str, Any] | None = None,
        seed: int | None = None,
        cut_from: tuple[str, int] | None = None,
    ) -> Stage:
        """A stage that trains one model (``kind`` sft or rl, from the ``start`` model: base or sft, or from
        ``start_label``'s model) and measures it on its own flag; ``extra`` goes over the plan's overrides.

        ``cut_from=(label, step)``: the model is ``label``'s run after ``step`` optimizer steps, exported by
        that run (same seed, data order and schedule, so the same weights as training ``step`` steps anew);
        it trains only when that export is missing. The first seed's SFT run exports the plan's
        ``boundary_sft_steps``."""
        first = self.plan.training_seeds[0]
        at = first if seed is None else seed
        start_label = start_label or ("base" if start == "base" else seed_label(f"sft_{flag}", at, first))
        label = label or seed_label(f"sft_{flag}" if kind == "sft" else f"rl_{start}_{flag}", at, first)
        exports = self.plan.boundary_sft_steps if kind == "sft" and label == self.rungs_from(flag) else None

        def run() -> None:
            if exported_model(self.train_dir(label)) is None and not (cut_from and self.cut(label, *cut_from)):
                self.train(kind, label, flag, self.model_path(start_label), extra, at, exports)
            self.evaluate(self.model_path(label), label, flag)

        def reset() -> None:
            # Rerunning a finished stage trains anew; the previous run is set aside (outside train/, where the
            # report looks), not deleted.
            # Its evaluation goes with it: it measured the set-aside model, not the one about to be trained.
            aside = self.out / "replaced" / f"{label}-{time.strftime('%Y%m%d-%H%M%S')}"
            for part, moved in ((self.train_dir(label), aside), (self.eval_dir(label, flag), aside / "eval")):
                if part.exists():
                    moved.parent.mkdir(parents=True, exist_ok=True)
                    part.rename(moved)

        what = "SFT" if kind == "sft" else f"GRPO from the {start_label} model"
        cut_note = f" ({cut_from[0]}'s run after step {cut_from[1]}, when it exported it)" if cut_from else ""
        return Stage(
            trained_by(label),
            f"{what} on {flag}{cut_note}, then Acc@1/Pass@k on {flag}",
            [self.eval_dir(label, flag) / "summary.json"],
            run,
            json_has_keys("metrics", "ks"),
            after=["data"]
            + ([] if start_label == "base" else [trained_by(start_label)])
            + ([trained_by(cut_from[0])] if cut_from else []),
            reset=reset,
        )

    def cut(self, label: str, source: str, step: int) -> bool:
        """Give ``label`` the model ``source``'s run exported after ``step`` steps; False when it has none."""
        # lightning and torch load only when a stage needs them
        from medrl.callbacks.step_exports import step_export_dir
        from medrl.models.lora import write_folder

        export = step_export_dir(self.train_dir(source) / STEP_EXPORTS, step)
        if hf_model(export) is None:
            return False
        # Whole or absent, as every export is: a kill mid-copy never leaves a model that looks exported.
        write_folder(self.train_dir(label) / LAST_HF, lambda tmp: shutil.copytree(export, tmp, dirs_exist_ok=True))
        atomic_write_text(
            self.train_dir(label) / "source.txt",
            f"the model of {self.train_dir(source)} after optimizer step {step}, exported by that run (the same "
            f"weights as training {step} steps with its seed, data order and schedule)\n",
        )
        return True

    # ---- the support-boundary sweep ---------------------------------------------------------------------------
    def rungs_from(self, flag: str) -> str:
        """The SFT run the boundary rungs on ``flag`` are cut from: the first training seed's."""
        return f"sft_{flag}"

    def boundary_stages(self, flag: str) -> list[Stage]:
        """The ladder of starting supports on ``flag``: SFT for each of the plan's ``boundary_sft_steps`` (the
        base model and the full SFT run are the ladder's ends), each followed by the study's GRPO budget.

        Each rung is the first seed's SFT run after that many steps, which the run exports as it passes them;
        a rung trains on its own only when that export is missing (a run from before, or a rung beyond the
        run's length)."""
        stages = []
        for steps in self.plan.boundary_sft_steps:
            sft_label, rl_label = f"boundary-sft{steps}_{flag}", f"boundary-rl{steps}_{flag}"
            budget = {"trainer": {"max_steps": steps, "max_epochs": None}}
            cut_from = (self.rungs_from(flag), steps)
            stages.append(self.train_stage("sft", flag, label=sft_label, extra=budget, cut_from=cut_from))
            stages.append(self.train_stage("rl", flag, label=rl_label, start_label=sft_label))
        return stages

    # ---- recipe ---------------------------------------------------------------------------------------------
    def measurement(self, model_label: str, flag: str, step: str) -> Measurement:
        """A finished evaluation read back as the recipe's ``Measurement`` (taken at ``step``)."""
        summary = json.loads((self.eval_dir(model_label, flag) / "summary.json").read_text())
        metrics = summary["metrics"]["all"]
        passes = {k: float(metrics[f"pass@{k}"]) for k in summary["ks"]}
        chance = {k: float(metrics[f"chance@{k}"]) for k in summary["ks"] if f"chance@{k}" in metrics}
        return Measurement(step, model_label, float(metrics["acc@1"]), passes, int(metrics["questions"]), chance)

    def recipe(self, flag: str) -> None:
        """The recipe's decision for one flag, replayed on the measurements the study already took."""
        run_recipe(
            flag, "base", lambda model_label, step: self.measurement(model_label, flag, step),
            sft=lambda _model, _round: f"sft_{flag}",
            rl=lambda model: f"rl_{'sft' if model.startswith('sft') else 'base'}_{flag}",
            tau=self.plan.tau, k=self.plan.flag_k(flag), out=self.out / "recipe" / flag, max_sft_rounds=1,
            support=self.plan.support_measure,
        )  # fmt: skip


def exported_model(folder: Path) -> Path | None:
    """The Hugging Face model a training folder exported (merged LoRA or full), or None before it has."""
    return hf_model(folder / LAST_HF)


def hf_model(hf: Path) -> Path | None:
    """The loadable model in an export folder ``*.hf`` (``merged/`` or ``model/``), or None."""
    return next((hf / sub for sub in ("merged", "model") if (hf / sub / "config.json").is_file()), None)
