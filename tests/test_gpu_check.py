"""The prepared GPU check runs end to end at toy size on a CPU, and the version floor it starts with holds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from medrl.core.errors import UserError
from medrl.core.versions import MINIMUM_VERSIONS, check_versions

REPO = Path(__file__).resolve().parents[1]
# The lent H200's image, as the device library's KINDS.md records it (2026-11): medrl runs there with --no-deps.
DEVICE = {"torch": "2.11.0+cu130", "transformers": "5.17.0", "lightning": "2.6.6"}


def test_the_version_floor_admits_this_stack_and_the_devices() -> None:
    here = check_versions()
    assert set(here) == set(MINIMUM_VERSIONS)
    assert check_versions(DEVICE) == DEVICE


def test_an_older_package_is_named_with_its_minimum() -> None:
    with pytest.raises(UserError, match=r"torch 2\.10\.1 \(needs >= 2\.11\)"):
        check_versions({**DEVICE, "torch": "2.10.1"})
    with pytest.raises(UserError, match=r"transformers 4\.57\.0 \(needs >= 5\.16\.1\)"):
        check_versions({**DEVICE, "transformers": "4.57.0"})


def test_the_kit_lists_only_what_the_device_lacks() -> None:
    names = {line.split("==")[0].split("[")[0] for line in (REPO / "requirements/gpu-kit.txt").read_text().splitlines()
             if line and not line.startswith("#")}  # fmt: skip
    assert names == {"jsonargparse", "docstring-parser", "typeshed-client", "medmnist", "fire", "termcolor"}
    assert not names & {"torch", "transformers", "lightning"}  # the device's own are used, never replaced


@pytest.mark.slow  # about 15 s of toy training, in a fresh process
def test_the_gpu_check_runs_at_toy_size_on_a_cpu(tmp_path: Path) -> None:
    cmd = [sys.executable, str(REPO / "bench/gpu_check.py"), "--device", "cpu", "--tiny", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    checks = results["checks"]
    assert set(checks) == {"peak", "sft", "grpo", "fsdp", "checkpointing"}
    assert all(c["passed"] for c in checks.values()), {k: c.get("error") for k, c in checks.items()}
    assert checks["fsdp"]["difference"] <= 1e-4 and 0 < checks["sft"]["mfu"] < 1
    assert {"generate", "reward", "advantage", "logprobs", "update", "sync"} <= set(checks["grpo"]["stages"])
    assert "| grpo |" in (tmp_path / "results.md").read_text()
