"""``medrl data get``: hub datasets written in the layouts medrl reads, through the real ``load_dataset`` path.

The fixtures are parquet files written with ``datasets`` in each hub dataset's shape (images inline); the
command reads them back with ``load_dataset`` exactly as it reads a hub id, and the data modules then load
the result with zero dropped rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medrl.cli import main
from medrl.data.benchmarks import BenchmarkSuiteDataModule
from medrl.data.hub_get import pmc_row
from medrl.data.pmc_vqa import PMCVQADataModule


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8))


def _write_parquet(rows: dict[str, list], path: Path, image_column: str) -> None:
    import datasets

    features = {
        k: datasets.Sequence(datasets.Value("string")) if isinstance(v[0], list) else datasets.Value("string")
        for k, v in rows.items()
        if k != image_column
    }
    if image_column == "images":
        features["images"] = datasets.Sequence(datasets.Image())
    else:
        features[image_column] = datasets.Image()
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows, features=datasets.Features(features)).to_parquet(str(path))


def _pmc_hub(folder: Path) -> None:
    """OctoMed/PMC-VQA's shape: id, image, question, options (a list, some with letters), answer."""
    for split, n in (("train", 6), ("test", 4)):
        rows = {
            "id": [f"{split}-{i}" for i in range(n)],
            "image": [_image(i + (100 if split == "test" else 0)) for i in range(n)],
            "question": [f"What does panel {i} show?" for i in range(n)],
            "options": [["A: CT", "B: MRI", "C: X-ray", "D: ultrasound"] for _ in range(n)],
            "answer": [["A", "B: MRI", "X-ray", "D"][i % 4] for i in range(n)],
        }
        _write_parquet(rows, folder / "data" / f"{split}-00000-of-00001.parquet", "image")


def test_pmc_vqa_round_trips_into_the_data_module(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    _pmc_hub(tmp_path / "hub")
    out = tmp_path / "data" / "pmc_vqa"
    assert main(["data", "get", "pmc-vqa", "--source", str(tmp_path / "hub"), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["images", "test_clean.csv", "train.csv"]
    data = PMCVQADataModule(root=str(out), image_check="decode")
    train, test = data.dataset("train"), data.dataset("test")
    assert (len(train), len(test)) == (6, 4)
    assert all(not r.dropped for split in ("train", "test") for r in data.reports[split])
    assert [it.answer_label for it in train.items] == ["A", "B", "C", "D", "A", "B"]
    assert train.items[1].options == {"A": "CT", "B": "MRI", "C": "X-ray", "D": "ultrasound"}
    # The images are the hub's, pixel for pixel.
    assert np.array_equal(np.asarray(data.store.open(test.items[2].images[0])), np.asarray(_image(102)))


def test_suite_round_trips_into_the_data_module(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    names = ["PMC-VQA", "MMMU-medical", "MedXpertQA-MM", "path_vqa", "SLAKE", "vqa-rad"]
    rows = {  # MedVLThinker-Eval's shape: a list of images per row, options as "A. text" lines
        "images": [[_image(i)] if i != 2 else [_image(i), _image(i + 50)] for i in range(6)],
        "question": [f"Question {i}?" for i in range(6)],
        "options": [
            "A. yes\nB. no",
            "A. left\nB. right\nC. both",
            "A. 1\nB. 2\nC. 3\nD. 4",
            "",
            "A. a\nB. b",
            "A. x\nB. y",
        ],
        "answer_label": ["A", "C", "B", "", "B", "A"],
        "answer": ["yes", "both", "2", "no", "b", "x"],
        "dataset_name": names,
    }
    _write_parquet(rows, tmp_path / "hub" / "data" / "test-00000-of-00001.parquet", "images")
    out = tmp_path / "data" / "medvqa_suite"
    assert main(["data", "get", "medvqa-suite", "--source", str(tmp_path / "hub"), "--out", str(out)]) == 0
    data = BenchmarkSuiteDataModule(str(out))
    dataset = data.dataset()
    assert len(dataset) == 6 and not any(r.dropped for r in data.reports)
    assert [it.benchmark for it in dataset.items] == ["PMC", "MMMU", "MedX-M", "PathVQA", "SLAKE", "VQA-RAD"]
    assert len(dataset.items[2].images) == 2  # the two-image row keeps both
    assert dataset.items[3].options == {"A": "yes", "B": "no"} and dataset.items[3].answer_label == "B"


def test_offline_fails_at_once_naming_the_dataset_and_the_manual_copy(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MEDRL_DATA_DIR", str(tmp_path))
    assert main(["data", "get", "medvqa-suite"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "UCSC-VLAA/MedVLThinker-Eval" in err and str(tmp_path / "medvqa_suite") in err and "--source" in err


def test_a_row_that_fits_no_shape_is_named_not_dropped_silently(tmp_path) -> None:
    with pytest.raises(ValueError, match="options A-D"):
        pmc_row({"question": "Q?", "options": ["CT", "MRI"], "answer": "CT"}, "x.png")
    with pytest.raises(ValueError, match="none of"):
        pmc_row({"question": "Q?", "options": ["CT", "MRI", "PET", "US"], "answer": "E"}, "x.png")
    row = pmc_row(
        {"question": "Q?", "options": '{"A": "CT", "B": "MRI", "C": "PET", "D": "US"}', "answer": "PET"}, "x.png"
    )
    assert (row["Answer_label"], row["Choice C"], row["Answer"]) == ("C", "C:PET", "PET")
