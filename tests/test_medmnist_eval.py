"""medrl's MedMNIST metrics against the medmnist package's Evaluator and against hand-worked values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medrl.data.medmnist_files import load_file
from medrl.lit.probe import fit_logistic_regression
from medrl.metrics import medmnist_eval as me

evaluator = pytest.importorskip("medmnist.evaluator")


def _pixel_probe_scores(root, flag: str) -> tuple[np.ndarray, np.ndarray]:
    """Real predictions: a logistic regression on raw pixels of the real train split, scored on the test split."""
    arrays = load_file(root / f"{flag}.npz", flag, 28)
    x = torch.from_numpy(arrays.images["train"].reshape(len(arrays.images["train"]), -1)).float() / 255
    xt = torch.from_numpy(arrays.images["test"].reshape(len(arrays.images["test"]), -1)).float() / 255
    mean, std = x.mean(0), x.std(0) + 1e-6
    linear = torch.nn.Linear(x.shape[1], 2)
    y = torch.from_numpy(arrays.labels["train"])
    fit_logistic_regression(linear, (x - mean) / std, y, 1.0, lambda z, t: F.cross_entropy(z, t[:, 0]), 50)
    with torch.no_grad():
        probs = linear((xt - mean) / std).softmax(-1).numpy()
    return arrays.labels["test"], probs


@pytest.mark.parametrize("flag", ["breastmnist", "pneumoniamnist"])
def test_equal_to_medmnist_evaluator_on_real_test_predictions(real_data_dir, flag):
    labels, probs = _pixel_probe_scores(real_data_dir, flag)
    task = "binary-class"
    assert me.get_acc(labels, probs, task) == evaluator.getACC(labels, probs, task)
    assert me.get_auc(labels, probs, task) == evaluator.getAUC(labels, probs, task)
    # The 1-D form (probability of the positive class) goes through the Evaluator's other branch.
    assert me.get_acc(labels, probs[:, 1], task) == evaluator.getACC(labels, probs[:, 1], task)
    assert me.get_auc(labels, probs[:, 1], task) == evaluator.getAUC(labels, probs[:, 1], task)
    # A real probe, not a constant: it must beat always answering the majority class.
    assert me.get_acc(labels, probs, task) > me.majority_rate(labels, task)


@pytest.mark.parametrize(
    ("task", "classes"),
    [("multi-class", 8), ("ordinal-regression", 5), ("multi-label, binary-class", 14), ("binary-class", 2)],
)
def test_equal_to_medmnist_evaluator_for_every_task_type(task, classes):
    rng = np.random.default_rng(0)
    n = 200
    if task.startswith("multi-label"):
        labels = (rng.random((n, classes)) < 0.3).astype(np.uint8)
        scores = rng.random((n, classes))
    else:
        labels = rng.integers(0, classes, (n, 1))
        scores = rng.dirichlet(np.ones(classes), n)
    assert me.get_acc(labels, scores, task) == evaluator.getACC(labels, scores, task)
    assert me.get_auc(labels, scores, task) == evaluator.getAUC(labels, scores, task)


def test_hand_worked_binary():
    labels = np.array([[0], [0], [1], [1]])
    # Positive-class probabilities 0.1, 0.6, 0.4, 0.9: thresholding at 0.5 gets rows 0 and 3 right -> ACC 0.5.
    # Of the 4 (negative, positive) pairs only (0.6, 0.4) is ordered wrongly -> AUC 3/4.
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.6, 0.4], [0.1, 0.9]])
    assert me.get_acc(labels, probs, "binary-class") == 0.5
    assert me.get_auc(labels, probs, "binary-class") == 0.75


def test_hand_worked_ordinal_extras():
    labels = np.array([0, 1, 2, 3])
    # Argmax grades 0, 2, 2, 1: absolute errors 0, 1, 0, 2 -> MAE 3/4.
    scores = np.eye(4)[[0, 2, 2, 1]]
    assert me.ordinal_mae(labels, scores) == 0.75
    # Quadratic kappa, 4 grades, weights w_ij = (i-j)^2 / 9. Observed: pairs (0,0) (1,2) (2,2) (3,1) weigh
    # 0 + 1/9 + 0 + 4/9, mean 5/36. Expected under independent marginals (true 1/4 each; predicted 1/4, 1/4,
    # 1/2, 0): for true grade 0..3 the sums of q_j (i-j)^2 are 2.25, 0.75, 1.25, 3.75 = 8, so 8/9 * 1/4 = 8/36.
    # kappa = 1 - (5/36) / (8/36) = 3/8.
    assert me.quadratic_kappa(labels, scores) == pytest.approx(0.375)
    metrics = me.evaluate(labels[:, None], scores, "ordinal-regression")
    assert set(metrics) == {"acc", "auc", "mae", "kappa"} and metrics["acc"] == 0.5


def test_auc_is_nan_when_a_class_is_absent():
    labels = np.array([[0], [0], [0]])  # no positive example: AUC is undefined
    probs = np.array([[0.8, 0.2], [0.3, 0.7], [0.5, 0.5]])
    assert math.isnan(me.get_auc(labels, probs, "binary-class"))
    # Either the Evaluator raises (older scikit-learn) or gives NaN too (newer): never a number.
    try:
        theirs = evaluator.getAUC(labels, probs, "binary-class")
    except ValueError:
        return
    assert math.isnan(theirs)


def test_majority_rate_matches_manifest_figures(real_data_dir):
    # The data MANIFEST gives the test-set majority rates: breast 114/156 = 73.08 %, pneumonia 390/624 = 62.50 %.
    breast = load_file(real_data_dir / "breastmnist.npz", "breastmnist", 28).labels["test"]
    pneumonia = load_file(real_data_dir / "pneumoniamnist.npz", "pneumoniamnist", 28).labels["test"]
    assert me.majority_rate(breast, "binary-class") == pytest.approx(114 / 156)
    assert me.majority_rate(pneumonia, "binary-class") == pytest.approx(390 / 624)
