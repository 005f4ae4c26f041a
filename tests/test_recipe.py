"""The recipe's decision rule and its record, driven by measurement sequences worked out by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medrl.rl.recipe import Measurement, decide, run_recipe


def _m(label: str, acc1: float, s8: float) -> Measurement:
    return Measurement(label, f"model-{label}", acc1, {1: acc1, 8: s8}, n_questions=50)


def test_threshold_is_inclusive() -> None:
    assert decide(_m("x", 0.3, 0.6), tau=0.6, k=8).action == "rl"  # S_8 == tau: support is there
    assert decide(_m("x", 0.3, 0.5999), tau=0.6, k=8).action == "sft"


def test_unmeasured_k_and_bad_tau_are_clear_errors() -> None:
    with pytest.raises(KeyError, match="Pass@16 was not measured"):
        decide(_m("x", 0.3, 0.6), tau=0.5, k=16)
    with pytest.raises(ValueError, match="tau"):
        decide(_m("x", 0.3, 0.6), tau=60, k=8)


def _run(tmp_path: Path, script: list[Measurement], max_sft_rounds: int = 1):
    queue, calls = list(script), []

    def measure(model: str, label: str) -> Measurement:
        calls.append(("measure", model, label))
        m = queue.pop(0)
        return Measurement(label, model, m.acc1, m.pass_at_k, m.n_questions)

    def sft(model: str, round_: int) -> str:
        calls.append(("sft", model))
        return f"{model}+sft{round_}"

    def rl(model: str) -> str:
        calls.append(("rl", model))
        return f"{model}+rl"

    record = run_recipe("pneumoniamnist", "base", measure, sft, rl, 0.6, 8, tmp_path, max_sft_rounds)
    return record, calls


def test_low_support_goes_through_sft_then_rl(tmp_path: Path) -> None:
    record, calls = _run(tmp_path, [_m("a", 0.30, 0.45), _m("b", 0.40, 0.70), _m("c", 0.62, 0.72)])
    assert [c[0] for c in calls] == ["measure", "sft", "measure", "rl", "measure"]
    assert [d.action for d in record.decisions] == ["sft", "rl"]
    assert record.final_model == "base+sft1+rl"
    saved = json.loads((tmp_path / "recipe.json").read_text())
    assert [m["label"] for m in saved["measurements"]] == ["base", "after_sft_1", "after_rl"]
    md = (tmp_path / "recipe.md").read_text()
    assert "| after_rl | `base+sft1+rl` | 0.620 | 0.720 | +0.100 | 50 |" in md


def test_high_support_goes_straight_to_rl(tmp_path: Path) -> None:
    record, calls = _run(tmp_path, [_m("a", 0.5, 0.9), _m("b", 0.8, 0.9)])
    assert [c[0] for c in calls] == ["measure", "rl", "measure"]
    assert record.decisions[0].action == "rl"


def test_support_that_stays_low_stops_after_the_sft_budget(tmp_path: Path) -> None:
    record, calls = _run(tmp_path, [_m("a", 0.2, 0.3), _m("b", 0.25, 0.4), _m("c", 0.3, 0.5)], max_sft_rounds=2)
    assert [c[0] for c in calls] == ["measure", "sft", "measure", "sft", "measure"]
    assert [d.action for d in record.decisions] == ["sft", "sft", "stop"]
    assert "did not reach tau" in record.decisions[-1].reason
    assert record.final_model == "base+sft1+sft2"


def test_the_passk_branch_widens_non_zero_support_before_sft(tmp_path: Path) -> None:
    queue = [_m("a", 0.20, 0.30), _m("b", 0.30, 0.65), _m("c", 0.50, 0.70)]
    calls: list[str] = []

    def measure(model: str, label: str) -> Measurement:
        m = queue.pop(0)
        return Measurement(label, model, m.acc1, m.pass_at_k, m.n_questions)

    def step(name: str):
        return lambda model, *_: (calls.append(name), f"{model}+{name}")[1]

    record = run_recipe("pathmnist", "base", measure, step("sft"), step("rl"), 0.6, 8, tmp_path, rl_passk=step("passk"))
    # 0 < 0.30 < 0.6: GRPO with the Pass@k advantage; 0.65 >= 0.6: RL to sharpen; no SFT.
    assert calls == ["passk", "rl"] and [d.action for d in record.decisions] == ["rl_passk", "rl"]
    assert [m.label for m in record.measurements] == ["base", "after_rl_passk", "after_rl"]
    assert "GRPO with the Pass@k advantage" in record.decisions[0].reason


def test_the_passk_branch_is_tried_once_and_never_on_zero_support() -> None:
    zero, some = _m("z", 0.0, 0.0), _m("s", 0.1, 0.3)
    assert decide(zero, 0.6, 8, passk_branch=True).action == "sft"  # nothing to widen: bridge with SFT
    assert decide(some, 0.6, 8, passk_branch=True).action == "rl_passk"
    assert decide(some, 0.6, 8).action == "sft"
