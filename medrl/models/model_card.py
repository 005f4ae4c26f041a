"""The model card (``README.md`` in the Hugging Face format) of every folder medrl exports.

A card has a YAML header the hub reads (``base_model``, ``library_name``, ``pipeline_tag: image-text-to-text``,
``tags`` with the method, ``datasets`` and ``license`` where known) and a body that says what was trained
(SFT or GRPO and the options that matter), on what data (files named with their MD5, split sizes), from which
base, with which medrl version and code revision, how well it did when the run evaluated it, and the command
that reproduces it. It names no local path: a base given as a folder is named by the folder's own name, a
config by its path inside the run folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medrl.core.io import atomic_write_text
from medrl.core.tables import markdown_table

CARD = "README.md"
STUDY_SECTION = "## Study evaluation"  # written by `medrl reproduce`, replaced (not added again) on a rerun


@dataclass
class CardFacts:
    """What a card says; every field is optional but ``method``.

    Attributes:
        method: ``SFT`` or ``GRPO``.
        kind: ``model`` (full weights), ``merged`` (an adapter merged into its base) or ``adapter`` (PEFT).
        base: the base model argument as given (a hub id, a tiny id, or a folder).
        options: the training options that matter, by name (``sampling.num_generations``: 8, ``lr``: 1e-5).
        steps: optimizer steps trained.
        data: data facts by name (``flag``, ``train questions``, ``file breastmnist.npz (MD5)``).
        datasets: hub dataset ids the data came from.
        license: the base model's licence, when its card says it.
        version: the medrl version.
        revision: the git commit of the code.
        evaluation: rows of ``{"group", "questions", "acc@1", ...}`` (the Pass@K callback's summary).
        commands: shell commands that reproduce the model, run from the run folder.
    """

    method: str
    kind: str = "model"
    base: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    steps: int | None = None
    data: dict[str, Any] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    license: str | None = None
    version: str = ""
    revision: str = ""
    evaluation: list[dict[str, Any]] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)


def _is_hub_id(name: str) -> bool:
    from medrl.models.hub import is_hub_id  # torch comes with it: not at import, for `medrl export --help`

    return is_hub_id(name) and not Path(name).exists()


def public_name(base: str) -> str:
    """A base model as a card may name it: a hub id or tiny id as is, a local folder by its own name."""
    if not base or _is_hub_id(base) or base.startswith("tiny"):
        return base
    return Path(base).name


def base_license(base: str | os.PathLike) -> str | None:
    """The ``license`` in the card of a base model folder, when it has one."""
    readme = Path(base) / CARD
    if not readme.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(readme).data.to_dict().get("license")
    except Exception:  # noqa: BLE001 - a base's malformed card only costs the licence line
        return None


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _evaluation_table(rows: list[dict[str, Any]]) -> list[str]:
    metrics = [k for k in ("acc@1", *(k for k in rows[0] if k.startswith("pass@")), "chance@1", "image_reliance")
               if any(k in r for r in rows)]  # fmt: skip
    table = []
    for row in rows:
        cells = [str(row.get("group", "all")), str(int(row.get("questions", 0)))]
        for key in metrics:
            value = row.get(key)
            lo, hi = row.get(f"{key}_lo"), row.get(f"{key}_hi")
            text = "n/a" if value is None else f"{value:+.3f}" if key == "image_reliance" else f"{value:.3f}"
            cells.append(text + (f" [{lo:+.2f}, {hi:+.2f}]" if lo is not None and hi is not None else ""))
        table.append(cells)
    return markdown_table(["questions of", "n", *metrics], table)


def render_card(facts: CardFacts) -> str:
    """The card's text: YAML header and body."""
    from huggingface_hub import ModelCardData

    base = public_name(facts.base)
    data = ModelCardData(
        base_model=base if _is_hub_id(base) else None,
        library_name="peft" if facts.kind == "adapter" else "transformers",
        pipeline_tag="image-text-to-text",
        tags=[
            "medrl",
            facts.method.lower(),
            "medical",
            "vision-language",
            *(["lora"] if facts.kind != "model" else []),
        ],
        datasets=facts.datasets or None,
        license=facts.license,
    )
    what = {"adapter": "a LoRA adapter", "merged": "a LoRA adapter merged into its base", "model": "full weights"}
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {facts.method} of {base or 'a vision-language model'} ({what.get(facts.kind, facts.kind)})",
        "",
        f"Trained with medrl {facts.version or '(unknown version)'}"
        + (f", code revision `{facts.revision}`" if facts.revision else "")
        + (f", {facts.steps} optimizer steps" if facts.steps is not None else "")
        + ". The answers follow the `<think>...</think><answer>"
        + ("OPTION TEXT" if facts.options.get("answer_with") == "text" else "LETTER")
        + "</answer>` format of multiple-choice VQA.",
        "",
        "## Training",
        "",
        *markdown_table(
            ["option", "value"],
            [
                ["method", facts.method],
                ["base model", base or "n/a"],
                *([k, _value(v)] for k, v in facts.options.items()),
            ],
        ),  # fmt: skip
        "",
        "## Data",
        "",
        *(
            markdown_table(["data", "value"], [[k, _value(v)] for k, v in facts.data.items()])
            if facts.data
            else ["Not recorded."]
        ),
        "",
        "## Evaluation",
        "",
        *(_evaluation_table(facts.evaluation) if facts.evaluation else ["Not evaluated during training."]),
        "",
    ]
    if facts.commands:
        lines += ["## Reproduce", "", "From the run folder:", "", "```", *facts.commands, "```", ""]
    loader = (
        "from peft import PeftModel\nfrom transformers import AutoModelForImageTextToText, AutoProcessor\n\n"
        f'base = AutoModelForImageTextToText.from_pretrained("{base or "BASE"}")\n'
        'model = PeftModel.from_pretrained(base, "THIS_FOLDER")\n'
        'processor = AutoProcessor.from_pretrained("THIS_FOLDER")'
        if facts.kind == "adapter"
        else "from transformers import AutoModelForImageTextToText, AutoProcessor\n\n"
        'model = AutoModelForImageTextToText.from_pretrained("THIS_FOLDER")\n'
        'processor = AutoProcessor.from_pretrained("THIS_FOLDER")'
    )
    lines += ["## Use", "", "```python", loader, "```", ""]
    return "\n".join(lines)


def is_medrl_card(card: str) -> bool:
    """Whether a README is a card medrl wrote (its tags hold ``medrl``), not a library's stub."""
    from huggingface_hub import ModelCard

    try:
        return "medrl" in (ModelCard(card).data.to_dict().get("tags") or [])
    except Exception:  # noqa: BLE001 - an unparseable README is not medrl's card
        return False


def as_merged(card: str) -> str:
    """An adapter's card as the card of that adapter merged into its base (header, title and loading code)."""
    from huggingface_hub import ModelCard

    parsed = ModelCard(card)
    parsed.data.library_name = "transformers"
    text = parsed.text.replace("(a LoRA adapter)", "(a LoRA adapter merged into its base)", 1)
    start, end = text.find("## Use"), len(text)
    use = [
        "## Use", "", "```python", "from transformers import AutoModelForImageTextToText, AutoProcessor", "",
        'model = AutoModelForImageTextToText.from_pretrained("THIS_FOLDER")',
        'processor = AutoProcessor.from_pretrained("THIS_FOLDER")', "```", "",
    ]  # fmt: skip
    text = (text[:start] if start >= 0 else text) + "\n".join(use) + (text[end:] if start < 0 else "")
    return f"---\n{parsed.data.to_yaml()}\n---\n{text}"


def write_card(folder: str | os.PathLike, facts: CardFacts) -> Path:
    """Write ``folder/README.md`` atomically."""
    return atomic_write_text(Path(folder) / CARD, render_card(facts))


def set_study_section(folder: str | os.PathLike, section: str) -> Path:
    """Put ``section`` (markdown starting with :data:`STUDY_SECTION`) into the card of ``folder``, replacing an
    earlier one, before its ``## Reproduce`` (or at the end)."""
    path = Path(folder) / CARD
    text = path.read_text() if path.is_file() else ""
    if STUDY_SECTION in text:  # drop the old one: from its heading to the next heading of the same level
        head, _, rest = text.partition(STUDY_SECTION)
        after = rest.find("\n## ")
        text = head.rstrip() + "\n\n" + (rest[after + 1 :] if after >= 0 else "")
    anchor = text.find("## Reproduce")
    block = section.rstrip() + "\n\n"
    text = text[:anchor] + block + text[anchor:] if anchor >= 0 else text.rstrip() + "\n\n" + block
    return atomic_write_text(path, text)
