"""Shared fixtures: the real-data directory, MedMNIST files for data-agnostic tests, and the offline tiny VLM."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from medrl.core.env import DATA_DIR_ENV


def pytest_configure(config: pytest.Config) -> None:
    # Nothing in the suite may touch the network: hub lookups must fail fast and locally.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("MEDRL_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Two cores on CI: more intra-op threads than cores only adds contention.
    torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU; none is visible (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests: the tiny models' matmuls are too small to gain from a second, and
    on a shared, loaded 2-core machine two spinning threads per process made GRPO runs about 10x slower (1.5 s
    vs 14 s for 3 steps). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The directory of real MedMNIST files ($MEDRL_DATA_DIR); tests needing it skip when it is unset."""
    value = os.environ.get(DATA_DIR_ENV)
    if not value:
        pytest.skip(f"{DATA_DIR_ENV} is not set: point it at a folder of official MedMNIST files to run this test")
    path = Path(value)
    if not (path / "pneumoniamnist.npz").is_file() or not (path / "breastmnist.npz").is_file():
        pytest.fail(f"{DATA_DIR_ENV}={path} lacks pneumoniamnist.npz / breastmnist.npz")
    return path


@dataclass(frozen=True)
class MedMNISTFolder:
    """A folder of PneumoniaMNIST and BreastMNIST files: the real ones, or synthetic stand-ins."""

    root: Path
    synthetic: bool

    def kwargs(self) -> dict[str, object]:
        """``root`` and ``synthetic`` for a MedMNIST DataModule."""
        return {"root": str(self.root), "synthetic": self.synthetic}

    def cli(self, prefix: str = "--data.init_args.") -> list[str]:
        """The same two settings as ``medrl fit`` options."""
        return [f"{prefix}root={self.root}", f"{prefix}synthetic={str(self.synthetic).lower()}"]


@pytest.fixture(scope="session")
def medmnist(tmp_path_factory: pytest.TempPathFactory) -> MedMNISTFolder:
    """For tests that need MedMNIST-format files but not the real images (training, rollouts, callbacks).

    The real files when $MEDRL_DATA_DIR holds them (as on CI); otherwise synthetic files in the official
    format (``medrl data synth``), so a clone without the shared data still tests the SFT and RL paths.
    """
    value = os.environ.get(DATA_DIR_ENV)
    if value and all((Path(value) / f"{flag}.npz").is_file() for flag in ("pneumoniamnist", "breastmnist")):
        return MedMNISTFolder(Path(value), synthetic=False)
    from medrl.data.medmnist_files import synthesize

    root = tmp_path_factory.mktemp("medmnist-synthetic")
    for flag in ("pneumoniamnist", "breastmnist"):
        synthesize(flag, out=root)
    return MedMNISTFolder(root, synthetic=True)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen2.5-VL saved to disk once per session (an isolated cache, built offline)."""
    from medrl.models.families.qwen_vl import tiny_dir as build

    return build(seed=0, root=tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny(tiny_dir: Path):
    """``(model, processor)`` of the tiny VLM, loaded from its saved folder, fp32, CPU, eval mode."""
    from medrl.models.hub import load_vlm

    return load_vlm(str(tiny_dir))
