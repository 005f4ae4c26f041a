"""MedMNIST ACC and AUC computed exactly as the ``medmnist`` package's Evaluator, plus ordinal extras.

``get_acc`` / ``get_auc`` follow ``medmnist.evaluator.getACC`` / ``getAUC`` step for step: inputs are
probabilities (not logits) and are squeezed first; binary tasks use the last column with a 0.5 threshold;
multi-label tasks average label-wise scores; every other task (multi-class and ordinal regression) uses the
argmax for ACC and the one-vs-rest mean for AUC. Where a class has no positive or no negative example (tiny
subsets) AUC is NaN here whatever the scikit-learn version (recent ones give NaN with a warning, older raise).

RetinaMNIST is ordinal, so :func:`evaluate` adds the mean absolute error of the predicted grade and the
quadratic-weighted Cohen's kappa for ordinal tasks.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import accuracy_score, cohen_kappa_score, roc_auc_score

MULTI_LABEL = "multi-label, binary-class"
BINARY = "binary-class"
ORDINAL = "ordinal-regression"


def _auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    if len(np.unique(y_true)) < 2:  # undefined
        return math.nan
    return float(roc_auc_score(y_true, y_score))


def get_auc(y_true: np.ndarray, y_score: np.ndarray, task: str) -> float:
    """AUC as ``medmnist.evaluator.getAUC``.

    Args:
        y_true: labels, ``[N, L]`` or ``[N]``.
        y_score: probabilities, ``[N, C]`` (or ``[N]`` for a binary task).
        task: the medmnist task string.
    """
    y_true, y_score = np.asarray(y_true).squeeze(), np.asarray(y_score).squeeze()
    if task == MULTI_LABEL:
        return float(np.mean([_auc(y_true[:, i], y_score[:, i]) for i in range(y_score.shape[1])]))
    if task == BINARY:
        if y_score.ndim == 2:
            y_score = y_score[:, -1]
        elif y_score.ndim != 1:
            raise ValueError(f"binary scores must be [N] or [N, C], got {y_score.shape}")
        return _auc(y_true, y_score)
    return float(np.mean([_auc((y_true == i).astype(float), y_score[:, i]) for i in range(y_score.shape[1])]))


def get_acc(y_true: np.ndarray, y_score: np.ndarray, task: str, threshold: float = 0.5) -> float:
    """ACC as ``medmnist.evaluator.getACC``.

    Args:
        y_true: labels, ``[N, L]`` or ``[N]``.
        y_score: probabilities, ``[N, C]`` (or ``[N]`` for a binary task).
        task: the medmnist task string.
        threshold: decision threshold for binary and multi-label tasks.
    """
    y_true, y_score = np.asarray(y_true).squeeze(), np.asarray(y_score).squeeze()
    if task == MULTI_LABEL:
        y_pred = y_score > threshold
        return float(np.mean([accuracy_score(y_true[:, i], y_pred[:, i]) for i in range(y_true.shape[1])]))
    if task == BINARY:
        if y_score.ndim == 2:
            y_score = y_score[:, -1]
        elif y_score.ndim != 1:
            raise ValueError(f"binary scores must be [N] or [N, C], got {y_score.shape}")
        return float(accuracy_score(y_true, y_score > threshold))
    return float(accuracy_score(y_true, np.argmax(y_score, axis=-1)))


def ordinal_mae(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Mean absolute error between the argmax grade and the true grade (labels ``[N]`` or ``[N, 1]``)."""
    return float(np.mean(np.abs(np.argmax(y_score, axis=-1) - np.asarray(y_true).reshape(-1))))


def quadratic_kappa(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Quadratic-weighted Cohen's kappa between the argmax grade and the true grade."""
    y_pred = np.argmax(y_score, axis=-1)
    y_true = np.asarray(y_true).reshape(-1)
    if len(np.unique(np.concatenate([y_true, y_pred]))) < 2:
        return math.nan  # one grade everywhere: kappa is 0/0
    return float(cohen_kappa_score(y_true, y_pred, weights="quadratic"))


def predicted_labels(y_score: np.ndarray, task: str, threshold: float = 0.5) -> np.ndarray:
    """Hard predictions the way ACC makes them: ``[N, L]`` booleans (multi-label) or ``[N]`` classes."""
    y_score = np.asarray(y_score)
    if task == MULTI_LABEL:
        return (y_score > threshold).astype(np.int64)
    if task == BINARY and y_score.ndim == 2:
        return (y_score[:, -1] > threshold).astype(np.int64)
    return np.argmax(y_score, axis=-1)


def majority_rate(y_true: np.ndarray, task: str) -> float:
    """ACC of always predicting the most frequent class (label-wise for multi-label): the collapse floor."""
    y_true = np.asarray(y_true)
    if task == MULTI_LABEL:
        positive = y_true.mean(0)
        return float(np.mean(np.maximum(positive, 1 - positive)))
    _, counts = np.unique(y_true.reshape(-1), return_counts=True)
    return float(counts.max() / counts.sum())


def evaluate(y_true: np.ndarray, y_score: np.ndarray, task: str) -> dict[str, float]:
    """``acc`` and ``auc`` (exactly medmnist's), plus ``mae`` and ``kappa`` for ordinal tasks."""
    metrics = {"acc": get_acc(y_true, y_score, task), "auc": get_auc(y_true, y_score, task)}
    if task == ORDINAL:
        metrics["mae"] = ordinal_mae(y_true, y_score)
        metrics["kappa"] = quadratic_kappa(y_true, y_score)
    return metrics
