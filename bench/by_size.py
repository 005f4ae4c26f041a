"""The size axis of ``make bench``: comparisons per model size, and each side's achieved FLOP/s against the peak.

The GRPO and sampling comparisons run once per size (``grpo@20m``, ``sampling@100m``: the same settings, the
model of that size from :mod:`bench.sizes`); the probe rows are size-free. Rows of a size are built by the
one-size table code on a view of that size's sides, then tagged with the size.

Achieved FLOP/s count the positions each side actually computes: an update costs about 6 x language-model
parameters per token position forwarded and backpropagated plus 2 x vision parameters per image patch through
the frozen tower. Unshared (TRL, ``medrl-hf-unshared``) every completion carries its own copy of the prompt and
image: G x (prompt + completion) positions and G towers a group; shared (medrl's default) a group computes one
prompt, one tower and G completions. Generation costs about 2 x language-model parameters per new token. The
useful-token rate (distinct positions a group trains on, one prompt plus G completions, per second of update)
is the same count for every side, so it compares them directly. Both are read against this machine's sustained
fp32 matmul rate at the sides' thread count (:mod:`bench.flops`).
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
        prompts, sequences = g["prompts"], g["prompts"] * g["generations"]
        completion = _median_stage(view_sides, "grpo/medrl-hf", "completion_tokens_mean") or g["completion_length"]
        useful = prompts * tokens["prompt"] + sequences * completion  # distinct positions of the batch
        computed = {  # (language positions, image towers) each update computes
            True: (useful, prompts),
            False: (sequences * (tokens["prompt"] + completion), sequences),
        }
        generate = 2 * counts["language"] * sequences * completion
        for side, update_key, generate_key, shared in (
            ("medrl-hf", "update", "generate", True), ("medrl-hf-unshared", "update", "generate", False),
            ("medrl-vllm", "update", "generate", True), ("trl", None, "transformers.generate", False),
        ):  # fmt: skip
            key = f"grpo/{side}"
            if key not in view_sides or not view_sides[key]["runs"]:
                continue
            positions, towers = computed[shared]
            update = 6 * counts["language"] * positions + 2 * counts["vision"] * towers * tokens["patches"]
            gen_s = _median_stage(view_sides, key, generate_key)
            upd_s = _median_stage(view_sides, key, update_key) if update_key else _trl_update(view_sides, key)
            achieved = update / upd_s if upd_s else None
            target = side in ("medrl-hf", "medrl-vllm") and size == UPDATE_TARGET[0]
            rows.append({
                "size": size, "parameters": counts, "side": side, "tokens_per_sequence": tokens["prompt"] + completion,
                "positions_computed": positions, "useful_positions": useful,
                "useful_tokens_per_s": useful / upd_s if upd_s else None,
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
             "Update: 6 x language parameters x token positions the side computes + 2 x vision parameters x patches "
             "of the towers it runs (unshared: every completion with its own prompt and image; shared: one prompt "
             "and tower a group); generation: 2 x language parameters per new token (TRL's token counts are taken "
             "as medrl's: same prompts, same completion cap). Useful tokens: the batch's distinct positions (each "
             "prompt once, every completion) per second of update, the same count for every side.", "",
             "| size (parameters) | side | update s | positions computed / useful | update GFLOP/s (% of peak) | "
             "useful tokens/s | generation s | generation GFLOP/s (% of peak) | target |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        useful = row.get("useful_tokens_per_s")
        cells = []
        for stage in ("update", "generate"):
            seconds, flops = row[f"{stage}_s"], row[f"{stage}_flops"]
            cells += ["-" if seconds is None else f"{seconds:.3g}",
                      "-" if flops is None else f"{flops / 1e9:.1f} ({100 * flops / peak:.0f}%)"]  # fmt: skip
            if stage == "update":
                positions = f"{row['positions_computed']:,.0f} / {row['useful_positions']:,.0f}"
                cells[1:1] = [positions]
                cells.append("-" if useful is None else f"{useful:,.0f}")
        verdict = "-" if row["target"] is None else f"{row['target']}: {'met' if row['met'] else 'missed'}"
        lines.append(f"| {row['size']} ({row['parameters']['total'] / 1e6:.1f}M) | {row['side']} | " + " | ".join(cells)
                     + f" | {verdict} |")  # fmt: skip
    return lines
