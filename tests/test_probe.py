"""Feature cache, linear probe, `medrl fit/test` with the probe configs, and `medrl probe-table`."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medrl.cli import main
from medrl.core.errors import ConfigError
from medrl.data.medmnist_files import synthesize
from medrl.features import FeatureCache, FeatureDataModule, feature_key
from medrl.lit.probe import LinearProbe, fit_logistic_regression
from medrl.models.encoders import TimmEncoder
from medrl.study.configs import MedRLCLI
from medrl.study.probe_table import probe_table

CONFIGS = sorted(Path(__file__).parents[1].glob("configs/probe*.yaml"))


def _resnet() -> TimmEncoder:
    # Native 28 px keeps a random resnet18 fast on a CPU; its features still carry the synthetic signal.
    return TimmEncoder("resnet18", pretrained=False, image_size="native")


def _dm(root: Path, cache: Path, flag: str = "pneumoniamnist", encoder=None, **kwargs) -> FeatureDataModule:
    kwargs.setdefault("synthetic", True)
    if not (root / f"{flag}.synthetic.npz").is_file():  # small files keep the suite fast on two cores
        synthesize(flag, 28, root, n_train=128 if flag == "chestmnist" else 96, n_val=64, n_test=64)
    return FeatureDataModule(flag, encoder or _resnet(), root=str(root), cache_dir=str(cache), progress=False, **kwargs)


def _trainer(epochs: int, **kwargs) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, **kwargs,
    )  # fmt: skip


def test_cache_hits_and_invalidation(tmp_path):
    dm = _dm(tmp_path, tmp_path / "cache")
    dm.setup("fit")
    first = dm.features("train")
    assert not first.hit and first.features.shape == (96, 512) and first.path.is_file()
    again = _dm(tmp_path, tmp_path / "cache")
    again.setup("fit")
    assert again.features("train").hit and torch.equal(again.features("train").features, first.features)
    # Anything that changes the features changes the key: encoder setting, rows, or the data file itself.
    pooled = _dm(tmp_path, tmp_path / "cache", encoder=TimmEncoder("resnet18", False, image_size="native",
                                                                   global_pool="max"))  # fmt: skip
    assert not pooled.features("train").hit and pooled.features("train").path != first.path
    subset = _dm(tmp_path, tmp_path / "cache", train_samples=50)
    assert not subset.features("train").hit and len(subset.features("train").indices) == 50
    synthesize("pneumoniamnist", 28, tmp_path, n_train=96, n_val=64, n_test=64, seed=1)  # same name, new content
    changed = _dm(tmp_path, tmp_path / "cache")
    assert not changed.features("train").hit and changed.features("train").path != first.path
    assert changed.features("train").key["synthetic"] is True


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupted_cache_file_is_detected_and_rebuilt(tmp_path, damage, caplog):
    dm = _dm(tmp_path, tmp_path / "cache")
    original = dm.features("val")
    data = bytearray(original.path.read_bytes())
    if damage == "flip":
        data[-100] ^= 0xFF  # inside the tensor bytes: the header still parses, the checksum does not match
    else:
        data = data[: len(data) // 2]
    original.path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="medrl.features.cache"):
        rebuilt = _dm(tmp_path, tmp_path / "cache").features("val")
    assert "corrupt" in caplog.text
    assert not rebuilt.hit and torch.equal(rebuilt.features, original.features)
    assert FeatureCache(tmp_path / "cache").load(rebuilt.key) is not None  # the rebuilt file reads back whole


class _FailingEncoder(TimmEncoder):
    """A real encoder that dies after a number of batches, as a killed process would."""

    def __init__(self, fail_after: int | None) -> None:
        super().__init__("resnet18", pretrained=False, image_size="native")
        self.fail_after, self.images_seen = fail_after, 0

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        if self.fail_after is not None and self.images_seen >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.images_seen += len(images)
        return super()._encode(images)


def test_interrupted_extraction_resumes_from_finished_chunks(tmp_path):
    dm = _dm(tmp_path, tmp_path / "cache", train_samples=48)
    dataset = dm.images.dataset("train")  # 48 images: chunks of 16, batches of 8
    cache = FeatureCache(tmp_path / "cache", chunk_size=16)
    key = feature_key(_resnet(), dataset, 28, dm.images.path)
    with pytest.raises(KeyboardInterrupt):  # dies in the second chunk, after 24 images
        cache.get(key, _FailingEncoder(fail_after=24), dataset, batch_size=8, progress=False)
    assert cache.load(key) is None  # nothing that looks complete
    resumed_encoder = _FailingEncoder(fail_after=None)
    resumed = cache.get(key, resumed_encoder, dataset, batch_size=8, progress=False)
    assert resumed_encoder.images_seen == 48 - 16  # the finished first chunk was reused, the rest re-encoded
    fresh = FeatureCache(tmp_path / "fresh").get(key, _resnet(), dataset, batch_size=8, progress=False)
    torch.testing.assert_close(resumed.features, fresh.features)
    assert not resumed.path.with_suffix(".partial").exists()


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """A data root and feature cache shared by the tests that only read them (features extracted once)."""
    return tmp_path_factory.mktemp("shared")


def test_probe_learns_the_synthetic_signal(shared):
    dm = _dm(shared, shared / "cache", flag="bloodmnist", batch_size=64)  # 8 classes: chance is 1/8
    model = LinearProbe()
    L.seed_everything(0)
    _trainer(5).fit(model, datamodule=dm)
    assert model.last_metrics["val"]["acc"] > 0.6
    assert not model.last_metrics["val"]["collapsed"]


def test_result_does_not_depend_on_whether_features_were_cached(tmp_path):
    weights = []
    for _ in ("cold", "warm"):
        model = LinearProbe()
        L.seed_everything(0)
        _trainer(2).fit(model, datamodule=_dm(tmp_path, tmp_path / "cache", batch_size=32))
        weights.append(model.head[-1].weight.detach().clone())
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=0)


def test_multilabel_chestmnist_uses_14_sigmoids_and_bce(tmp_path):
    dm = _dm(tmp_path, tmp_path / "cache", flag="chestmnist", batch_size=32)
    model = LinearProbe(output_dir=str(tmp_path / "out"))
    L.seed_everything(0)
    trainer = _trainer(5)
    trainer.fit(model, datamodule=dm)
    assert model.head[-1].out_features == 14
    batch = next(iter(dm.val_dataloader()))
    logits = model(batch["features"])
    torch.testing.assert_close(model.loss(logits, batch["label"]), F.binary_cross_entropy_with_logits(
        logits, batch["label"].float()))  # fmt: skip
    assert ((model.probabilities(logits) > 0) & (model.probabilities(logits) < 1)).all()
    trainer.test(model, datamodule=dm, verbose=False)
    assert model.last_metrics["test"]["auc"] > 0.6
    with open(tmp_path / "out" / "predictions_test.csv") as fh:
        header = next(csv.reader(fh))
    assert header[:2] == ["index", "label_0"] and header[-1] == "prob_13" and len(header) == 1 + 14 + 14


def test_lbfgs_logistic_regression_matches_sklearn():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5))
    y = (x @ rng.normal(size=(5, 3))).argmax(1) + 0
    ours = torch.nn.Linear(5, 3).double()
    fit_logistic_regression(ours, torch.from_numpy(x), torch.from_numpy(y)[:, None],
                            0.5, lambda z, t: F.cross_entropy(z, t[:, 0]), 500)  # fmt: skip
    theirs = LogisticRegression(C=0.5, max_iter=5000, tol=1e-10).fit(x, y)
    with torch.no_grad():
        probs = ours(torch.from_numpy(x)).softmax(-1).numpy()
    np.testing.assert_allclose(probs, theirs.predict_proba(x), atol=1e-4)


def test_lbfgs_probe_chooses_c_on_validation(shared):
    dm = _dm(shared, shared / "cache", flag="bloodmnist")
    model = LinearProbe(optimizer="lbfgs", c_values=[1e-4, 1e-2, 1.0], lbfgs_max_iter=100)
    _trainer(1).fit(model, datamodule=dm)
    assert model.hparams.chosen_c in (1e-4, 1e-2, 1.0)
    assert model.last_metrics["val"]["acc"] > 0.6


def test_knn_probabilities_hand_worked_and_multilabel():
    from medrl.metrics.knn import knn_probabilities

    # Query (1, 0.1) normalised: cosine 0.995 with (1, 0) [class 0] and 0.856 with (0.8, 0.6) [class 1]; at
    # T = 1 the votes are e^0.995 = 2.705 and e^0.856 = 2.353: p = 2.705 / 5.058 = 0.535 for class 0.
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])
    p = knn_probabilities(torch.tensor([[1.0, 0.1]]), bank, torch.tensor([[0], [1], [1]]), 2, 2, temperature=1.0)
    assert p[0].tolist() == pytest.approx([0.5348, 0.4652], abs=1e-4)
    # Multi-label: each label's probability is the weighted share of neighbours carrying it.
    labels = torch.tensor([[1, 0], [0, 1], [1, 1]])
    p = knn_probabilities(torch.tensor([[1.0, 0.1]]), bank, labels, 2, 2, multilabel=True, temperature=1.0)
    assert p[0].tolist() == pytest.approx([1.0, 0.4652], abs=1e-4)


def test_knn_matches_a_loop_and_does_not_depend_on_the_chunk():
    from medrl.metrics.knn import knn_probabilities

    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(60, 8, generator=g), torch.randn(9, 8, generator=g)
    labels = torch.randint(0, 4, (60, 1), generator=g)
    fast = knn_probabilities(queries, bank, labels, k=10, num_classes=4, chunk=7)
    assert torch.allclose(fast, knn_probabilities(queries, bank, labels, k=10, num_classes=4, chunk=1000), atol=1e-6)
    for i, q in enumerate(queries):
        sims = sorted(((float(F.cosine_similarity(q, b, dim=0)), int(labels[j, 0])) for j, b in enumerate(bank)),
                      reverse=True)[:10]  # fmt: skip
        votes = [sum(math.exp(s / 0.07) for s, c in sims if c == cls) for cls in range(4)]
        assert fast[i].tolist() == pytest.approx([v / sum(votes) for v in votes], abs=1e-5)


def test_knn_probe_chooses_k_on_validation_and_tests(shared, tmp_path):
    dm = _dm(shared, shared / "cache", flag="bloodmnist")
    model = LinearProbe(optimizer="knn", knn_ks=[1, 10, 50], output_dir=str(tmp_path))  # not the working directory
    trainer = _trainer(1)
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
    assert model.hparams.chosen_k in (1, 10, 50)
    assert model.last_metrics["test"]["acc"] > 0.5 and 0.5 < model.last_metrics["test"]["auc"] <= 1.0


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_probe_configs_parse(config, tmp_path):
    cli = MedRLCLI(args=["--config", str(config), "--data.root", str(tmp_path)], run=False)
    assert isinstance(cli.model, LinearProbe) and isinstance(cli.datamodule, FeatureDataModule)


def test_medrl_fit_and_test_on_real_pneumonia(real_data_dir, tiny_dir, tmp_path, capsys):
    """The documented commands on the real file: a random resnet18 and the tiny tower, on subsets."""
    common = [
        "--config", "configs/probe.yaml", "--data.root", str(real_data_dir), "--data.cache_dir", str(tmp_path / "c"),
        "--data.train_samples", "256", "--data.val_samples", "64", "--data.test_samples", "200",
        "--data.progress", "false", "--trainer.enable_progress_bar", "false", "--trainer.max_epochs", "5",
        "--data.encoder.image_size", "native",  # 4 tokens per image for tiny: keeps the test fast
    ]  # fmt: skip
    timm = ["--data.encoder", "medrl.models.encoders.TimmEncoder", "--data.encoder.name", "resnet18",
            "--data.encoder.pretrained", "false", "--data.encoder.image_size", "native"]  # fmt: skip
    for name, encoder in (("resnet", timm), ("tiny", ["--data.encoder.model", str(tiny_dir)])):
        root = tmp_path / name
        assert main(["fit", *common, *encoder, "--trainer.default_root_dir", str(root)]) == 0
        assert "val ACC" in capsys.readouterr().out
        ckpt = next(root.rglob("last.ckpt"))
        assert main(["test", *common, *encoder, "--trainer.default_root_dir", str(root), "--ckpt_path", str(ckpt)]) == 0
        assert "test ACC" in capsys.readouterr().out
        record = json.loads(next(root.rglob("metrics_test.json")).read_text())
        assert record["data"]["encoder"]["pretrained"] is False and record["data"]["synthetic"] is False
        assert record["metrics"]["n"] == 200
        rows = next(root.rglob("predictions_test.csv")).read_text().splitlines()
        assert rows[0] == "index,label,prob_0,prob_1" and len(rows) == 201
        # Above the 200-image subset's majority rate: the probe has not collapsed to one class.
        assert record["metrics"]["acc"] > record["metrics"]["majority_rate"], name


def test_probe_table_writes_the_table_and_skips_finished_cells(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEDRL_PROGRESS", "1")  # the extraction bar names each extraction: none on a cache hit
    args = [
        "probe-table", "--encoders", json.dumps(["timm:resnet18,pretrained=false,image_size=native",
                                                 f"qwen:{tiny_dir},image_size=native"]),
        "--flags", "[breastmnist]", "--root", str(tmp_path), "--synthetic", "true", "--out", str(tmp_path / "t"),
        "--max_epochs", "2", "--cache_dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    assert main(args) == 0
    capsys_first_err = capsys.readouterr().err
    rows = list(csv.DictReader(open(tmp_path / "t" / "results.csv")))
    assert len(rows) == 2 and {r["pretrained"] for r in rows} == {"False"} and rows[0]["synthetic"] == "True"
    assert (tmp_path / "t" / "results.png").stat().st_size > 1000
    assert "resnet18 (random init)" in (tmp_path / "t" / "results.md").read_text()
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().out.count("skip breastmnist") == 2
    assert list(csv.DictReader(open(tmp_path / "t" / "results.csv"))) == rows
    # kNN as a second probe of the same cells: two more rows, the features read from the cache, not re-extracted.
    capsys.readouterr()
    assert main([*args, "--optimizer", "[sgd, knn]"]) == 0
    out = capsys.readouterr()
    both = list(csv.DictReader(open(tmp_path / "t" / "results.csv")))
    assert [r["probe"] for r in both] == ["sgd", "sgd", "knn", "knn"] and both[:2] == rows
    assert out.out.count("skip breastmnist") == 2 and "features breastmnist" not in out.err
    assert "features breastmnist" in capsys_first_err
    # A learning-rate sweep: one sgd head per rate on the cached features; kNN takes no rate, so it is skipped.
    assert main([*args, "--optimizer", "[sgd, knn]", "--lr", "[1.0, 0.001]"]) == 0
    out = capsys.readouterr()
    swept = list(csv.DictReader(open(tmp_path / "t" / "results.csv")))
    assert swept[:4] == both and [(r["probe"], r["lr"]) for r in swept[4:]] == [("sgd", "1.0"), ("sgd", "0.001")] * 2
    assert out.out.count("skip breastmnist") == 2 and "features breastmnist" not in out.err  # nothing re-extracted
    # The rates train different heads: the test probabilities differ.
    first = [r["cell"] for r in swept[4:6]]
    probs = [(tmp_path / "t" / "cells" / c / "predictions_test.csv").read_text() for c in first]
    assert probs[0] != probs[1]
    with pytest.raises(ConfigError, match="lr must be positive"):
        probe_table([f"qwen:{tiny_dir},image_size=native"], flags=["breastmnist"], root=str(tmp_path),
                    synthetic=True, out=str(tmp_path / "t"), lr=[0.1, 0.0])  # fmt: skip


@pytest.mark.slow
def test_ddp_test_metrics_equal_single_process(shared, tmp_path):
    """Under DDP every rank scores a shard; gathered (and de-padded) predictions give the single-process metrics."""
    dm = _dm(shared, shared / "cache", flag="bloodmnist", test_samples=63)  # odd: the sampler pads one row
    model = LinearProbe(output_dir=str(tmp_path / "one"))
    L.seed_everything(0)
    trainer = _trainer(2)
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
    ddp = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_progress_bar=False,
                    enable_model_summary=False)  # fmt: skip
    model.hparams.output_dir = str(tmp_path / "two")
    ddp.test(model, datamodule=_dm(shared, shared / "cache", flag="bloodmnist", test_samples=63), verbose=False)
    one = json.loads((tmp_path / "one" / "metrics_test.json").read_text())["metrics"]
    two = json.loads((tmp_path / "two" / "metrics_test.json").read_text())["metrics"]
    assert two["n"] == one["n"] == 63
    assert two["acc"] == pytest.approx(one["acc"]) and two["auc"] == pytest.approx(one["auc"])
