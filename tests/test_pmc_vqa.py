"""PMC-VQA: the official CSV format with good and broken rows, the DataModule, and the balanced subset builder.

The fixture writes small CSVs in the official layout (padded ``A:text`` choices, ``Answer_label``) and real
JPEG files, plus one row for each way a row can be wrong.
"""

from __future__ import annotations

import csv
import io
import json
import zipfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from medrl.cli import main
from medrl.core.hashing import file_digest
from medrl.data.image_store import ImageStore
from medrl.data.medmnist import MedMNISTDataModule
from medrl.data.pmc_subset import build_subset, manifest_path
from medrl.data.pmc_vqa import PMCVQADataModule, PMCVQAError, read_pmc_csv
from medrl.data.vqa import INSTRUCTION, format_prompt

HEADER = ["index", "Figure_path", "Question", "Answer", "Choice A", "Choice B", "Choice C", "Choice D",
          "Answer_label", "Modality"]  # fmt: skip
# Gold letters of the 40 good training rows: 12 A, 11 B, 9 C, 8 D.
GOOD_LETTERS = "A" * 12 + "B" * 11 + "C" * 9 + "D" * 8
TEST_QUESTIONS = ["What does figure 0 show?", "What does figure 1 show?"]  # train rows 0 and 1 (gold A)
TEST_IMAGES = ["PMC12_F1.jpg", "PMC13_F1.jpg"]  # train rows 12 and 13 (gold B)


def _jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), (seed * 5 % 256, 90, 200 - seed % 100)).save(buffer, "JPEG")
    return buffer.getvalue()


def _row(i: int, letter: str, question: str | None = None, figure: str | None = None, **override: str) -> dict:
    texts = {c: f"finding {c.lower()} of figure {i}" for c in "ABCD"}
    row = {
        "index": str(i),
        "Figure_path": figure or f"PMC{i}_F1.jpg",
        "Question": f" {question or f'What does figure {i} show?'} ",
        "Answer": f"{texts.get(letter, 'finding e')} ",  # the official files pad values with spaces
        **{f"Choice {c}": f" {c}:{texts[c]} " for c in "ABCD"},
        "Answer_label": letter,
        "Modality": "CT" if i % 3 else "MRI",
    }
    row.update(override)
    return row


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=HEADER)
        writer.writeheader()
        writer.writerows(rows)


def make_pmc(root: Path, as_zip: bool = False) -> Path:
    """A PMC-VQA folder: train.csv (40 good rows + 5 bad), test.csv, test_clean.csv, images/ or images.zip."""
    root.mkdir(parents=True, exist_ok=True)
    train = [_row(i, letter) for i, letter in enumerate(GOOD_LETTERS)]
    train += [
        _row(40, "A", **{"Choice B": " C:finding b of figure 40"}),  # 40: prefix of B says C
        _row(41, "B", Answer="something else entirely"),  # 41: Answer is not the text of choice B
        _row(42, "E"),  # 42: unknown letter
        _row(43, "D", figure="PMC_missing.jpg"),  # 43: image absent
        _row(44, "D", figure="PMC_broken.jpg"),  # 44: image present but not decodable
    ]
    _write_csv(root / "train.csv", train)
    _write_csv(root / "test.csv", [_row(100, "A", TEST_QUESTIONS[0]), _row(101, "C", figure=TEST_IMAGES[0])])
    _write_csv(root / "test_clean.csv", [_row(102, "B", TEST_QUESTIONS[1]), _row(103, "D", figure=TEST_IMAGES[1])])
    images = {f"PMC{i}_F1.jpg": _jpeg(i) for i in [*range(40), 40, 41, 42, 100, 101, 102, 103]}
    images["PMC_broken.jpg"] = b"\xff\xd8\xff\xe0 this is not a jpeg"
    if as_zip:  # the official archive keeps the figures under images/
        with zipfile.ZipFile(root / "images.zip", "w") as zf:
            for name, data in images.items():
                zf.writestr(f"images/{name}", data)
    else:
        (root / "images").mkdir(exist_ok=True)
        for name, data in images.items():
            (root / "images" / name).write_bytes(data)
    return root


@pytest.fixture(scope="module")
def pmc_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pmc(tmp_path_factory.mktemp("pmc"))


@pytest.mark.parametrize("as_zip", [False, True], ids=["folder", "zip"])
def test_bad_rows_are_reported_with_reasons(tmp_path: Path, as_zip: bool) -> None:
    root = make_pmc(tmp_path, as_zip)
    items, report = read_pmc_csv(root / "train.csv", ImageStore.find(root))
    assert report.rows == 45 and report.kept == 40 and len(items) == 40
    assert report.counts() == {"bad_prefix": 1, "answer_mismatch": 1, "unknown_label": 1, "missing_image": 1,
                               "bad_image": 1}  # fmt: skip
    by_row = {d.row: d for d in report.dropped}
    assert by_row[40].reasons == ("bad_prefix",) and "'C:finding b" in by_row[40].detail
    assert by_row[41].reasons == ("answer_mismatch",) and "something else" in by_row[41].detail
    assert by_row[42].reasons == ("unknown_label",) and "'E'" in by_row[42].detail
    assert by_row[43].reasons == ("missing_image",) and "PMC_missing.jpg" in by_row[43].detail
    assert by_row[44].reasons == ("bad_image",) and "PMC_broken.jpg" in by_row[44].detail
    assert by_row[40].line == 42  # header on line 1, data row 0 on line 2
    summary = report.summary()
    assert "45 rows, 40 kept, 5 dropped" in summary and "row 42 (line 44)" in summary
    # prefixes and padding are gone, the gold is the labelled choice
    first = items[0]
    assert first.options == {c: f"finding {c.lower()} of figure 0" for c in "ABCD"}
    assert first.answer_label == "A" and first.answer == "finding a of figure 0"
    assert first.question == "What does figure 0 show?"


def test_missing_columns_name_the_file_and_columns(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("Figure_path,Question,Answer\nx.jpg,q,a\n")
    with pytest.raises(PMCVQAError, match=r"train\.csv lacks the PMC-VQA columns \['Choice A'"):
        read_pmc_csv(tmp_path / "train.csv", None, "none")
    with pytest.raises(PMCVQAError, match="does not exist"):
        read_pmc_csv(tmp_path / "nope.csv", None, "none")


def test_items_match_the_medmnist_vqa_format(pmc_root: Path, tmp_path: Path) -> None:
    dm = PMCVQADataModule(root=str(pmc_root), report_dir=str(tmp_path / "reports"), batch_size=4)
    dm.setup("fit")
    item = dm.dataset("train")[0]
    ref = MedMNISTDataModule("breastmnist", root=str(tmp_path), synthetic=True, mode="vqa").dataset("test")[0]
    assert set(ref) <= set(item)
    for key in ref:
        assert type(item[key]) is type(ref[key]), key
    assert item["image"].mode == "RGB" and item["image"].size == (24, 16)
    assert item["prompt"] == format_prompt("What does figure 0 show?", item["options"], INSTRUCTION)
    assert item["messages"][-1]["content"][0] == {"type": "image"}
    assert item["answer"] == "A" and item["label"] == 0 and item["flag"] == "PMC" and item["index"] == 0
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, list) and len(batch) == 4 and all("messages" in b for b in batch)
    # the test split (test_clean.csv) and a report per split, as JSON
    assert len(dm.dataset("val")) == 2
    report = json.loads((tmp_path / "reports" / "train_train_report.json").read_text())
    assert report["dropped"] == 5 and report["dropped_by_reason"]["bad_image"] == 1


def test_datamodule_reads_a_subset_jsonl_and_seeded_samples(pmc_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "sub.jsonl"
    build_subset(pmc_root / "train.csv", [pmc_root / "test.csv"], ImageStore.find(pmc_root), out, n=8, seed=1)
    dm = PMCVQADataModule(root=str(pmc_root), train_file=str(out), val_samples=1)
    dm.setup("fit")
    assert len(dm.dataset("train")) == 8 and len(dm.dataset("val")) == 1
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [dm.dataset("train")[i]["answer"] for i in range(8)] == [r["answer_label"] for r in rows]


def _subset(root: Path, out: Path, **kwargs) -> dict:
    tests = [root / "test.csv", root / "test_clean.csv"]
    return build_subset(root / "train.csv", tests, ImageStore.find(root), out, **kwargs)


def test_subset_balances_letters_and_excludes_test_items(pmc_root: Path, tmp_path: Path) -> None:
    # 32 = 8 per letter. D has 8 good rows plus 2 whose image is missing or broken, so the draw must
    # reach the broken ones, reject them and still deliver 8; A and B lose 2 rows each to the test files.
    manifest = _subset(pmc_root, tmp_path / "s.jsonl", n=32, seed=0)
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert Counter(r["answer_label"] for r in rows) == {"A": 8, "B": 8, "C": 8, "D": 8}
    assert manifest["counts"]["per_letter"] == {"A": 8, "B": 8, "C": 8, "D": 8}
    questions = {r["question"] for r in rows}
    images = {r["images"][0] for r in rows}
    assert not questions & set(TEST_QUESTIONS) and not images & set(TEST_IMAGES)
    assert not images & {"PMC_missing.jpg", "PMC_broken.jpg"}
    pool = manifest["pool"]
    assert (pool["test_question"], pool["test_image"], pool["excluded_as_test"]) == (2, 2, 4)
    assert pool["train_rows"] == 45 and pool["valid_rows"] == 42 and pool["eligible"] == 38
    assert manifest["validation"]["images"]["dropped_by_reason"] == {"missing_image": 1, "bad_image": 1}
    assert manifest["validation"]["rows"]["dropped_by_reason"] == {"bad_prefix": 1, "answer_mismatch": 1,
                                                                    "unknown_label": 1}  # fmt: skip
    assert manifest["sources"]["train"]["sha256"] == file_digest(pmc_root / "train.csv")
    assert manifest["output"]["sha256"] == file_digest(tmp_path / "s.jsonl") and manifest["seed"] == 0
    # one more per letter is more than D holds once its broken images are known
    with pytest.raises(PMCVQAError, match="only 8 eligible items have gold letter D, 9 needed"):
        _subset(pmc_root, tmp_path / "t.jsonl", n=36)


def test_subset_is_deterministic_per_seed(pmc_root: Path, tmp_path: Path) -> None:
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        _subset(pmc_root, tmp_path / f"{name}.jsonl", n=16, seed=seed)
    a, b, c = ((tmp_path / f"{x}.jsonl").read_bytes() for x in "abc")
    assert a == b and a != c
    manifests = [json.loads(manifest_path(tmp_path / f"{x}.jsonl").read_text()) for x in "ab"]
    for m in manifests:  # the same but for the output's file name
        assert m["output"].pop("jsonl") in ("a.jsonl", "b.jsonl")
    assert manifests[0] == manifests[1]


def test_subset_stratified_by_a_column(pmc_root: Path, tmp_path: Path) -> None:
    manifest = _subset(pmc_root, tmp_path / "s.jsonl", n=16, stratify_by="Modality")
    per = manifest["counts"]["per_letter_and_stratum"]
    # equal shares: 2 CT and 2 MRI per letter, as every letter has at least 2 eligible MRI rows
    assert per == {L: {"Modality=CT": 2, "Modality=MRI": 2} for L in "ABCD"}
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert Counter(r["stratum"] for r in rows) == {"Modality=CT": 8, "Modality=MRI": 8}
    with pytest.raises(PMCVQAError, match="'Organ' is not a column"):
        _subset(pmc_root, tmp_path / "x.jsonl", n=8, stratify_by="Organ")


def test_subset_stratified_by_measured_pass_rate(pmc_root: Path, tmp_path: Path) -> None:
    # Rows 0-44 measured with 4 samples each: row i solved i % 5 times, so rates 0, .25, .5, .75 and 1.
    rates = tmp_path / "eval.jsonl"
    rates.write_text("".join(json.dumps({"dataset_index": i, "num_correct": i % 5, "num_rollouts": 4}) + "\n"
                             for i in range(45)))  # fmt: skip
    manifest = _subset(pmc_root, tmp_path / "s.jsonl", n=8, pass_rates=str(rates), bands=[0, 0.5, 1],
                       min_pass_rate=0.25, max_pass_rate=0.75)  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert all(0.25 <= r["pass_rate"] <= 0.75 for r in rows)
    # rates .25 fall in [0, .5); .5 and .75 in [.5, 1]: one of each per letter
    assert manifest["counts"]["per_stratum"] == {"pass[0,0.5)": 4, "pass[0.5,1]": 4}
    assert manifest["pool"]["outside_pass_rate_range"] == 16  # the 0.0 and 1.0 rows among the 38 eligible...
    assert manifest["pool"]["eligible"] == 38 - 16


def test_pmc_subset_cli(pmc_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.jsonl"
    assert main(["data", "pmc-subset", "--n", "8", "--root", str(pmc_root), "--out", str(out), "--seed", "2"]) == 0
    text = capsys.readouterr().out
    assert "8 items" in text and "'A': 2" in text and manifest_path(out).is_file()
