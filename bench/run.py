"""Every speed comparison medrl claims, side by side on this machine in one run (``make bench``).

Four comparisons, each side in a fresh process of its own (its peak resident memory is measured there):

1. GRPO step: medrl with the ``hf`` and the ``vllm`` engine against TRL's ``GRPOTrainer``
   (:mod:`bench.grpo_step`), seconds per optimizer step after warm-up, over several fresh processes;
2. Pass@K sampling: medrl's engines against one ``generate`` call per sample per question
   (:mod:`bench.sampling`), repeated passes over the same questions;
3. engine throughput: new tokens per second of ``hf`` and ``vllm`` at several questions per call;
4. probe table: three encoders x the real flags at 224 px with a sweep of heads per cell, features extracted
   once, against one probe run per head that re-extracts them as the authors' script does (:mod:`bench.probe`).

Rounds alternate the sides, so drifting load on a shared machine spreads over all of them. Results go to
``bench/results.json`` and ``bench/results.md`` (atomically), with hardware, versions, the load average at
each run's start, the medians with their min-max, the ratios, and the targets met or missed.

    python bench/run.py                    # everything at the sizes the docs quote (about an hour on 2 cores)
    python bench/run.py --quick            # smoke run, tiny sizes, vLLM off unless --vllm: runs/bench-quick/
    python bench/run.py --only grpo probe --repeats 5 --out runs/bench

Needs ``$MEDRL_DATA_DIR`` (the real pneumoniamnist.npz and breastmnist.npz).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.by_size import expand, flops_rows, view  # noqa: E402
from bench.isolate import SideFailed, SideRun, run_isolated  # noqa: E402
from bench.markdown import render  # noqa: E402
from bench.settings import FULL, QUICK  # noqa: E402
from bench.table import build_rows, stats  # noqa: E402
from medrl.core.io import atomic_write_json, atomic_write_text  # noqa: E402

SIDES = {"grpo": ("medrl-hf", "medrl-hf-unshared", "medrl-vllm", "trl"), "sampling": ("per-sample", "hf", "vllm"),
         "probe": ("reextract", "cached")}  # fmt: skip
VLLM_SIDES = {"grpo/medrl-vllm", "sampling/vllm"}


def fairness(settings: dict[str, dict[str, Any]]) -> dict[str, str]:
    """How each comparison's sides were made to do the same work, in words, from the settings used."""
    text = {}
    if g := settings.get("grpo"):
        text["grpo"] = (
            f"TRL 1.16 GRPOTrainer with use_vllm=False (its transformers.generate path, the same kind of generation "
            f"as medrl's hf engine; TRL 1.16 accepts vLLM only up to 0.31, so the vLLM row is compared with the same "
            f"TRL run). Both load the same saved random Qwen2.5-VL folder of the row's size in float32 on CPU "
            f"(TRL: use_cpu, bf16 off), take the same {g['prompts']} real PneumoniaMNIST VQA prompts and images per "
            f"step in the same order (no shuffling), G={g['generations']}, at most {g['completion_length']} completion "
            f"tokens, temperature 1.0, the same reward functions (medrl's accuracy and format, weight 1 each; CARE "
            f"off, TRL has none), beta 0 (no reference model), one optimizer step per generation batch (mu 1), all "
            f"{g['prompts'] * g['generations']} sequences in one forward/backward, AdamW lr 1e-5, weight decay 0, "
            f"constant learning rate, gradient norm clipped at 5; {g['steps']} timed steps after {g['warmup']} "
            f"untimed warm-up steps per run, {g['threads']} torch thread(s), each run a fresh process"
        )
    if s := settings.get("sampling"):
        text["sampling"] = (
            f"The same {s['questions']} real PneumoniaMNIST validation questions and images, K={s['k']} samples "
            f"each, temperature 0.7, top-p 0.9, top-k off, at most {s['max_new_tokens']} new tokens, vision "
            f"placeholder tokens banned on every side, the same model loaded in float32; the per-sample side calls "
            f"model.generate once per sample (the authors' loop), medrl's hf engine puts every question and sample "
            f"in batched generate calls, its vllm engine sends each question as one request with n=K. The throughput "
            f"passes sample K={s.get('throughput_k') or s['k']} completions of each of at least {s['questions']} "
            f"distinct questions at {', '.join(map(str, s['batch_sizes']))} questions per call (at least one whole "
            f"call). Token counts are recorded to show equal work; engine start-up and one short warm-up call are "
            f"outside the timings; {s['threads']} torch threads"
        )
    if p := settings.get("probe"):
        text["probe"] = (
            f"The same {len(p['encoders'])} encoders ({', '.join(p['encoders'])}; {{20m}} is bench/sizes.py's 20m "
            f"Qwen2.5-VL tower) at 224 px, the same {', '.join(p['flags'])} files and seeded subsets "
            f"({p['train_samples']} train + {p['val_samples']} val + {p['test_samples']} test images), "
            f"{p['heads']} heads per cell (SGD momentum 0.9, cosine, learning rates log-spaced from 1 to 1e-4, "
            f"{p['epochs']} epochs, batch {p['batch_size']}, BatchNorm1d without affine then Linear), each head "
            f"fitted and scored on the test split by the same code; medrl: one probe-table call from an empty "
            f"cache, timed end to end; the authors' way: one probe run per head, each extracting the features "
            f"again: one run per cell timed end to end (from an empty cache), the sweep counted as {p['heads']} "
            f"such runs; {p['threads']} torch thread(s), imports and model files built before the clocks"
        )
    return text


def plan(settings: dict[str, dict[str, Any]], vllm: bool) -> list[tuple[str, str, int]]:
    """(comparison, side, round) in run order: round by round, every comparison's sides in turn."""
    rounds = max(s["rounds"] for s in settings.values())
    runs = []
    for round_ in range(rounds):
        for kind, s in settings.items():
            if round_ < s["rounds"]:
                base = kind.split("@")[0]
                runs += [(kind, side, round_) for side in SIDES[base] if vllm or f"{base}/{side}" not in VLLM_SIDES]
    return runs


def run_all(settings: dict[str, dict[str, Any]], vllm: bool, jobs: int, workdir: Path) -> dict[str, Any]:
    """Run every planned side in its own process; per side: its runs, pooled ``seconds`` and peak memory."""
    from rich.progress import Progress

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    runs = plan(settings, vllm)
    script = Path(__file__).resolve()
    done: dict[tuple[str, str, int], SideRun] = {}
    failures: dict[str, str] = {}
    with Progress(transient=False) as progress, ThreadPoolExecutor(max_workers=jobs) as pool:
        task = progress.add_task("benchmarks", total=len(runs))

        def one(kind: str, side: str, round_: int) -> None:
            name = f"{kind}-{side}-r{round_}"
            spec = {"kind": kind, "side": side, "settings": settings[kind], "threads": settings[kind]["threads"],
                    "workdir": str(workdir)}  # fmt: skip
            try:
                run = run_isolated(script, name, spec, workdir, env)
            except SideFailed as err:  # the other sides' figures are still worth writing
                failures[f"{kind}/{side}"] = str(err)
                progress.console.print(f"[red]{err}[/red]")
                progress.advance(task)
                return
            done[(kind, side, round_)] = run
            seconds = run.result["seconds"]
            progress.console.print(
                f"{kind:<8} {side:<11} round {round_ + 1}: median {statistics.median(seconds):8.3f} s "
                f"({len(seconds)} timed), peak RSS {max(run.peak_rss_mib, run.tree_peak_rss_mib):,.0f} MiB, "
                f"load {run.load_before[0]:.1f}, process {run.wall_s:.0f} s ({run.cpu_s:.0f} CPU s)"
            )
            progress.advance(task)

        for future in [pool.submit(one, *run) for run in runs]:
            future.result()
    sides: dict[str, Any] = {}
    order: dict[tuple[str, str], int] = {}
    for kind, side, _ in runs:
        order.setdefault((kind, side), len(order))
    for (kind, side, _), run in sorted(done.items(), key=lambda item: (order[item[0][:2]], item[0][2])):
        entry = sides.setdefault(f"{kind}/{side}", {"runs": [], "seconds": [], "peak_rss_mib": 0.0})
        entry["runs"].append({"wall_s": run.wall_s, "cpu_s": run.cpu_s, "peak_rss_mib": run.peak_rss_mib,
                              "tree_peak_rss_mib": run.tree_peak_rss_mib, "load_before": run.load_before,
                              "result": run.result})  # fmt: skip
        entry["seconds"] += run.result["seconds"]
        entry["peak_rss_mib"] = max(entry["peak_rss_mib"], run.peak_rss_mib, run.tree_peak_rss_mib)
    for key, message in failures.items():
        sides.setdefault(key, {"runs": [], "seconds": [], "peak_rss_mib": 0.0})["failed"] = message
    return sides


def select(quick: bool, only: list[str] | None, repeats: int | None, threads: int | None) -> dict[str, dict[str, Any]]:
    """The settings of the chosen comparisons; ``repeats`` overrides rounds (sampling: in-process repeats)."""
    settings = copy.deepcopy(QUICK if quick else FULL)
    settings = {kind: s for kind, s in settings.items() if not only or kind in only}
    for kind, s in settings.items():
        if repeats is not None:
            s["repeats" if kind == "sampling" else "rounds"] = repeats
        if threads is not None:
            s["threads"] = threads
    return settings


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the command line, run the comparisons and write the JSON and markdown results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and one round: checks the harness runs")
    parser.add_argument("--vllm", action=argparse.BooleanOptionalAction, default=None,
                        help="run the vLLM sides (default: on, off with --quick)")  # fmt: skip
    parser.add_argument("--only", nargs="+", choices=sorted(SIDES), help="run only these comparisons")
    parser.add_argument("--repeats", type=int, help="fresh processes per side (sampling: passes per process)")
    parser.add_argument("--threads", type=int, help="torch threads of every side (default 1, see FULL)")
    parser.add_argument("--sizes", help="model sizes of the GRPO and sampling comparisons, comma-separated "
                        "(tiny, 20m, 100m; default: all three, tiny with --quick)")  # fmt: skip
    parser.add_argument("--jobs", type=int, default=1, help="sides run at once (above 1 they disturb each other)")
    parser.add_argument("--out", help="folder for results.json/.md (default: bench/, or runs/bench-quick with --quick)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        from bench.sides import run_side

        atomic_write_json(args.result, run_side(json.loads(Path(args.child).read_text())))
        return {}
    if not os.environ.get("MEDRL_DATA_DIR"):
        parser.error("MEDRL_DATA_DIR is not set: point it at the folder holding pneumoniamnist.npz and breastmnist.npz")
    for flag in ("repeats", "threads", "jobs"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    vllm = (not args.quick) if args.vllm is None else args.vllm
    settings = select(args.quick, args.only, args.repeats, args.threads)
    if not settings:
        parser.error(f"--only {' '.join(args.only)}: the quick mode has only {', '.join(QUICK)}")
    from bench.sizes import SHAPES

    sizes = [s.strip() for s in (args.sizes or ("tiny" if args.quick else ",".join(SHAPES))).split(",") if s.strip()]
    if unknown := [s for s in sizes if s not in SHAPES]:
        parser.error(f"--sizes {','.join(unknown)}: the sizes are {', '.join(SHAPES)}")
    settings = expand(settings, sizes)
    started, load_start, t0 = datetime.now(UTC), list(os.getloadavg()), time.perf_counter()
    from bench.flops import peak_matmul_flops

    threads = min(s["threads"] for s in settings.values())
    peak = peak_matmul_flops(threads, seconds=0.5 if args.quick else 2.0)  # before any side: an idle machine
    with tempfile.TemporaryDirectory(prefix="medrl-bench-") as workdir:
        sides = run_all(settings, vllm, args.jobs, Path(workdir))
    command = shlex.join(["python", "bench/run.py", *(sys.argv[1:] if argv is None else argv)])
    results = summarise(args, command, settings, vllm, sides, started, load_start, time.perf_counter() - t0)
    results["sizes"], results["peak"] = sizes, peak
    results["rows"] = sized_rows(sides, settings, sizes)
    results["flops"] = flops_rows(sides, settings, sizes, peak["flops"])
    # A smoke run never overwrites the committed full results.
    root = Path(__file__).resolve().parents[1]
    out = Path(args.out) if args.out else root / ("runs/bench-quick" if args.quick else "bench")
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", render(results))
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    if failed := [key for key, side in sides.items() if "failed" in side]:
        sys.exit(f"these sides failed (their logs are in results.json, sides.<side>.failed): {', '.join(failed)}")
    return results


def sized_rows(sides: dict[str, Any], settings: dict[str, Any], sizes: list[str]) -> list[dict[str, Any]]:
    """The size-free rows, then each size's rows with the size in their key and name."""
    from bench.sizes import parameters

    rows = build_rows(*view(sides, settings, None))
    for size in sizes:
        label = f"{size}, {parameters(size)['total'] / 1e6:.1f}M"
        for row in build_rows(*view(sides, settings, size)):
            rows.append({**row, "key": f"{row['key']}@{size}", "comparison": f"{row['comparison']} [{label}]",
                         "size": size})  # fmt: skip
    return rows


def summarise(args: argparse.Namespace, command: str, settings: dict, vllm: bool, sides: dict, started: datetime,
              load_start: list[float], seconds: float) -> dict[str, Any]:  # fmt: skip
    """The results document: what ran, where, under what load, and the rows."""
    from medrl.study.runcard import code_revision, hardware, package_versions

    per_run = [run["load_before"][0] for side in sides.values() for run in side["runs"]]
    return {
        "mode": "quick" if args.quick else "full",
        "command": command,
        "started": started.isoformat(timespec="seconds"),
        "duration_s": round(seconds, 1),
        "vllm_sides": vllm,
        "jobs": args.jobs,
        "load_average": {
            "cpus": os.cpu_count(),
            "start": load_start,
            "end": list(os.getloadavg()),
            "one_minute_at_run_starts": stats(per_run),
        },
        "hardware": hardware(),
        "versions": package_versions(),
        "code": code_revision(),
        "settings": settings,
        # Each comparison's words from its first size's settings; the larger sizes' own counts are in `settings`.
        "fairness": fairness({k.split("@")[0]: v for k, v in reversed(settings.items())}),
        "sides": sides,
    }


if __name__ == "__main__":  # vLLM may spawn processes: keep the entry point guarded
    main()
