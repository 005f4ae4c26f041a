"""The laptop plan's unit costs on this machine, with SmolVLM-256M's shapes (``tiny:smolvlm-256m``, random weights).

Times what `configs/study/laptop.yaml` spends its time on: sampling for support (8 questions x (8 samples +
greedy) x 64 tokens), an SFT step (batch 8), a GRPO step (the plan's settings, through `medrl fit`) and probe
features through the SigLIP tower at 512 px. docs/laptop.md turns them into the plan's expected run time.

    python bench/laptop.py                  # 2 threads; writes bench/laptop.json
    python bench/laptop.py --threads 8

Needs ``$MEDRL_DATA_DIR`` (the real pneumoniamnist.npz); builds the 256M-shaped model once (about 1 GB).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = "tiny:smolvlm-256m"


def _items(split: str, n: int) -> list[dict]:
    from medrl.data.modalities import PneumoniaMNIST

    data = PneumoniaMNIST(mode="vqa", train_samples=n, val_samples=n, seed=0)
    return [data.dataset(split)[i] for i in range(n)]


def sampling_and_sft(threads: int) -> dict[str, float]:
    """Seconds of one support batch and of three SFT steps (the first is reported apart)."""
    import torch

    from medrl.data.collate import SFTCollator
    from medrl.models.hub import load_vlm
    from medrl.rollout.factory import make_engine
    from medrl.rollout.types import SamplingParams

    torch.set_num_threads(threads)
    model, processor = load_vlm(MODEL, image_options={"do_image_splitting": False})
    engine = make_engine("hf", model, processor)
    params = SamplingParams(n=8, temperature=0.7, top_p=0.9, max_new_tokens=64, greedy=True, seed=0)
    start = time.perf_counter()
    results = engine.generate(_items("val", 8), params)
    sampling = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for r in results for c in [*r.samples, r.greedy])
    collate, batch = SFTCollator(processor, max_completion_tokens=64), _items("train", 8)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    steps = []
    for _ in range(3):
        start = time.perf_counter()
        inputs = collate(batch)
        model(**inputs.inputs, labels=inputs.labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        steps.append(time.perf_counter() - start)
    return {"sampling_8q_s": sampling, "sampling_tokens_per_s": tokens / sampling, "sft_first_step_s": steps[0],
            "sft_step_s": sum(steps[1:]) / 2}  # fmt: skip


def probe_features(threads: int) -> float:
    """Seconds per image through the SmolVLM tower (512 px)."""
    import torch

    from medrl.data.modalities import PneumoniaMNIST
    from medrl.models.encoders import encoder_from_spec

    torch.set_num_threads(threads)
    encoder = encoder_from_spec(f"vlm:{MODEL}").load()
    dataset = PneumoniaMNIST(train_samples=18, seed=0).dataset("train")
    images = torch.stack([dataset[i]["image"] for i in range(18)])
    encoder.encode(images[:2])  # warm-up
    start = time.perf_counter()
    encoder.encode(images[2:])
    return (time.perf_counter() - start) / 16


def grpo_steps(threads: int) -> list[dict[str, float]]:
    """Stage seconds of 3 GRPO steps with the laptop plan's settings, from a real `medrl fit` run."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "medrl.cli", "fit", "--config", str(REPO / "configs" / "rl.yaml"),
                   "--model.init_args.model", MODEL, "--model.init_args.image_options", "{do_image_splitting: false}",
                   "--model.init_args.optim.micro_batch_size", "4", "--model.init_args.sampling.max_completion_length",
                   "64", "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
                   "--data.init_args.train_samples", "64", "--data.init_args.val_samples", "8",
                   "--trainer.default_root_dir", tmp]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MEDRL_PROGRESS": "0"}
        subprocess.run(command, check=True, env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rows = csv.DictReader((Path(tmp) / "lightning_logs" / "version_0" / "metrics.csv").open())
        keys = ("time/step", "time/generate", "time/update")
        return [{k: float(r[k]) for k in keys} for r in rows if r.get("time/step")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "bench" / "laptop.json"))
    args = parser.parse_args()
    result = {"model": MODEL, "threads": args.threads, "cpu_count": os.cpu_count(), "load": os.getloadavg()[0]}
    result.update(sampling_and_sft(args.threads))
    result["probe_s_per_image"] = probe_features(args.threads)
    result["grpo_steps"] = grpo_steps(args.threads)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
