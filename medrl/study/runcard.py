"""The run card: what a result was produced with (versions, hardware, code revision, data hashes, seeds)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

from medrl.core.versions import code_revision, package_versions

__all__ = ["code_revision", "hardware", "package_versions", "run_card"]


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


def run_card(**extra: Any) -> dict[str, Any]:
    """Versions, hardware and code revision, plus whatever the caller records (seeds, configs, data hashes)."""
    return {"code": code_revision(), "versions": package_versions(), "hardware": hardware(), **extra}
