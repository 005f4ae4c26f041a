"""Every export carries a model card; `medrl export` publishes a clean folder; the study's models carry their study."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from medrl.cli import main

REPO = Path(__file__).resolve().parents[1]
FAST = ["--trainer.max_steps=2", "--data.init_args.train_samples=32", "--data.init_args.val_samples=8"]


def _card(folder: Path):
    from huggingface_hub import ModelCard

    card = ModelCard.load(folder / "README.md")
    return card, card.data.to_dict()


def _no_local_paths(text: str, *roots: Path) -> None:
    for root in roots:
        assert str(root) not in text, f"the card names the local path {root}"
    assert "/root/" not in text and "/tmp/" not in text and "/home/" not in text


def _pass_at_k_fragment(tmp_path: Path) -> Path:
    text = (REPO / "callbacks/pass_at_k.yaml").read_text()
    for old, new in (
        ("n: 16", "n: 2"),
        ("ks: [1, 2, 4, 8, 16]", "ks: [1, 2]"),
        ("max_questions: 64", "max_questions: 4"),
        ("max_new_tokens: 128", "max_new_tokens: 8"),
        ("before_training: true", "before_training: false"),
    ):
        text = text.replace(old, new)  # fmt: skip
    fragment = tmp_path / "pass_at_k.yaml"
    fragment.write_text(text + "        image_ablation: true\n")
    return fragment


def test_an_sft_export_has_a_card_and_still_loads(tiny_dir, medmnist, tmp_path) -> None:
    from transformers import AutoModelForImageTextToText

    root = tmp_path / "run"
    assert main(["fit", "--config", str(REPO / "configs/sft.yaml"), f"--model.init_args.model={tiny_dir}",
                 *medmnist.cli(), f"--trainer.default_root_dir={root}", *FAST]) == 0  # fmt: skip
    folder = next(root.rglob("last.hf")) / "model"
    card, meta = _card(folder)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-text-to-text"
    assert {"medrl", "sft"} <= set(meta["tags"]) and "base_model" not in meta  # a local base has no hub id
    text = card.content
    assert f"base model | {tiny_dir.name}" in text and "2 optimizer steps" in text
    assert "| file pneumoniamnist" in text and "(MD5) |" in text
    assert "medrl fit --config lightning_logs/version_0/config.yaml" in text
    _no_local_paths(text, tmp_path, tiny_dir.parent)
    AutoModelForImageTextToText.from_pretrained(folder)  # the card does not get in the way of loading


def test_a_grpo_export_carries_its_evaluation(tiny_dir, medmnist, tmp_path) -> None:
    root = tmp_path / "run"
    assert main(["fit", "--config", str(REPO / "configs/rl.yaml"), f"--model.init_args.model={tiny_dir}",
                 *medmnist.cli(), f"--trainer.default_root_dir={root}", "--trainer.max_steps=2",
                 "--trainer.val_check_interval=2", "--config", str(_pass_at_k_fragment(tmp_path))]) == 0  # fmt: skip
    card, meta = _card(next(root.rglob("last.hf")) / "model")
    assert "grpo" in meta["tags"]
    text = card.content
    assert "| sampling.num_generations | 4 |" in text and "| care.enabled | True |" in text
    assert "| optim.lr | 0.0001 |" in text and "Not evaluated" not in text
    table = text.split("## Evaluation", 1)[1].split("##", 1)[0]
    assert "| all | 4 |" in table and "image_reliance" in table and "acc@1" in table


def test_a_lora_export_has_an_adapter_card_and_a_merged_one(tiny_dir, medmnist, tmp_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    root = tmp_path / "run"
    assert main(["fit", "--config", str(REPO / "configs/sft.yaml"), f"--model.init_args.model={tiny_dir}",
                 *medmnist.cli(), f"--trainer.default_root_dir={root}", *FAST, "--model.init_args.finetune=lora",
                 "--trainer.callbacks.init_args.merged=true"]) == 0  # fmt: skip
    export = next(root.rglob("last.hf"))
    _, adapter = _card(export / "adapter")
    _, merged = _card(export / "merged")
    assert adapter["library_name"] == "peft" and "lora" in adapter["tags"]
    assert merged["library_name"] == "transformers"
    assert "merged into its base" in (export / "merged" / "README.md").read_text()
    PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_dir), export / "adapter")
    AutoModelForImageTextToText.from_pretrained(export / "merged")


def test_export_writes_a_clean_folder_and_plans_the_push(tiny_dir, medmnist, tmp_path, capsys, monkeypatch) -> None:
    from medrl.study.export_command import upload_plan

    root = tmp_path / "run"
    assert main(["fit", "--config", str(REPO / "configs/sft.yaml"), f"--model.init_args.model={tiny_dir}",
                 *medmnist.cli(), f"--trainer.default_root_dir={root}", *FAST,
                 "--model.init_args.finetune=lora"]) == 0  # fmt: skip
    out = tmp_path / "published"
    # An adapter-only export published merged: merged now, onto the base the adapter records.
    assert main(["export", str(root), "--out", str(out), "--part", "merged", "--push_to_hub", "me/tiny-sft",
                 "--dry_run", "true"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    files, message = upload_plan(out, "me/tiny-sft")
    assert {"README.md", "config.json", "model.safetensors"} <= set(files)
    assert f"would push {len(files)} files to me/tiny-sft (private): {message}" in printed
    assert message.startswith("medrl export: SFT of ") and "merged into its base" in message
    _, meta = _card(out)
    assert meta["library_name"] == "transformers"
    # Offline: one line, exit 2, and the folder stays.
    monkeypatch.setenv("MEDRL_OFFLINE", "1")
    assert main(["export", str(out), "--push_to_hub", "me/tiny-sft"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "not pushed to me/tiny-sft: offline mode is set" in err[0] and str(out) in err[0]
    assert (out / "model.safetensors").is_file()


def test_the_study_section_of_a_card_is_replaced_not_repeated(tmp_path) -> None:
    from medrl.models.model_card import CardFacts, set_study_section, write_card

    write_card(tmp_path, CardFacts(method="SFT", base="tiny", commands=["medrl fit --config c.yaml"]))
    set_study_section(tmp_path, "## Study evaluation\n\nfirst")
    set_study_section(tmp_path, "## Study evaluation\n\nsecond")
    text = (tmp_path / "README.md").read_text()
    assert text.count("## Study evaluation") == 1 and "second" in text and "first" not in text
    assert text.index("## Study evaluation") < text.index("## Reproduce")
    header = yaml.safe_load(text.split("---")[1])
    assert header["pipeline_tag"] == "image-text-to-text"


def test_the_report_writes_each_trained_models_study_into_its_card(tmp_path) -> None:
    from medrl.models.model_card import CardFacts, write_card
    from medrl.report import build_report

    run = tmp_path / "run"
    rows = [{"id": f"breastmnist/{i}", "group": "breastmnist", "n": 2, "correct": i % 3, "greedy_correct": i % 2 == 0,
             "greedy_correct_swapped": i % 4 == 0, "options": {"A": "x", "B": "y"}} for i in range(40)]  # fmt: skip
    for label in ("base", "sft_breastmnist"):
        folder = run / "eval" / label / "breastmnist"
        folder.mkdir(parents=True)
        (folder / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        metrics = {"all": {"questions": 40, "acc@1": 0.5, "pass@1": 0.5, "pass@2": 0.6, "chance@2": 0.75}}
        (folder / "summary.json").write_text(json.dumps({"meta": {}, "ks": [1, 2], "metrics": metrics}))
    part = "model"
    export = run / "train" / "sft_breastmnist" / "checkpoints" / "last.hf" / part
    write_card(export, CardFacts(method="SFT", base="tiny"))
    (run / "plan.json").write_text(json.dumps({"name": "t", "support": {"k": 2}, "flags": ["breastmnist"]}))
    report = build_report(run).read_text()
    card = (export / "README.md").read_text()
    assert "## Study evaluation" in card and "| breastmnist | 40 |" in card
    assert "+0.250 [" in card  # image reliance: 20 right with the own image, 10 with the swapped one, of 40
    assert f"[sft_breastmnist ({part})](train/sft_breastmnist/checkpoints/last.hf/{part}/README.md)" in report


def test_a_published_adapter_names_no_local_path(tiny_dir, medmnist, tmp_path) -> None:
    root = tmp_path / "run"
    assert main(["fit", "--config", str(REPO / "configs/sft.yaml"), f"--model.init_args.model={tiny_dir}",
                 *medmnist.cli(), f"--trainer.default_root_dir={root}", *FAST,
                 "--model.init_args.finetune=lora"]) == 0  # fmt: skip
    out = tmp_path / "adapter"
    assert main(["export", str(root), "--out", str(out), "--part", "adapter"]) == 0
    for path in out.iterdir():
        if path.suffix in (".json", ".md", ".jinja"):
            _no_local_paths(path.read_text(), tmp_path, tiny_dir.parent)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_dir.name
