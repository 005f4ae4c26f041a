"""Linear probes on cached, frozen encoder features (the study's vision axis).

Three ways to fit the same head, ``BatchNorm1d(affine=False)`` (optional) then ``Linear``:

- ``sgd`` (default): the authors' probe. SGD with momentum 0.9, lr 0.1, cosine over the epochs (20 epochs,
  batch 1024 in ``configs/probe.yaml``).
- ``adamw``: the MedMNIST+ style. AdamW, lr 1e-4; pair it with early stopping on ``val/loss``
  (``configs/probe_medmnist_plus.yaml``).
- ``lbfgs``: L-BFGS logistic regression on standardised features, one fit per inverse regularisation
  strength C, keeping the C with the best validation ACC (ties: lower validation loss), as in the CLIP and
  DINOv2 linear evaluations.
- ``knn``: no head at all: the weighted cosine kNN classifier (:mod:`medrl.metrics.knn`, the DINO rule the
  study's authors release as ``knn.py``), k chosen among ``knn_ks`` on validation ACC (ties: the smaller k),
  temperature ``knn_temperature``.

Multi-label data (ChestMNIST) gets one sigmoid output per label and binary cross-entropy; every other task a
softmax and cross-entropy. Validation and test report ACC/AUC exactly as the ``medmnist`` Evaluator
(:mod:`medrl.metrics.medmnist_eval`); the test loop also writes one prediction row per image and a metrics
JSON that records the encoder (including whether its weights were pretrained) and the data file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import nn

from medrl.core.errors import ConfigError
from medrl.data.medmnist_files import atomic_write_bytes
from medrl.metrics import medmnist_eval as me
from medrl.metrics.knn import DEFAULT_KS, TEMPERATURE, knn_probabilities

DEFAULT_C = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)


class LinearProbe(L.LightningModule):
    """A linear head trained on cached features; sizes and task come from the DataModule unless given.

    Args:
        optimizer: ``sgd`` (the authors'), ``adamw`` (MedMNIST+), ``lbfgs`` (logistic regression, C on val) or
            ``knn`` (weighted cosine kNN, k on val; nothing is trained).
        lr: learning rate; None means 0.1 for sgd and 1e-4 for adamw.
        momentum: SGD momentum.
        weight_decay: weight decay for sgd and adamw.
        batchnorm: put ``BatchNorm1d(affine=False)`` before the linear layer (standardises the features).
        cosine: cosine-anneal the learning rate over ``trainer.max_epochs`` (sgd and adamw).
        c_values: inverse regularisation strengths that ``lbfgs`` tries (sklearn's C).
        lbfgs_max_iter: L-BFGS iterations per C.
        in_features: feature width (None: from the DataModule).
        num_classes: outputs (None: from the DataModule).
        task: medmnist task string (None: from the DataModule).
        output_dir: where test predictions and metrics go (None: the logger's folder).
        cpu_threads: torch intra-op threads while the head trains or tests on CPU (None: leave torch's setting).
        knn_ks: the k that ``knn`` chooses from (default 10, 20, 100, 200).
        knn_temperature: the vote temperature T of ``knn`` (weights exp(similarity / T)).
    """

    def __init__(
        self,
        optimizer: Literal["sgd", "adamw", "lbfgs", "knn"] = "sgd",
        lr: float | None = None,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        batchnorm: bool = True,
        cosine: bool = True,
        c_values: list[float] | None = None,
        lbfgs_max_iter: int = 500,
        in_features: int | None = None,
        num_classes: int | None = None,
        task: str | None = None,
        output_dir: str | None = None,
        cpu_threads: int | None = 1,
        knn_ks: list[int] | None = None,
        knn_temperature: float = TEMPERATURE,
    ) -> None:
        super().__init__()
        if optimizer not in ("sgd", "adamw", "lbfgs", "knn"):
            raise ConfigError(f"optimizer must be sgd, adamw, lbfgs or knn, got {optimizer!r}")
        self.save_hyperparameters()
        self.automatic_optimization = optimizer not in ("lbfgs", "knn")
        self._bank: tuple[torch.Tensor, torch.Tensor] | None = None  # knn: training features and labels
        self.knn_k: int | None = None
        self.head: nn.Sequential | None = None
        self._outputs: dict[str, list[dict[str, torch.Tensor]]] = {"val": [], "test": []}
        self.last_metrics: dict[str, dict[str, Any]] = {}
        self._saved_threads: int | None = None
        if None not in (in_features, num_classes, task):
            self._build(in_features, num_classes, task)

    # ---- model ---------------------------------------------------------------------------------------------
    def _build(self, in_features: int, num_classes: int, task: str) -> None:
        self.hparams.update(in_features=in_features, num_classes=num_classes, task=task)
        self.task, self.multilabel = task, task == me.MULTI_LABEL
        # momentum=None: running statistics are the exact average over all batches, so eval-mode
        # normalisation is right even when an epoch is a single batch of 1024.
        norm = [nn.BatchNorm1d(in_features, affine=False, momentum=None)] if self.hparams.batchnorm else []
        self.head = nn.Sequential(*norm, nn.Linear(in_features, num_classes))

    def setup(self, stage: str) -> None:
        if self.head is not None:
            return
        dm = self.trainer.datamodule
        missing = [a for a in ("in_features", "num_classes", "task") if not hasattr(dm, a)]
        if missing:
            raise TypeError(f"{type(dm).__name__} lacks {missing}: pass them to LinearProbe or use FeatureDataModule")
        self._build(dm.in_features, dm.num_classes, dm.task)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, C]`` of features ``[B, D]`` (for ``knn``: the logits whose softmax or sigmoid gives the
        neighbours' votes)."""
        if self.hparams.optimizer == "knn":
            return self._knn_logits(features, self.knn_k)
        assert self.head is not None, "the head is built in setup() or from in_features/num_classes/task"
        return self.head(features.float())

    def _knn_logits(self, features: torch.Tensor, k: int | None) -> torch.Tensor:
        if self._bank is None or k is None:
            raise RuntimeError("the kNN probe has no training bank: it is built when fit starts")
        bank, labels = self._bank
        prob = knn_probabilities(features.cpu(), bank, labels, k, self.hparams.num_classes, self.multilabel,
                                 self.hparams.knn_temperature).clamp(1e-6, 1 - 1e-6)  # fmt: skip
        logits = torch.log(prob / (1 - prob)) if self.multilabel else torch.log(prob)
        return logits.to(features.device)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """BCE over labels ``[B, L]`` for multi-label tasks, cross-entropy on ``labels[:, 0]`` otherwise."""
        if self.multilabel:
            return F.binary_cross_entropy_with_logits(logits, labels.float())
        return F.cross_entropy(logits, labels[:, 0].long())

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """What the medmnist metrics take: sigmoid (multi-label) or softmax probabilities."""
        return torch.sigmoid(logits) if self.multilabel else logits.softmax(-1)

    # ---- loops ---------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        if not self.automatic_optimization:
            return None  # lbfgs fits in on_train_start; the epoch loop only runs validation
        loss = self.loss(self(batch["features"]), batch["label"])
        self.log("train/loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(batch["label"]))
        return loss

    def _eval_step(self, split: str, batch: dict[str, torch.Tensor]) -> None:
        logits = self(batch["features"])
        loss = self.loss(logits, batch["label"])
        self.log(f"{split}/loss", loss, prog_bar=True, on_epoch=True, batch_size=len(batch["label"]), sync_dist=True)
        self._outputs[split].append(
            {"prob": self.probabilities(logits), "label": batch["label"], "index": batch["index"]}
        )

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def _gathered(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        outputs, self._outputs[split] = self._outputs[split], []
        prob, label, index = (torch.cat([o[k] for o in outputs]) for k in ("prob", "label", "index"))
        if self.trainer.world_size > 1:
            prob, label, index = (self.all_gather(t).flatten(0, 1) for t in (prob, label, index))
            # DistributedSampler pads with repeats: keep each image once.
            _, first = np.unique(index.cpu().numpy(), return_index=True)
            keep = torch.from_numpy(first).to(prob.device)
            prob, label, index = prob[keep], label[keep], index[keep]
        return prob.float().cpu().numpy(), label.cpu().numpy(), index.cpu().numpy()

    def _epoch_end(self, split: str) -> None:
        if self.trainer.sanity_checking:
            self._outputs[split].clear()
            return
        prob, label, index = self._gathered(split)
        metrics = me.evaluate(label, prob, self.task)
        for name, value in metrics.items():
            self.log(f"{split}/{name}", value, prog_bar=name in ("acc", "auc"))
        predicted = me.predicted_labels(prob, self.task)
        collapsed = not self.multilabel and len(np.unique(predicted)) == 1
        if collapsed and split == "test":  # validation reports it once, at the end of fit
            rank_zero_warn("test: the probe predicts one class for every image (ACC = the majority rate)")
        self.last_metrics[split] = {
            **metrics,
            "n": len(label),
            "majority_rate": me.majority_rate(label, self.task),
            "collapsed": collapsed,
        }
        if split == "test":
            self._write_test_outputs(prob, label, index)

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")

    # ---- threads -------------------------------------------------------------------------------------------
    # A linear head's matmuls are far too small to gain from intra-op threads, and on a busy CPU the thread
    # hand-off dominates: a 20-epoch fit on 256 cached rows took 7.7 s with 2 threads and 1.6 s with 1 on a
    # loaded 2-core machine. Extraction (in the DataModule's setup) runs before this and keeps every thread.
    def _limit_threads(self) -> None:
        if self.hparams.cpu_threads and self.device.type == "cpu" and self._saved_threads is None:
            self._saved_threads = torch.get_num_threads()
            torch.set_num_threads(self.hparams.cpu_threads)

    def _restore_threads(self) -> None:
        if self._saved_threads is not None:
            torch.set_num_threads(self._saved_threads)
            self._saved_threads = None

    def on_fit_start(self) -> None:
        self._limit_threads()

    def on_test_start(self) -> None:
        self._limit_threads()

    def on_test_end(self) -> None:
        self._restore_threads()

    # ---- outputs -------------------------------------------------------------------------------------------
    def output_folder(self) -> Path:
        """Where test outputs go: ``output_dir``, else the logger's folder, else the trainer's root."""
        if self.hparams.output_dir:
            return Path(self.hparams.output_dir)
        return Path(self.trainer.log_dir or self.trainer.default_root_dir)

    @rank_zero_only
    def _write_test_outputs(self, prob: np.ndarray, label: np.ndarray, index: np.ndarray) -> None:
        folder = self.output_folder()
        label = label.reshape(len(label), -1)
        label_cols = ["label"] if label.shape[1] == 1 else [f"label_{i}" for i in range(label.shape[1])]
        header = ",".join(["index", *label_cols, *(f"prob_{i}" for i in range(prob.shape[1]))])
        rows = [
            ",".join([str(int(i)), *(str(int(v)) for v in lab), *(f"{p:.8g}" for p in pr)])
            for i, lab, pr in zip(index, label, prob, strict=True)
        ]
        atomic_write_bytes(folder / "predictions_test.csv", ("\n".join([header, *rows]) + "\n").encode())
        dm = self.trainer.datamodule
        record = {
            "split": "test",
            "metrics": self.last_metrics["test"],
            "data": dm.describe() if hasattr(dm, "describe") else None,
            "probe": dict(self.hparams),
            "predictions": "predictions_test.csv",
        }
        text = json.dumps(record, indent=2, default=str, allow_nan=True)
        atomic_write_bytes(folder / "metrics_test.json", text.encode())
        encoder = (record["data"] or {}).get("encoder", {})
        m = self.last_metrics["test"]
        print(
            f"test ACC {m['acc']:.4f} AUC {m['auc']:.4f} (n={m['n']}, majority {m['majority_rate']:.4f}) | "
            f"encoder {encoder.get('name')} pretrained={encoder.get('pretrained')} | {folder / 'metrics_test.json'}"
        )

    def on_fit_end(self) -> None:
        self._restore_threads()
        self._report_fit()

    @rank_zero_only
    def _report_fit(self) -> None:
        if "val" in self.last_metrics:
            m, dm = self.last_metrics["val"], self.trainer.datamodule
            line = f"val ACC {m['acc']:.4f} AUC {m['auc']:.4f} (n={m['n']}, majority {m['majority_rate']:.4f})"
            if hasattr(dm, "describe"):
                encoder = dm.describe()["encoder"]
                line += f" | encoder {encoder['name']} pretrained={encoder['pretrained']}"
            if m["collapsed"]:
                line += " | COLLAPSED: one class for every image"
            print(line)

    # ---- optimisation --------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        assert self.head is not None
        if hp.optimizer in ("lbfgs", "knn"):
            return None  # fitted in closed loop (lbfgs) or not at all (knn) by on_train_start
        params = self.head.parameters()
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=hp.lr or 0.1, momentum=hp.momentum, weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=hp.lr or 1e-4, weight_decay=hp.weight_decay)
        if not hp.cosine:
            return opt
        epochs = max(int(self.trainer.max_epochs or 1), 1)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)}

    def on_train_start(self) -> None:
        if self.hparams.optimizer == "lbfgs":
            self._fit_lbfgs()
        elif self.hparams.optimizer == "knn":
            self._fit_knn()

    @torch.no_grad()
    def _fit_knn(self) -> None:
        """Keep the training split as the bank; choose k on validation ACC (ties: the smaller k)."""
        dm = self.trainer.datamodule
        x, y = self._collect(dm.train_dataloader())
        xv, yv = self._collect(dm.val_dataloader())
        self._bank = (x.cpu(), y.cpu())
        scores = []
        for k in sorted(self.hparams.knn_ks or DEFAULT_KS):
            prob = self.probabilities(self._knn_logits(xv, k))
            scores.append((me.get_acc(yv.cpu().numpy(), prob.cpu().numpy(), self.task), -k))
        acc, neg_k = max(scores)
        self.knn_k = -neg_k
        self.hparams["chosen_k"] = self.knn_k
        self.log("knn/chosen_k", float(self.knn_k))
        print(f"knn: chose k={self.knn_k} (val ACC {acc:.4f}, T={self.hparams.knn_temperature})")

    def _collect(self, loader) -> tuple[torch.Tensor, torch.Tensor]:
        batches = list(loader)
        return (torch.cat([b["features"] for b in batches]).float().to(self.device),
                torch.cat([b["label"] for b in batches]).to(self.device))  # fmt: skip

    @torch.no_grad()
    def _fit_lbfgs(self) -> None:
        """Fit one logistic regression per C on the whole training split; keep the best on validation."""
        assert self.head is not None
        dm = self.trainer.datamodule
        x, y = self._collect(dm.train_dataloader())
        xv, yv = self._collect(dm.val_dataloader())
        linear = self.head[-1]
        if self.hparams.batchnorm:  # standardise with the training split's statistics, as a fixed transform
            norm = self.head[0]
            norm.running_mean.copy_(x.mean(0))
            norm.running_var.copy_(x.var(0, unbiased=False))
            norm.eval()
            x, xv = norm(x), norm(xv)
        best: tuple[float, float, float, dict[str, torch.Tensor]] | None = None
        for c in sorted(self.hparams.c_values or DEFAULT_C):  # weak to strong: each fit warm-starts the next
            with torch.enable_grad():
                fit_logistic_regression(linear, x, y, c, self.loss, self.hparams.lbfgs_max_iter)
            logits = linear(xv)
            acc = me.get_acc(yv.cpu().numpy(), self.probabilities(logits).cpu().numpy(), self.task)
            val_loss = float(self.loss(logits, yv))
            if best is None or (acc, -val_loss) > (best[1], -best[2]):
                best = (c, acc, val_loss, {k: v.clone() for k, v in linear.state_dict().items()})
        assert best is not None
        linear.load_state_dict(best[3])
        self.hparams["chosen_c"] = best[0]
        self.log("lbfgs/chosen_c", best[0])
        print(f"lbfgs: chose C={best[0]:g} (val ACC {best[1]:.4f}, val loss {best[2]:.4f})")


def fit_logistic_regression(
    linear: nn.Linear, x: torch.Tensor, y: torch.Tensor, c: float, loss_fn, max_iter: int = 500
) -> float:
    """Minimise ``loss_fn(linear(x), y) + ||W||^2 / (2 C N)`` with L-BFGS, in place; returns the final objective.

    This is sklearn's ``C * sum(loss) + ||W||^2 / 2`` divided by ``C * N`` (same minimiser; the bias is not
    penalised), so C means what it means in sklearn's ``LogisticRegression``.
    """
    penalty = 1.0 / (2.0 * c * len(x))
    opt = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        objective = loss_fn(linear(x), y) + penalty * linear.weight.pow(2).sum()
        objective.backward()
        return objective

    opt.step(closure)
    with torch.no_grad():
        value = float(loss_fn(linear(x), y) + penalty * linear.weight.pow(2).sum())
    if not math.isfinite(value):
        raise FloatingPointError(f"L-BFGS diverged at C={c}; standardise the features (batchnorm: true)")
    return value
