"""The same matrix for every VLM family, each on its offline tiny model: the real family classes, probe
features of its tower, what `vision: frozen | projector | all` trains, no generated image placeholder, HF
sampling's shared prefill giving exactly num_return_sequences' samples, SFT's answer-only labels under its chat
template, two GRPO steps on both engines with Pass@K validation and an HF export whose logits equal the
checkpoint's, and vLLM's greedy equal to HF's after full and LoRA pushes.
(The Qwen2.5-VL `tiny` runs all of this across the rest of the suite; its rows here are the cheap ones.)"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from medrl.cli import main
from medrl.data.collate import encode_chat
from medrl.data.medmnist import MedMNISTDataModule
from medrl.models.families import family_of, family_of_folder
from medrl.models.hub import load_vlm, resolve_model
from medrl.rollout.factory import make_engine
from medrl.rollout.types import SamplingParams

REPO = Path(__file__).resolve().parents[1]
GREEDY = SamplingParams(n=0, greedy=True, max_new_tokens=8, seed=0)
# tiny id -> its family; each tiny model makes 4 image tokens of a 28 px image
FAMILY_TINY = {"tiny:smolvlm": "idefics3", "tiny:gemma3": "gemma3", "tiny:internvl": "internvl",
               "tiny:qwen3_vl": "qwen3_vl"}  # fmt: skip
EVERY_TINY = {"tiny": "qwen2_vl", **FAMILY_TINY}


@pytest.fixture(scope="module")
def items(medmnist) -> list[dict]:
    dataset = MedMNISTDataModule(**medmnist.kwargs(), flag="pneumoniamnist", mode="vqa", val_samples=4).dataset("val")
    return [dataset[i] for i in range(4)]


def _build(tiny: str):
    """A fresh in-memory copy of a tiny model (tests below change its weights or trainability)."""
    return load_vlm(str(resolve_model(tiny)))


@pytest.mark.parametrize(("tiny", "family"), EVERY_TINY.items())
def test_the_tiny_model_is_the_real_family(tiny: str, family: str, items) -> None:
    model, processor = _build(tiny)
    assert family_of(model).name == family == family_of_folder(resolve_model(tiny)).name
    assert type(model).__name__.endswith("ForConditionalGeneration")
    text = model.config.get_text_config()
    assert (getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads) >= 32  # vLLM's CPU floor
    batch = encode_chat(processor, [items[0]["messages"]], [items[0]["image"]])
    image_token = getattr(model.config, "image_token_id", None) or model.config.image_token_index
    assert (batch.inputs["input_ids"] == image_token).sum() == 4  # one 28 px image: 4 image tokens in every family


@pytest.mark.parametrize("tiny", EVERY_TINY)
def test_probe_features_of_the_familys_tower(tiny: str, medmnist) -> None:
    from medrl.models.encoders import encoder_from_spec

    encoder = encoder_from_spec(f"vlm:{tiny}")
    images = MedMNISTDataModule(**medmnist.kwargs(), flag="pneumoniamnist", train_samples=4).dataset("train")
    features = encoder.encode(torch.stack([images[i]["image"] for i in range(4)]))
    assert features.shape == (4, encoder.dim)  # one vector per image, the tower's (or merger's) width
    assert torch.isfinite(features).all() and torch.cdist(features, features)[~torch.eye(4, dtype=bool)].min() > 0
    described = encoder.describe()
    assert described["pretrained"] is False and described["pooling"] == "mean"
    tower = family_of_folder(resolve_model(tiny)).tower
    assert described["features"] == "merger" or described["features"].startswith(f"{tower} last_hidden_state")


@pytest.mark.parametrize("tiny", FAMILY_TINY)
@pytest.mark.parametrize("vision", ["frozen", "projector", "all"])
def test_vision_training_follows_the_familys_module_names(tiny: str, vision: str) -> None:
    from medrl.models.lora import LoRAConfig, apply_lora, set_full_finetune

    family = family_of_folder(resolve_model(tiny))
    names = {family.tower, family.projector}
    trains = {"frozen": set(), "projector": {family.projector}, "all": names}[vision]

    def vision_side(model) -> set[str]:  # the projector's parameters may sit inside the tower (visual.merger)
        parts = [set(n.split(".")) for n, p in model.named_parameters() if p.requires_grad]
        return {family.projector if family.projector in p else family.tower for p in parts if p & names}

    model, _ = _build(tiny)
    set_full_finetune(model, vision)
    assert vision_side(model) == trains
    assert any(p.requires_grad for n, p in model.named_parameters() if not set(n.split(".")) & names)
    adapted = apply_lora(_build(tiny)[0], LoRAConfig(), vision)
    assert vision_side(adapted) == trains
    lora = [n for n, _ in adapted.named_parameters() if "lora_" in n]
    assert lora and not any(family.tower in n.split(".") for n in lora)  # adapters on the language model only


@pytest.mark.parametrize("tiny", FAMILY_TINY)
def test_no_engine_generates_an_image_placeholder(tiny: str, items) -> None:
    model, processor = _build(tiny)
    banned = processor.tokenizer.convert_tokens_to_ids(list(family_of(model).placeholders))
    assert len(banned) == len(family_of(model).placeholders) and None not in banned

    def favour_placeholders(_module, _args, logits):  # without the ban, every sampled token would be one
        logits[..., banned] += 50.0
        return logits

    model.get_output_embeddings().register_forward_hook(favour_placeholders)
    results = make_engine("hf", model, processor).generate(items, SamplingParams(n=8, max_new_tokens=24))
    tokens = [t for r in results for c in r.samples for t in c.token_ids]
    assert tokens and not set(tokens) & set(banned)


@pytest.mark.parametrize("tiny", EVERY_TINY)
def test_sampling_prefills_each_prompt_once_and_matches_per_copy_prefill(tiny: str, items) -> None:
    """The hf engine prefills a prompt once for its n samples; under one seed that gives exactly the tokens (and
    log-probs) of transformers' own num_return_sequences, which prefills every copy."""
    from transformers import LogitsProcessorList

    from medrl.rollout.decoding import prompt_texts
    from medrl.rollout.hf import _RecordAndBan

    model, processor = _build(tiny)
    engine = make_engine("hf", model, processor)
    params = SamplingParams(n=4, temperature=0.7, top_p=0.9, max_new_tokens=12, seed=3, logprobs=True)
    prefill_rows = []
    hook = model.register_forward_pre_hook(
        lambda _m, _a, kw: prefill_rows.append(kw["input_ids"].shape) if kw["input_ids"].shape[1] > 1 else None,
        with_kwargs=True,
    )
    results = engine.generate(items, params)
    hook.remove()
    assert [shape[0] for shape in prefill_rows] == [len(items)]  # one prefill row per prompt, not per sample
    inputs = engine._inputs(prompt_texts(processor, items), items)
    recorder = _RecordAndBan(engine.banned, record=True)
    torch.manual_seed(3)
    with torch.no_grad():
        out = model.generate(**inputs, generation_config=engine._config(params, sample=True),
                             logits_processor=LogitsProcessorList([recorder]))  # fmt: skip
    reference = out[:, inputs["input_ids"].shape[1] :]
    logprobs = recorder.finish(reference[:, -1])
    samples = [c for r in results for c in r.samples]
    assert len(samples) == reference.shape[0] == 4 * len(items)
    for row, completion in enumerate(samples):
        assert completion.token_ids == reference[row, : len(completion.token_ids)].tolist(), (tiny, row)
        expected = logprobs[row, : len(completion.token_ids)]
        assert torch.allclose(torch.tensor(completion.logprobs), expected, atol=1e-5), (tiny, row)


@pytest.mark.parametrize("tiny", FAMILY_TINY)
def test_sft_labels_are_the_answer_and_the_familys_end_of_turn(tiny: str, items) -> None:
    model, processor = _build(tiny)
    answer = "<think>dense</think><answer>B</answer>"
    batch = encode_chat(processor, [items[0]["messages"]], [items[0]["image"]], [answer])
    labels = batch.labels[0]
    kept = labels[labels != -100].tolist()
    assert processor.tokenizer.decode(kept) == answer + family_of(model).turn_ends[0]  # the template's own turn end
    model.train()
    loss = model(**batch.inputs, labels=batch.labels).loss
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def _logits(model, processor, items) -> torch.Tensor:
    batch = encode_chat(processor, [it["messages"] for it in items[:2]], [it["image"] for it in items[:2]])
    with torch.no_grad():
        return model.eval()(**batch.inputs).logits


def _export_equals_checkpoint(tiny: str, folder: Path, items) -> bool:
    """The exported HF model's logits equal the base with the checkpoint's weights loaded; True if those
    weights moved the logits (so that the equality says something)."""
    exported, _ = load_vlm(str(folder / "checkpoints" / "last.hf" / "model"))
    base, processor = _build(tiny)
    state = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    trained = {k.removeprefix("model."): v for k, v in state.items()}
    before = _logits(base, processor, items)
    _, unexpected = base.load_state_dict(trained, strict=False)
    assert trained and not unexpected
    after = _logits(base, processor, items)
    torch.testing.assert_close(_logits(exported, processor, items), after, atol=1e-5, rtol=1e-5)
    return bool((after - before).abs().max() > 0)


@pytest.mark.parametrize("engine", ["hf", "vllm"])
@pytest.mark.parametrize("tiny", FAMILY_TINY)
def test_two_grpo_steps_validate_with_pass_at_k_and_export(
    tiny: str, engine: str, medmnist, items, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["fit", "--config", str(REPO / "configs" / "rl.yaml"), "--model.init_args.model", tiny,
            "--model.init_args.engine.name", engine, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
            "--model.init_args.sampling.max_completion_length", "16", "--data.init_args.val_samples", "4",
            "--trainer.default_root_dir", str(tmp_path / "rl"),
            "--config", str(REPO / "callbacks" / "pass_at_k.yaml"), "--trainer.callbacks.n", "4",
            "--trainer.callbacks.ks", "[1, 4]", "--trainer.callbacks.max_questions", "4",
            "--trainer.callbacks.max_new_tokens", "8", "--trainer.callbacks.before_training", "false",
            "--trainer.callbacks.engine", engine, *medmnist.cli("--data.init_args.")]  # fmt: skip
    assert main(argv) == 0
    folder = tmp_path / "rl" / "lightning_logs" / "version_0"
    metrics = list(csv.DictReader((folder / "metrics.csv").open()))
    assert len([r for r in metrics if r.get("time/step")]) == 2
    assert any(r.get("val/pass@4") not in (None, "") for r in metrics)  # Pass@K ran on this family
    _export_equals_checkpoint(tiny, folder, items)  # a random model's rewards may all tie: no move needed here


@pytest.mark.parametrize("tiny", FAMILY_TINY)
def test_two_sft_steps_move_the_model_and_export_what_the_checkpoint_holds(
    tiny: str, medmnist, items, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["fit", "--config", str(REPO / "configs" / "sft.yaml"), "--model.init_args.model", tiny,
            "--trainer.max_steps", "2", "--data.init_args.batch_size", "4", "--data.init_args.train_samples", "8",
            "--data.init_args.val_samples", "4", "--trainer.default_root_dir", str(tmp_path / "sft"),
            *medmnist.cli("--data.init_args.")]  # fmt: skip
    assert main(argv) == 0
    assert _export_equals_checkpoint(tiny, tmp_path / "sft" / "lightning_logs" / "version_0", items)


def _distinct(tiny: str, seed: int):
    """A tiny model with larger random weights: decisive greedy choices that differ from the base model's."""
    policy, processor = _build(tiny)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        for name, param in policy.named_parameters():
            if param.dim() >= 2 and "embed" not in name:
                param.normal_(0.0, 0.1, generator=generator)
    return policy, processor


def _two_image_item(items) -> dict:
    """A question with two images, passed natively: one placeholder per image."""
    from medrl.core.prompts import chat_messages

    images = [items[1]["image"], items[2]["image"].resize((56, 56))]
    return {**items[0], "image": None, "images": images, "messages": chat_messages(items[0]["prompt"], images=2)}


@pytest.mark.parametrize("tiny", EVERY_TINY)
def test_vllm_greedy_equals_hf_after_full_and_merged_lora_pushes(tiny: str, items) -> None:
    from peft import LoraConfig, get_peft_model

    from medrl.models.lora import language_target_regex

    base, processor = _distinct(tiny, 4)  # decisive weights: no near-tie for the two engines' rounding to flip
    items = [*items, _two_image_item(items)]  # native multi-image prompts, on both engines
    batch = encode_chat(processor, [items[-1]["messages"]], [items[-1]["images"]])
    image_token = getattr(base.config, "image_token_id", None) or base.config.image_token_index
    assert (batch.inputs["input_ids"] == image_token).sum() > 4  # both images' tokens, not one image's
    greedy = lambda engine: [r.greedy.token_ids for r in engine.generate(items, GREEDY)]  # noqa: E731
    engine = make_engine("vllm", base, processor, max_model_len=512, kv_cache_gib=0.25, max_num_seqs=16, max_images=2)
    try:
        assert greedy(engine) == greedy(make_engine("hf", base, processor))  # the same model before any push
        policy, _ = _distinct(tiny, 5)
        expected = greedy(make_engine("hf", policy, processor))
        assert greedy(engine) != expected  # still the base
        engine.sync(policy)
        assert greedy(engine) == expected
        # A LoRA policy (random A and B, large alpha) goes over merged into vLLM's language model.
        config = LoraConfig(r=8, lora_alpha=64, target_modules=language_target_regex(["q_proj", "v_proj", "o_proj"]),
                            init_lora_weights=False)  # fmt: skip
        lora = get_peft_model(_distinct(tiny, 6)[0], config).eval()
        expected = greedy(make_engine("hf", lora, processor))
        assert greedy(engine) != expected
        engine.sync(lora)
        assert greedy(engine) == expected
    finally:
        engine.close()


# Each hub model's fragment, tried with its settings (dtype aside) on its family's tiny model.
FRAGMENT_TINY = {"qwen2_5_vl_7b": "tiny", "octomed_7b": "tiny", "lingshu_7b": "tiny", "qwen3_vl_8b": "tiny:qwen3_vl",
                 "medgemma_4b": "tiny:gemma3", "internvl3_8b": "tiny:internvl",
                 "smolvlm_256m": "tiny:smolvlm"}  # fmt: skip


def test_every_hub_model_has_a_fragment_tried_here() -> None:
    fragments = {p.stem for p in (REPO / "configs" / "models").glob("*.yaml")}
    assert fragments - {"medbridgerl_octomed_7b"} == set(FRAGMENT_TINY)


@pytest.mark.parametrize(("fragment", "tiny"), FRAGMENT_TINY.items())
def test_a_hub_models_fragment_trains_on_its_familys_tiny_model(
    fragment: str, tiny: str, medmnist, tmp_path: Path, monkeypatch
) -> None:
    from medrl.models.fragments import fragment_init_args
    from medrl.models.hub import load_processor

    path = REPO / "configs" / "models" / f"{fragment}.yaml"
    settings = fragment_init_args(str(path))
    processor = load_processor(tiny, settings.get("image_options"))  # every option is the family's own setting
    for key, value in (settings.get("image_options") or {}).items():
        if key not in ("min_pixels", "max_pixels"):  # Qwen folds these into `size`
            assert getattr(processor.image_processor, key) == value
    monkeypatch.chdir(tmp_path)
    argv = ["fit", "--config", str(REPO / "configs" / "rl.yaml"), "--config", str(path),
            "--model.init_args.model", tiny,
            "--model.init_args.dtype", "float32", "--trainer.max_steps", "1", "--trainer.val_check_interval", "1",
            "--model.init_args.sampling.max_completion_length", "8", "--data.init_args.val_samples", "2",
            "--data.init_args.train_samples", "8", "--trainer.default_root_dir", str(tmp_path / "rl"),
            *medmnist.cli("--data.init_args.")]  # fmt: skip
    assert main(argv) == 0
    hparams = (tmp_path / "rl" / "lightning_logs" / "version_0" / "hparams.yaml").read_text()
    assert f"finetune: {settings['finetune']}" in hparams
