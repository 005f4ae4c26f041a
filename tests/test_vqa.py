"""MedMNIST as multiple-choice VQA: prompt format, determinism, letter balance, many-class and multi-label."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from medrl.data import vqa
from medrl.data.medmnist import MedMNISTDataModule


def test_prompt_has_the_authors_layout() -> None:
    text = vqa.format_prompt("What is shown?", {"A": "normal", "B": "pneumonia"})
    lines = text.split("\n")
    assert lines[:5] == ["What is shown?", "", "Options:", "A. normal", "B. pneumonia"]
    assert "<think> </think>" in lines[-1] and "<answer> </answer>" in lines[-1] and "ONLY the letter" in lines[-1]


def test_real_pneumonia_vqa_items(real_data_dir: Path) -> None:
    dm = MedMNISTDataModule(flag="pneumoniamnist", root=str(real_data_dir), mode="vqa")
    ds = dm.dataset("val")
    letters = Counter()
    for i in range(len(ds)):
        item = ds[i]
        assert set(item["options"]) == {"A", "B"}
        assert sorted(item["options"].values()) == ["normal", "pneumonia"]
        # The gold letter names the item's true class.
        assert item["options"][item["answer"]] == ds.class_names[int(dm.arrays.labels["val"][item["index"], 0])]
        letters[item["answer"]] += 1
    # 524 val items over 2 letters, balanced by construction.
    assert letters == {"A": 262, "B": 262}
    item = ds[3]
    assert item["image"].size == (28, 28) and item["image"].mode == "RGB"
    assert item["messages"][-1]["content"][0] == {"type": "image"}
    assert item["messages"][-1]["content"][1]["text"] == item["prompt"]


def test_vqa_is_deterministic_in_the_seed(tmp_path: Path) -> None:
    def questions(seed: int) -> list:
        dm = MedMNISTDataModule(flag="pathmnist", root=str(tmp_path), synthetic=True, mode="vqa", seed=seed)
        return [(it["options"], it["answer"]) for it in (dm.dataset("val")[i] for i in range(20))]

    assert questions(0) == questions(0)
    assert questions(0) != questions(1)


def test_many_class_options_include_gold_and_balance_letters(tmp_path: Path) -> None:
    dm = MedMNISTDataModule(flag="pathmnist", root=str(tmp_path), synthetic=True, mode="vqa", num_options=4)
    ds = dm.dataset("train")
    counts = Counter()
    for i in range(len(ds)):
        item = ds[i]
        assert len(item["options"]) == 4 and len(set(item["options"].values())) == 4
        assert item["options"][item["answer"]] == ds.class_names[item["label"]]
        counts[item["answer"]] += 1
    assert counts == {letter: 64 for letter in "ABCD"}  # 256 synthetic train items / 4 letters


def test_all_options_when_num_options_is_none(tmp_path: Path) -> None:
    dm = MedMNISTDataModule(flag="bloodmnist", root=str(tmp_path), synthetic=True, mode="vqa", num_options=None)
    assert len(dm.dataset("val")[0]["options"]) == 8


def test_multilabel_chest_vqa_keeps_single_finding_items(tmp_path: Path) -> None:
    dm = MedMNISTDataModule(flag="chestmnist", root=str(tmp_path), synthetic=True, mode="vqa")
    ds = dm.dataset("train")
    labels = dm.arrays.labels["train"]
    assert len(ds) + ds.skipped_multi_finding == len(labels)
    assert len(ds) == int((labels.sum(1) <= 1).sum())
    for i in range(10):
        item = ds[i]
        row = labels[item["index"]]
        expected = ds.class_names[int(row.argmax())] if row.any() else vqa.NO_FINDING
        assert item["options"][item["answer"]] == expected


def test_retina_options_are_readable_grades(tmp_path: Path) -> None:
    dm = MedMNISTDataModule(flag="retinamnist", root=str(tmp_path), synthetic=True, mode="vqa", num_options=None)
    assert sorted(dm.dataset("val")[0]["options"].values()) == [f"grade {i}" for i in range(5)]


def test_seeded_subsets(real_data_dir: Path) -> None:
    dm = MedMNISTDataModule(flag="pneumoniamnist", root=str(real_data_dir), train_samples=100, val_samples=50)
    assert len(dm.dataset("train")) == 100 and len(dm.dataset("val")) == 50
    again = MedMNISTDataModule(flag="pneumoniamnist", root=str(real_data_dir), train_samples=100)
    assert (again.dataset("train").indices == dm.dataset("train").indices).all()


def test_modality_presets_set_their_flag(real_data_dir: Path) -> None:
    from medrl.data.medmnist_files import FLAGS_2D
    from medrl.data.modalities import MODALITIES, PneumoniaMNIST

    assert sorted(MODALITIES) == sorted(FLAGS_2D)
    dm = PneumoniaMNIST(root=str(real_data_dir), mode="vqa", val_samples=8)
    assert dm.flag == "pneumoniamnist" and len(dm.dataset("val")) == 8
    assert dm.dataset("val")[0]["flag"] == "pneumoniamnist"


def test_answer_with_text_asks_for_and_trains_on_the_option_text(tmp_path: Path) -> None:
    from medrl.core.errors import ConfigError
    from medrl.data.collate import target_text
    from medrl.metrics.pass_at_k import score_question

    dm = MedMNISTDataModule(flag="bloodmnist", root=str(tmp_path), synthetic=True, mode="vqa", answer_with="text")
    item = dm.dataset("val")[0]
    assert item["answer_with"] == "text" and "ONLY the text of the correct option" in item["prompt"]
    gold_text = item["options"][item["answer"]]
    assert target_text(item) == f"<answer>{gold_text}</answer>"
    wrong = next(t for t in item["options"].values() if t != gold_text)
    texts = [f"<answer>{gold_text}</answer>", f"<answer>{wrong}</answer>", f"<answer>{item['answer']}</answer>"]
    score = score_question(texts, item["answer"], "".join(item["options"]), options=item["options"])
    assert score.correct == 2 and score.format_failures == 0  # the text and the letter both name the gold option
    letter = MedMNISTDataModule(flag="bloodmnist", root=str(tmp_path), synthetic=True, mode="vqa").dataset("val")[0]
    assert letter["answer_with"] == "letter" and target_text(letter) == f"<answer>{letter['answer']}</answer>"
    assert letter["options"] == item["options"]  # the same questions, only the instruction and target differ
    with pytest.raises(ConfigError, match="answer_with"):
        MedMNISTDataModule(flag="bloodmnist", root=str(tmp_path), synthetic=True, mode="vqa", answer_with="word")
