"""Each trained model of a study carries its study: the report's rows for it go into its model card.

The report stage writes, into the card of every model a training stage exported (``train/<label>/checkpoints/
last.hf/{merged,model,adapter}/README.md``), a ``## Study evaluation`` section: the model's Acc@1 and Pass@k
with 95 % intervals, chance, and image reliance on every flag it was evaluated on. The report lists the cards.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from medrl.core.tables import markdown_table
from medrl.metrics.intervals import image_reliance, interval
from medrl.models.model_card import CARD, STUDY_SECTION, set_study_section
from medrl.report.load import RunResults

EXPORT_PARTS = ("merged", "model", "adapter")


def card_folders(results: RunResults, label: str) -> list[Path]:
    """The exported folders of one trained model (several parts of one export each have a card)."""
    hf = results.root / "train" / label / "checkpoints" / "last.hf"
    return [hf / part for part in EXPORT_PARTS if (hf / part / CARD).is_file()]


def reliance_text(results: RunResults, label: str, flag: str) -> str:
    """A model's image reliance on a flag with its 95 % interval (over seeds too), or n/a when not measured."""
    sets = results.question_sets(label, flag)
    found = image_reliance(sets) if sets else None
    return "n/a" if found is None or math.isnan(found.value) else found.text(signed=True)


def study_section(results: RunResults, label: str, k: int | str) -> str | None:
    """The ``## Study evaluation`` section of one model: a row per flag it was evaluated on."""
    rows = []
    for flag in sorted(results.evals.get(label, {})):
        sets = results.question_sets(label, flag)
        if not sets:
            continue
        at = results.k_for(flag, k)
        chance = results.metric(label, flag, f"chance@{at}")
        rows.append([flag, str(int(results.metric(label, flag, "questions") or 0)), interval(sets, "acc@1").text(),
                     str(at), interval(sets, f"pass@{at}").text(), "n/a" if chance is None else f"{chance:.3f}",
                     reliance_text(results, label, flag)])  # fmt: skip
    if not rows:
        return None
    name = results.plan.get("name", results.root.name)
    return "\n".join([
        STUDY_SECTION, "",
        f"From the study `{name}` (`medrl reproduce`): 95 % bootstrap intervals over questions. Image reliance is "
        "Acc@1 with each question's own image minus with another question's (0: the answers ignore the image).",
        "",
        *markdown_table(["flag", "questions", "Acc@1", "k", "Pass@k", "chance@k", "image reliance"], rows),
    ])  # fmt: skip


def write_study_cards(results: RunResults, k: int | str) -> list[tuple[str, Path]]:
    """Put each trained model's study section into its cards; ``(label, card)`` of every card written."""
    written = []
    for label in sorted(results.evals):
        if label == "base" or not card_folders(results, label):
            continue
        section = study_section(results, label, k)
        if section is None:
            continue
        for folder in card_folders(results, label):
            written.append((label, set_study_section(folder, section)))
    return written


def cards_lines(results: RunResults, written: list[tuple[str, Path]]) -> list[str]:
    """The report's list of model cards, linked by their path in the run folder."""
    if not written:
        return []
    lines = ["Model cards (each with its rows of this report): "]
    links = [f"[{label} ({path.parent.name})]({os.path.relpath(path, results.root)})" for label, path in written]
    return [lines[0] + ", ".join(links) + ".", ""]
