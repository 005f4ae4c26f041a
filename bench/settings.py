"""The settings of every comparison of `make bench` (FULL) and of its smoke run (QUICK, `--quick`).

Kept apart from run.py so that a side (bench/probe.py run on its own) reads them without importing the
harness that imports the sides.
"""

from __future__ import annotations

from typing import Any

FULL: dict[str, dict[str, Any]] = {
    "grpo": {"prompts": 4, "generations": 8, "completion_length": 64, "steps": 8, "warmup": 2, "threads": 1,
             "rounds": 3},
    "sampling": {"questions": 16, "k": 16, "max_new_tokens": 64, "batch_sizes": [1, 16, 64], "throughput_k": 4,
                 "repeats": 1, "threads": 1, "rounds": 2},
    "probe": {"encoders": ["timm:resnet18,pretrained=false", "vlm:{20m}",
                           "timm:vit_small_patch16_224,pretrained=false"],
              "flags": ["breastmnist", "pneumoniamnist"], "heads": 16, "epochs": 20, "batch_size": 1024,
              "train_samples": 256, "val_samples": 64, "test_samples": 128, "threads": 1, "rounds": 1},
}  # fmt: skip
# One torch thread per side by default: on a shared machine a second OpenMP thread spends its time waiting for a
# descheduled peer (HF generate ran 24x slower with 2 threads than with 1 at a load of 9 on 2 cores).
QUICK: dict[str, dict[str, Any]] = {
    "grpo": {**FULL["grpo"], "prompts": 2, "generations": 2, "completion_length": 8, "steps": 2, "warmup": 1,
             "rounds": 1},
    "sampling": {**FULL["sampling"], "questions": 2, "k": 4, "max_new_tokens": 8, "batch_sizes": [1, 2],
                 "repeats": 2, "rounds": 1},
    "probe": {**FULL["probe"], "encoders": ["qwen:tiny,image_size=native"], "flags": ["breastmnist"], "heads": 3,
              "epochs": 2, "train_samples": 32, "val_samples": 16, "test_samples": 16},
}  # fmt: skip
