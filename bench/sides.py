"""What one side of each comparison runs inside its own process, through the comparison scripts' functions.

``bench/run.py`` starts a fresh process per side run (``--child``); that process calls :func:`run_side` with
the side's spec and writes what it returns as JSON. Every side returns its timed measurements under
``seconds`` (one per timed step or pass), so the harness aggregates them all the same way.
"""

from __future__ import annotations

import argparse
from typing import Any


def run_side(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the side named by ``spec`` (``kind``, ``side``, ``settings``, ``threads``, ``workdir``)."""
    import torch

    torch.set_num_threads(spec["threads"])
    runners = {"grpo": grpo_side, "sampling": sampling_side, "probe": probe_side}
    kind = spec["kind"].split("@")[0]  # `grpo@20m`: the comparison at a model size
    if kind not in runners:
        raise ValueError(f"unknown comparison {spec['kind']!r}: expected one of {sorted(runners)}")
    result = runners[kind](spec["side"], spec["settings"], spec["workdir"])
    return {**result, "torch_threads_at_end": torch.get_num_threads()}  # an engine may have changed it


def grpo_side(side: str, settings: dict[str, Any], workdir: str) -> dict[str, Any]:
    """Seconds per timed GRPO step (after warm-up) and each step's stage timings, for medrl or TRL."""
    from bench.grpo_step import run_medrl, run_trl

    args = argparse.Namespace(out=workdir, **settings)
    stages: list[dict[str, float]] = []
    if side == "trl":
        seconds = run_trl(args, stages)
    else:
        engine, _, variant = side.removeprefix("medrl-").partition("-")  # `medrl-hf-unshared`: prompts not shared
        seconds = run_medrl(args, engine, stages, share_prompt=variant != "unshared")
    return {"seconds": seconds, "stages": stages}


def sampling_side(side: str, settings: dict[str, Any], workdir: str) -> dict[str, Any]:
    """Pass@K passes of the one-call-per-sample loop, or of a medrl engine plus its throughput passes."""
    from bench.sampling import baseline_side, engine_side

    common = {k: settings[k] for k in ("questions", "k", "max_new_tokens", "repeats")}
    common["size"] = settings.get("size", "tiny")
    if side == "per-sample":
        return baseline_side(**common)
    out = engine_side(side, batch_sizes=settings["batch_sizes"], throughput_k=settings.get("throughput_k"), **common)
    return {"seconds": out["pass_at_k"]["seconds"], **out}


def probe_side(side: str, settings: dict[str, Any], workdir: str) -> dict[str, Any]:
    """End-to-end seconds of the probe table with its sweep of heads: extracted once, or once per head."""
    from bench.probe import cached_side, reextract_side, warm_up

    warm_up(settings)  # imports and one-off builds stay outside the timings
    return cached_side(settings, workdir) if side == "cached" else reextract_side(settings, workdir)
