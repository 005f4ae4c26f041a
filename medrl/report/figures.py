"""The report's figures, each returned as PNG bytes (the caller writes them atomically)."""

from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")  # servers have no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402

from medrl.report.load import RunResults  # noqa: E402

STAGE_MODELS = ("base", "sft", "rl_base", "rl_sft")
STAGE_NAMES = {"base": "base", "sft": "SFT", "rl_base": "RL from base", "rl_sft": "SFT then RL"}


def model_label(stage: str, flag: str) -> str:
    """The run-directory label of a stage's model for a flag (``base`` is shared by all flags)."""
    return "base" if stage == "base" else f"{stage}_{flag}"


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def support_curves(results: RunResults, flag: str) -> bytes:
    """Pass@k against k for every stage's model on one flag; each model's Acc@1 as a dashed line."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, stage in enumerate(STAGE_MODELS):
        label = model_label(stage, flag)
        ks = [k for k in results.ks(label, flag) if results.metric(label, flag, f"pass@{k}") is not None]
        if not ks:
            continue
        line = ax.plot(ks, [results.metric(label, flag, f"pass@{k}") for k in ks], marker="o", color=f"C{i}")
        line[0].set_label(f"{STAGE_NAMES[stage]} pass@k")
        acc = results.metric(label, flag, "acc@1")
        if acc is not None and not math.isnan(acc):
            ax.axhline(acc, linestyle="--", color=f"C{i}", alpha=0.8, label=f"{STAGE_NAMES[stage]} acc@1")
    chance = _chance_curve(results, flag)
    if chance:  # the same questions for every model: one chance curve
        ax.plot(*zip(*chance, strict=True), linestyle=":", color="k", marker=".", label="chance (random letter)")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("k (samples)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{flag}: support (pass@k) and greedy accuracy")
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def _chance_curve(results: RunResults, flag: str) -> list[tuple[int, float]]:
    """``[(k, chance@k)]`` of the flag's question set (from the first model evaluated on it), k = 1 included."""
    for stage in STAGE_MODELS:
        label = model_label(stage, flag)
        ks = results.ks(label, flag)
        points = [(k, results.metric(label, flag, f"chance@{k}")) for k in sorted({1, *ks})]
        points = [(k, v) for k, v in points if v is not None]
        if points:
            return points
    return []


def acc_gap_bars(results: RunResults, k: int | dict[str, int]) -> bytes:
    """Per flag, grouped bars of Acc@1 and of the gap G_k = Pass@k - Acc@1 for every stage's model (``k`` one
    for all flags, or each flag's own)."""
    ks = k if isinstance(k, dict) else {flag: k for flag in results.flags}
    flags = results.flags
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 2.2 * len(flags) + 3), 3.6), sharex=True)
    width = 0.8 / len(STAGE_MODELS)
    for panel, ax in enumerate(axes):
        for i, stage in enumerate(STAGE_MODELS):
            values = []
            for flag in flags:
                label = model_label(stage, flag)
                acc, sup = results.metric(label, flag, "acc@1"), results.metric(label, flag, f"pass@{ks[flag]}")
                value = acc if panel == 0 else (None if acc is None or sup is None else sup - acc)
                values.append(math.nan if value is None else value)
            xs = [j + (i - (len(STAGE_MODELS) - 1) / 2) * width for j in range(len(flags))]
            ax.bar(xs, values, width=width, color=f"C{i}", label=STAGE_NAMES[stage])
        ax.set_xticks(range(len(flags)), flags, rotation=20, fontsize=8)
        one = len(set(ks.values())) == 1
        gap = f"gap G_{next(iter(ks.values()))} = Pass@k - Acc@1" if one else "gap G_k = Pass@k - Acc@1 (each flag's k)"
        ax.set_title("Acc@1 (greedy)" if panel == 0 else gap)
        ax.axhline(0, color="black", linewidth=0.6)
    axes[0].legend(fontsize=7)
    return _png(fig)


def transfer_matrix(results: RunResults, metric: str = "acc@1") -> tuple[list[str], list[str], list[list[float]]]:
    """``(rows, columns, deltas)``: each trained model's ``metric`` on each flag minus the base model's."""
    flags = results.flags
    rows = [m for m in sorted(results.evals) if m != "base" and not m.startswith("boundary-")]  # sweep: own section
    deltas = []
    for model in rows:
        row = []
        for flag in flags:
            value, base = results.metric(model, flag, metric), results.metric("base", flag, metric)
            row.append(math.nan if value is None or base is None else value - base)
        deltas.append(row)
    return rows, flags, deltas


def transfer_heatmap(results: RunResults, metric: str = "acc@1") -> bytes:
    """A heatmap of :func:`transfer_matrix`: trained models (rows) measured on every flag (columns)."""
    rows, cols, deltas = transfer_matrix(results, metric)
    fig, ax = plt.subplots(figsize=(1.6 * len(cols) + 3, 0.5 * len(rows) + 1.8))
    finite = [abs(v) for r in deltas for v in r if not math.isnan(v)]
    bound = max(finite + [0.01])
    image = ax.imshow(deltas, cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    for i, r in enumerate(deltas):
        for j, v in enumerate(r):
            ax.text(j, i, "n/a" if math.isnan(v) else f"{v:+.2f}", ha="center", va="center", fontsize=7)
    ax.set_title(f"transfer: change in {metric} against the base model")
    fig.colorbar(image, ax=ax, fraction=0.04)
    return _png(fig)


def probe_chart(results: RunResults) -> bytes:
    """Test ACC of every probe (encoder and probe kind x flag) as grouped bars."""
    rows = results.probe_rows
    name = lambda r: f"{r['encoder']} [{r.get('probe', '?')}]"  # noqa: E731
    encoders = list(dict.fromkeys(name(r) for r in rows))
    flags = list(dict.fromkeys(r["flag"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(5, 1.8 * len(flags) + 2), 3.4))
    width = 0.8 / max(len(encoders), 1)
    for i, encoder in enumerate(encoders):
        values = []
        for flag in flags:
            match = [float(r["acc"]) for r in rows if name(r) == encoder and r["flag"] == flag]
            values.append(match[0] if match else math.nan)
        xs = [j + (i - (len(encoders) - 1) / 2) * width for j in range(len(flags))]
        ax.bar(xs, values, width=width, label=encoder, color=f"C{i}")
    ax.set_xticks(range(len(flags)), flags, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("test ACC")
    ax.set_title("probes of frozen encoders (linear [sgd], kNN [knn])")
    ax.legend(fontsize=7)
    return _png(fig)


def reward_curves(results: RunResults) -> bytes:
    """Each GRPO run's mean reward per step (a 5-step running mean over the raw, faint, values)."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for i, (model, log) in enumerate(sorted(results.rl_logs.items())):
        rewards = [float(r["reward/mean"]) for r in log if r.get("reward/mean") not in (None, "")]
        if not rewards:
            continue
        smooth = [
            sum(rewards[max(0, j - 4) : j + 1]) / len(rewards[max(0, j - 4) : j + 1]) for j in range(len(rewards))
        ]
        ax.plot(rewards, color=f"C{i % 10}", alpha=0.25, linewidth=0.8)
        ax.plot(smooth, color=f"C{i % 10}", label=model, linewidth=1.4)
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward")
    ax.set_title("GRPO reward per step (5-step running mean)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    return _png(fig)
