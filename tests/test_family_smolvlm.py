"""The SmolVLM / Idefics3 family on its offline tiny model (`tiny:smolvlm`): prompts through its own processor,
GRPO on both engines, and vLLM's greedy equal to HF's after a weight push. The rest of the family matrix
(probe tower, SFT's answer mask, LoRA targets, FSDP units) is still Qwen-only."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from medrl.cli import main
from medrl.data.medmnist import MedMNISTDataModule
from medrl.models.hub import load_vlm, resolve_model
from medrl.models.tiny_smolvlm import build_tiny_smolvlm
from medrl.rollout.factory import make_engine
from medrl.rollout.types import SamplingParams

REPO = Path(__file__).resolve().parents[1]
GREEDY = SamplingParams(n=0, greedy=True, max_new_tokens=8, seed=0)


@pytest.fixture(scope="module")
def smolvlm():
    return load_vlm(str(resolve_model("tiny:smolvlm")))


@pytest.fixture(scope="module")
def items(medmnist) -> list[dict]:
    dataset = MedMNISTDataModule(**medmnist.kwargs(), flag="pneumoniamnist", mode="vqa", val_samples=4).dataset("val")
    return [dataset[i] for i in range(4)]


def test_the_tiny_model_is_the_real_family(smolvlm, items) -> None:
    model, processor = smolvlm
    assert type(model).__name__ == "Idefics3ForConditionalGeneration"
    assert type(processor).__name__ == "Idefics3Processor"
    prompt = processor.apply_chat_template(items[0]["messages"], add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt], images=[[items[0]["image"]]], return_tensors="pt")
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == 4  # one 64 px image, pixel shuffle 2
    assert inputs["pixel_values"].shape[:2] == (1, 1)  # [rows, tiles, C, H, W]: no grid, per row


def test_probe_features_of_the_siglip_tower(medmnist) -> None:
    from medrl.models.encoders import encoder_from_spec

    encoder = encoder_from_spec("idefics3:tiny:smolvlm")
    images = MedMNISTDataModule(**medmnist.kwargs(), flag="pneumoniamnist", train_samples=4).dataset("train")
    batch = torch.stack([images[i]["image"] for i in range(4)])
    features = encoder.encode(batch)
    assert features.shape == (4, encoder.dim) == (4, 64)  # the tower's width, one vector per image
    assert torch.isfinite(features).all() and torch.cdist(features, features)[~torch.eye(4, dtype=bool)].min() > 0
    described = encoder.describe()
    assert described["features"].startswith("vision_model last_hidden_state") and described["pretrained"] is False


@pytest.mark.parametrize(("vision", "trains"), [("frozen", set()), ("projector", {"connector"}),
                                               ("all", {"vision_model", "connector"})])  # fmt: skip
def test_vision_training_follows_the_familys_module_names(vision: str, trains: set[str]) -> None:
    from medrl.models.lora import LoRAConfig, apply_lora, set_full_finetune

    def vision_side(model) -> set[str]:
        names = {"vision_model", "connector"}
        return {part for n, p in model.named_parameters() if p.requires_grad for part in n.split(".") if part in names}

    model, _ = build_tiny_smolvlm(seed=0)
    set_full_finetune(model, vision)
    assert vision_side(model) == trains  # `frozen` used to leave Idefics3's tower trainable (it looked for `visual`)
    assert any(p.requires_grad for n, p in model.named_parameters() if "text_model" in n)
    adapted = apply_lora(build_tiny_smolvlm(seed=0)[0], LoRAConfig(), vision)
    assert vision_side(adapted) == trains
    assert not any("lora_" in n for n, _ in adapted.named_parameters() if "vision_model" in n)


def test_no_engine_generates_an_image_placeholder(smolvlm, items) -> None:
    model, processor = smolvlm
    banned = set(processor.tokenizer.convert_tokens_to_ids(["<image>", "<fake_token_around_image>", "<global-img>"]))
    results = make_engine("hf", model, processor).generate(items, SamplingParams(n=8, max_new_tokens=24, seed=0))
    assert not any(set(c.token_ids) & banned for r in results for c in r.samples)


def test_sft_labels_are_the_answer_and_the_familys_end_of_turn(smolvlm, items) -> None:
    from medrl.data.collate import encode_chat

    model, processor = smolvlm
    answer = "<think>dense</think><answer>B</answer>"
    batch = encode_chat(processor, [items[0]["messages"]], [[items[0]["image"]]], [answer])
    labels = batch.labels[0]
    kept = labels[labels != -100].tolist()
    assert processor.tokenizer.decode(kept) == answer + "<end_of_utterance>"  # the template's own turn end
    loss = model(**batch.inputs, labels=batch.labels).loss
    assert torch.isfinite(loss) and loss > 0


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_two_grpo_steps_train_and_export(engine: str, medmnist, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["fit", "--config", str(REPO / "configs" / "rl.yaml"), "--model.init_args.model", "tiny:smolvlm",
            "--model.init_args.engine.name", engine, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
            "--data.init_args.val_samples", "4", "--trainer.default_root_dir", str(tmp_path / "rl"),
            *medmnist.cli("--data.init_args.")]  # fmt: skip
    assert main(argv) == 0
    folder = tmp_path / "rl" / "lightning_logs" / "version_0"
    rows = [r for r in csv.DictReader((folder / "metrics.csv").open()) if r.get("time/step")]
    assert len(rows) == 2
    exported = folder / "checkpoints" / "last.hf" / "model"
    model, _ = load_vlm(str(exported))
    assert type(model).__name__ == "Idefics3ForConditionalGeneration"


def _distinct(seed: int):
    """A tiny SmolVLM with larger random weights: decisive greedy choices that differ from the base model's."""
    policy, _ = build_tiny_smolvlm(seed=seed)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        for param in policy.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.1, generator=generator)
    return policy


def test_vllm_greedy_equals_hf_after_full_and_merged_lora_pushes(smolvlm, items) -> None:
    from peft import LoraConfig, get_peft_model

    base, processor = smolvlm
    greedy = lambda engine: [r.greedy.token_ids for r in engine.generate(items, GREEDY)]  # noqa: E731
    engine = make_engine("vllm", base, processor, max_model_len=512, kv_cache_gib=0.25, max_num_seqs=16)
    try:
        policy = _distinct(5)
        expected = greedy(make_engine("hf", policy, processor))
        assert greedy(engine) != expected  # still the base
        engine.sync(policy)
        assert greedy(engine) == expected
        # A LoRA policy (random A and B, large alpha) goes over merged into vLLM's text model.
        config = LoraConfig(r=8, lora_alpha=64, target_modules=r".*text_model.*\.(q_proj|v_proj|o_proj)",
                            init_lora_weights=False)  # fmt: skip
        lora = get_peft_model(_distinct(6), config).eval()
        expected = greedy(make_engine("hf", lora, processor))
        assert greedy(engine) != expected
        engine.sync(lora)
        assert greedy(engine) == expected
    finally:
        engine.close()
