"""The report from a hand-written run directory: every section renders, numbers come only from the inputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from medrl.report import build_report
from medrl.report.figures import transfer_matrix
from medrl.report.load import load_run

FLAGS = ["breastmnist", "pneumoniamnist"]
# acc@1 and pass@4 per (model, flag), chosen by hand so every delta below is easy to check.
SCORES = {
    ("base", "breastmnist"): (0.50, 0.70),
    ("base", "pneumoniamnist"): (0.40, 0.60),
    ("sft_breastmnist", "breastmnist"): (0.75, 0.90),
    ("sft_breastmnist", "pneumoniamnist"): (0.45, 0.65),
    ("rl_base_breastmnist", "breastmnist"): (0.55, 0.68),
    ("rl_sft_breastmnist", "breastmnist"): (0.85, 0.90),
}


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    _write(tmp_path / "plan.json", {"name": "unit", "illustrative": True, "flags": FLAGS, "support": {"k": 4}})
    data = {"breastmnist": {"source": "official", "md5": "750601b1f35ba3300ea97c75c52ff8f6"},
            "pneumoniamnist": {"source": "synthetic", "md5": "0123456789abcdef"}}  # fmt: skip
    card = {"code": "abc123", "versions": {"torch": "2.13.0"}, "hardware": {"cpus": 2}, "seed": 0, "data": data}
    _write(tmp_path / "runcard.json", card)
    _write(
        tmp_path / "stages.json",
        {"vision": {"status": "done", "seconds": 12.5}, "support": {"status": "done", "seconds": 30}},
    )
    for (model, flag), (acc, p4) in SCORES.items():
        metrics = {"questions": 32, "acc@1": acc, "pass@1": acc - 0.05, "pass@2": (acc + p4) / 2, "pass@4": p4,
                   "majority": acc, "format_fail": 0.1, "unique": 1.5}  # fmt: skip
        _write(
            tmp_path / "eval" / model / flag / "summary.json",
            {"meta": {}, "ks": [1, 2, 4], "metrics": {"all": metrics}},
        )
    _write(tmp_path / "recipe" / "breastmnist" / "recipe.json", {
        "target": "breastmnist", "tau": 0.8, "k": 4, "final_model": "m",
        "measurements": [{"label": "base", "model": "tiny", "acc1": 0.5, "pass_at_k": {"4": 0.7}, "n_questions": 32}],
        "decisions": [{"action": "sft", "reason": "Pass@4 = 0.700 < tau = 0.800"}],
    })  # fmt: skip
    (tmp_path / "vision").mkdir()
    with open(tmp_path / "vision" / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(
            fh, fieldnames=["encoder", "pretrained", "flag", "size", "image_size", "probe", "acc", "auc", "majority"]
        )
        writer.writeheader()
        writer.writerow({"encoder": "timm:resnet18", "pretrained": "False", "flag": "breastmnist", "size": 28,
                         "image_size": 224, "probe": "sgd", "acc": 0.8123, "auc": 0.85,
                         "majority": 0.7308})  # fmt: skip
    # GRPO logs: from base every group is all wrong (no signal); from SFT rewards rise. Blank reward rows are
    # validation-only rows Lightning writes in the same file.
    for model, rewards in (("rl_base_breastmnist", [0.0] * 6), ("rl_sft_breastmnist", [0.2, 0.4, 0.6, 0.8, 1.0, 1.2])):
        log = tmp_path / "train" / model / "lightning_logs" / "version_0" / "metrics.csv"
        log.parent.mkdir(parents=True)
        with open(log, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["step", "reward/mean", "groups/all_wrong", "groups/all_correct"])
            writer.writeheader()
            for step, reward in enumerate(rewards):
                writer.writerow({"step": step, "reward/mean": reward, "groups/all_wrong": float(reward == 0),
                                 "groups/all_correct": 0.0})  # fmt: skip
            writer.writerow({"step": 6, "reward/mean": "", "groups/all_wrong": "", "groups/all_correct": ""})
    return tmp_path


def test_every_section_renders(run_dir: Path) -> None:
    text = build_report(run_dir).read_text()
    assert text.startswith("**Illustrative numbers.**")
    for heading in (
        "## 1. Vision",
        "## 2-4. Support",
        "## 5. Transfer",
        "## 6. The boundary-aware recipe",
        "## 7. Run card",
    ):
        assert heading in text
    assert "Not run." not in text
    assert "breastmnist official (MD5 `750601b1f35b`); pneumoniamnist **SYNTHETIC stand-in**" in text
    assert "| timm:resnet18 | False | breastmnist | 28 | 224 | sgd | 0.812 | 0.850 | 0.731 |" in text
    # SFT on breast: acc 0.75, pass@4 0.90 -> G_4 = 0.150.
    # No per-question rows and no chance levels in this run: plain values, chance n/a.
    assert "| SFT | 32 | 0.750 | 0.700 | 0.825 | 0.900 | n/a | n/a | 0.150 | 0.750 | 0.100 |" in text
    # Six steps are too few for a trend (n/a), and this run kept no per-question rows (n/a changed answers).
    assert "| rl_base_breastmnist | 6 | 0.000 | 0.000 | n/a | 1.000 | 0.000 | n/a |" in text
    assert "| rl_sft_breastmnist | 6 | 0.600 | 0.800 | n/a | 0.000 | 0.000 | n/a |" in text  # steps 0-4 and 1-5
    assert "**sft**: Pass@4 = 0.700 < tau = 0.800" in text and "`abc123`" in text
    for fig in ("probes", "support_breastmnist", "support_pneumoniamnist", "acc_gap", "transfer", "rl_rewards"):
        png = run_dir / "figures" / f"{fig}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", fig


def test_transfer_deltas_are_against_base(run_dir: Path) -> None:
    rows, cols, deltas = transfer_matrix(load_run(run_dir))
    assert cols == FLAGS
    sft = deltas[rows.index("sft_breastmnist")]
    assert sft == pytest.approx([0.25, 0.05])  # 0.75 - 0.50 on breast, 0.45 - 0.40 on pneumonia
    rl = deltas[rows.index("rl_base_breastmnist")]
    assert rl[0] == pytest.approx(0.05) and rl[1] != rl[1]  # not measured on pneumonia: NaN, shown as n/a


def test_empty_run_says_not_run(tmp_path: Path) -> None:
    text = build_report(tmp_path).read_text()
    assert text.count("Not run.") == 4 and not text.startswith("**Illustrative")


def test_corrupt_json_names_the_file(run_dir: Path) -> None:
    (run_dir / "eval" / "base" / "breastmnist" / "summary.json").write_text("{")
    from medrl.core.errors import UserError

    with pytest.raises(UserError, match="base/breastmnist/summary.json"):  # one line from `medrl report`
        build_report(run_dir)


def test_command_takes_the_run_directory_positionally(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from medrl.cli import main

    (run_dir / "report.md").unlink(missing_ok=True)
    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "report.md").read_text().startswith("**Illustrative numbers.**")
    assert f"wrote {run_dir / 'report.md'}" in capsys.readouterr().out


def _question_rows(greedy: list[int], correct: list[int], options: int = 4, n: int = 4) -> list[dict]:
    return [{"id": f"q{i}", "group": "all", "n": n, "correct": c, "greedy_correct": bool(g), "num_options": options,
             "options": {"ABCDE"[j]: f"option {j}" for j in range(options)}}
            for i, (g, c) in enumerate(zip(greedy, correct, strict=True))]  # fmt: skip


def _findings_run(tmp_path: Path, rl_sft_greedy: list[int]) -> Path:
    """One flag, 60 four-option questions: base near chance, SFT with more support, RL variants as given."""
    from medrl.metrics.intervals import Questions

    q = 60
    models = {
        "base": ([0] * 45 + [1] * 15, [1] * q),  # support at chance level: 1 of 4 samples right
        "sft_breastmnist": ([0] * 30 + [1] * 30, [3] * q),  # SFT raises support
        "rl_base_breastmnist": ([0] * 45 + [1] * 15, [0] * 20 + [1] * 40),  # RL from base lowers it
        "rl_sft_breastmnist": (rl_sft_greedy, [3] * q),
    }
    _write(tmp_path / "plan.json", {"name": "unit", "flags": ["breastmnist"], "support": {"k": 2}})
    for model, (greedy, correct) in models.items():
        rows = _question_rows(greedy, correct)
        folder = tmp_path / "eval" / model / "breastmnist"
        folder.mkdir(parents=True)
        (folder / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        qs = Questions.from_rows(rows)
        metrics = {"questions": q, "acc@1": float(qs.greedy.mean()), "pass@1": float(qs.pass_at(1).mean()),
                   "pass@2": float(qs.pass_at(2).mean()), "chance@1": 0.25, "chance@2": 7 / 16}  # fmt: skip
        _write(folder / "summary.json", {"meta": {}, "ks": [1, 2], "metrics": {"all": metrics}})
    return tmp_path


@pytest.mark.parametrize(
    ("rl_sft_greedy", "verdict"),
    [
        ([0] * 10 + [1] * 50, "this run supports it"),  # 0.50 -> 0.83: RL after SFT raises Acc@1
        ([0] * 50 + [1] * 10, "this run contradicts it"),  # 0.50 -> 0.17
        ([0] * 29 + [1] * 31, "this run can't tell"),  # 0.50 -> 0.52, one question
        ([0] * 30 + [1] * 30, "this run finds no effect larger than +-0.05"),  # the same answers: 0 [0, 0]
    ],
)
def test_findings_read_their_verdicts_from_the_numbers(tmp_path: Path, rl_sft_greedy, verdict) -> None:
    text = build_report(_findings_run(tmp_path, rl_sft_greedy)).read_text()
    first = next(line for line in text.splitlines() if line.startswith("- **RL raises Acc@1 when support is high**"))
    assert verdict in first, first
    weak = next(line for line in text.splitlines() if line.startswith("- **RL on weak support"))
    assert "this run supports it" in weak and "support above chance (Pass@2)" in weak  # 40 of 60 fell to 0 right
    sft = next(line for line in text.splitlines() if line.startswith("- **SFT raises Pass@k"))
    assert ("this run supports it" in sft) == (verdict == "this run supports it")
    assert "| SFT then RL (vs SFT) |" in text and "[95% CI]" in text
    assert "interval half-width 0." in first
    assert "(the Acc@1 change's: 0." in weak and "(the Acc@1 change's: 0." in sft and "and Acc@1 by" in sft


def test_a_stand_in_flag_gives_no_verdict(tmp_path: Path) -> None:
    run = _findings_run(tmp_path, [0] * 10 + [1] * 50)
    for summary in run.glob("eval/*/breastmnist/summary.json"):
        data = json.loads(summary.read_text())
        data["meta"]["synthetic"] = True
        summary.write_text(json.dumps(data))
    text = build_report(run).read_text()
    assert "- **RL raises Acc@1" not in text
    assert "Left out of the pooled findings (synthetic stand-ins): breastmnist." in text


def test_boundary_section_fits_the_datas_tau(tmp_path: Path) -> None:
    """Three rungs on one flag: RL gains nothing from the base, a little from a short SFT, a lot from the full one."""
    from medrl.metrics.intervals import Questions

    q, flag = 80, "breastmnist"
    right = lambda m: [1] * m + [0] * (q - m)  # noqa: E731
    models = {  # label: (greedy right, samples right of 4)
        "base": (right(20), [1] * q),
        "rl_base_breastmnist": (right(20), [1] * q),
        "boundary-sft10_breastmnist": (right(30), [2] * q),
        "boundary-rl10_breastmnist": (right(34), [2] * q),
        "sft_breastmnist": (right(40), [3] * q),
        "rl_sft_breastmnist": (right(70), [3] * q),
    }
    _write(tmp_path / "plan.json", {"name": "unit", "flags": [flag], "support": {"k": 2}, "tau": 0.6,
                                    "boundary_sft_steps": [10]})  # fmt: skip
    for model, (greedy, correct) in models.items():
        rows = _question_rows(greedy, correct)
        folder = tmp_path / "eval" / model / flag
        folder.mkdir(parents=True)
        (folder / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        qs = Questions.from_rows(rows)
        metrics = {"questions": q, "acc@1": float(qs.greedy.mean()), "pass@2": float(qs.pass_at(2).mean()),
                   "chance@2": 7 / 16}  # fmt: skip
        _write(folder / "summary.json", {"meta": {}, "ks": [2], "metrics": {"all": metrics}})
    text = build_report(tmp_path).read_text()
    assert "## 5b. The support boundary" in text
    finding = next(line for line in text.splitlines() if line.startswith("- **RL helps most when"))
    assert "this run supports it" in finding  # +0.375 from the full SFT start against +0.000 from the base
    assert "; interval half-width 0." in finding  # every finding states its precision
    # Starting supports (above chance at k=2): base 1 right of 4 -> pass@2 1/2 -> (1/2 - 7/16) / (9/16) = 1/9.
    assert "| base | 80 | 0.111 [0.11, 0.11] | +0.000 [+0.00, +0.00] |" in text
    # From the base RL gains nothing; from SFT 10 steps +0.05 (4 more right, none fewer: the paired interval
    # stays above 0) and from the full SFT +0.375: tau = the SFT-10 rung's support. 2 of 4 samples right:
    # pass@2 = 1 - C(2,2)/C(4,2) = 5/6, above chance (5/6 - 7/16) / (9/16) = 19/27.
    assert f"The data's tau: {19 / 27:.3f} (the recipe's: 0.6)" in text
    assert "| SFT 10 steps | 80 | 0.704 [0.70, 0.70] | +0.050 [+0.01, +0.10] |" in text
    for name in ("boundary_breastmnist", "boundary_pooled"):
        assert (tmp_path / "figures" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_a_second_training_seed_enters_the_values_and_the_intervals(tmp_path: Path) -> None:
    """The same run with the SFT then RL model trained from a second seed that gained less."""
    run = _findings_run(tmp_path, [0] * 10 + [1] * 50)
    plan = json.loads((run / "plan.json").read_text())
    _write(run / "plan.json", {**plan, "seeds": [0, 1]})
    single = build_report(run).read_text()
    for model, greedy in (("sft_breastmnist-s1", [0] * 30 + [1] * 30), ("rl_sft_breastmnist-s1", [0] * 26 + [1] * 34)):
        rows = _question_rows(greedy, [3] * 60)
        folder = run / "eval" / model / "breastmnist"
        folder.mkdir(parents=True)
        (folder / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        metrics = {"questions": 60, "acc@1": sum(greedy) / 60, "pass@1": 0.75, "pass@2": 1.0, "chance@1": 0.25,
                   "chance@2": 7 / 16}  # fmt: skip
        _write(folder / "summary.json", {"meta": {}, "ks": [1, 2], "metrics": {"all": metrics}})
    text = build_report(run).read_text()
    assert "| SFT then RL (2 seeds) | 60 | 0.700 [" in text  # (50 + 34) / 120 right
    first = next(line for line in text.splitlines() if line.startswith("- **RL raises Acc@1"))
    assert "2 training seeds" in first and "+0.200 [" in first  # each seed against its own SFT model
    assert "trained from 2 seeds (0, 1)" in text and "2 training seeds" not in single


def test_k_room_reads_each_flag_where_chance_leaves_room(tmp_path: Path) -> None:
    from medrl.study.plan import load_plan

    run = _findings_run(tmp_path, [0] * 10 + [1] * 50)
    _write(run / "plan.json", {"name": "unit", "flags": ["breastmnist"], "support": {"k": "room"}})
    text = build_report(run).read_text()
    # 4-option questions with 4 samples each: ks 1, 2, 4; chance@4 = 0.68 <= 0.75, so k = 4.
    assert "breastmnist k = 4" in text and "| chance@4 |" in text
    assert "support above chance (Pass@k at each flag's k" in text
    plan = tmp_path / "plan.yaml"
    plan.write_text("flags: [breastmnist, bloodmnist, retinamnist]\nsupport: {k: room}\n")
    loaded = load_plan(plan)
    assert [loaded.flag_k(f) for f in loaded.flags] == [2, 4, 4]  # 2 options; 4 of 8 classes; 4 of 5 grades


def test_the_reward_trend_and_the_share_of_changed_greedy_answers() -> None:
    from medrl.report.build import _changed_answers, _trend
    from medrl.report.load import RunResults

    rising = [{"reward/mean": str(0.02 * step)} for step in range(40)]
    flat = [{"reward/mean": str(1.0 + 0.01 * (step % 2))} for step in range(40)]
    assert _trend(rising).startswith("rising (+0.200)") and _trend(flat).startswith("plateaued")
    results = RunResults(root=Path("."))
    rows = lambda letters: [{"id": f"q{i}", "greedy": g} for i, g in enumerate(letters)]  # noqa: E731
    results.questions = {"sft_breastmnist-s1": {"breastmnist": rows("ABAB")},
                         "rl_sft_breastmnist-s1": {"breastmnist": rows("ABBB")}}  # fmt: skip
    assert _changed_answers(results, "rl_sft_breastmnist-s1") == "0.250"
    assert _changed_answers(results, "rl_base_breastmnist") == "n/a"  # the base was not evaluated here
