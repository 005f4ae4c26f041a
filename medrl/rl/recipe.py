"""The boundary-aware recipe: measure support, bridge it with SFT while it is low, sharpen with RL once high.

Support is Pass@K (S_k) on a small validation set of the target task; Acc@1 (A) is greedy accuracy. If
``S_k < tau`` the recipe runs SFT on the bridging data and measures again (up to ``max_sft_rounds``
times); once ``S_k >= tau`` it runs RL and measures again. The paper leaves ``tau`` open, so it is a
parameter, and every measurement and decision is recorded with its reason (JSON and markdown).

The measuring and training steps are passed in as callables, so the same logic drives the CLI (which
runs ``medrl fit`` and the evaluator) and the tests (which run the real tiny model on real data).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from medrl.core.io import atomic_write_json, atomic_write_text
from medrl.metrics.chance import adjusted


@dataclass(frozen=True)
class Measurement:
    """Acc@1 and Pass@k of one model on the target's validation set.

    Args:
        label: when it was taken (``base``, ``after_sft_1``, ``after_rl``).
        model: the model argument measured.
        acc1: greedy accuracy in [0, 1].
        pass_at_k: unbiased Pass@k in [0, 1] per k.
        n_questions: validation questions scored.
        chance: Pass@k of answering a random offered letter, per k (empty when the option counts are unknown).
    """

    label: str
    model: str
    acc1: float
    pass_at_k: dict[int, float]
    n_questions: int
    chance: dict[int, float] = field(default_factory=dict)

    def support(self, k: int) -> float:
        """S_k, with a clear error when k was not measured."""
        if k not in self.pass_at_k:
            raise KeyError(f"Pass@{k} was not measured (have k in {sorted(self.pass_at_k)}); add it to the ks")
        return self.pass_at_k[k]

    def adjusted_support(self, k: int) -> float | None:
        """S_k above chance, ``(S_k - chance_k) / (1 - chance_k)``; None when chance was not measured."""
        chance = self.chance.get(k)
        return None if chance is None else adjusted(self.support(k), chance)

    def gap(self, k: int) -> float:
        """G_k = Pass@k - Acc@1: how much of the support greedy decoding leaves unused."""
        return self.support(k) - self.acc1


@dataclass(frozen=True)
class Decision:
    """What the recipe does next and why."""

    action: Literal["sft", "rl", "rl_passk", "stop"]
    reason: str


SupportMeasure = Literal["adjusted", "raw"]


def decide(
    measurement: Measurement, tau: float, k: int, passk_branch: bool = False, support: SupportMeasure = "adjusted"
) -> Decision:
    """SFT when support is below ``tau``, RL once it is at or above; with ``passk_branch``, support that is
    non-zero but below ``tau`` goes to GRPO with the Pass@k advantage first (``rl_passk``): it rewards the
    rare sample that reaches the answer, which is how support grows without bridging data.

    ``support="adjusted"`` (the default) compares the support above chance with ``tau``: on 2-option
    questions a random letter already has Pass@8 = 0.996, so raw Pass@k would call any model supported.
    Without a measured chance level the raw Pass@k is used, and the reason says so.

    >>> m = Measurement("base", "tiny", acc1=0.40, pass_at_k={8: 0.55}, n_questions=100)
    >>> decide(m, tau=0.7, k=8).action
    'sft'
    >>> decide(m, tau=0.5, k=8).reason.split(":")[0]
    'Pass@8 = 0.550 (raw'
    >>> coin = Measurement("base", "tiny", acc1=0.5, pass_at_k={8: 0.97}, n_questions=64, chance={8: 0.996})
    >>> decide(coin, tau=0.6, k=8).action  # 0.97 raw, but below what guessing gets
    'sft'
    """
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau is a pass rate and must be in [0, 1], got {tau}")
    raw = measurement.support(k)
    above = measurement.adjusted_support(k) if support == "adjusted" else None
    if above is None:
        s, name = raw, f"Pass@{k} = {raw:.3f}" + (" (raw: no chance level measured)" if support == "adjusted" else "")
    else:
        s, name = above, f"Pass@{k} above chance = {above:.3f} (raw {raw:.3f}, chance {measurement.chance[k]:.3f})"
    if s < tau and passk_branch and s > 0:
        return Decision(
            "rl_passk", f"0 < {name} < tau = {tau:.3f}: some support; GRPO with the Pass@k advantage to widen it"
        )
    if s < tau:
        return Decision("sft", f"{name} < tau = {tau:.3f}: support is low; SFT to bridge it")
    return Decision(
        "rl",
        f"{name} >= tau = {tau:.3f}: support is there; RL to sharpen "
        f"(Acc@1 {measurement.acc1:.3f}, gap G_{k} = {measurement.gap(k):.3f})",
    )


@dataclass
class RecipeRecord:
    """Every measurement and decision of one recipe run, in order."""

    target: str
    tau: float
    k: int
    support: SupportMeasure = "adjusted"
    measurements: list[Measurement] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    final_model: str = ""

    def to_markdown(self) -> str:
        """A short human-readable account of the run."""
        lines = [
            f"# Boundary-aware recipe: {self.target}",
            "",
            f"tau = {self.tau}, K = {self.k}, support compared with tau: {self.support} Pass@K"
            + (" (above chance)" if self.support == "adjusted" else ""),
            "",
            f"| step | model | Acc@1 | Pass@{self.k} | G_{self.k} | questions |",
            "|---|---|---|---|---|---|",
        ]
        for m in self.measurements:
            lines.append(
                f"| {m.label} | `{m.model}` | {m.acc1:.3f} | {m.support(self.k):.3f} | {m.gap(self.k):+.3f} "
                f"| {m.n_questions} |"
            )
        lines += ["", "Decisions:", ""] + [f"{i}. **{d.action}**: {d.reason}" for i, d in enumerate(self.decisions, 1)]
        return "\n".join(lines) + f"\n\nFinal model: `{self.final_model}`\n"

    def save(self, out: Path) -> None:
        """Write ``recipe.json`` and ``recipe.md`` atomically."""
        atomic_write_json(out / "recipe.json", asdict(self))
        atomic_write_text(out / "recipe.md", self.to_markdown())


def run_recipe(
    target: str,
    model: str,
    measure: Callable[[str, str], Measurement],
    sft: Callable[[str, int], str],
    rl: Callable[[str], str],
    tau: float,
    k: int,
    out: Path,
    max_sft_rounds: int = 1,
    rl_passk: Callable[[str], str] | None = None,
    support: SupportMeasure = "adjusted",
) -> RecipeRecord:
    """Run the recipe from ``model`` and record it under ``out`` (saved after every step).

    Args:
        target: what is being adapted to (a MedMNIST flag or a PMC-VQA subset), for the record.
        model: the starting model argument.
        measure: ``(model, label) -> Measurement`` on the target's validation set.
        sft: ``(model, round) -> new model`` fine-tunes on the bridging data.
        rl: ``model -> new model`` runs GRPO on the target.
        tau: support threshold on Pass@k.
        k: the k of Pass@k compared with tau.
        out: folder for ``recipe.json`` / ``recipe.md``.
        max_sft_rounds: SFT rounds allowed before the recipe gives up on reaching tau.
        rl_passk: ``model -> new model`` runs GRPO with the Pass@k advantage; given, the recipe tries it once
            on non-zero support below tau before SFT (:func:`decide`'s ``passk_branch``).
        support: compare tau with Pass@k above chance (``adjusted``) or with raw Pass@k (``raw``).
    """
    record = RecipeRecord(target=target, tau=tau, k=k, support=support)
    current = model
    measurement = measure(current, "base")
    record.measurements.append(measurement)
    rounds, passk_rounds = 0, 0
    while True:
        decision = decide(measurement, tau, k, rl_passk is not None and passk_rounds == 0, support)
        if decision.action == "sft" and rounds >= max_sft_rounds:
            decision = Decision(
                "stop",
                f"{decision.reason}, but {rounds} SFT round(s) did not reach tau: RL on weak support gains "
                f"little, so the recipe stops here (raise max_sft_rounds or widen the bridging data)",
            )
        record.decisions.append(decision)
        record.save(out)
        if decision.action == "stop":
            break
        if decision.action == "rl_passk":
            passk_rounds += 1
            current = rl_passk(current)  # type: ignore[misc]
            measurement = measure(current, "after_rl_passk")
            record.measurements.append(measurement)
            continue
        if decision.action == "sft":
            rounds += 1
            current = sft(current, rounds)
            measurement = measure(current, f"after_sft_{rounds}")
            record.measurements.append(measurement)
            continue
        current = rl(current)
        record.measurements.append(measure(current, "after_rl"))
        break
    record.final_model = current
    record.save(out)
    return record
