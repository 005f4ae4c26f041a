"""One very long question is dropped and reported (``too_long``) by every reader, never tokenised whole.

A suite row with an 80,000-character question once drove ``medrl bench-eval`` to 24 GB and the kernel's
out-of-memory killer. The budget is the model's context minus the completion budget (or
``max_prompt_length``); tiny's context is 4096 tokens.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from medrl.core.budget import CHARS_PER_TOKEN_BOUND, PromptBudget
from medrl.core.errors import ConfigError
from medrl.data.image_store import ImageStore
from medrl.models.budget import model_prompt_budget, prompt_budget

LONG = "Is this normal? " * 5000  # 80,000 characters


class Counting:
    """The real tokenizer count, recording the longest text it was handed."""

    def __init__(self, budget: PromptBudget) -> None:
        self.longest = 0
        self.inner = budget.count_text

    def __call__(self, text: str) -> int:
        self.longest = max(self.longest, len(text))
        return self.inner(text)


def test_the_budget_by_hand() -> None:
    # Words as tokens, 10 tokens per image: "a b c" (3) + 2 (template) + one image (10) = 15 tokens.
    budget = PromptBudget(15, lambda t: len(t.split()), lambda h, w: 10, overhead=2)
    assert budget.tokens("a b c", [(28, 28)]) == 15 and budget.problem("a b c", [(28, 28)]) is None
    reason, detail = budget.problem("a b c d", [(28, 28)])
    assert reason == "too_long" and "at least 16 tokens" in detail and "budget of 15" in detail


def test_a_row_reads_its_image_sizes_only_when_they_decide() -> None:
    # Words as tokens, up to 10 tokens per image (the cap), budget 15.
    budget = PromptBudget(15, lambda t: len(t.split()), lambda h, w: min(10, h // 10), max_image_tokens=10)
    reads: list[int] = []

    def sizes() -> list[tuple[int, int]]:
        reads.append(1)
        return [(30, 30)]  # 3 tokens

    assert budget.problem_of_row("a b c", 1, sizes) is None and reads == []  # 3 + 10 <= 15 at any size
    assert budget.problem_of_row(" ".join("x" * 20), 1, sizes)[0] == "too_long" and reads == []  # text alone
    assert budget.problem_of_row("a " * 9, 1, sizes) is None and reads == [1]  # 9 + 10 > 15: read: 9 + 3 fits
    unbounded = PromptBudget(15, lambda t: len(t.split()), lambda h, w: h // 10)
    assert unbounded.problem_of_row("a b c", 1, lambda: [(200, 200)])[0] == "too_long"  # 3 + 20: read, too long


def test_the_tiny_model_budget(tiny_dir: Path) -> None:
    budget = model_prompt_budget(str(tiny_dir), completion_tokens=96)
    assert budget.max_tokens == 4096 - 96
    assert budget.count_image(224, 224) > budget.count_image(28, 28) > 0  # the processor's own count
    assert budget.overhead > 0  # system turn, role markers, image markers
    with pytest.raises(ConfigError, match="no room for a prompt"):
        model_prompt_budget(str(tiny_dir), completion_tokens=5000)


def test_an_80k_character_suite_question_is_dropped_and_counted_on_a_prefix(tiny_dir, tmp_path, monkeypatch) -> None:
    from test_benchmarks import make_suite

    from medrl.data.benchmarks import BenchmarkSuiteDataModule

    root = make_suite(tmp_path, with_bad=False)
    rows = [json.loads(line) for line in (root / "suite.jsonl").read_text().splitlines()]
    rows[2]["question"] = LONG
    (root / "suite.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = BenchmarkSuiteDataModule(str(root))
    before = len(data.dataset())
    budget = model_prompt_budget(str(tiny_dir), completion_tokens=64)
    counting = Counting(budget)
    reads: list[str] = []
    real_size = ImageStore.size
    monkeypatch.setattr(ImageStore, "size", lambda self, name: (reads.append(name), real_size(self, name))[1])
    counted = PromptBudget(budget.max_tokens, counting, budget.count_image, budget.overhead, budget.max_image_tokens)
    assert data.apply_prompt_budget(counted) == 1
    assert reads == []  # tiny's processor caps an image at 16 tokens: no row needed its images read
    assert len(data.dataset()) == before - 1
    report = data.reports[0]
    (dropped,) = report.dropped
    assert dropped.reasons == ("too_long",) and dropped.line == 3 and "80" in dropped.detail
    assert report.kept == before - 1
    assert counting.longest <= CHARS_PER_TOKEN_BOUND * (budget.max_tokens + 1) < len(LONG)


def test_pmc_vqa_training_drops_the_long_row_before_the_first_step(tiny_dir: Path, tmp_path: Path) -> None:
    import lightning as L
    import torch
    from test_pmc_vqa import make_pmc

    from medrl.data.pmc_vqa import PMCVQADataModule
    from medrl.lit.sft import SFTModule

    root = make_pmc(tmp_path / "pmc")
    train = root / "train.csv"
    with train.open(newline="") as fh:
        reader = csv.DictReader(fh)
        header, rows = reader.fieldnames, list(reader)
    rows[7]["Question"] = LONG
    with train.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    dm = PMCVQADataModule(root=str(root), batch_size=4, val_samples=2)

    class SFT(SFTModule):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)

    trainer = L.Trainer(accelerator="cpu", fast_dev_run=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    trainer.fit(SFT(model=str(tiny_dir), finetune="full", max_completion_tokens=16), dm)
    counts = dm.reports["train"][0].counts()
    assert counts.get("too_long") == 1, counts
    assert all(LONG not in dm.dataset("train").prompt_text(it) for it in dm.dataset("train").items)


def test_a_medmnist_flag_whose_prompt_cannot_fit_is_an_error(tiny_dir: Path, medmnist) -> None:
    from medrl.data.medmnist import MedMNISTDataModule
    from medrl.models.hub import load_vlm

    model, processor = load_vlm(str(tiny_dir))
    dm = MedMNISTDataModule("pneumoniamnist", **medmnist.kwargs(), mode="vqa", val_samples=4)
    dm.setup("validate")
    dm.apply_prompt_budget(prompt_budget(processor, model.config, 64))  # the real budget: fits
    with pytest.raises(ConfigError, match="pneumoniamnist val: the prompt takes at least"):
        dm.apply_prompt_budget(prompt_budget(processor, model.config, 64, max_prompt_length=20))


def test_the_pmc_subset_drops_a_question_the_model_cannot_take(tiny_dir: Path, tmp_path: Path) -> None:
    from test_pmc_vqa import make_pmc

    from medrl.cli import main

    root = make_pmc(tmp_path / "pmc")
    train = root / "train.csv"
    text = train.read_text()
    train.write_text(text.replace("What does figure 20 show?", LONG.strip(), 1))
    out = tmp_path / "s.jsonl"
    args = ["data", "pmc-subset", "--n", "8", "--root", str(root), "--out", str(out), "--model", str(tiny_dir)]
    assert main(args) == 0
    manifest = json.loads(out.with_name("s.manifest.json").read_text())
    assert manifest["validation"]["rows"]["dropped_by_reason"].get("too_long") == 1
    assert all(len(json.loads(line)["question"]) < 1000 for line in out.read_text().splitlines())


def test_bench_eval_scores_the_suite_without_the_too_long_row(tiny_dir: Path, tmp_path: Path) -> None:
    from test_benchmarks import make_suite

    from medrl.cli import main

    root = make_suite(tmp_path / "suite", with_bad=False)
    rows = [json.loads(line) for line in (root / "suite.jsonl").read_text().splitlines()]
    rows[0]["question"] = LONG
    (root / "suite.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    args = ["bench-eval", "--model", str(tiny_dir), "--suite", str(root), "--out", str(out), "--max_new_tokens", "4"]
    assert main(args) == 0
    scores = json.loads((out / "scores.json").read_text())
    assert scores["validation"][0]["dropped_by_reason"] == {"too_long": 1}
    assert len((out / "items.jsonl").read_text().splitlines()) == len(rows) - 1
