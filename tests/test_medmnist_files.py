"""MedMNIST files: the real release verifies and loads; synthetic files round-trip; bad input fails clearly."""

from __future__ import annotations

import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from medrl.core.env import DATA_DIR_ENV
from medrl.data import medmnist_files as mf
from medrl.data.medmnist import MedMNISTDataModule

REAL = {  # from the MANIFEST of the real files: (train, val, test), class counts of test
    "breastmnist": ((546, 78, 156), [42, 114]),
    "pneumoniamnist": ((4708, 524, 624), [234, 390]),
}


@pytest.mark.parametrize("flag", sorted(REAL))
def test_real_file_is_official(real_data_dir: Path, flag: str) -> None:
    report = mf.verify_file(real_data_dir / f"{flag}.npz")
    assert report.status == "official", report.problems
    assert tuple(report.counts[s] for s in mf.SPLITS) == REAL[flag][0]


@pytest.mark.parametrize("flag", sorted(REAL))
def test_real_file_loads_with_official_shapes(real_data_dir: Path, flag: str) -> None:
    dm = MedMNISTDataModule(flag=flag, root=str(real_data_dir))
    dm.setup()
    for split, n in zip(mf.SPLITS, REAL[flag][0], strict=True):
        assert len(dm.dataset(split)) == n
    item = dm.dataset("test")[0]
    assert item["image"].shape == (3, 28, 28) and item["image"].dtype.is_floating_point is False
    assert item["label"].shape == (1,)
    assert np.bincount(dm.arrays.labels["test"][:, 0]).tolist() == REAL[flag][1]
    assert dm.arrays.synthetic is False


@pytest.mark.parametrize("flag", mf.FLAGS_2D)
def test_synthetic_round_trip_every_flag(tmp_path: Path, flag: str) -> None:
    path = mf.synthesize(flag, 28, tmp_path, n_train=12, n_val=4, n_test=4, seed=1)
    assert path.name == f"{flag}.synthetic.npz"
    report = mf.verify_file(path)
    assert report.status == "synthetic", report.problems
    arrays = mf.load_file(path, flag, 28)
    meta = mf.info(flag)
    want_image, want_label = mf.expected_shapes(flag, 28, "train", 12)
    assert arrays.synthetic and arrays.images["train"].shape == want_image
    assert arrays.labels["train"].shape == want_label
    assert arrays.labels["train"].max() < len(meta["label"])


def test_synthetic_at_larger_size_and_signal(tmp_path: Path) -> None:
    path = mf.synthesize("pathmnist", 64, tmp_path, n_train=90, n_val=9, n_test=9)
    assert path.name == "pathmnist_64.synthetic.npz"
    arrays = mf.load_file(path, "pathmnist", 64)
    images, labels = arrays.images["train"].astype(float), arrays.labels["train"][:, 0]
    # The class signal is in mean brightness: class means must differ and be ordered by class.
    means = [images[labels == c].mean() for c in np.unique(labels)]
    assert means == sorted(means) and means[-1] - means[0] > 50


def test_synthetic_datamodule_writes_file_on_first_use(tmp_path: Path) -> None:
    dm = MedMNISTDataModule(flag="dermamnist", root=str(tmp_path), synthetic=True, mode="vqa")
    dm.setup("fit")
    assert (tmp_path / "dermamnist.synthetic.npz").is_file()
    item = dm.dataset("train")[0]
    assert item["answer"] in item["options"] and len(item["options"]) == 4


def _fails_naming(path: Path, *needles: str) -> None:
    with pytest.raises(mf.MedMNISTFileError) as excinfo:
        mf.load_file(path, "breastmnist", 28)
    message = str(excinfo.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message


def test_missing_file_says_how_to_fetch(tmp_path: Path) -> None:
    _fails_naming(tmp_path / "breastmnist.npz", "medrl data fetch", mf.official_md5("breastmnist"))


def test_truncated_file(real_data_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "breastmnist.npz"
    data = (real_data_dir / "breastmnist.npz").read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    _fails_naming(bad, "truncated or corrupt")
    report = mf.verify_file(bad)
    assert report.status == "bad" and report.problems


def test_not_a_zip(tmp_path: Path) -> None:
    bad = tmp_path / "breastmnist.npz"
    bad.write_text("<html>404 Not Found</html>")
    _fails_naming(bad, "not a readable .npz")


def test_wrong_keys_and_shapes(tmp_path: Path) -> None:
    bad = tmp_path / "breastmnist.npz"
    np.savez_compressed(bad, train_images=np.zeros((3, 32, 32), np.uint8), train_labels=np.zeros((3, 1), np.uint8))
    _fails_naming(bad, "missing key val_images", "expected uint8(3, 28, 28)")


def test_md5_mismatch_is_reported_not_official(real_data_dir: Path, tmp_path: Path) -> None:
    # Same arrays, re-saved: readable and well-formed, but not the official bytes.
    copy = tmp_path / "breastmnist.npz"
    with np.load(real_data_dir / "breastmnist.npz") as npz:
        np.savez(copy, **{k: npz[k] for k in npz.files})
    report = mf.verify_file(copy)
    assert report.status == "bad"
    assert any("differs from the official" in p for p in report.problems)


def test_pickled_arrays_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "breastmnist.npz"
    np.savez(bad, train_images=np.array([{"x": 1}], dtype=object))
    _fails_naming(bad)


def test_fetch_offline_fails_at_once_with_manual_steps(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(mf.MedMNISTFileError) as excinfo:
        mf.fetch("octmnist", 64, tmp_path)
    assert time.monotonic() - start < 5
    message = str(excinfo.value)
    assert "octmnist_64.npz" in message and mf.official_url("octmnist", 64) in message
    assert mf.official_md5("octmnist", 64) in message
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_fetch_keeps_an_official_file(real_data_dir: Path, tmp_path: Path) -> None:
    shutil.copy(real_data_dir / "breastmnist.npz", tmp_path)
    assert mf.fetch("breastmnist", 28, tmp_path) == tmp_path / "breastmnist.npz"


def test_root_unset_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(mf.MedMNISTFileError, match=DATA_DIR_ENV):
        mf.resolve_root(None)


def test_unknown_flag_and_size() -> None:
    with pytest.raises(ValueError, match="pathmnist"):
        mf.file_name("mnist")
    with pytest.raises(ValueError, match="28, 64, 128, 224"):
        mf.file_name("pathmnist", 32)


def test_zip_member_corruption_is_caught(real_data_dir: Path, tmp_path: Path) -> None:
    # A valid zip directory whose member data is damaged: the CRC check must fire, not return garbage.
    bad = tmp_path / "breastmnist.npz"
    data = bytearray((real_data_dir / "breastmnist.npz").read_bytes())
    with zipfile.ZipFile(real_data_dir / "breastmnist.npz") as zf:
        info = zf.getinfo("train_images.npy")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 100
    data[start : start + 64] = bytes(64)
    bad.write_bytes(bytes(data))
    _fails_naming(bad)
