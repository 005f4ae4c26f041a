"""Cached encoder features of a MedMNIST dataset as a Lightning DataModule: extract once, train many heads."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from medrl.data.medmnist import MedMNISTDataModule
from medrl.features.cache import CachedFeatures, FeatureCache, feature_key
from medrl.models.encoders import Encoder

log = logging.getLogger(__name__)


class FeatureRows(Dataset):
    """Rows of cached features: ``{"features": float [D], "label": int64 [L], "index": int}``."""

    def __init__(self, cached: CachedFeatures) -> None:
        self.cached = cached

    def __len__(self) -> int:
        return len(self.cached.features)

    def __getitem__(self, i: int) -> dict[str, Any]:
        c = self.cached
        return {"features": c.features[i], "label": c.labels[i], "index": c.indices[i]}


class FeatureDataModule(L.LightningDataModule):
    """A MedMNIST 2D dataset seen through a frozen encoder, one cached feature vector per image.

    The first use of an (encoder, flag, size, split, rows) combination runs the encoder over the images in
    batches with a progress bar and stores the result under a content key; every later run reads it back.

    Args:
        flag: MedMNIST flag, e.g. ``pneumoniamnist``.
        encoder: the frozen encoder (any :class:`medrl.models.encoders.Encoder`: timm, a VLM family's tower).
        size: image size of the data file (28, 64, 128 or 224); the encoder's own ``image_size`` decides
            what it sees.
        root: directory of the .npz files (default ``$MEDRL_DATA_DIR``).
        synthetic: use ``<flag>.synthetic.npz`` (written if absent) instead of the official file.
        batch_size: feature rows per training batch (the authors' probe uses 1024).
        extract_batch_size: images per encoder batch during extraction.
        num_workers: DataLoader workers for extraction.
        train_samples: a seeded subset of this many training images (None: all).
        val_samples: the same for validation.
        test_samples: the same for test.
        cache_dir: feature cache folder (default ``$MEDRL_CACHE/features``).
        device: where the encoder runs: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``...
        progress: show a progress bar with images/s during extraction.
        seed: seeds the subsets.
    """

    def __init__(
        self,
        flag: str,
        encoder: Encoder,
        size: int = 28,
        root: str | None = None,
        synthetic: bool = False,
        batch_size: int = 1024,
        extract_batch_size: int = 64,
        num_workers: int = 0,
        train_samples: int | None = None,
        val_samples: int | None = None,
        test_samples: int | None = None,
        cache_dir: str | None = None,
        device: str = "auto",
        progress: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["encoder"])
        self.encoder = encoder
        self.images = MedMNISTDataModule(
            flag=flag,
            size=size,
            root=root,
            mode="image",
            synthetic=synthetic,
            batch_size=extract_batch_size,
            num_workers=num_workers,
            train_samples=train_samples,
            val_samples=val_samples,
            test_samples=test_samples,
            seed=seed,
        )
        self.flag, self.size, self.batch_size, self.num_workers = flag, size, batch_size, num_workers
        self.extract_batch_size, self.progress = extract_batch_size, progress
        self.device = device
        self.cache = FeatureCache(cache_dir)
        self.splits: dict[str, CachedFeatures] = {}

    def _device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def features(self, split: str) -> CachedFeatures:
        """One split's features, from the cache or extracted now (once per process)."""
        if split not in self.splits:
            dataset = self.images.dataset(split)
            key = feature_key(self.encoder, dataset, self.size, self.images.path)
            cached = self.cache.get(
                key, self.encoder, dataset, self.extract_batch_size, self._device(), self.num_workers, self.progress
            )
            how = "cache hit" if cached.hit else f"extracted in {cached.seconds:.1f}s"
            log.info("%s %s: %d x %d features (%s) %s", self.flag, split, *cached.features.shape, how, cached.path)
            self.splits[split] = cached
        return self.splits[split]

    def prepare_data(self) -> None:
        """Write the synthetic file if one is asked for; features are extracted lazily, per stage, in setup."""
        self.images.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        """Load (or extract) the features of the splits the stage needs; record the encoder in the hparams."""
        needs = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in needs.get(stage or "", ("train", "val", "test")):
            self.features(split)
        self.hparams["encoder"] = self.encoder.describe()
        self.hparams["synthetic_file"] = self.images.arrays.synthetic

    def describe(self) -> dict[str, Any]:
        """The data and encoder behind these features, for metrics files and tables."""
        return {
            "flag": self.flag,
            "size": self.size,
            "file": str(self.images.path),
            "synthetic": self.images.arrays.synthetic,
            "task": self.task,
            "encoder": self.encoder.describe(),
            "encoder_label": self.encoder.label,
            "rows": {s: len(c.indices) for s, c in self.splits.items()},
        }

    @property
    def in_features(self) -> int:
        """Width of the feature vectors."""
        split = next(iter(self.splits), None) or "train"
        return int(self.features(split).features.shape[1])

    @property
    def num_classes(self) -> int:
        """Outputs of the probe head (14 for ChestMNIST, else the class count)."""
        return self.images.num_classes

    @property
    def task(self) -> str:
        """The medmnist task string (``binary-class``, ``multi-class``, ``multi-label, binary-class``, ...)."""
        return self.images.task

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        # Rows are in memory already: worker processes would only add start-up time.
        return DataLoader(FeatureRows(self.features(split)), batch_size=self.batch_size, shuffle=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
