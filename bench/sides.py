"""What one side of each comparison runs inside its own process, through the comparison scripts' functions.

``bench/run.py`` starts a fresh process per side run (``--child``); that process calls :func:`run_side` with
the side's spec and writes what it returns as JSON. Every side returns its timed measurements under
``seconds`` (one per timed step or pass), so the harness aggregates them all the same way.
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any


def run_side(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the side named by ``spec`` (``kind``, ``side``, ``settings``, ``threads``, ``workdir``)."""
    import torch

    torch.set_num_threads(spec["threads"])
    runners = {"grpo": grpo_side, "sampling": sampling_side, "probe": probe_side, "probe_224": probe_side}
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
        seconds = run_medrl(args, side.removeprefix("medrl-"), stages)
    return {"seconds": seconds, "stages": stages}


def sampling_side(side: str, settings: dict[str, Any], workdir: str) -> dict[str, Any]:
    """Pass@K passes of the one-call-per-sample loop, or of a medrl engine plus its throughput passes."""
    from bench.sampling import baseline_side, engine_side

    common = {k: settings[k] for k in ("questions", "k", "max_new_tokens", "repeats")}
    common["size"] = settings.get("size", "tiny")
    if side == "per-sample":
        return baseline_side(**common)
    out = engine_side(side, batch_sizes=settings["batch_sizes"], **common)
    return {"seconds": out["pass_at_k"]["seconds"], **out}


def probe_side(side: str, settings: dict[str, Any], workdir: str) -> dict[str, Any]:
    """End-to-end seconds of a probe run that re-encodes every epoch, or of one on cached features.

    The ``cached`` side times a cold start (extraction into an empty cache, then the head) and then the same
    run again on the now warm cache.
    """
    from bench.probe import cached, reencoding
    from medrl.models.encoders import encoder_from_spec

    args = argparse.Namespace(**settings)
    encoder_from_spec(args.encoder).load("cpu")  # imports and one-off builds stay outside the timings
    if side == "reencoding":
        seconds, acc = reencoding(args)
        return {"seconds": [seconds], "val_acc": acc}
    with tempfile.TemporaryDirectory(dir=workdir, prefix="cache-") as cache_dir:
        cold, cold_acc = cached(args, cache_dir)
        warm, warm_acc = cached(args, cache_dir)
    return {"seconds": [cold], "warm_seconds": [warm], "val_acc": cold_acc, "warm_val_acc": warm_acc}
