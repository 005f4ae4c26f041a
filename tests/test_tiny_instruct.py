"""tiny-instruct, the CPU study's base: it answers in the format from the first step with chance-level support,
so the headline GRPO command (configs/rl.yaml as it is) visibly learns."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from medrl.cli import main
from medrl.models.hub import resolve_model

REPO = Path(__file__).resolve().parents[1]


def test_tiny_instruct_writes_the_format_and_knows_no_task() -> None:
    folder = resolve_model("tiny-instruct")  # built on first use (about 30 s), then cached
    record = json.loads((folder / "instruct.json").read_text())
    assert record["format_rate"] >= 0.9  # well-formed greedy answers naming an offered letter
    # Format-only training: noise images, random gold letters. Its accuracy on fresh such questions is chance
    # (0.32 for their mix of 2-5 options) up to the sampling error of 64 questions (sd ~0.06).
    assert abs(record["accuracy"] - record["chance"]) < 0.2
    assert (folder / "config.json").is_file() and folder.name.startswith("tiny-instruct-")


def test_tiny_instruct_image_tokens_are_centred_on_noise() -> None:
    """What the tokens share is gone, what varies between images is kept (fresh noise, not the build's)."""
    import numpy as np
    import torch
    from PIL import Image

    from medrl.models.hub import load_vlm

    model, processor = load_vlm("tiny-instruct", device="cpu", dtype=torch.float32)
    rng = np.random.default_rng(123)
    noise = [Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)) for _ in range(32)]
    inputs = processor.image_processor(images=noise, return_tensors="pt")
    with torch.no_grad():
        out = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    tokens = out.pooler_output if hasattr(out, "pooler_output") else out
    tokens = tokens.reshape(-1, model.config.text_config.hidden_size)
    shared = tokens.mean(0).pow(2).mean().sqrt()
    varying = (tokens - tokens.mean(0)).pow(2).mean().sqrt()
    assert shared < 0.2 * varying, (float(shared), float(varying))
    record = json.loads((resolve_model("tiny-instruct") / "instruct.json").read_text())
    assert record["centred_rms"] > float(varying)  # the build removed a shared part larger than what varies


def test_the_headline_rl_config_learns(medmnist, tmp_path, monkeypatch) -> None:
    """`medrl fit --config configs/rl.yaml` unchanged (40 steps, tiny-instruct, PneumoniaMNIST)."""
    monkeypatch.chdir(tmp_path)
    argv = ["fit", "--config", str(REPO / "configs" / "rl.yaml"), "--trainer.default_root_dir", str(tmp_path / "rl"),
            *medmnist.cli("--data.init_args.")]  # fmt: skip
    assert main(argv) == 0
    log = tmp_path / "rl" / "lightning_logs" / "version_0" / "metrics.csv"
    rows = [r for r in csv.DictReader(log.open()) if r.get("reward/mean")]
    assert len(rows) == 40
    mean = lambda part, key: sum(float(r[key]) for r in part) / len(part)  # noqa: E731
    assert mean(rows[-10:], "reward/mean") > mean(rows[:10], "reward/mean")
    assert mean(rows[:10], "reward/format") > 0.8  # the base answers well-formed from the start
    assert sum(float(r["train/grad_norm"]) > 0 for r in rows) >= 35  # updates carry gradient
