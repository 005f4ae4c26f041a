"""The offline tiny VLM and model resolution: build, save, reload, generate; hub ids fail clearly offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medrl.data.vqa import chat_messages
from medrl.models.families.qwen_vl import VISION_PLACEHOLDERS, build_tiny, tiny_dir
from medrl.models.hub import ModelNotFoundError, load_vlm, resolve_model, vision_tower


def _encode(processor, size: int = 28):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8))
    text = processor.apply_chat_template(chat_messages("What is shown?"), add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=[image], return_tensors="pt")


def test_tiny_is_small_and_deterministic() -> None:
    model_a, _ = build_tiny(seed=3)
    model_b, _ = build_tiny(seed=3)
    model_c, _ = build_tiny(seed=4)
    n_params = sum(p.numel() for p in model_a.parameters())
    assert 1e5 < n_params < 5e6
    assert model_a.config.text_config.num_hidden_layers == 2 and model_a.config.vision_config.depth == 2
    pa, pb, pc = (next(m.parameters()) for m in (model_a, model_b, model_c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_saved_tiny_reloads_to_the_same_outputs(tiny_dir: Path, tiny) -> None:
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in tiny_dir.iterdir()}
    model, processor = tiny
    fresh, _ = build_tiny(seed=0)
    inputs = _encode(processor)
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, fresh(**inputs).logits, atol=1e-6)
    # 28 px is upscaled to 56x56: a 4x4 patch grid merged 2x2 into 4 image tokens.
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((inputs["input_ids"] == image_id).sum()) == 4


def test_tiny_generates_from_image_and_prompt(tiny) -> None:
    model, processor = tiny
    inputs = _encode(processor)
    banned = [[i] for i in processor.tokenizer.convert_tokens_to_ids(VISION_PLACEHOLDERS)]
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=True, max_new_tokens=12, num_return_sequences=3, bad_words_ids=banned)
    new = out[:, inputs["input_ids"].shape[1] :]
    assert new.shape[0] == 3 and new.shape[1] >= 1
    assert not any(t in [b[0] for b in banned] for t in new.flatten().tolist())
    assert all(isinstance(t, str) for t in processor.batch_decode(new, skip_special_tokens=True))


def test_vision_tower_features(tiny) -> None:
    model, processor = tiny
    inputs = _encode(processor, size=64)
    with torch.no_grad():
        out = vision_tower(model)(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    merged = out.pooler_output if hasattr(out, "pooler_output") else out
    assert merged.shape[-1] == model.config.text_config.hidden_size


def test_tiny_dir_is_cached(tmp_path: Path) -> None:
    first = tiny_dir(seed=5, root=tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert tiny_dir(seed=5, root=tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_model_arguments_resolve(tiny_dir: Path, tmp_path: Path) -> None:
    assert resolve_model(str(tiny_dir)) == tiny_dir
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="no such folder"):
        resolve_model("./does/not/exist")


def test_hub_id_offline_fails_at_once_with_instructions() -> None:
    with pytest.raises(ModelNotFoundError) as excinfo:
        load_vlm("Qwen/Qwen2.5-VL-3B-Instruct")
    message = str(excinfo.value)
    assert "--model DIR" in message and "huggingface-cli download Qwen/Qwen2.5-VL-3B-Instruct" in message


def _corpus_from_data() -> list[str]:
    """tiny's tokenizer text as the data layer would write it today: prompts, questions, class names, format."""
    from medrl.data import vqa
    from medrl.data.medmnist_files import FLAGS_2D, info

    lines = [vqa.INSTRUCTION, "You are a helpful assistant.", "Options:", "system user assistant"]
    lines += list(vqa.QUESTIONS.values())
    lines += [" ".join(vqa.class_names(flag, info(flag)["label"])) for flag in FLAGS_2D]
    lines += [f"<think> The image shows it, so the answer is {c}. </think> <answer>{c}</answer>" for c in "ABCDEFGH"]
    lines += [f"{c}. " for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"] + ["0 1 2 3 4 5 6 7 8 9 yes no"]
    return lines


def test_frozen_tokenizer_corpus_matches_the_data_layer() -> None:
    # models/ may not import data/ (the layer contract), so the corpus is frozen; this catches drift.
    from medrl.models.tiny_corpus import CORPUS

    expected = _corpus_from_data()
    assert list(CORPUS) == expected, (
        "medrl/models/tiny_corpus.py is stale: replace CORPUS with these lines (and bump TINY_VERSION):\n"
        + "\n".join(repr(line) + "," for line in expected)
    )
