"""``medrl bench-eval``: a model on the six-benchmark suite, greedy Acc@1 (and optionally Pass@K) per benchmark.

The flow is the shared evaluation path (:func:`medrl.evaluation.sample_and_score`: engine -> answer parsing
-> per-question scores), run batch by batch so an interrupted evaluation resumes where it stopped.
Outputs, in ``--out``: ``items.jsonl`` (one row per item: benchmark, dataset index, gold, parsed greedy
and sampled answers, counts, greedy text), ``scores.json``, ``table.md`` and ``table.csv`` (one column per
benchmark in the paper's order, then the mean), and ``run.json`` (the settings, checked on resume).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Literal

from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

from medrl.core.env import show_progress
from medrl.core.errors import ConfigError
from medrl.core.io import atomic_write_json, atomic_write_jsonl, atomic_write_text
from medrl.core.seeds import derive_seed
from medrl.data.benchmarks import BENCHMARKS, BenchmarkSuiteDataModule
from medrl.data.image_store import ImageCheck
from medrl.data.mcq_items import MCQItemsDataset
from medrl.models.budget import model_prompt_budget
from medrl.models.families import family_of_folder
from medrl.models.fragments import image_options_of, model_and_dtype
from medrl.models.hub import resolve_model
from medrl.report.benchmark_table import score, table_rows, to_csv, to_markdown
from medrl.rollout.engine import Engine
from medrl.rollout.factory import open_engine
from medrl.rollout.types import PASS_AT_K_TEMPERATURE, PASS_AT_K_TOP_P, SamplingParams

ITEMS, RUN, SCORES = "items.jsonl", "run.json", "scores.json"


def _batch_seed(seed: int, batch: int) -> int:
    """Each batch samples with its own seed, a pure function of (seed, batch): a resumed run draws the same."""
    return derive_seed([seed, batch])


def _read_done(path: Path) -> list[dict[str, Any]]:
    """Rows already written; a torn last line (the process died mid-write) is dropped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def evaluate_items(
    engine: Engine,
    dataset: MCQItemsDataset,
    params: SamplingParams,
    out: Path,
    batch_size: int = 32,
    keep_texts: bool = False,
) -> list[dict[str, Any]]:
    """Score every item of ``dataset``, appending each finished batch to ``out/items.jsonl``; returns all rows.

    Batches are fixed slices of the dataset, so a rerun skips the batches already in the file and samples
    the others with the same seeds as an uninterrupted run would.
    """
    from medrl.evaluation import sample_and_score

    path = out / ITEMS
    done = _read_done(path)
    atomic_write_jsonl(path, done)  # drop a torn line before appending
    done_ids = {row["id"] for row in done}
    rows = list(done)
    started, tokens = time.perf_counter(), 0
    bar = tqdm(total=len(dataset), initial=len(done), desc="bench-eval", unit="item", disable=not show_progress())
    with bar, path.open("a", encoding="utf-8") as fh:
        for b, start in enumerate(range(0, len(dataset), batch_size)):
            positions = list(range(start, min(start + batch_size, len(dataset))))
            items = [dataset.items[p] for p in positions]
            if all(f"{it.benchmark}/{it.dataset_index}" in done_ids for it in items):
                continue
            vqa_items = [dataset[p] for p in positions]
            seed = None if params.seed is None else _batch_seed(params.seed, b)
            scored = sample_and_score(
                engine, vqa_items, params.with_(seed=seed), len(positions), positions, keep_texts, progress=False
            )
            new = []
            for item, (_, row) in zip(items, scored, strict=True):
                if row["id"] in done_ids:
                    continue
                row.update(benchmark=item.benchmark, dataset_name=item.dataset_name, dataset_index=item.dataset_index)
                new.append(row)
            fh.write("".join(json.dumps(row) + "\n" for row in new))
            fh.flush()
            rows += new
            tokens += sum(row["new_tokens"] for row in new)
            rate = f"{tokens / max(time.perf_counter() - started, 1e-9):.0f} tok/s"
            bar.update(len(new))
            bar.set_postfix_str(rate, refresh=False)
            if bar.disable:  # a log, not a terminal: one line per batch
                print(f"  {len(rows)}/{len(dataset)} items, {rate}", file=sys.stderr, flush=True)
    order = {f"{it.benchmark}/{it.dataset_index}": i for i, it in enumerate(dataset.items)}
    rows.sort(key=lambda r: order.get(r["id"], len(order)))
    atomic_write_jsonl(path, rows)
    return rows


def _check_resume(out: Path, settings: dict[str, Any], resume: bool) -> None:
    run = out / RUN
    if run.is_file() and (out / ITEMS).is_file():
        previous = json.loads(run.read_text())
        if not resume:
            (out / ITEMS).unlink()
        elif previous != settings:
            changed = sorted(k for k in settings.keys() | previous.keys() if settings.get(k) != previous.get(k))
            raise ConfigError(
                f"medrl bench-eval: {out} holds an evaluation with other settings ({', '.join(changed)}); "
                "use another --out, or --resume false to start over"
            )
    atomic_write_json(run, settings)


def print_table(header: list[str], rows: list[list[str]], title: str) -> None:
    """The score table on the terminal."""
    table = Table(title=title)
    for column in header:
        table.add_column(column, justify="left" if column in ("model", "metric") else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=None if sys.stdout.isatty() else 160).print(table)


def bench_eval(
    model: str,
    suite: str,
    out: str = "runs/bench_eval",
    engine: Literal["hf", "vllm"] = "hf",
    name: str | None = None,
    benchmarks: list[str] | None = None,
    samples_per_benchmark: int | None = None,
    max_new_tokens: int = 2048,
    n: int = 0,
    ks: list[int] | None = None,
    temperature: float = PASS_AT_K_TEMPERATURE,
    top_p: float = PASS_AT_K_TOP_P,
    batch_size: int = 32,
    seed: int = 0,
    image_root: str | None = None,
    image_check: ImageCheck = "decode",
    instruction: str | None = None,
    system_prompt: str | None = None,
    device: str = "auto",
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
    engine_options: dict[str, Any] | None = None,
    keep_texts: bool = False,
    published: bool = True,
    resume: bool = True,
    mean_of_all: bool = False,
    max_prompt_length: int | None = None,
    images: Literal["auto", "native", "tiled"] = "auto",
    image_options: dict[str, Any] | None = None,
) -> int:
    """Evaluate a model on the six-benchmark suite: greedy Acc@1 per benchmark and the mean (+ Pass@K).

    Args:
        model: ``tiny``, a local model folder, a Hugging Face id (e.g. OctoMed/OctoMed-7B), or a model fragment
            (configs/models/*.yaml: its model and dtype).
        suite: the unified evaluation export: a JSONL file, or a folder of them, with its images.
        out: output folder (items.jsonl, scores.json, table.md, table.csv, run.json).
        engine: ``hf`` (transformers generate) or ``vllm``.
        name: the model's name in the table (default: the model argument).
        benchmarks: evaluate only these (PMC, MMMU, MedX-M, PathVQA, SLAKE, VQA-RAD; default: all).
        samples_per_benchmark: a seeded subset of this many items per benchmark (default: all).
        max_new_tokens: completion length limit (the authors' evaluation allows 2048).
        n: sampled completions per item for Pass@K (0: greedy only).
        ks: the k of Pass@k (default with n > 0: 1, 2, 4, ... up to n).
        temperature: sampling temperature of the n samples (the study uses 0.7).
        top_p: nucleus mass of the n samples (the study uses 0.9).
        batch_size: items per engine call (and per resumable chunk).
        seed: seeds the samples and the per-benchmark subsets.
        image_root: where the export's image paths are relative to (default: the JSONL's folder).
        image_check: check every image first: decode, exists or none.
        instruction: overrides the think/answer instruction of the prompt.
        system_prompt: an optional system message.
        device: ``auto`` (GPU when visible), ``cpu`` or ``cuda`` (hf engine).
        dtype: weight dtype for the hf engine (auto: bf16 on GPU, fp32 on CPU).
        engine_options: engine keyword arguments (e.g. max_model_len, gpu_memory_utilization for vLLM).
        keep_texts: store every sampled completion's text in items.jsonl (greedy texts are always kept).
        published: add the published rows (configs/published.json: the paper's model and its base) to the table.
        resume: continue an interrupted evaluation in ``out`` (false: start over).
        mean_of_all: average every benchmark in the suite (default: the six only; others are scored apart).
        max_prompt_length: prompt tokens (text and image) an item may take; longer ones are dropped and reported
            as ``too_long`` (default: the model's context minus max_new_tokens).
        images: how an item's several images (MMMU, MedXpertQA) reach the model: ``native`` as separate
            images in one prompt, ``tiled`` into one picture; ``auto``: native when the model's family takes
            several images (every family medrl knows does). Recorded in run.json and the summary line.
        image_options: the family's image-processor settings (e.g. ``{max_pixels: 802816}`` for pixel-budget
            families, ``{do_image_splitting: false}`` for SmolVLM), for both engines.
    """
    from medrl.evaluation import default_ks

    image_options = image_options_of(model, image_options)
    model, dtype = model_and_dtype(model, dtype)  # a configs/models/*.yaml fragment names the model and its dtype
    if n < 0:
        raise ConfigError(f"medrl bench-eval: n must be >= 0, got {n}")
    ks = sorted(set(ks)) if ks else (default_ks(n) if n > 0 else [])
    if ks and max(ks) > n:
        raise ConfigError(f"medrl bench-eval: pass@{max(ks)} needs n >= {max(ks)} samples per item, got n={n}")
    out_dir = Path(out)
    if images == "auto":
        images = "native" if family_of_folder(resolve_model(model)).multi_image else "tiled"
    data = BenchmarkSuiteDataModule(suite, image_root, benchmarks, samples_per_benchmark, image_check,
                                    instruction=instruction, system_prompt=system_prompt, seed=seed,
                                    images=images)  # fmt: skip
    dataset = data.dataset()
    # Before any engine starts: one very long row must be dropped and reported, not tokenised into memory.
    data.apply_prompt_budget(model_prompt_budget(model, max_new_tokens, max_prompt_length, image_options))
    for report in data.reports:
        print(report.summary(), file=sys.stderr)
    params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
                            greedy=True)  # fmt: skip
    settings = {
        "model": model, "suite": str(suite), "engine": engine, "benchmarks": benchmarks,
        "samples_per_benchmark": samples_per_benchmark, "items": len(dataset), "max_new_tokens": max_new_tokens,
        "n": n, "temperature": temperature, "top_p": top_p, "batch_size": batch_size, "seed": seed,
        "instruction": instruction, "system_prompt": system_prompt, "keep_texts": keep_texts, "images": images,
        "max_images": (most := dataset.max_images()), "image_options": image_options,
    }  # fmt: skip
    _check_resume(out_dir, settings, resume)
    shown = f"several images {'as separate images' if images == 'native' else 'tiled into one'} (up to {most})"
    print(f"medrl bench-eval: {len(dataset)} items, {model} on {engine}, greedy + {n} samples, "
          f"{shown if most > 1 else 'one image each'} -> {out_dir}")  # fmt: skip
    options = {"max_images": most, **(engine_options or {})} if engine == "vllm" else engine_options
    with open_engine(engine, model, seed, device, dtype, options, image_options) as runner:
        rows = evaluate_items(runner, dataset, params, out_dir, batch_size, keep_texts)
    label = name or model
    scores = score(rows, ks, mean_of_all=mean_of_all)
    if scores["outside_mean"]:
        print(f"medrl bench-eval: warning: {', '.join(scores['outside_mean'])} not among the six benchmarks "
              f"({', '.join(BENCHMARKS)}): scored, but kept out of the mean (--mean_of_all true adds them)",
              file=sys.stderr)  # fmt: skip
    atomic_write_json(out_dir / SCORES, {"model": label, "ks": ks, **scores, "validation": [
        r.to_dict(examples=20) for r in data.reports]})  # fmt: skip
    header, table = table_rows({label: scores}, published=published)
    atomic_write_text(out_dir / "table.md", to_markdown(header, table))
    atomic_write_text(out_dir / "table.csv", to_csv(header, table))
    print_table(header, table, f"{label} on the medical VQA suite (%)")
    return 0
