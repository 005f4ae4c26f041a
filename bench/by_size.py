"""The size axis of ``make bench``: comparisons per model size, and each side's achieved FLOP/s against the peak.

The GRPO and sampling comparisons run once per size (``grpo@20m``, ``sampling@100m``: the same settings, the
model of that size from :mod:`bench.sizes`); the probe rows are size-free. Rows of a size are built by the
one-size table code on a view of that size's sides, then tagged with the size.

Achieved FLOP/s use the usual counts: an update costs about 6 x language-model parameters x tokens trained (a
forward and a backward over every prompt and completion token) plus 2 x vision parameters x image patches (the
frozen tower's forward); generation about 2 x language-model parameters per new token. Both are read against
this machine's sustained fp32 matmul rate at the sides' thread count (:mod:`bench.flops`).
"""

from __future__ import annotations

import copy
import statistics
from typing import Any

SIZED = ("grpo", "sampling")  # comparisons that run per model size
# Fewer timed steps and rounds at the largest size keep a full run within the hour on 2 cores (stated in the table).
PER_SIZE = {
    "20m": {"grpo": {"steps": 4, "warmup": 1, "rounds": 2}, "sampling": {"rounds": 1}},
    "100m": {"grpo": {"steps": 3, "warmup": 1, "rounds": 1}, "sampling": {"questions": 8, "rounds": 1}},
}
UPDATE_TARGET = ("100m", 0.40)  # update-stage FLOP/s at 100m: at least 40 % of the measured peak


def expand(settings: dict[str, dict[str, Any]], sizes: list[str]) -> dict[str, dict[str, Any]]:
    """``settings`` with every sized comparison repeated per size (``kind@size``, its ``size`` set)."""
    out: dict[str, dict[str, Any]] = {}
    for kind, s in settings.items():
        if kind not in SIZED:
            out[kind] = s
            continue
        for size in sizes:
            out[f"{kind}@{size}"] = {**copy.deepcopy(s), **PER_SIZE.get(size, {}).get(kind, {}), "size": size}
    return out


def view(sides: dict[str, Any], settings: dict[str, Any], size: str | None) -> tuple[dict, dict]:
    """The sides and settings of one size under their plain names (``grpo/trl``), or the size-free ones."""
    if size is None:
        return ({k: v for k, v in sides.items() if "@" not in k.split("/")[0]},
                {k: v for k, v in settings.items() if "@" not in k})  # fmt: skip
    tag = f"@{size}"
    return ({k.replace(tag, "", 1): v for k, v in sides.items() if k.split("/")[0].endswith(tag)},
            {k.removesuffix(tag): v for k, v in settings.items() if k.endswith(tag)})  # fmt: skip


def prompt_tokens(size: str, prompts: int) -> dict[str, float]:
    """Mean prompt tokens (text and image) and image patches per prompt of the GRPO comparison's items."""
    from bench.grpo_step import _items
    from bench.sizes import model_dir
    from medrl.data.collate import encode_chat
    from medrl.models.hub import load_processor

    processor = load_processor(model_dir(size))
    items = _items(prompts)
    batch = encode_chat(processor, [it["messages"] for it in items], [it["image"] for it in items])
    grid = batch.inputs["image_grid_thw"]
    return {"prompt": float(batch.prompt_lengths.float().mean()), "patches": float(grid.prod(-1).float().mean())}


def flops_rows(sides: dict[str, Any], settings: dict[str, Any], sizes: list[str], peak: float) -> list[dict]:
    """Achieved FLOP/s of each GRPO side's update and generation, per size, as a share of ``peak``."""
    from bench.sizes import parameters

    rows = []
    for size in sizes:
        view_sides, view_settings = view(sides, settings, size)
        g = view_settings.get("grpo")
        if not g:
            continue
        counts, tokens = parameters(size), prompt_tokens(size, g["prompts"])
        sequences = g["prompts"] * g["generations"]
        completion = _median_stage(view_sides, "grpo/medrl-hf", "completion_tokens_mean") or g["completion_length"]
        update = 6 * counts["language"] * sequences * (tokens["prompt"] + completion)
        update += 2 * counts["vision"] * g["prompts"] * tokens["patches"]
        generate = 2 * counts["language"] * sequences * completion
        for side, update_key, generate_key in (("medrl-hf", "update", "generate"), ("medrl-vllm", "update", "generate"),
                                               ("trl", None, "transformers.generate")):  # fmt: skip
            key = f"grpo/{side}"
            if key not in view_sides or not view_sides[key]["runs"]:
                continue
            gen_s = _median_stage(view_sides, key, generate_key)
            upd_s = _median_stage(view_sides, key, update_key) if update_key else _trl_update(view_sides, key)
            achieved = update / upd_s if upd_s else None
            target = side.startswith("medrl") and size == UPDATE_TARGET[0]
            rows.append({
                "size": size, "parameters": counts, "side": side, "tokens_per_sequence": tokens["prompt"] + completion,
                "update_s": upd_s, "update_flops": achieved,
                "generate_s": gen_s, "generate_flops": generate / gen_s if gen_s else None, "peak_flops": peak,
                "target": f">= {100 * UPDATE_TARGET[1]:.0f}% of peak" if target else None,
                "met": (achieved is not None and achieved >= UPDATE_TARGET[1] * peak) if target else None,
            })  # fmt: skip
    return rows


def _median_stage(sides: dict[str, Any], key: str, name: str) -> float | None:
    steps = [step for run in sides.get(key, {}).get("runs", []) for step in run["result"].get("stages", [])]
    values = [step[name] for step in steps if name in step]
    return statistics.median(values) if values else None


def _trl_update(sides: dict[str, Any], key: str) -> float | None:
    """TRL's update: the step minus its input preparation (generation, rewards, the old log-probs)."""
    prepare = _median_stage(sides, key, "_prepare_inputs")
    step = statistics.median(sides[key]["seconds"]) if sides[key]["seconds"] else None
    return step - prepare if step is not None and prepare is not None else None


def render_flops(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown lines of the FLOP/s table."""
    if not rows:
        return []
    peak = rows[0]["peak_flops"]
    lines = ["", "## Against the machine's limit", "",
             f"Sustained fp32 matmul peak at the sides' thread count: **{peak / 1e9:.0f} GFLOP/s** (bench/flops.py). "
             "Update: 6 x language parameters x tokens trained + 2 x vision parameters x patches; generation: "
             "2 x language parameters per new token (TRL's token counts are taken as medrl's: same prompts, same "
             "completion cap).", "",
             "| size (parameters) | side | update s | update GFLOP/s (% of peak) | generation s | "
             "generation GFLOP/s (% of peak) | target |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        cells = []
        for stage in ("update", "generate"):
            seconds, flops = row[f"{stage}_s"], row[f"{stage}_flops"]
            cells += ["-" if seconds is None else f"{seconds:.3g}",
                      "-" if flops is None else f"{flops / 1e9:.1f} ({100 * flops / peak:.0f}%)"]  # fmt: skip
        verdict = "-" if row["target"] is None else f"{row['target']}: {'met' if row['met'] else 'missed'}"
        lines.append(f"| {row['size']} ({row['parameters']['total'] / 1e6:.1f}M) | {row['side']} | " + " | ".join(cells)
                     + f" | {verdict} |")  # fmt: skip
    return lines
