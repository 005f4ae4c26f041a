"""Pass@K sampling speed: medrl's engines against one ``generate`` call per sample, on ``tiny``.

The study's protocol samples K = 16 completions per question at temperature 0.7, top-p 0.9. The authors'
script does it the plain way: for each question, K calls of ``model.generate`` in sequence, one sample each.
medrl's ``hf`` engine puts many questions and all K samples in one batched ``generate``; its ``vllm`` engine
sends each question as one request with ``n = K``. All three sample the same 64 real PneumoniaMNIST
questions with the same settings and completion cap; tiny's random weights rarely stop early, so the token
counts match. Then, engine throughput (new tokens per second) at several numbers of questions per call.

    python bench/sampling.py                                     # the full comparison (tens of minutes on 2 cores)
    python bench/sampling.py --questions 16 --batch_sizes '[1,4,16]'

Needs ``$MEDRL_DATA_DIR`` (the real pneumoniamnist.npz). Writes ``runs/bench/sampling.json``.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _items(n: int) -> list[dict]:
    from medrl.data.modalities import PneumoniaMNIST

    data = PneumoniaMNIST(mode="vqa", val_samples=n, seed=0)
    dataset = data.dataset("val")
    return [dataset[i] for i in range(n)]


def one_call_per_sample(model, processor, items: list[dict], k: int, max_new_tokens: int) -> tuple[float, float, int]:
    """The authors' loop: for every question, K sequential ``generate`` calls of one sample each."""
    import torch

    from medrl.models.families.qwen_vl import VISION_PLACEHOLDERS

    banned = [[i] for i in processor.tokenizer.convert_tokens_to_ids(VISION_PLACEHOLDERS)]
    tokens, start, cpu = 0, time.perf_counter(), time.process_time()
    with torch.no_grad():
        for item in items:
            text = processor.apply_chat_template(item["messages"], add_generation_prompt=True, tokenize=False)
            inputs = processor(text=[text], images=[item["image"]], return_tensors="pt")
            for _ in range(k):
                out = model.generate(
                    **inputs,
                    do_sample=True,
                    temperature=0.7,
                    top_p=0.9,
                    top_k=0,
                    max_new_tokens=max_new_tokens,
                    bad_words_ids=banned,
                )
                tokens += out.shape[1] - inputs["input_ids"].shape[1]
    return time.perf_counter() - start, time.process_time() - cpu, tokens


def timed(engine, items: list[dict], params, per_call: int) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds and new tokens to sample ``items`` with ``per_call`` questions per call.

    CPU seconds (this process, all threads) are reported beside wall time because a shared machine's
    load moves wall time between runs far more than it moves the work done.
    """
    tokens, start, cpu = 0, time.perf_counter(), time.process_time()
    for i in range(0, len(items), per_call):
        for result in engine.generate(items[i : i + per_call], params):
            tokens += sum(len(c) for c in result.samples)
    return time.perf_counter() - start, time.process_time() - cpu, tokens


def build_engine(name: str, model, processor, path: Path, max_sequences: int, items: list[dict], params):
    """A started engine (``hf`` on the in-memory model, ``vllm`` on the saved folder) and its start seconds.

    One short call follows the start, untimed, so first-call costs stay out of every timing.
    """
    from medrl.rollout import make_engine

    start = time.perf_counter()
    if name == "hf":
        engine = make_engine("hf", model, processor, max_batch_sequences=max_sequences)
    else:
        engine = make_engine("vllm", path, max_model_len=512, kv_cache_gib=1.0)
    seconds = time.perf_counter() - start
    timed(engine, items[:2], params.with_(max_new_tokens=4), 2)
    return engine, seconds


def baseline_side(questions: int, k: int, max_new_tokens: int, repeats: int = 1, size: str = "tiny") -> dict:
    """The one-call-per-sample loop alone, ``repeats`` times, in this process (for a harness that isolates it).

    Returns lists of wall seconds, CPU seconds and new tokens, one entry per repeat.
    """
    from bench.sizes import model_dir
    from medrl.models.hub import load_vlm

    items = _items(questions)
    model, processor = load_vlm(str(model_dir(size)))
    one_call_per_sample(model, processor, items[:1], 1, 4)  # warm-up, as the engines get
    runs = [one_call_per_sample(model, processor, items, k, max_new_tokens) for _ in range(repeats)]
    return {"seconds": [r[0] for r in runs], "cpu_s": [r[1] for r in runs], "tokens": [r[2] for r in runs]}


def engine_side(
    name: str,
    questions: int,
    k: int,
    max_new_tokens: int,
    batch_sizes: list[int],
    repeats: int = 1,
    size: str = "tiny",
    throughput_k: int | None = None,
) -> dict:
    """One medrl engine alone: Pass@K with every question in one call, then throughput per questions per call.

    A throughput pass at ``b`` questions per call samples ``throughput_k`` (default ``k``) completions of
    each of ``max(b, questions)`` distinct questions (rounded down to whole calls), so every call really
    holds ``b`` questions.

    Returns the engine's start seconds, and per repeat the wall seconds, CPU seconds and new tokens of the
    Pass@K pass (``pass_at_k``) and of each throughput pass (``throughput[questions per call]``).
    """
    from bench.sizes import model_dir
    from medrl.models.hub import load_vlm
    from medrl.rollout import SamplingParams

    items, pool = _items(questions), _items(max(questions, *batch_sizes))  # the Pass@K questions are the loop's
    path = model_dir(size)
    model, processor = load_vlm(str(path))
    params = SamplingParams(n=k, temperature=0.7, top_p=0.9, max_new_tokens=max_new_tokens, seed=0)
    flow = params.with_(n=throughput_k or k)
    most = max(k * questions, flow.n * max(batch_sizes))
    engine, start_s = build_engine(name, model, processor, path, most, items, params)
    try:
        out: dict = {"start_s": start_s, "pass_at_k": _repeat(engine, items, params, questions, repeats)}
        out["throughput"] = {}
        for b in batch_sizes:
            chunk = pool[: b * max(1, questions // b)]
            out["throughput"][b] = _repeat(engine, chunk, flow, b, repeats)
    finally:
        engine.close()
    return out


def _repeat(engine, items: list[dict], params, per_call: int, repeats: int) -> dict[str, list]:
    runs = [timed(engine, items, params, per_call) for _ in range(repeats)]
    return {"seconds": [r[0] for r in runs], "cpu_s": [r[1] for r in runs], "tokens": [r[2] for r in runs]}


def main(
    questions: int = 64,
    k: int = 16,
    max_new_tokens: int = 64,
    batch_sizes: list[int] | None = None,
    engines: list[str] | None = None,
    baseline: bool = True,
    out: str = "runs/bench/sampling.json",
) -> None:
    """Run the benchmark and print a markdown table.

    Args:
        questions: questions sampled (the comparison uses all of them).
        k: samples per question.
        max_new_tokens: completion cap for every method.
        batch_sizes: questions per engine call for the throughput table.
        engines: medrl engines to time (hf, vllm).
        baseline: also time the one-call-per-sample loop.
        out: where the JSON results go.
    """
    import torch

    from medrl.core.io import atomic_write_json
    from medrl.models.families.qwen_vl import tiny_dir
    from medrl.models.hub import load_vlm
    from medrl.rollout import SamplingParams

    batch_sizes = batch_sizes or [1, 4, 16, 64]
    engines = engines or ["hf", "vllm"]
    items = _items(questions)
    path = tiny_dir(0)
    model, processor = load_vlm(str(path))
    params = SamplingParams(n=k, temperature=0.7, top_p=0.9, max_new_tokens=max_new_tokens, seed=0)
    results: dict = {
        "setup": {
            "questions": questions,
            "k": k,
            "max_new_tokens": max_new_tokens,
            "torch_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__,
        },
        "pass_at_k": {},
        "throughput": {},
    }
    built = {}
    for name in engines:
        built[name], start_s = build_engine(name, model, processor, path, k * max(batch_sizes), items, params)
        results["setup"][f"{name}_start_s"] = round(start_s, 2)
    if baseline:
        seconds, cpu, tokens = one_call_per_sample(model, processor, items, k, max_new_tokens)
        results["pass_at_k"]["one generate call per sample"] = {"seconds": seconds, "cpu_s": cpu, "tokens": tokens}
        print(f"one call per sample: {seconds:.1f} s ({cpu:.1f} CPU s), {tokens} tokens", flush=True)
    for name, engine in built.items():
        seconds, cpu, tokens = timed(engine, items, params, questions)
        results["pass_at_k"][f"medrl {name}"] = {"seconds": seconds, "cpu_s": cpu, "tokens": tokens}
        print(f"medrl {name}: {seconds:.1f} s ({cpu:.1f} CPU s), {tokens} tokens", flush=True)
        for per_call in batch_sizes:
            seconds, cpu, tokens = timed(engine, items, params, per_call)
            entry = {"seconds": seconds, "cpu_s": cpu, "tokens": tokens}
            results["throughput"].setdefault(name, {})[per_call] = entry
            print(f"  {name} {per_call} questions/call: {tokens / seconds:.0f} tokens/s", flush=True)
    for engine in built.values():
        engine.close()

    rows = results["pass_at_k"]
    base = rows.get("one generate call per sample", {}).get("seconds")
    lines = [
        f"Pass@K sampling, {questions} questions x K={k}, {max_new_tokens} new tokens max, tiny, "
        f"{results['setup']['torch_threads']} torch threads",
        "",
        "| method | wall s | CPU s | new tokens | tokens/s (wall) | speed-up (wall) | speed-up (CPU) |",
        "|---|---|---|---|---|---|---|",
    ]
    base_cpu = rows.get("one generate call per sample", {}).get("cpu_s")
    for method, r in rows.items():
        speed = f"{base / r['seconds']:.1f}x" if base else "-"
        speed_cpu = f"{base_cpu / r['cpu_s']:.1f}x" if base_cpu else "-"
        lines.append(
            f"| {method} | {r['seconds']:.1f} | {r['cpu_s']:.1f} | {r['tokens']} | "
            f"{r['tokens'] / r['seconds']:.0f} | {speed} | {speed_cpu} |"
        )
    lines += ["", "| engine | " + " | ".join(f"{b} q/call" for b in batch_sizes) + " |"]
    lines.append("|---" * (len(batch_sizes) + 1) + "|")
    for name, by_size in results["throughput"].items():
        cells = [f"{by_size[b]['tokens'] / by_size[b]['seconds']:.0f} tok/s" for b in batch_sizes]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    results["table"] = lines
    atomic_write_json(Path(out), results)
    print(f"wrote {out}")


if __name__ == "__main__":  # vLLM may spawn processes: keep the entry point guarded
    from jsonargparse import auto_cli

    auto_cli(main, as_positional=False)
