"""Pass@k estimator (hand-worked, brute force, vectorised), the PassAtK metric, and its DDP sync."""

from __future__ import annotations

import itertools
import json
import math
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from medrl.metrics.pass_at_k import PassAtK, pass_at_k, pass_at_k_tensor, score_question


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (10, 3, 1, 0.3),  # pass@1 is the fraction correct, c/n
        (16, 0, 8, 0.0),  # no correct sample: never passes
        (4, 3, 2, 1.0),  # n - c = 1 < k = 2: every pair holds a correct sample
        (8, 1, 8, 1.0),  # k = n: passes iff c > 0
        (8, 0, 8, 0.0),
        (1000, 1, 500, 0.5),  # C(999,500)/C(1000,500) = 500/1000: huge binomials, exact ratio
        (2000, 1, 1, 1 / 2000),
    ],
)
def test_hand_worked_values(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
    vectorised = pass_at_k_tensor(torch.tensor([n]), torch.tensor([c]), k)
    assert float(vectorised[0]) == pytest.approx(expected, abs=1e-9)


def test_matches_brute_force_over_all_k_subsets() -> None:
    # The definition: the share of k-subsets of the n samples that contain at least one correct sample.
    for n in range(1, 8):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)


def test_vectorised_equals_the_scalar_loop() -> None:
    generator = torch.Generator().manual_seed(0)
    n = torch.randint(16, 2049, (300,), generator=generator)
    c = (torch.rand(300, generator=generator) * (n + 1)).long().clamp(max=n)
    c[:10] = 0
    c[10:20] = n[10:20]
    for k in (1, 2, 8, 16):
        vectorised = pass_at_k_tensor(n, c, k)
        loop = torch.tensor([pass_at_k(int(a), int(b), k) for a, b in zip(n, c, strict=True)], dtype=torch.float64)
        assert torch.allclose(vectorised, loop, atol=1e-9, rtol=0)
        assert bool(((vectorised >= 0) & (vectorised <= 1)).all())


@pytest.mark.parametrize(("n", "c", "k"), [(4, 1, 5), (4, 5, 2), (4, -1, 2), (4, 1, 0), (0, 0, 1)])
def test_bad_input_is_refused(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_vectorised_refuses_k_above_n() -> None:
    with pytest.raises(ValueError, match="at least 8 samples"):
        pass_at_k_tensor(torch.tensor([16, 4]), torch.tensor([1, 1]), 8)


def _scores():
    """Three questions whose parsed answers are worked out by hand in the comments."""
    return [
        # gold A: A, B, A, failure -> c=2 of 4; majority A; unique {A, B}; greedy A (right)
        score_question(
            ["<answer>A</answer>", "<answer>B</answer>", "<answer>A</answer>", "garbage"],
            "A",
            "AB",
            "<answer>A</answer>",
        ),
        # gold B: C x4 -> c=0; majority C (wrong); unique {C}; greedy C (wrong)
        score_question(["<answer>C</answer>"] * 4, "B", "ABCD", "<answer>C</answer>"),
        # gold C: C, empty block (failure), "answer: D", two letters (failure) -> c=1; C and D tie, C came
        # first so the majority is C (right); unique {C, D}; greedy "The answer is C" (right)
        score_question(
            ["<answer>C</answer>", "<answer></answer>", "answer: D", "<answer>A, C</answer>"],
            "C",
            "ABCD",
            "The answer is C",
        ),
    ]


# The three questions above: acc@1 = 2/3; pass@1 = mean(2/4, 0, 1/4) = 1/4;
# pass@2 = mean(1 - C(2,2)/C(4,2), 0, 1 - C(3,2)/C(4,2)) = mean(5/6, 0, 1/2) = 4/9; pass@4 = mean(1, 0, 1) = 2/3;
# majority = 2/3; format failures = (1 + 0 + 2) / 12 = 1/4; unique = (2 + 1 + 2) / 3 = 5/3.
EXPECTED = {
    "questions": 3.0,
    "acc@1": 2 / 3,
    "pass@1": 1 / 4,
    "pass@2": 4 / 9,
    "pass@4": 2 / 3,
    "gap@1": 1 / 4 - 2 / 3,
    "gap@2": 4 / 9 - 2 / 3,
    "gap@4": 0.0,
    "majority": 2 / 3,
    "format_fail": 1 / 4,
    "unique": 5 / 3,
    # Chance with mixed option counts (2, 4, 4): chance@k = mean of 1 - (1 - 1/m)^k.
    # chance@1 = (1/2 + 1/4 + 1/4) / 3 = 1/3; chance@2 = (3/4 + 7/16 + 7/16) / 3 = 13/24;
    # chance@4 = (15/16 + 175/256 + 175/256) / 3 = 295/384.
    "chance@1": 1 / 3,
    "chance@2": 13 / 24,
    "chance@4": 295 / 384,
    # Above chance, (x - chance) / (1 - chance): acc@1 (2/3 - 1/3) / (2/3) = 1/2; pass@1 (1/4 - 1/3) / (2/3) = -1/8;
    # pass@2 (4/9 - 13/24) / (11/24) = -7/33; pass@4 (2/3 - 295/384) / (89/384) = -39/89.
    "adj_acc@1": 1 / 2,
    "adj_pass@1": -1 / 8,
    "adj_pass@2": -7 / 33,
    "adj_pass@4": -39 / 89,
}


def test_answer_parsing_feeds_the_counts() -> None:
    first, second, third = _scores()
    assert (first.correct, first.majority, first.unique, first.format_failures) == (2, "A", 2, 1)
    assert (second.correct, second.greedy_correct, second.majority) == (0, False, "C")
    assert third.answers == ["C", "unparseable", "D", "unparseable"]
    assert (third.majority, third.greedy) == ("C", "C")


def test_metric_hand_worked() -> None:
    metric = PassAtK(ks=[1, 2, 4, 8])
    scores = _scores()
    metric.update(scores[:1])  # across two updates, as across validation batches
    metric.update(scores[1:])
    result = metric.compute()
    assert "pass@8" not in result  # k above the samples per question is not reported
    assert result.keys() == EXPECTED.keys()
    for key, value in EXPECTED.items():
        assert result[key] == pytest.approx(value, abs=1e-12), key


def test_acc_at_1_is_nan_without_greedy_completions() -> None:
    metric = PassAtK(ks=[1])
    metric.update([score_question(["<answer>A</answer>"], "A")])
    result = metric.compute()
    assert math.isnan(result["acc@1"]) and result["pass@1"] == 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        scores = _scores()
        mine = scores[:2] if rank == 0 else scores[2:]  # uneven shards: 2 questions and 1
        metric = PassAtK(ks=[1, 2, 4])
        metric.update(mine)
        # A group present on one rank only: rank 1 has nothing to add and must still take part in the sync.
        lonely = PassAtK(ks=[1])
        lonely.update(scores[:1] if rank == 0 else [])
        result = {"all": metric.compute(), "lonely": lonely.compute()}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        torch.distributed.destroy_process_group()


def test_metric_syncs_across_two_processes(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for key, value in EXPECTED.items():
            if key in result["all"]:
                assert result["all"][key] == pytest.approx(value, abs=1e-12), (rank, key)
        assert result["all"]["questions"] == 3.0
        assert result["lonely"]["questions"] == 1.0 and result["lonely"]["pass@1"] == 0.5


# -- evaluation outputs, the callback and the verb --------------------------------------------------------


def test_summary_has_a_row_per_group_only_when_there_are_several() -> None:
    from medrl.evaluation import summarise

    scores = _scores()
    rows = [{"group": g} for g in ("pneumoniamnist", "pneumoniamnist", "breastmnist")]
    summary = summarise(list(zip(scores, rows, strict=True)), ks=[1, 2])
    assert list(summary) == ["all", "breastmnist", "pneumoniamnist"]
    assert summary["breastmnist"]["questions"] == 1.0 and summary["breastmnist"]["pass@2"] == 0.5
    assert summary["pneumoniamnist"]["acc@1"] == 0.0 + 0.5  # questions 1 (right) and 2 (wrong)
    assert list(summarise(list(zip(scores, [{"group": "x"}] * 3, strict=True)), ks=[1])) == ["all"]


class _MixedVQA:
    """Two modalities in one validation set (PneumoniaMNIST and BreastMNIST), as a LightningDataModule."""

    def __new__(cls, medmnist):
        import lightning as L
        from torch.utils.data import ConcatDataset, DataLoader

        from medrl.data.medmnist import MedMNISTDataModule, vqa_collate

        class Mixed(L.LightningDataModule):
            def _loader(self, split: str) -> DataLoader:
                parts = [
                    MedMNISTDataModule(flag=f, mode="vqa", **medmnist.kwargs(), **{f"{split}_samples": 2}).dataset(
                        split
                    )
                    for f in ("pneumoniamnist", "breastmnist")
                ]
                return DataLoader(ConcatDataset(parts), batch_size=2, collate_fn=vqa_collate)

            def train_dataloader(self) -> DataLoader:
                return self._loader("train")

            def val_dataloader(self) -> DataLoader:
                return self._loader("val")

        return Mixed()


def run_callback_fast_dev_run(
    tiny_dir: Path, medmnist, out: Path, engine: object | None = None, image_ablation: bool = False
):
    """Fit an SFT module (LoRA) for one fast_dev_run step with the Pass@K callback; returns (trainer, callback)."""
    import lightning as L

    from medrl.callbacks.pass_at_k import PassAtKCallback
    from medrl.lit.sft import SFTModule

    callback = PassAtKCallback(
        engine="vllm" if engine is not None else "hf", n=2, max_new_tokens=6, batch_size=4, output_dir=str(out),
        image_ablation=image_ablation,
    )  # fmt: skip
    if engine is not None:
        callback.use_engine(engine)

    class SFTWithOptimizer(SFTModule):  # LightningCLI supplies the optimizer in configs; here we do
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)

    module = SFTWithOptimizer(model=str(tiny_dir), finetune="lora", max_completion_tokens=8)
    quiet = {"enable_progress_bar": False, "enable_model_summary": False}
    trainer = L.Trainer(fast_dev_run=True, accelerator="cpu", callbacks=[callback], **quiet)
    trainer.fit(module, datamodule=_MixedVQA(medmnist))
    return trainer, callback


def test_callback_logs_and_writes_in_fast_dev_run(tiny_dir: Path, medmnist, tmp_path: Path) -> None:
    trainer, callback = run_callback_fast_dev_run(tiny_dir, medmnist, tmp_path)
    logged = trainer.callback_metrics
    for key in ("acc@1", "pass@1", "pass@2", "gap@2", "majority", "format_fail", "unique"):
        assert f"val/{key}" in logged
        assert f"val/pneumoniamnist/{key}" in logged and f"val/breastmnist/{key}" in logged
    assert float(logged["val/questions"]) == 4.0
    for tag in ("before_training", "epoch000"):
        folder = tmp_path / tag
        rows = [json.loads(line) for line in (folder / "questions.jsonl").read_text().splitlines()]
        assert len(rows) == 4 and {r["group"] for r in rows} == {"pneumoniamnist", "breastmnist"}
        assert all(len(r["answers"]) == 2 and r["greedy"] is not None and "correct" in r for r in rows)
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["metrics"]["all"]["questions"] == 4.0 and summary["ks"] == [1, 2]
        assert (folder / "summary.md").read_text().startswith("| group |")
        assert (folder / "pass_at_k.png").read_bytes()[:4] == b"\x89PNG"
    assert callback.engine is None  # closed at teardown


def test_eval_command_writes_table_jsonl_and_curve(tiny_dir: Path, medmnist, tmp_path: Path) -> None:
    from medrl.cli import main

    out = tmp_path / "eval"
    args = ["eval", "--model", str(tiny_dir), *medmnist.cli("--"), "--questions", "3", "--n", "2"]
    assert main([*args, "--max_new_tokens", "6", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "questions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["id"].startswith("pneumoniamnist/") for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["engine"] == "hf" and set(summary["metrics"]) == {"all"}
    assert (out / "pass_at_k.png").stat().st_size > 0 and (out / "summary.md").is_file()
