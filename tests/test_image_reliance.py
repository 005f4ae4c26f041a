"""The image-ablation control: every question answered again with another question's image."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medrl.evaluation import add_image_reliance, sample_and_score, summarise, swap_images
from medrl.rollout.types import SamplingParams


def _items(medmnist, flag: str = "breastmnist", n: int = 24) -> list[dict]:
    from medrl.data.medmnist import MedMNISTDataModule

    dm = MedMNISTDataModule(flag, mode="vqa", num_options=2, val_samples=n, **medmnist.kwargs())
    dataset = dm.dataset("val")
    return [dataset[i] for i in range(len(dataset))]


def test_swapped_images_come_from_another_question_with_another_answer(medmnist) -> None:
    items = _items(medmnist)
    swapped = swap_images(items, seed=3)
    assert swapped == swap_images(items, seed=3)  # seeded
    golds = [it["options"][it["answer"]] for it in items]
    for i, (item, other) in enumerate(zip(items, swapped, strict=True)):
        donor = other["swapped_from"]
        assert donor != i and other["image"] is items[donor]["image"]
        assert golds[donor] != golds[i]  # both classes are in the set: a donor of the other class exists
        assert other["messages"] == item["messages"] and other["answer"] == item["answer"]


def test_a_model_that_ignores_the_image_has_reliance_exactly_zero(tiny_dir, medmnist) -> None:
    from medrl.models.families import vision_modules
    from medrl.models.hub import load_vlm
    from medrl.rollout.factory import make_engine

    model, processor = load_vlm(str(tiny_dir))
    _, projector = vision_modules([name for name, _ in model.named_parameters()])
    with torch.no_grad():  # the projector's output is all zeros: every image reaches the language model alike
        for name, param in model.named_parameters():
            if name.startswith(f"{projector}."):
                param.zero_()
    engine = make_engine("hf", model, processor)
    items = _items(medmnist)
    params = SamplingParams(n=2, max_new_tokens=8, seed=0)
    scored = sample_and_score(engine, items, params, batch_size=8, swapped=swap_images(items, 0), progress=False)
    rows = [row for _, row in scored]
    assert all(row["greedy_text"] == row["greedy_text_swapped"] for row in rows)
    summary = summarise(scored, [1, 2])
    add_image_reliance(summary, rows)
    metrics = summary["all"]
    assert metrics["acc@1_swapped"] == metrics["acc@1"]
    assert (metrics["image_reliance"], metrics["image_reliance_lo"], metrics["image_reliance_hi"]) == (0.0, 0.0, 0.0)


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="tiny-instruct does not learn to read images at this budget (docs/reproducing.md: the option lookup, "
    "not the vision path, is the bottleneck); strict, so the day it passes the marker must go",
)
def test_a_model_trained_to_read_a_learnable_image_signal_relies_on_it(tmp_path: Path) -> None:
    # Synthetic BreastMNIST: each class has its own brightness and stripes, so the answer is in the image.
    from medrl.cli import main
    from medrl.data.medmnist_files import synthesize

    data = tmp_path / "data"
    synthesize("breastmnist", out=data, n_train=512, n_val=64, n_test=64)
    root = tmp_path / "sft"
    repo = Path(__file__).resolve().parents[1]
    assert main(["fit", "--config", str(repo / "configs/sft.yaml"), "--model.init_args.model=tiny-instruct",
                 "--model.init_args.vision=all", "--data=medrl.data.modalities.BreastMNIST",
                 f"--data.init_args.root={data}", "--data.init_args.synthetic=true", "--data.init_args.mode=vqa",
                 "--data.init_args.train_samples=512", "--data.init_args.val_samples=64", "--trainer.max_epochs=6",
                 f"--trainer.default_root_dir={root}"]) == 0  # fmt: skip
    out = tmp_path / "eval"
    model = str(next(root.rglob("last.hf")))
    assert main(["eval", "--model", model, "--flags", "[breastmnist]", "--root", str(data), "--synthetic", "true",
                 "--split", "val", "--questions", "64", "--n", "2", "--out", str(out)]) == 0  # fmt: skip
    metrics = json.loads((out / "summary.json").read_text())["metrics"]["all"]
    assert metrics["image_reliance_lo"] > 0.1, metrics


def test_the_pass_at_k_callback_logs_image_reliance_when_asked(tiny_dir, medmnist, tmp_path) -> None:
    from test_pass_at_k import run_callback_fast_dev_run

    trainer, _ = run_callback_fast_dev_run(tiny_dir, medmnist, tmp_path, image_ablation=True)
    logged = trainer.callback_metrics
    assert {"val/image_reliance", "val/image_reliance_lo", "val/acc@1_swapped"} <= set(logged)
    rows = [json.loads(line) for line in (tmp_path / "epoch000" / "questions.jsonl").read_text().splitlines()]
    assert all("greedy_correct_swapped" in row and "swapped_from" in row for row in rows)


def test_eval_reports_image_reliance_by_default(tiny_dir, medmnist, tmp_path, capsys) -> None:
    from medrl.cli import main

    out = tmp_path / "eval"
    args = ["eval", "--model", str(tiny_dir), *medmnist.cli("--"), "--questions", "6", "--n", "2"]
    assert main([*args, "--max_new_tokens", "6", "--out", str(out)]) == 0
    metrics = json.loads((out / "summary.json").read_text())["metrics"]["all"]
    assert {"acc@1_swapped", "image_reliance", "image_reliance_lo", "image_reliance_hi"} <= set(metrics)
    assert "all: " in capsys.readouterr().out and "image_reliance" in (out / "summary.md").read_text()
    assert main([*args, "--max_new_tokens", "6", "--out", str(tmp_path / "off"), "--image_ablation", "false"]) == 0
    assert "image_reliance" not in json.loads((tmp_path / "off" / "summary.json").read_text())["metrics"]["all"]
