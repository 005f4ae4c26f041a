"""Assemble ``report.md`` and ``figures/*.png`` from a run directory (``medrl report RUN_DIR``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import medrl.report.boundary as boundary
import medrl.report.figures as figures
from medrl.core.io import atomic_write_bytes, atomic_write_text
from medrl.core.tables import markdown_table
from medrl.metrics.intervals import image_reliance, interval, paired_change, reliance_sentence
from medrl.report.cards import cards_lines, reliance_text, write_study_cards
from medrl.report.findings import CHANGES, DELTA, change, findings, metric_name, support_metric
from medrl.report.load import RunResults, load_run

ILLUSTRATIVE = (
    "**Illustrative numbers.** This run used the CPU scale: small models trained from scratch on small files. "
    "The numbers exercise every stage of the study; they are not the paper's results."
)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _vision(results: RunResults, figs: dict[str, bytes]) -> list[str]:
    lines = ["## 1. Vision: can the model's eyes see it?", ""]
    if not results.probe_rows:
        return lines + ["Not run.", ""]
    cols = ["encoder", "pretrained", "flag", "size", "image_size", "probe", "acc", "auc", "majority"]
    rows = [
        [r.get(c, "") if c not in ("acc", "auc", "majority") else _fmt(float(r[c])) for c in cols]
        for r in results.probe_rows
    ]
    figs["probes.png"] = figures.probe_chart(results)
    lines += markdown_table(cols, rows)
    lines += ["", "Test-split ACC/AUC exactly as the medmnist Evaluator; `majority` is the test-set majority rate.", ""]
    return lines + ["![probes](figures/probes.png)", ""]


def _ci(results: RunResults, label: str, flag: str, metric: str) -> str:
    """A metric of one model with its 95 % interval (bootstrap over questions, and over training seeds where
    the plan ran several), or its plain value."""
    sets = results.question_sets(label, flag)
    return interval(sets, metric).text() if sets else _fmt(_seed_mean(results, label, flag, metric))


def _seed_mean(results: RunResults, label: str, flag: str, metric: str) -> float | None:
    """A summary metric of one model, averaged over its training seeds."""
    values = [results.metric(m, flag, metric) for m in results.seed_labels(label, flag) or [label]]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _support_row(results: RunResults, stage: str, flag: str, ks: list[int], k: int) -> list[str] | None:
    label = figures.model_label(stage, flag)
    if flag not in results.evals.get(label, {}):
        return None
    mean = lambda metric: _seed_mean(results, label, flag, metric)  # noqa: E731
    acc, sup = mean("acc@1"), mean(f"pass@{k}")
    gap = None if acc is None or sup is None else sup - acc
    seeds = len(results.seed_labels(label, flag))
    return [
        figures.STAGE_NAMES[stage] + (f" ({seeds} seeds)" if seeds > 1 else ""),
        f"{int(results.metric(label, flag, 'questions') or 0)}",
        _ci(results, label, flag, "acc@1"),
        *[_ci(results, label, flag, f"pass@{j}") if j == k else _fmt(mean(f"pass@{j}")) for j in ks],
        _fmt(mean(f"chance@{k}")),
        _ci(results, label, flag, f"adj_pass@{k}") if mean(f"chance@{k}") is not None else "n/a",
        _fmt(gap),
        _fmt(mean("majority")),
        _fmt(mean("format_fail")),
        reliance_text(results, label, flag),
    ]


def _reliance_sentences(results: RunResults) -> list[str]:
    """One sentence per model and flag: whether its answers depend on the image (the image-ablation control)."""
    lines = []
    for stage in figures.STAGE_MODELS:
        for flag in results.flags:
            label = figures.model_label(stage, flag)
            sets = results.question_sets(label, flag)
            found = image_reliance(sets) if sets else None
            if found is None or math.isnan(found.value):
                continue
            said = reliance_sentence({"image_reliance": found.value, "image_reliance_lo": found.lo,
                                      "image_reliance_hi": found.hi})  # fmt: skip
            lines.append(f"- {figures.STAGE_NAMES[stage]} on {flag}: {said}")
    return (["Image reliance (Acc@1 with the right image minus with another question's image, paired 95 % "
             "interval):", "", *lines, ""] if lines else [])  # fmt: skip


def _changes(results: RunResults, flag: str, k: int) -> list[str]:
    """The paired before/after changes on one flag's questions, each with its interval."""
    support = support_metric(results, k)
    rows = []
    for after, before, name in CHANGES:
        cells = []
        for metric in ("acc@1", f"pass@{k}", support) if support != f"pass@{k}" else ("acc@1", f"pass@{k}"):
            found = change(results, after, before, metric, [flag])
            cells.append(
                "n/a" if found is None else found[0].text(signed=True) + (" (spans 0)" if found[0].spans_zero else "")
            )
        if any(c != "n/a" for c in cells):
            rows.append([f"{name} (vs {figures.STAGE_NAMES[before]})", *cells])
    if not rows:
        return []
    header = ["change", "Acc@1", f"Pass@{k}", *([f"above chance@{k}"] if support != f"pass@{k}" else [])]
    return ["Paired changes on the same questions, 95 % bootstrap intervals:", "", *markdown_table(header, rows), ""]


def _seeds_note(results: RunResults) -> str:
    """What the intervals cover, by how many training seeds the plan ran."""
    seeds = list(results.plan.get("seeds") or [])
    if len(seeds) > 1:
        listed = ", ".join(map(str, seeds))
        return (f"Each trained model was trained from {len(seeds)} seeds ({listed}) and measured on the same "
                "questions: values are means over seeds, and intervals resample seeds, then questions (the "
                "transfer table, the boundary sweep and the recipe use the first seed's models).")  # fmt: skip
    return "One training seed per model: the intervals cover question sampling, not training noise."


def _support(results: RunResults, figs: dict[str, bytes], k: int | str) -> list[str]:
    lines = ["## 2-4. Support and sampling efficiency, before and after SFT and RL", ""]
    if not results.flags:
        return lines + ["Not run.", ""]
    found = findings(results, k, delta=float(results.plan.get("delta", DELTA)))
    if found:
        lines += [f"- {f.sentence()}" for f in found] + [""]
    if results.stand_in_flags:
        lines += [f"Left out of the pooled findings (synthetic stand-ins): {', '.join(results.stand_in_flags)}.", ""]
    lines += _reliance_sentences(results)
    lines += [
        "Intervals: 95 % percentile bootstrap over questions (2,000 resamples; paired for changes). Chance: what "
        "answering a random offered letter scores, 1 - (1 - 1/m)^k per question with m options; above chance = "
        "(Pass@k - chance) / (1 - chance), 0 for guessing. " + _seeds_note(results),
        "",
    ]
    if k == "room":
        lines += ["Each flag's support is read at the k that leaves room above chance (chance@k <= 0.75): "
                  + ", ".join(f"{flag} k = {results.k_for(flag, k)}" for flag in results.flags) + ".", ""]  # fmt: skip
    flag_ks = {flag: results.k_for(flag, k) for flag in results.flags}
    for flag in results.flags:
        k = flag_ks[flag]  # noqa: PLW2901 - one flag's k from here on
        ks = results.ks("base", flag) or next((results.ks(m, flag) for m in results.evals if results.ks(m, flag)), [])
        passes = [f"pass@{j} [95% CI]" if j == k else f"pass@{j}" for j in ks]
        header = ["model", "questions", "acc@1 [95% CI]", *passes, f"chance@{k}", f"above chance@{k} [95% CI]",
                  f"G_{k}", "majority vote", "format fail", "image reliance [95% CI]"]  # fmt: skip
        rows = [_support_row(results, stage, flag, ks, k) for stage in figures.STAGE_MODELS]
        rows = [r for r in rows if r is not None]
        figs[f"support_{flag}.png"] = figures.support_curves(results, flag)
        lines += [
            f"### {flag}",
            "",
            *markdown_table(header, rows),
            "",
            *_changes(results, flag, k),
            f"![support {flag}](figures/support_{flag}.png)",
            "",
        ]
    figs["acc_gap.png"] = figures.acc_gap_bars(results, flag_ks)
    shown = "G_k at each flag's k" if len(set(flag_ks.values())) > 1 else f"G_{next(iter(flag_ks.values()))}"
    return lines + [f"Acc@1 and the gap {shown} per modality:", "", "![acc and gap](figures/acc_gap.png)", ""]


def _mean(rows: list[dict[str, str]], key: str) -> float | None:
    values = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
    return sum(values) / len(values) if values else None


def _trend(log: list[dict[str, str]]) -> str:
    """Whether a GRPO run's mean reward was still rising: its last quarter against the quarter before, the
    difference set against twice its standard error (per-step rewards as independent draws)."""
    rewards = [float(r["reward/mean"]) for r in log if r.get("reward/mean") not in (None, "")]
    q = len(rewards) // 4
    if q < 2:
        return "n/a"
    last, prev = rewards[-q:], rewards[-2 * q : -q]
    diff = sum(last) / q - sum(prev) / q
    var = sum((x - sum(last) / q) ** 2 for x in last) / (q - 1) + sum((x - sum(prev) / q) ** 2 for x in prev) / (q - 1)
    se = math.sqrt(var / q)
    return f"{'rising' if diff > 2 * se else 'plateaued'} ({diff:+.3f})"


def _started_from(label: str) -> tuple[str, str] | None:
    """``(model RL started from, flag)`` of an RL model label (``rl_sft_breastmnist-s1`` -> ``sft_breastmnist-s1``)."""
    body, _, seed = label.removeprefix("rl_").partition("-")
    start, _, flag = body.partition("_")
    if start not in ("base", "sft") or not flag:
        return None
    return ("base" if start == "base" else f"sft_{flag}" + (f"-{seed}" if seed else "")), flag


def _changed_answers(results: RunResults, label: str) -> str:
    """The share of questions whose greedy answer RL changed (same questions, before and after)."""
    found = _started_from(label)
    if found is None:
        return "n/a"
    before, flag = found
    old = {r["id"]: r.get("greedy") for r in results.questions.get(before, {}).get(flag, [])}
    new = {r["id"]: r.get("greedy") for r in results.questions.get(label, {}).get(flag, [])}
    shared = [i for i in new if i in old]
    return f"{sum(old[i] != new[i] for i in shared) / len(shared):.3f}" if shared else "n/a"


def _rl_signal(results: RunResults, figs: dict[str, bytes]) -> list[str]:
    """What each GRPO run had to learn from, whether its reward was still rising, and what it changed."""
    if not results.rl_logs:
        return []
    rows = [
        [model, str(len(log)), *(_fmt(_mean(part, "reward/mean")) for part in (log[:5], log[-5:])), _trend(log),
         *(_fmt(_mean(log, f"groups/{key}")) for key in ("all_wrong", "all_correct")), _changed_answers(results, model)]
        for model, log in results.rl_logs.items()
    ]  # fmt: skip
    header = ["RL model", "steps", "mean reward, first 5", "mean reward, last 5", "last quarter vs the one before",
              "groups all wrong", "groups all right", "greedy answers RL changed"]  # fmt: skip
    figs["rl_rewards.png"] = figures.reward_curves(results)
    return [
        "### What RL had to learn from, and what it changed",
        "",
        *markdown_table(header, rows),
        "",
        "A group whose samples are all wrong (or all right) has zero advantage and gives GRPO no gradient: where "
        "the base model has no support, RL from it has nothing to reinforce. 'Rising' means the last quarter's "
        "mean reward beat the quarter before by more than twice its standard error; the last column is the share "
        "of evaluation questions whose greedy answer differs from the model RL started from.",
        "",
        "![reward curves](figures/rl_rewards.png)",
        "",
    ]


def _transfer(results: RunResults, figs: dict[str, bytes]) -> list[str]:
    lines = ["## 5. Transfer across modalities", ""]
    rows, cols, deltas = figures.transfer_matrix(results)
    if not rows or "base" not in results.evals:
        return lines + ["Not run.", ""]
    figs["transfer.png"] = figures.transfer_heatmap(results)

    def cell(model: str, flag: str, delta: float) -> str:
        before, after = results.question_set("base", flag), results.question_set(model, flag)
        if before is None or after is None or math.isnan(delta):
            return "n/a" if math.isnan(delta) else f"{delta:+.3f}"
        return paired_change(before, after, "acc@1").text(signed=True)

    body = [[r, *(cell(r, f, v) for f, v in zip(cols, d, strict=True))] for r, d in zip(rows, deltas, strict=True)]
    lines += ["Change in Acc@1 against the base model on the same questions, with paired 95 % intervals (rows: "
              "trained model; columns: evaluated modality).", ""]  # fmt: skip
    return lines + markdown_table(["model", *cols], body) + ["", "![transfer](figures/transfer.png)", ""]


def _recipe(results: RunResults) -> list[str]:
    lines = ["## 6. The boundary-aware recipe", ""]
    if not results.recipes:
        return lines + ["Not run.", ""]
    rows = []
    for flag, rec in results.recipes.items():
        k = rec["k"]

        def said(m: dict, k: int = k) -> str:
            raw, chance = m["pass_at_k"][str(k)], (m.get("chance") or {}).get(str(k))
            above = "" if chance is None else f", above chance {(raw - chance) / (1 - chance):.3f}"
            return f"{m['label']} (A {m['acc1']:.3f}, S_{k} {raw:.3f}{above})"

        path = " -> ".join(said(m) for m in rec["measurements"])
        decisions = "; ".join(f"**{d['action']}**: {d['reason']}" for d in rec["decisions"])
        rows.append([flag, str(rec["tau"]), path, decisions])
    compared = {rec.get("support", "raw") for rec in results.recipes.values()}
    notes = {"adjusted": "tau is compared with the support above chance", "raw": "tau is compared with raw Pass@k"}
    note = notes[next(iter(compared))] if len(compared) == 1 else "tau comparisons differ by target"
    return (
        lines
        + [f"{note.capitalize()}.", ""]
        + markdown_table(["target", "tau", "measurements", "decisions"], rows)
        + [""]
    )


def _data_sources(results: RunResults) -> list[str]:
    data = results.runcard.get("data") or {}
    if not data:
        return []
    parts = [
        f"{flag} {'**SYNTHETIC stand-in**' if rec.get('source') == 'synthetic' else 'official'} "
        f"(MD5 `{rec.get('md5', '?')[:12]}`)"
        for flag, rec in data.items()
    ]
    return ["Data: " + "; ".join(parts) + ".", ""]


def _runcard(results: RunResults) -> list[str]:
    lines = ["## 7. Run card", ""]
    card = results.runcard
    if card:
        versions = ", ".join(f"{k} {v}" for k, v in card.get("versions", {}).items())
        hw = card.get("hardware", {})
        lines += [f"- code: `{card.get('code') or 'unknown'}`", f"- versions: {versions}",
                  f"- hardware: {hw.get('cpu', '?')} ({hw.get('cpus', '?')} cores, {hw.get('memory_gib', '?')} GiB), "
                  f"GPUs: {', '.join(hw.get('gpus', [])) or 'none'}"]  # fmt: skip
        for key in ("seed", "scale"):
            if key in card:
                lines.append(f"- {key}: `{card[key]}`")
    plan = results.plan
    for kind in ("sft", "rl"):  # the experiment configs behind the trained models, as the plan ran them
        train = plan.get(kind) or {}
        if train.get("config"):
            overrides = json.dumps(train.get("overrides", {}))
            lines.append(f"- {kind} config: `{train['config']}` with overrides `{overrides}`")
    if plan:
        lines.append("- the full plan: `plan.json`; each trained model's command and merged config: "
                     "`train/<model>/command.txt`, `train/<model>/override.yaml`")  # fmt: skip
    if results.log_dirs:
        rows = [[model, f"[{folder}/]({folder}/)"] for model, folder in results.log_dirs.items()]
        lines += [
            "",
            "Training logs (`metrics.csv`, TensorBoard events, completions, Pass@K evaluations); "
            "`tensorboard --logdir train` shows them side by side:",
            "",
            *markdown_table(["model", "logs"], rows),
        ]
    if results.stages:

        def status(name: str, rec: dict) -> str:  # the report stage is running while it writes this table
            return "this report" if name == "report" and rec.get("status") == "running" else rec.get("status", "?")

        rows = [[name, status(name, rec), f"{rec.get('seconds', 0):.1f}"] for name, rec in results.stages.items()]
        total = sum(rec.get("seconds", 0) for rec in results.stages.values())
        lines += [
            "",
            *markdown_table(["stage", "status", "seconds"], rows),
            "",
            f"Total wall time of stages: {total:.0f} s",
        ]
    return lines + [""]


def _boundary(results: RunResults, figs: dict[str, bytes], k: int | str) -> list[str]:
    """Section 5b: RL's gain against the support it started from, per modality and pooled, and the data's tau."""
    if not any(len(boundary.rungs(results, f)) > 2 for f in results.flags):
        return []
    support = support_metric(results, k)
    tau = results.plan.get("tau")
    lines = ["## 5b. The support boundary: RL's gain against the starting support", ""]
    flags = [f for f in results.flags if len(boundary.rungs(results, f)) > 2]
    delta = float(results.plan.get("delta", DELTA))
    if (found := boundary.boundary_finding(results, flags, delta)) is not None:
        lines += [f"- {found.sentence()}", ""]
    lines += [
        f"Each rung is a starting model (the base, SFT for a few steps, the full SFT run) and the same GRPO budget "
        f"from it; starting support is {metric_name(support)}. The data's tau: the lowest starting support from "
        f"which every rung gains Acc@1 reliably (interval above zero). The recipe's tau is {tau}.",
        "",
    ]
    for name, group in [*((f, [f]) for f in flags), ("pooled", flags)]:
        result = boundary.sweep(results, group, support)
        if not result:
            continue
        data_tau = boundary.estimated_tau(result)
        rows = [[r.rung.name, str(r.questions), r.support.text(), r.acc_change.text(signed=True),
                 r.support_change.text(signed=True)] for r in result]  # fmt: skip
        title = f"{name}: RL's change against starting support" + (f" ({', '.join(group)})" if name == "pooled" else "")
        figs[f"boundary_{name}.png"] = boundary.plot(result, title, data_tau, tau)
        lines += [
            f"### {name}",
            "",
            *markdown_table(
                ["start", "questions", "start support [95% CI]", "RL's change in Acc@1", "RL's change in support"], rows
            ),  # fmt: skip
            "",
            f"The data's tau: {boundary.fmt_tau(data_tau)} (the recipe's: {tau}).",
            "",
            f"![boundary {name}](figures/boundary_{name}.png)",
            "",
        ]
    return lines


def build_report(run_dir: str | Path, unfinished: list[str] | None = None) -> Path:
    """Write ``RUN/report.md`` and ``RUN/figures/*.png`` from the run's own outputs; returns the report path.

    ``unfinished``: the plan's stages that have not finished, named at the top of the report.
    """
    results = load_run(run_dir)
    planned = results.plan.get("support", {}).get("k", 0)
    k: int | str = (
        planned
        if planned == "room"
        else int(planned or 0)
        or max((max(results.ks(m, f)) for m in results.evals for f in results.evals[m] if results.ks(m, f)), default=1)
    )
    figs: dict[str, bytes] = {}
    lines = [ILLUSTRATIVE, ""] if results.plan.get("illustrative", False) else []
    if unfinished:
        lines += [
            f"**Unfinished study.** {len(unfinished)} planned stages have not finished, and their sections read "
            f"'not run': {', '.join(unfinished)}.",
            "",
        ]
    lines += [f"# Study report: {results.plan.get('name', results.root.name)}", ""] + _data_sources(results)
    lines += _vision(results, figs) + _support(results, figs, k) + _rl_signal(results, figs) + _transfer(results, figs)
    lines += _boundary(results, figs, k)
    lines += _recipe(results) + _runcard(results)
    lines += cards_lines(results, write_study_cards(results, k))
    for name, data in figs.items():
        atomic_write_bytes(results.root / "figures" / name, data)
    return atomic_write_text(results.root / "report.md", "\n".join(lines))
