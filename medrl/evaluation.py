"""Acc@1 / Pass@K evaluation of a VLM on VQA items: sample, score, summarise, write.

Shared by the Pass@K callback (during validation), ``medrl eval`` (a model, zero-shot) and the study's
evaluations. The flow is
``items -> Engine.generate(n samples + greedy) -> parse_answer -> PassAtK -> files``, where the files of one
evaluation are, in one folder: ``questions.jsonl`` (one row per question), ``summary.json``, ``summary.md``
(a table per modality) and ``pass_at_k.png`` (Pass@k against k, Acc@1 as a dashed line), each written
atomically.

The image-ablation control: with ``swapped`` items (:func:`swap_images`: each question with another
question's image, seeded, from a question with another gold answer when there is one) every question is also
answered greedily with the wrong image. **Image reliance** is Acc@1 with the right image minus Acc@1 with the
swapped one, with a paired 95 % interval over questions (:func:`add_image_reliance`; read in words by
:func:`medrl.metrics.intervals.reliance_sentence`): a model that ignores the image gives the same answers both
ways and a reliance of exactly 0.
"""

from __future__ import annotations

import io
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medrl.core.env import show_progress
from medrl.core.io import atomic_write_bytes, atomic_write_json, atomic_write_jsonl, atomic_write_text
from medrl.core.tables import markdown_table
from medrl.data.collate import item_images
from medrl.metrics.answers import text_options
from medrl.metrics.intervals import Questions, image_reliance
from medrl.metrics.pass_at_k import PassAtK, QuestionScore, score_question
from medrl.rollout.engine import Engine
from medrl.rollout.types import Item, SamplingParams

ALL = "all"


def default_ks(n: int) -> list[int]:
    """Powers of two up to ``n``, and ``n`` itself: ``16 -> [1, 2, 4, 8, 16]``."""
    ks = [1 << i for i in range(max(n, 1).bit_length()) if (1 << i) <= n]
    return sorted(set([*ks, n])) if n >= 1 else [1]


def question_id(item: Item, position: int) -> str:
    """A stable id: ``flag/index`` for MedMNIST items, else the item's ``id`` or its position."""
    if "flag" in item and "index" in item:
        return f"{item['flag']}/{item['index']}"
    return str(item.get("id", position))


def _gold_text(item: Item) -> str:
    options = item.get("options") or {}
    return str(options.get(item.get("answer"), item.get("answer")))


def swap_images(items: Sequence[Item], seed: int = 0) -> list[Item]:
    """Each item with the image(s) of another item, for the image-ablation control.

    The donor is drawn with ``seed`` among the other items with as many images and, when any has one, another
    gold answer (so a model that reads the image is led away from the right answer, not towards it by luck);
    the item's text, options and gold stay. ``swapped_from`` names the donor's position.
    """
    rng = random.Random(seed)
    counts = [len(item_images(it)) for it in items]
    golds = [_gold_text(it) for it in items]
    out: list[Item] = []
    for i, item in enumerate(items):
        donor = None
        for _ in range(64):  # random draws: cheap, and almost always enough for a donor of another answer
            j = rng.randrange(len(items))
            if j != i and counts[j] == counts[i] and golds[j] != golds[i]:
                donor = j
                break
        if donor is None:  # every other item shares the answer (or the image count): any other one
            others = [j for j in range(len(items)) if j != i and counts[j] == counts[i]]
            donor = rng.choice(others) if others else i
        images = item_images(items[donor])
        swapped = {**item, "swapped_from": donor}
        if item.get("images") is not None:
            swapped["images"] = images
        else:
            swapped["image"] = images[0] if images else None
        out.append(swapped)
    return out


def sample_and_score(
    engine: Engine,
    items: Sequence[Item],
    params: SamplingParams,
    batch_size: int = 64,
    positions: Sequence[int] | None = None,
    keep_texts: bool = False,
    progress: bool = True,
    swapped: Sequence[Item] | None = None,
) -> list[tuple[QuestionScore, dict[str, Any]]]:
    """Generate ``params.n`` samples and a greedy completion per item, parse and score each question.

    Args:
        engine: the rollout engine.
        items: VQA items with ``messages``, ``image``, ``answer`` (gold letter) and ``options``.
        params: sampling parameters; ``greedy`` is forced on (Acc@1 needs it).
        batch_size: questions per engine call.
        positions: each item's position in the full evaluation set (for ids); default 0..len-1.
        keep_texts: store every sampled completion's text in the rows (large).
        progress: show a progress bar.
        swapped: the same items with swapped images (:func:`swap_images`): each is also answered greedily, one
            extra greedy pass, into the row's ``greedy_correct_swapped`` (the image-ablation control).

    Returns:
        ``[(score, row)]`` per item, where ``row`` is the question's JSON-ready record.
    """
    if swapped is not None and len(swapped) != len(items):
        raise ValueError(f"{len(swapped)} swapped items for {len(items)} items")
    ablation = params.with_(n=0, greedy=True, logprobs=False)
    from tqdm.auto import tqdm

    params = params.with_(greedy=True)
    positions = list(positions) if positions is not None else list(range(len(items)))
    out: list[tuple[QuestionScore, dict[str, Any]]] = []
    started, tokens = time.perf_counter(), 0
    bar = tqdm(total=len(items), desc=f"pass@k ({engine.name})", unit="q", disable=not show_progress(progress))
    with bar:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            results = engine.generate(chunk, params)
            controls = (
                engine.generate(swapped[start : start + batch_size], ablation) if swapped else [None] * len(chunk)
            )
            for offset, (item, result, control) in enumerate(zip(chunk, results, controls, strict=True)):
                for key in ("answer", "options"):
                    if key not in item:
                        raise KeyError(f"item {positions[start + offset]} has no {key!r}: evaluation needs VQA items")
                letters = "".join(item["options"])
                greedy_text = result.greedy.text if result.greedy is not None else None
                named = text_options(item)
                score = score_question(result.texts, item["answer"], letters, greedy_text, named)
                row = {
                    "id": question_id(item, positions[start + offset]),
                    "group": str(item.get("flag", ALL)),
                    **score.to_dict(),
                    "options": dict(item["options"]),
                    "greedy_text": greedy_text,
                    "new_tokens": sum(len(c.token_ids) for c in [*result.samples, *filter(None, [result.greedy])]),
                }
                if control is not None:
                    text = control.greedy.text if control.greedy is not None else None
                    swapped_score = score_question([], item["answer"], letters, text, named)
                    row["greedy_correct_swapped"] = swapped_score.greedy_correct
                    row["greedy_text_swapped"] = text
                    row["swapped_from"] = swapped[start + offset].get("swapped_from")  # type: ignore[index]
                tokens += row["new_tokens"]
                if keep_texts:
                    row["samples"] = result.texts
                out.append((score, row))
            bar.update(len(chunk))
            bar.set_postfix_str(f"{tokens / max(time.perf_counter() - started, 1e-9):.0f} tok/s", refresh=False)
    return out


def summarise(
    scored: Sequence[tuple[QuestionScore, dict[str, Any]]],
    ks: Sequence[int],
    groups: Sequence[str] | None = None,
    device: Any = "cpu",
) -> dict[str, dict[str, float]]:
    """Metrics over all questions (``"all"``) and, when there are several groups (modalities), per group.

    Under ``torch.distributed`` every rank must call this with the same ``groups`` (the metric syncs) and a
    ``device`` its backend can communicate on (the rank's GPU with NCCL).
    """
    groups = sorted({row["group"] for _, row in scored}) if groups is None else list(groups)
    summary = {}
    for group in [ALL, *groups] if len(groups) > 1 else [ALL]:
        metric = PassAtK(ks).to(device)
        metric.update([s for s, row in scored if group == ALL or row["group"] == group])
        summary[group] = metric.compute()
    return summary


def add_image_reliance(summary: dict[str, dict[str, float]], rows: Sequence[dict[str, Any]], seed: int = 0) -> None:
    """Add ``acc@1_swapped`` and ``image_reliance`` (with ``_lo``/``_hi``, its paired 95 % interval) to each
    group of ``summary``, from rows that carry the ablation's ``greedy_correct_swapped``; nothing otherwise."""
    for group, metrics in summary.items():
        chosen = [r for r in rows if (group == ALL or r["group"] == group) and "greedy_correct_swapped" in r]
        if not chosen:
            continue
        found = image_reliance(Questions.from_rows(chosen), seed=seed)
        swapped = [float(r["greedy_correct_swapped"]) for r in chosen if r["greedy_correct_swapped"] is not None]
        metrics["acc@1_swapped"] = sum(swapped) / len(swapped) if swapped else math.nan
        metrics.update(image_reliance=found.value, image_reliance_lo=found.lo, image_reliance_hi=found.hi)


def evaluate_items(
    engine: Engine,
    items: Sequence[Item],
    params: SamplingParams,
    ks: Sequence[int],
    batch_size: int = 64,
    image_ablation: bool = True,
    keep_texts: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    """``(rows, summary)`` of one evaluation on one process: sample and score every item, and with
    ``image_ablation`` answer each again with a swapped image (seeded by ``params.seed``) and add the reliance."""
    seed = params.seed or 0
    swapped = swap_images(items, seed) if image_ablation else None
    scored = sample_and_score(engine, items, params, batch_size, keep_texts=keep_texts, swapped=swapped)
    rows = [row for _, row in scored]
    summary = summarise(scored, ks)
    add_image_reliance(summary, rows, seed)
    return rows, summary


def _table(summary: dict[str, dict[str, float]], ks: Sequence[int]) -> str:
    top = max(ks)
    columns = ["questions", "acc@1", *[f"pass@{k}" for k in ks], f"gap@{top}", f"chance@{top}", f"adj_pass@{top}",
               "majority", "format_fail", "unique"]  # fmt: skip
    if any("image_reliance" in metrics for metrics in summary.values()):
        columns += ["acc@1_swapped", "image_reliance"]
    rows = []
    for group, metrics in summary.items():
        values = [metrics.get(col, math.nan) for col in columns]
        rows.append(
            [
                group,
                *(f"{int(v)}" if col == "questions" else f"{v:.3f}" for col, v in zip(columns, values, strict=True)),
            ]
        )
    return "\n".join(markdown_table(["group", *columns], rows)) + "\n"


def plot_curve(summary: dict[str, dict[str, float]], ks: Sequence[int], title: str) -> bytes:
    """PNG bytes of Pass@k against k (log2 axis) per group, with each group's Acc@1 dashed."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
    for i, (group, metrics) in enumerate(summary.items()):
        xs = [k for k in ks if f"pass@{k}" in metrics]
        line = ax.plot(xs, [metrics[f"pass@{k}"] for k in xs], marker="o", label=f"{group} pass@k", color=f"C{i}")
        if not math.isnan(metrics.get("acc@1", math.nan)):
            ax.axhline(metrics["acc@1"], linestyle="--", color=line[0].get_color(), label=f"{group} acc@1")
        chance = [k for k in xs if f"chance@{k}" in metrics]
        if chance:  # what answering a random offered letter would score: support must be read against it
            ax.plot(chance, [metrics[f"chance@{k}"] for k in chance], linestyle=":", color=line[0].get_color(),
                    label=f"{group} chance")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(ks), [str(k) for k in ks])
    ax.set_xlabel("k (samples)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def write_outputs(
    folder: str | Path,
    rows: Sequence[dict[str, Any]],
    summary: dict[str, dict[str, float]],
    ks: Sequence[int],
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``questions.jsonl``, ``summary.json``, ``summary.md`` and ``pass_at_k.png`` into ``folder``.

    The summary goes last: its presence marks a complete evaluation folder.
    """
    folder = Path(folder)
    atomic_write_jsonl(folder / "questions.jsonl", list(rows))
    title = " / ".join(str(v) for v in (meta or {}).values() if isinstance(v, str))[:80] or "Pass@k"
    atomic_write_bytes(folder / "pass_at_k.png", plot_curve(summary, ks, title))
    atomic_write_text(folder / "summary.md", _table(summary, ks))
    atomic_write_json(folder / "summary.json", {"meta": meta or {}, "ks": list(ks), "metrics": summary})
    return folder
