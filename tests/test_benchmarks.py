"""The six-benchmark suite: reading the unified export (good and broken rows), yes/no items, the DataModule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from medrl.data.benchmarks import (
    BENCHMARKS,
    BenchmarkSuiteDataModule,
    SuiteError,
    benchmark_order,
    load_suite,
    parse_options,
)
from medrl.data.vqa import INSTRUCTION, format_prompt

ABCD = {"A": "CT", "B": "MRI", "C": "X-ray", "D": "ultrasound"}


def _png(path: Path, size: tuple[int, int], colour: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (colour, 30, 60)).save(path)
    return f"images/{path.name}"


def suite_rows(root: Path) -> list[dict]:
    """16 good rows over the six benchmarks (with each way of writing options) and the rows' images."""
    img = lambda i, size=(20, 12): _png(root / "images" / f"{i}.png", size, 10 * i)  # noqa: E731
    rows = []
    # PMC: options as a JSON string (as the Hugging Face export stores them)
    for i, gold in enumerate("ABCD"):
        rows.append(
            {
                "images": [img(i)],
                "question": f"Which modality, case {i}?",
                "options": json.dumps(ABCD),
                "answer_label": gold,
                "answer": ABCD[gold],
                "dataset_name": "pmc_vqa",
                "dataset_index": i,
            }
        )
    # MMMU: two images per item (tiled into one), options as an object
    for i in (4, 5):
        rows.append(
            {
                "images": [img(i, (10, 10)), img(i + 100, (30, 20))],
                "question": f"Compare the images ({i})",
                "options": {"A": "same", "B": "different", "C": "cannot tell"},
                "answer_label": "B",
                "answer": "different",
                "dataset_name": "MMMU-medical",
                "dataset_index": i,
            }
        )
    # MedXpertQA-MM: 5 options
    for i in (6, 7):
        five = {**ABCD, "E": "PET"}
        rows.append(
            {
                "images": [img(i)],
                "question": f"Hard case {i}",
                "options": five,
                "answer_label": "E",
                "answer": "PET",
                "dataset_name": "MedXpertQA-MM",
                "dataset_index": i,
            }
        )
    # closed yes/no items without options: they become A. yes / B. no
    for i, (name, answer) in enumerate(
        [
            ("path_vqa", "yes"),
            ("path_vqa", "no"),
            ("path_vqa", "Yes"),
            ("SLAKE", "no"),
            ("vqa_rad", "yes"),
            ("vqa_rad", "no"),
        ],
        start=8,
    ):
        rows.append(
            {
                "images": [img(i)],
                "question": f"Is there a lesion ({i})?",
                "options": "{}",
                "answer": answer,
                "answer_label": "",
                "dataset_name": name,
                "dataset_index": i,
            }
        )
    # a SLAKE item that already carries yes/no options and a label
    rows.append(
        {
            "images": [img(14)],
            "question": "Is the liver normal?",
            "options": {"A": "Yes", "B": "No"},
            "answer_label": "A",
            "answer": "Yes",
            "dataset_name": "SLAKE",
            "dataset_index": 14,
        }
    )
    # a VQA-RAD item whose label is the answer's text, not its letter
    rows.append(
        {
            "images": [img(15)],
            "question": "Which side?",
            "options": {"A": "left", "B": "right"},
            "answer_label": "right",
            "answer": "right",
            "dataset_name": "VQA-RAD",
            "dataset_index": 15,
        }
    )
    return rows  # fmt: skip


def bad_rows(root: Path) -> list[str]:
    """One JSONL line for each way an export row can be wrong."""
    ok = {"images": ["images/0.png"], "question": "q?", "options": ABCD, "answer_label": "A", "answer": "CT",
          "dataset_name": "pmc_vqa"}  # fmt: skip
    (root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    lines = [
        '{"images": ["images/0.png"], "question": "unterminated',  # bad_json
        {**ok, "answer_label": "E", "dataset_index": 90},  # unknown_label: E is not an option
        {**ok, "answer": "MRI", "dataset_index": 91},  # answer_mismatch
        {**ok, "images": ["images/nowhere.png"], "dataset_index": 92},  # missing_image
        {**ok, "images": ["images/broken.png"], "dataset_index": 93},  # bad_image
        {**ok, "dataset_index": 0},  # duplicate of the first PMC row
        {**ok, "options": "", "answer": "maybe", "answer_label": "", "dataset_index": 94},  # bad_options
    ]
    return [line if isinstance(line, str) else json.dumps(line) for line in lines]


def make_suite(root: Path, with_bad: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in suite_rows(root)] + (bad_rows(root) if with_bad else [])
    (root / "suite.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_suite(tmp_path_factory.mktemp("suite"))


def test_reader_keeps_good_rows_and_reports_bad_ones(suite: Path) -> None:
    reports: list = []
    items, _ = load_suite(str(suite), reports=reports)
    assert len(items) == 16
    (report,) = reports
    assert report.rows == 23 and report.kept == 16
    assert report.counts() == {"bad_json": 1, "unknown_label": 1, "answer_mismatch": 1, "missing_image": 1,
                               "bad_image": 1, "duplicate": 1, "bad_options": 1}  # fmt: skip
    assert {d.line for d in report.dropped} == set(range(17, 24))
    by_index = {(it.dataset_name, it.dataset_index): it for it in items}
    # yes/no items without options became 2-option questions
    yes_no = by_index[("path_vqa", 9)]
    assert yes_no.options == {"A": "yes", "B": "no"} and yes_no.answer_label == "B" and yes_no.benchmark == "PathVQA"
    assert by_index[("path_vqa", 10)].answer_label == "A"  # "Yes" matched case-insensitively
    assert by_index[("VQA-RAD", 15)].answer_label == "B"  # a label given as the answer's text
    assert by_index[("MedXpertQA-MM", 6)].options["E"] == "PET"
    assert [b for b in benchmark_order(it.benchmark for it in items)] == list(BENCHMARKS)


def test_items_are_vqa_items_with_the_benchmark_as_flag(suite: Path) -> None:
    dm = BenchmarkSuiteDataModule(str(suite), batch_size=5)
    dm.setup("validate")
    items = [dm.dataset()[i] for i in range(len(dm.dataset()))]
    assert [it["flag"] for it in items] == ["PMC"] * 4 + ["MMMU"] * 2 + ["MedX-M"] * 2 + ["PathVQA"] * 3 + [
        "SLAKE"] * 2 + ["VQA-RAD"] * 3  # fmt: skip
    first = items[0]
    assert first["prompt"] == format_prompt("Which modality, case 0?", ABCD, INSTRUCTION)
    assert first["answer"] == "A" and first["label"] == 0 and first["index"] == 0 and first["image"].mode == "RGB"
    mmmu = items[4]
    assert mmmu["image"].size == (10 * 2 + 30 + 2, 20)  # two images tiled at a common height, 2 px apart
    batch = next(iter(dm.val_dataloader()))
    assert isinstance(batch, list) and len(batch) == 5
    with pytest.raises(Exception, match="evaluation-only"):
        dm.train_dataloader()


def test_benchmark_filter_and_subsets(suite: Path) -> None:
    dm = BenchmarkSuiteDataModule(str(suite), benchmarks=["path_vqa", "SLAKE"], samples_per_benchmark=2)
    flags = [dm.dataset()[i]["flag"] for i in range(len(dm.dataset()))]
    assert flags == ["PathVQA", "PathVQA", "SLAKE", "SLAKE"]
    again = BenchmarkSuiteDataModule(str(suite), benchmarks=["path_vqa", "SLAKE"], samples_per_benchmark=2)
    assert [it.dataset_index for it in again.dataset().items] == [it.dataset_index for it in dm.dataset().items]


def test_unreadable_suites_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(SuiteError, match="does not exist"):
        load_suite(str(tmp_path / "nothing"))
    with pytest.raises(SuiteError, match=r"no \*\.jsonl"):
        load_suite(str(tmp_path))
    (tmp_path / "x.jsonl").write_text('{"question": "q", "options": {"A": "a"}, "answer_label": "A"}\n')
    with pytest.raises(SuiteError, match="no usable item"):
        load_suite(str(tmp_path), image_check="none")


def test_parse_options_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="single letters"):
        parse_options({"AA": "x"})
    with pytest.raises(ValueError, match="neither JSON"):
        parse_options("just text")
