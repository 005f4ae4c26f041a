"""Linear probe for 20 epochs: cached features against re-encoding the images every epoch.

The authors' probe script runs the frozen encoder inside every epoch. medrl extracts the features once
(into the content-keyed cache) and trains the head on them. Both arms here use the same encoder, the same
data file and splits, the same head (BatchNorm1d without affine, then Linear), the same optimiser (SGD,
momentum 0.9, lr 0.1, cosine), the same batch size, and validate after every epoch; each is timed end to end
from a cold start (the cached arm includes its extraction, into an empty cache folder). A third number is
the cached arm again with the cache warm, i.e. what every further probe on those features costs.

    python bench/probe.py                          # tiny's tower at native size, 256 + 64 breastmnist images
    python bench/probe.py --encoder qwen:tiny --train-samples 0     # at 224 px (64 tokens), whole splits
    python bench/probe.py --encoder timm:resnet18,pretrained=false,image_size=native --flag pneumoniamnist

The defaults are the cheap end on purpose: the cheaper the encoder per image, the larger the share of the
fixed costs (trainer start-up, head training) that caching cannot remove, so the ratio measured there is a
lower bound for costlier encoders and larger images.

Needs ``$MEDRL_DATA_DIR`` (the real .npz files).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import lightning as L
import torch

from medrl.data.medmnist import MedMNISTDataModule
from medrl.features import FeatureDataModule
from medrl.lit.probe import LinearProbe
from medrl.models.encoders import Encoder, encoder_from_spec


class ReencodingProbe(LinearProbe):
    """The same probe fed with images: the frozen encoder runs inside every training and validation step."""

    def __init__(self, encoder: Encoder, **kwargs) -> None:
        super().__init__(**kwargs)
        self.encoder = encoder

    def _features(self, batch: dict) -> dict:
        return {"features": self.encoder.encode(batch["image"]), "label": batch["label"], "index": batch["index"]}

    def training_step(self, batch: dict, batch_idx: int):
        return super().training_step(self._features(batch), batch_idx)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        super().validation_step(self._features(batch), batch_idx)


def _trainer(epochs: int) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def cached(args: argparse.Namespace, cache_dir: str) -> tuple[float, float]:
    """Seconds and final val ACC: extract (or reuse) features, then train the head."""
    start = time.perf_counter()
    encoder = encoder_from_spec(args.encoder)
    dm = FeatureDataModule(args.flag, encoder, batch_size=args.batch_size, extract_batch_size=args.extract_batch_size,
                           cache_dir=cache_dir, train_samples=args.train_samples, val_samples=args.val_samples,
                           progress=False)  # fmt: skip
    L.seed_everything(0, verbose=False)
    model = LinearProbe()
    _trainer(args.epochs).fit(model, datamodule=dm)
    return time.perf_counter() - start, model.last_metrics["val"]["acc"]


def reencoding(args: argparse.Namespace) -> tuple[float, float]:
    """Seconds and final val ACC when every epoch runs the encoder over the images again."""
    start = time.perf_counter()
    encoder = encoder_from_spec(args.encoder).load("cpu")
    images = MedMNISTDataModule(args.flag, batch_size=args.batch_size, train_samples=args.train_samples,
                                val_samples=args.val_samples)  # fmt: skip
    L.seed_everything(0, verbose=False)
    with torch.no_grad():  # the head needs in_features before fit: one image tells
        dim = encoder.encode(images.dataset("train")[0]["image"][None]).shape[1]
    # cpu_threads=None: the encoder runs inside the training step here and needs every thread.
    model = ReencodingProbe(encoder, in_features=dim, num_classes=images.num_classes, task=images.task,
                            cpu_threads=None)  # fmt: skip
    _trainer(args.epochs).fit(model, datamodule=images)
    return time.perf_counter() - start, model.last_metrics["val"]["acc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="qwen:tiny,image_size=native", help="spec, see medrl probe-table --help")
    parser.add_argument("--flag", default="breastmnist")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=256, help="probe batch (both arms)")
    parser.add_argument("--extract-batch-size", type=int, default=64)
    parser.add_argument("--train-samples", type=int, default=256, help="0: the whole split")
    parser.add_argument("--val-samples", type=int, default=64, help="0: the whole split")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    args.train_samples, args.val_samples = args.train_samples or None, args.val_samples or None
    torch.set_num_threads(args.threads)
    # Imports and one-off builds (tiny's folder) are paid here, outside both timings.
    encoder_from_spec(args.encoder).load("cpu")
    with tempfile.TemporaryDirectory() as cache_dir:
        cold, cold_acc = cached(args, cache_dir)
        warm, warm_acc = cached(args, cache_dir)
    slow, slow_acc = reencoding(args)
    rows = f"{args.train_samples or 'all'} train + {args.val_samples or 'all'} val images"
    print(f"\nencoder {args.encoder}, {args.flag} ({rows}), {args.epochs} epochs, {args.threads} threads")
    print(f"  re-encoding every epoch : {slow:8.1f} s  (val ACC {slow_acc:.4f})")
    print(f"  cached, cold cache      : {cold:8.1f} s  (val ACC {cold_acc:.4f})  -> {slow / cold:5.1f}x faster")
    print(f"  cached, warm cache      : {warm:8.1f} s  (val ACC {warm_acc:.4f})  -> {slow / warm:5.1f}x faster")


if __name__ == "__main__":
    main()
