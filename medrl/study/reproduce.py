"""``medrl reproduce``: the whole study from one command, narrated, resumable, ending in ``report.md``."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Sequence
from pathlib import Path

from medrl.core.errors import ConfigError
from medrl.core.io import atomic_write_json
from medrl.study.plan import StudyPlan, claim_run_dir, load_plan, with_model
from medrl.study.probe_table import probe_heads
from medrl.study.runcard import run_card
from medrl.study.runner import Stage, StageRunner, expected_times, json_has_keys, run_lock, stop_on_sigterm
from medrl.study.stages import Study

PLANS = Path(__file__).resolve().parents[2] / "configs" / "study"


def _probe_cells_done(plan: StudyPlan):
    expected = len(plan.vision.encoders) * len(plan.flags) * len(probe_heads(plan.vision.optimizer, plan.vision.lr))

    def check(paths: Sequence[Path]) -> bool:
        with open(paths[0], newline="") as fh:
            heads = {(row["spec"], row["flag"], row["probe"], row.get("lr") or "") for row in csv.DictReader(fh)}
        return len(heads) >= expected

    return check


def build_stages(study: Study) -> list[Stage]:
    """The study in order: data, vision, support, SFT, RL, transfer, the boundary sweep, recipe, report."""
    plan, out = study.plan, study.out

    def vision() -> None:
        from medrl.study.probe_table import probe_table

        study._load_sources()
        for flag in plan.flags:  # one call per flag: each may come from a different folder (stand-ins)
            probe_table(
                encoders=plan.vision.encoders, flags=[flag], sizes=[plan.size], out=str(out / "vision"),
                root=study.data_root(flag), synthetic=study.sources[flag], optimizer=plan.vision.optimizer,
                lr=plan.vision.lr, max_epochs=plan.vision.max_epochs, train_samples=plan.vision.train_samples,
                test_samples=plan.vision.test_samples, seed=plan.seed,
            )  # fmt: skip

    stages = [
        Stage("data", "check the MedMNIST files the study reads (official, else a declared stand-in)",
              [out / "data.json"], study.resolve_data, json_has_keys(*plan.flags)),
        Stage("vision", "linear probes: can the frozen encoders see each task?",
              [out / "vision" / "results.csv"], vision, _probe_cells_done(plan), after=["data"]),
    ]  # fmt: skip
    stages += [study.eval_stage("base", flag) for flag in plan.flags]
    stages += [study.train_stage("sft", flag) for flag in plan.flags]
    stages += [study.train_stage("rl", flag, start=start) for start in plan.rl_from for flag in plan.flags]
    for seed in plan.training_seeds[1:]:  # the same models again from other seeds: training noise, measured
        stages += [study.train_stage("sft", flag, seed=seed) for flag in plan.flags]
        stages += [study.train_stage("rl", flag, start=s, seed=seed) for s in plan.rl_from for flag in plan.flags]
    trained = [f"sft_{f}" for f in plan.flags] + [f"rl_{s}_{f}" for s in plan.rl_from for f in plan.flags]
    if plan.transfer:
        stages += [study.eval_stage(m, f) for m in trained for f in plan.flags if not m.endswith(f"_{f}")]
    if plan.boundary_sft_steps:  # the ladder of starting supports, RL from each rung
        stages += [stage for flag in plan.flags for stage in study.boundary_stages(flag)]
    if "sft" in plan.rl_from and "base" in plan.rl_from:
        stages += [
            Stage(f"recipe:{flag}", f"the recipe's decision for {flag} (tau {plan.tau}, k {plan.flag_k(flag)})",
                  [out / "recipe" / flag / "recipe.json"], lambda flag=flag: study.recipe(flag),
                  json_has_keys("decisions", "measurements"),
                  after=[f"eval:base:{flag}", f"sft:sft_{flag}", f"rl:rl_base_{flag}", f"rl:rl_sft_{flag}"])
            for flag in plan.flags
        ]  # fmt: skip

    def report() -> None:
        from medrl.report import build_report

        write_run_card(out, plan)  # the report's run card and data sources are read from it
        build_report(out)

    # The report reads every output before it.
    stages.append(Stage("report", "report.md and its figures", [out / "report.md"], report,
                        after=[stage.name for stage in stages]))  # fmt: skip
    return stages


def reproduce(
    scale: str = "cpu",
    plan: str | None = None,
    out: str | None = None,
    root: str | None = None,
    dry_run: bool = False,
    force: str | list[str] | None = None,
    model: str | None = None,
) -> int:
    """Run the whole study: probes, zero-shot support, SFT, GRPO, transfer, the recipe, then the report.

    Each stage says what it is for, what it writes and how long it took; a rerun skips stages whose
    outputs check out; a failure keeps earlier outputs and says how to resume.

    Args:
        scale: the plan in configs/study/ to run: cpu (a laptop, tiny model, minutes) or paper (GPUs).
        plan: a plan file instead of --scale.
        out: run directory (default: runs/study-<scale>).
        root: MedMNIST folder (default: $MEDRL_DATA_DIR).
        dry_run: print the plan and every stage (with its outputs and configs) without running anything.
        force: stages to rerun even if their outputs exist, comma-separated: a full name (`eval:base:breastmnist`)
            or a group (`sft`, `rl`, `eval`, `recipe`, `report`: every stage of it). Stages that read a forced
            stage's outputs run again too; a forced training stage trains anew (the old run is set aside).
        model: run the plan on this base model instead of the plan's: a tiny id (``tiny:gemma3``), a folder,
            a hub id, or a model fragment (``configs/models/medgemma_4b.yaml``: its dtype, image and LoRA
            settings go into every training stage). The vision stage probes its tower; the run folder
            defaults to ``runs/study-<plan>-<model>``.
    """
    plan_path = Path(plan) if plan else PLANS / f"{scale}.yaml"
    if not plan_path.is_file():
        raise ConfigError(
            f"medrl reproduce: no plan {plan_path}; scales: {sorted(p.stem for p in PLANS.glob('*.yaml'))}"
        )
    study_plan = load_plan(plan_path)
    if model:
        study_plan = with_model(study_plan, model)
    run_dir = Path(out or f"runs/study-{study_plan.name}")
    study = Study(study_plan, run_dir, root=root)
    stages = build_stages(study)
    forced = _forced(stages, force)
    if dry_run:
        return _dry_run(study, stages, plan_path)
    resume = f"medrl reproduce --plan {plan_path} --out {run_dir}" + (f" --model {model}" if model else "")
    with run_lock(run_dir, resume), stop_on_sigterm():
        claim_run_dir(run_dir, study_plan, "medrl reproduce")
        start = time.perf_counter()
        print(f"medrl reproduce: plan {plan_path} -> {run_dir} ({len(stages)} stages)")
        try:
            StageRunner(run_dir, resume_hint=resume, expected=expected_times(plan_path, run_dir)).run(stages, forced)
        except Exception:
            return 1  # the runner has printed the error, the end of its traceback and the command that resumes
        finally:
            write_run_card(run_dir, study_plan)  # also after a failure: what ran, on what, with which versions
    print(f"report: {run_dir / 'report.md'} ({time.perf_counter() - start:.0f}s)")
    return 0


def _forced(stages: list[Stage], force: str | list[str] | None) -> list[str]:
    """Stage names selected by ``--force`` (names or groups); an unknown name is an error that lists the choices."""
    wanted = [w.strip() for w in (force.split(",") if isinstance(force, str) else force or []) if w.strip()]
    names = [stage.name for stage in stages]
    picked = [n for n in names if any(n == w or n.split(":")[0] == w for w in wanted)]
    unknown = [w for w in wanted if not any(n == w or n.split(":")[0] == w for n in names)]
    if unknown:
        groups = sorted({n.split(":")[0] for n in names})
        raise ConfigError(f"medrl reproduce: --force {','.join(unknown)} names no stage; groups: {', '.join(groups)}; "
                         f"stages: see `medrl reproduce --dry_run true`")  # fmt: skip
    return picked


def write_run_card(run_dir: Path, plan: StudyPlan) -> None:
    """Write ``RUN/runcard.json``: code revision, versions, hardware, seed, scale and the data actually read."""
    path = run_dir / "data.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    atomic_write_json(run_dir / "runcard.json", run_card(seed=plan.seed, scale=plan.name, data=data))


def _dry_run(study: Study, stages: list[Stage], plan_path: Path) -> int:
    from medrl.study.configs import check_configs

    plan = study.plan
    print(f"plan {plan_path} ({plan.name}): model {plan.model}; flags {', '.join(plan.flags)} at {plan.size}px")
    s = plan.support
    print(f"support: n={s.n} ks={s.ks} T={s.temperature} top_p={s.top_p} engine={s.engine}; tau={plan.tau} k={s.k}")
    for kind, train in (("sft", plan.sft), ("rl", plan.rl)):
        config = check_configs([train.config])  # the experiment config must parse against the code
        print(f"{kind}: {train.config} ({config.fit.model.class_path}) + overrides {train.overrides}")
    for i, stage in enumerate(stages, 1):
        outputs = ", ".join(str(p.relative_to(study.out)) for p in stage.outputs)
        print(f"{i:>3}. {stage.name}: {stage.purpose}\n       writes {outputs}")
    print(f"dry run: {len(stages)} stages planned into {study.out}; nothing was run")
    return 0
