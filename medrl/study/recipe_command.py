"""``medrl recipe``: the boundary-aware recipe run for real on one target (a MedMNIST flag or PMC-VQA).

Measure support (Pass@k) and Acc@1 of a model on the target's validation questions; while support is below
tau, fine-tune on the bridging data (SFT) and measure again; once it reaches tau, run GRPO on the target and
measure again. Training and measuring reuse the study's stages (:class:`medrl.study.stages.Study`), so each
step leaves the same folders as ``medrl reproduce`` (``train/<label>/`` with its command and config,
``eval/<label>/<flag>/``), and a rerun skips steps whose outputs are already there.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from medrl.core.errors import ConfigError
from medrl.data.medmnist_files import FLAGS_2D as FLAGS
from medrl.rl.recipe import Measurement, RecipeRecord, run_recipe
from medrl.study.plan import TrainPlan, claim_run_dir, load_plan, with_model
from medrl.study.reproduce import PLANS
from medrl.study.runner import run_lock, stop_on_sigterm
from medrl.study.stages import PMC_PREFIX, Study, exported_model, target_slug

# GRPO with the Pass@k-aware advantage (medrl.rl.advantages), for the recipe's optional branch.
PASSK = {"model": {"init_args": {"loss": {"advantage_estimator": "grpo_passk"}}}}


def recipe(
    target: str,
    model: str | None = None,
    bridge: str | None = None,
    scale: str = "cpu",
    plan: str | None = None,
    out: str | None = None,
    root: str | None = None,
    pmc_root: str | None = None,
    tau: float | None = None,
    support_measure: Literal["adjusted", "raw"] | None = None,
    k: int | None = None,
    n: int | None = None,
    questions: int | None = None,
    sft_config: str | None = None,
    rl_config: str | None = None,
    max_sft_rounds: int = 1,
    passk_branch: bool = False,
) -> int:
    """Run the boundary-aware recipe: measure support; SFT while Pass@k < tau; GRPO once Pass@k >= tau.

    Every measurement and decision, with its reason, is written to OUT/recipe.json and OUT/recipe.md.
    Settings not given here come from the study plan (--scale or --plan).

    Args:
        target: what to adapt to: a MedMNIST flag, or ``pmc:<train file>`` for PMC-VQA (training on that file,
            e.g. the JSONL of `medrl data pmc-subset`; support measured on the validation file). Its
            validation questions are the support set.
        model: the starting model: a tiny id, a Hugging Face folder or hub id, or a model fragment
            (``configs/models/*.yaml``, whose dtype, image and LoRA settings go into SFT and GRPO; default:
            the plan's model).
        bridge: the data SFT trains on when support is low, a flag or ``pmc:<file>`` (default: the target).
        scale: the plan in configs/study/ whose settings fill in the rest: cpu or paper.
        plan: a plan file instead of --scale.
        out: run directory (default: runs/recipe-<target>).
        root: MedMNIST folder (default: $MEDRL_DATA_DIR).
        pmc_root: PMC-VQA folder (default: $MEDRL_DATA_DIR/pmc_vqa).
        tau: the support threshold on Pass@k (default: the plan's).
        support_measure: compare tau with Pass@k above chance (adjusted) or raw Pass@k (default: the plan's,
            adjusted).
        k: the k of Pass@k compared with tau (default: the plan's).
        n: samples per question (default: the plan's; must be >= k).
        questions: validation questions measured (default: the plan's).
        sft_config: the SFT experiment config (default: the plan's, with its overrides).
        rl_config: the GRPO experiment config (default: the plan's, with its overrides).
        max_sft_rounds: SFT rounds allowed before the recipe stops short of tau.
        passk_branch: on non-zero support below tau, try GRPO with the Pass@k advantage (grpo_passk) once before
            SFT: it rewards the rare sample that reaches the answer, for targets without bridging data.
    """
    for name, flag in (("target", target), ("bridge", bridge)):
        if flag is not None and flag not in FLAGS and not (flag.startswith(PMC_PREFIX) and len(flag) > len(PMC_PREFIX)):
            raise ConfigError(
                f"medrl recipe: --{name} {flag!r} is not a MedMNIST 2D flag ({', '.join(FLAGS)}) "
                f"nor {PMC_PREFIX}<train file> for PMC-VQA"
            )
    base = load_plan(Path(plan) if plan else PLANS / f"{scale}.yaml")
    if model:
        base = with_model(base, model)
    support = dataclasses.replace(
        base.support,
        **{key: value for key, value in (("k", k), ("n", n), ("questions", questions)) if value is not None},
    )
    if support.k != "room" and support.n < support.k:
        raise ConfigError(f"medrl recipe: n={support.n} samples cannot estimate Pass@{support.k}; pass --n >= --k")
    support.ks = sorted({j for j in [*base.support.ks, *([support.k] if support.k != "room" else [])]
                         if j <= support.n})  # fmt: skip
    bridge = bridge or target
    study_plan = dataclasses.replace(
        base,
        name=f"recipe-{target_slug(target)}",
        flags=list(dict.fromkeys([target, bridge])),
        support=support,
        tau=base.tau if tau is None else tau,
        support_measure=support_measure or base.support_measure,
        sft=TrainPlan(sft_config, {}) if sft_config else base.sft,
        rl=TrainPlan(rl_config, {}) if rl_config else base.rl,
    )
    run_dir = Path(out or f"runs/recipe-{target_slug(target)}")
    at = study_plan.flag_k(target)  # `k: room` resolves to the target's k with room above chance
    with run_lock(run_dir, f"medrl recipe --target {target} --out {run_dir}"), stop_on_sigterm():
        claim_run_dir(run_dir, study_plan, "medrl recipe")
        study = Study(study_plan, run_dir, root=root, pmc_root=pmc_root)
        print(f"medrl recipe: {study_plan.model} on {target} (tau {study_plan.tau} on Pass@{at}) -> {run_dir}")
        study.resolve_data()
        labels = {study_plan.model: "base"}

        def measure(model_path: str, step: str) -> Measurement:
            label = labels[model_path]
            if not (study.eval_dir(label, target) / "summary.json").is_file():
                print(f"  measuring {label} on {target}: {support.questions} questions x {support.n} samples")
                study.evaluate(model_path, label, target)
            found = study.measurement(label, target, step)
            print(f"  {step}: Acc@1 {found.acc1:.3f}, Pass@{at} {found.support(at):.3f}")
            return found

        def train(kind: str, label: str, flag: str, start: str, extra: dict | None = None) -> str:
            if exported_model(study.train_dir(label)) is None:
                print(
                    f"  {kind.upper()} {label} on {flag} from {labels[start]} (log: {study.train_dir(label)}/fit.log)"
                )
                study.train(kind, label, flag, start, extra)
            path = study.model_path(label)
            labels[path] = label
            return path

        record: RecipeRecord = run_recipe(
            target, study_plan.model, measure,
            sft=lambda current, rnd: train("sft", f"sft_{rnd}", bridge, current),
            rl=lambda current: train("rl", f"rl_{labels[current]}", target, current),
            tau=study_plan.tau, k=at, out=run_dir, max_sft_rounds=max_sft_rounds,
            support=study_plan.support_measure,
            rl_passk=(lambda current: train("rl", f"rl_passk_{labels[current]}", target, current, PASSK))
            if passk_branch else None,
        )  # fmt: skip
        for decision in record.decisions:
            print(f"  decision {decision.action}: {decision.reason}")
        print(f"final model: {record.final_model}\nwrote {run_dir / 'recipe.json'} and {run_dir / 'recipe.md'}")
        return 0
