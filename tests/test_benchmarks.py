"""The six-benchmark suite: reading the unified export (good and broken rows), yes/no items, the DataModule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from medrl.cli import main
from medrl.data.benchmarks import (
    BENCHMARKS,
    BenchmarkSuiteDataModule,
    SuiteError,
    benchmark_order,
    load_suite,
    parse_options,
    write_suite,
)
from medrl.data.pmc_vqa import PMCVQADataModule
from medrl.data.vqa import INSTRUCTION, format_prompt
from medrl.report.benchmark_table import score, table_rows
from medrl.rollout.engine import Engine
from medrl.rollout.types import Completion, PromptResult, SamplingParams
from medrl.study.bench_eval import evaluate_items
from medrl.study.configs import MedRLCLI

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
    assert [im.size for im in mmmu["images"]] == [(10, 10), (30, 20)] and mmmu["image"] is None  # native
    assert [c["type"] for c in mmmu["messages"][-1]["content"]] == ["image", "image", "text"]
    assert dm.dataset().max_images() == 2
    tiled = BenchmarkSuiteDataModule(str(suite), images="tiled").dataset()[4]
    assert tiled["image"].size == (10 * 2 + 30 + 2, 20) and "images" not in tiled  # at a common height, 2 px apart
    assert [c["type"] for c in tiled["messages"][-1]["content"]] == ["image", "text"]
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


class ScriptedEngine(Engine):
    """Known predictions: greedy and sampled answers per question, set by the test (no model involved)."""

    name = "scripted"

    def __init__(self, script: dict[str, tuple[str, list[str]]]) -> None:
        self.script, self.calls = script, 0

    def generate(self, items, params: SamplingParams) -> list[PromptResult]:
        self.calls += 1
        results = []
        for item in items:
            greedy, samples = self.script[item["prompt"].split("\n")[0]]
            completion = lambda text: Completion(text=text, token_ids=[1], finish_reason="stop")  # noqa: E731
            results.append(PromptResult("", [completion(t) for t in samples[: params.n]], completion(greedy)))
        return results

    def load_weights(self, weights) -> None:
        raise NotImplementedError("a scripted engine has no weights")


def _script(dataset) -> dict[str, tuple[str, list[str]]]:
    """Greedy right on 3/4 PMC, 1/2 MMMU, 0/2 MedX-M, 3/3 PathVQA, 1/2 SLAKE, 2/3 VQA-RAD; one of 4 samples right."""
    wrong = {("PMC", 3), ("MMMU", 5), ("MedX-M", 6), ("MedX-M", 7), ("SLAKE", 14), ("VQA-RAD", 13)}
    script = {}
    for item in dataset.items:
        gold = item.answer_label
        other = next(letter for letter in item.options if letter != gold)
        key = (item.benchmark, item.dataset_index)
        greedy = f"<think>...</think><answer>{other if key in wrong else gold}</answer>"
        if key == ("SLAKE", 14):  # a wrong answer that is a format failure (no letter at all) counts as wrong
            greedy = "I am not sure"
        samples = [f"<answer>{gold}</answer>"] + [f"<answer>{other}</answer>"] * 3
        script[item.question] = (greedy, samples)
    return script


def test_known_predictions_score_to_known_accuracies(suite: Path, tmp_path: Path) -> None:
    dataset = BenchmarkSuiteDataModule(str(suite)).dataset()
    engine = ScriptedEngine(_script(dataset))
    rows = evaluate_items(engine, dataset, SamplingParams(n=4, greedy=True), tmp_path, batch_size=5)
    scores = score(rows, ks=[1, 2, 4])
    acc = {b: s["acc@1"] for b, s in scores["per_benchmark"].items()}
    assert acc == pytest.approx({"PMC": 3 / 4, "MMMU": 1 / 2, "MedX-M": 0.0, "PathVQA": 1.0, "SLAKE": 1 / 2,
                                 "VQA-RAD": 2 / 3})  # fmt: skip
    # the mean is over benchmarks, not items: (75 + 50 + 0 + 100 + 50 + 66.67) / 6
    assert scores["mean"]["acc@1"] == pytest.approx((0.75 + 0.5 + 0 + 1 + 0.5 + 2 / 3) / 6)
    # one right sample in four everywhere: pass@1 = 1/4, pass@2 = 1 - C(3,2)/C(4,2) = 1/2, pass@4 = 1
    for s in scores["per_benchmark"].values():
        assert (s["pass@1"], s["pass@2"], s["pass@4"]) == pytest.approx((0.25, 0.5, 1.0))
    assert scores["per_benchmark"]["SLAKE"]["format_failures"] == 0.5
    header, table = table_rows({"scripted": scores}, published=True)
    assert header == ["model", "metric", "PMC (n=4)", "MMMU (n=2)", "MedX-M (n=2)", "PathVQA (n=3)", "SLAKE (n=2)",
                      "VQA-RAD (n=3)", "mean"]  # fmt: skip
    assert table[0] == ["scripted", "acc@1", "75.00", "50.00", "0.00", "100.00", "50.00", "66.67", "56.94"]
    assert table[-1][-1] == "53.50"  # Qwen2.5-VL-7B's published mean over the six
    rows_on_disk = [json.loads(line) for line in (tmp_path / "items.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows_on_disk] == [f"{it.benchmark}/{it.dataset_index}" for it in dataset.items]


def test_an_interrupted_evaluation_resumes_to_the_same_rows(suite: Path, tmp_path: Path, tiny) -> None:
    from medrl.rollout.hf import HFEngine

    dataset = BenchmarkSuiteDataModule(str(suite), benchmarks=["PMC", "SLAKE"]).dataset()
    engine = HFEngine(*tiny)
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=5, greedy=True)
    whole = evaluate_items(engine, dataset, params, tmp_path / "whole", batch_size=2, keep_texts=True)
    # the run died after 3 rows (in the middle of batch 2 of 3), halfway through writing the 4th
    lines = (tmp_path / "whole" / "items.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "items.jsonl").write_text("".join(lines[:3]) + lines[3][:30])
    resumed = evaluate_items(engine, dataset, params, tmp_path / "cut", batch_size=2, keep_texts=True)
    assert len(whole) == 6 and resumed == whole  # sampled texts included: the same seeds were used


def test_bench_eval_command(suite: Path, tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench-eval", "--model", str(tiny_dir), "--suite", str(suite), "--out", str(tmp_path), "--n", "2",
            "--max_new_tokens", "8", "--batch_size", "8", "--benchmarks", "[PMC, SLAKE]"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["images"] == "native" and run["max_images"] == 1 and "one image each" in out
    assert "PMC (n=4)" in out and "SLAKE (n=2)" in out and "pass@2" in out
    saved = json.loads((tmp_path / "scores.json").read_text())
    assert saved["benchmarks"] == ["PMC", "SLAKE"] and saved["ks"] == [1, 2]
    table = (tmp_path / "table.md").read_text().splitlines()
    assert table[0].startswith("| model | metric | PMC (n=4) | SLAKE (n=2) | mean |")
    assert len((tmp_path / "items.jsonl").read_text().splitlines()) == 6
    assert main([*args, "--n", "4"]) == 2  # same folder, other settings: refused
    assert "other settings" in capsys.readouterr().err


def test_bench_eval_passes_several_images_natively_on_vllm(suite: Path, tmp_path: Path, capsys) -> None:
    args = ["bench-eval", "--model", "tiny:gemma3", "--suite", str(suite), "--out", str(tmp_path), "--engine", "vllm",
            "--max_new_tokens", "4", "--benchmarks", "[MMMU, PMC]", "--engine_options",
            '{"max_model_len": 512, "kv_cache_gib": 0.25}']  # fmt: skip
    assert main(args) == 0
    assert "several images as separate images (up to 2)" in capsys.readouterr().out
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["images"] == "native" and run["max_images"] == 2
    rows = [json.loads(line) for line in (tmp_path / "items.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {r["benchmark"] for r in rows} == {"MMMU", "PMC"}


def test_bench_eval_takes_a_model_fragment(suite: Path, tiny_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    fragment = tmp_path / "model.yaml"
    fragment.write_text(f"model:\n  init_args:\n    model: {tiny_dir}\n    dtype: float32\n")
    args = ["bench-eval", "--model", str(fragment), "--suite", str(suite), "--out", str(tmp_path / "o"),
            "--max_new_tokens", "4", "--benchmarks", "[SLAKE]"]  # fmt: skip
    assert main(args) == 0
    assert json.loads((tmp_path / "o" / "run.json").read_text())["model"] == str(tiny_dir)
    # The released model's fragment, offline and not cached: one line naming the hub id.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    released = str(REPO / "configs" / "models" / "medbridgerl_octomed_7b.yaml")
    assert main([*args[:2], released, *args[3:5], "--out", str(tmp_path / "r"), *args[7:]]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "armenjeddi/MedBridgeRL-OctoMed-7B-PMC-VQA-RL" in errors[0]


REPO = Path(__file__).resolve().parents[1]
SHORT_EVAL = ["--trainer.callbacks.max_new_tokens", "8", "--trainer.callbacks.output_dir"]


def test_sft_on_pmc_validated_per_benchmark_fast_dev_run(suite: Path, tiny_dir: Path, tmp_path: Path) -> None:
    from test_pmc_vqa import make_pmc

    root = make_pmc(tmp_path / "pmc")
    cli = MedRLCLI(args=[
        "fit", "--config", str(REPO / "configs/sft.yaml"), "--config", str(REPO / "callbacks/pass_at_k.yaml"),
        "--data", "medrl.data.pmc_vqa.PMCVQADataModule", "--data.root", str(root), "--data.validate_on", "suite",
        "--data.suite", str(suite), "--data.batch_size", "4", "--data.val_samples", "1",
        "--model.model", str(tiny_dir), "--trainer.fast_dev_run", "true", "--trainer.default_root_dir",
        str(tmp_path / "run"), "--trainer.callbacks.n", "2", "--trainer.callbacks.ks", "[1, 2]",
        "--trainer.callbacks.before_training", "false",
        *SHORT_EVAL, str(tmp_path / "eval"),
    ])  # fmt: skip
    assert isinstance(cli.datamodule, PMCVQADataModule) and cli.trainer.global_step == 1
    metrics = cli.trainer.callback_metrics
    for bench in BENCHMARKS:
        assert 0.0 <= float(metrics[f"val/{bench}/pass@2"]) <= 1.0
    assert float(metrics["val/questions"]) == 6  # one per benchmark


def test_validate_with_the_benchmarks_config(suite: Path, tiny_dir: Path, tmp_path: Path) -> None:
    cli = MedRLCLI(args=[
        "validate", "--config", str(REPO / "configs/benchmarks.yaml"), "--data.suite", str(suite),
        "--model.model", str(tiny_dir), "--trainer.default_root_dir", str(tmp_path), *SHORT_EVAL, str(tmp_path),
    ])  # fmt: skip
    metrics = cli.trainer.callback_metrics
    assert {f"val/{b}/acc@1" for b in BENCHMARKS} <= set(metrics)
    rows = [json.loads(line) for line in (tmp_path / "validate" / "questions.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(f"{it.benchmark}/{it.dataset_index}" for it in
                                                   BenchmarkSuiteDataModule(str(suite)).dataset().items)  # fmt: skip


def test_grpo_on_a_pmc_subset_with_the_octomed_config_fast_dev_run(suite: Path, tiny_dir: Path, tmp_path) -> None:
    """configs/rl_octomed_pmc.yaml end to end on CPU: the subset builder's output trains, the suite validates."""
    from test_pmc_vqa import make_pmc

    root = make_pmc(tmp_path / "pmc")
    assert main(["data", "pmc-subset", "--n", "16", "--root", str(root)]) == 0
    cli = MedRLCLI(args=[
        "fit", "--config", str(REPO / "configs/rl_octomed_pmc.yaml"), "--trainer.accelerator", "cpu",
        "--trainer.precision", "32-true", "--trainer.fast_dev_run", "true", "--trainer.default_root_dir", str(tmp_path),
        "--model.model", str(tiny_dir), "--model.engine.name", "hf", "--model.engine.options", "{}",
        "--model.dtype", "float32", "--model.optim.gradient_checkpointing", "false",
        "--model.sampling.num_generations", "2", "--model.sampling.max_completion_length", "8",
        "--model.sampling.val_max_new_tokens", "8",
        "--data.root", str(root), "--data.train_file", "pmc_vqa_16.jsonl", "--data.suite", str(suite),
        "--data.batch_size", "4", "--data.val_samples", "1",
    ])  # fmt: skip
    assert cli.trainer.global_step == 1
    assert len(cli.datamodule.dataset("train")) == 16 and len(cli.datamodule.dataset("val")) == 6  # 1 per benchmark
    metrics = cli.trainer.callback_metrics
    assert {"reward/accuracy", "time/generate", "val/accuracy"} <= set(metrics)


def test_write_suite_exports_rows_with_in_memory_images(tmp_path: Path) -> None:
    """Rows as a Hugging Face dataset yields them (PIL images, image dicts, options as JSON) become a suite."""
    import io

    png = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(png, "PNG")
    on_disk = tmp_path / "given.jpg"
    Image.new("RGB", (9, 9), "blue").save(on_disk)
    rows = [
        {"images": [Image.new("L", (12, 10)), Image.new("RGB", (5, 10))], "question": "Same?",
         "options": json.dumps({"A": "yes", "B": "no"}), "answer_label": "A", "answer": "yes",
         "dataset_name": "MMMU-medical", "dataset_index": 7},
        {"images": [{"bytes": png.getvalue(), "path": None}], "question": "Fluid?", "options": "", "answer": "no",
         "answer_label": "", "dataset_name": "vqa_rad", "dataset_index": 8},
        {"images": [str(on_disk)], "question": "Which?", "options": {"A": "CT", "B": "MRI"}, "answer_label": "B",
         "answer": "MRI", "dataset_name": "pmc_vqa", "dataset_index": 9},
    ]  # fmt: skip
    out = tmp_path / "suite"
    write_suite(rows, out)
    first = (out / "suite.jsonl").read_bytes()
    write_suite(rows, out)  # a rerun finds the images there and writes the same file
    assert (out / "suite.jsonl").read_bytes() == first
    reports: list = []
    items, _ = load_suite(str(out), reports=reports)
    assert reports[0].dropped == [] and [it.benchmark for it in items] == ["MMMU", "VQA-RAD", "PMC"]
    assert items[0].images == ("images/0_0.png", "images/0_1.png") and items[2].images == ("images/2_0.jpg",)
    assert items[1].options == {"A": "yes", "B": "no"} and items[1].answer_label == "B"
