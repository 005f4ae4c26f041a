"""The benchmark's model sizes: random-weight Qwen2.5-VL models built offline at real-model proportions.

``tiny`` is medrl's test model (0.66M parameters, head size 32). ``20m`` and ``100m`` keep Qwen2.5-VL's
architecture with head size 64 in both towers, grouped-query attention, a gated MLP and the 2x2 patch merger;
every size's processor resizes images to 224 px, i.e. 16x16 patches of 14 px merged into 64 image tokens, as the
study feeds a Qwen tower. Built once into the medrl cache (atomically), like ``tiny``.

    python bench/sizes.py            # builds every size and prints its parameter counts
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

IMAGE_PIXELS = 224 * 224  # 64 merged tokens per image
# size -> (text: hidden, layers, heads, kv heads, MLP width; vision: hidden, depth, heads, MLP width)
SHAPES: dict[str, dict[str, int]] = {
    "tiny": {"hidden": 128, "layers": 2, "heads": 4, "kv_heads": 2, "mlp": 256,
             "v_hidden": 64, "v_depth": 2, "v_heads": 4, "v_mlp": 128},
    "20m": {"hidden": 384, "layers": 8, "heads": 6, "kv_heads": 2, "mlp": 1024,
            "v_hidden": 256, "v_depth": 4, "v_heads": 4, "v_mlp": 1024},
    "100m": {"hidden": 768, "layers": 12, "heads": 12, "kv_heads": 4, "mlp": 2048,
             "v_hidden": 512, "v_depth": 8, "v_heads": 8, "v_mlp": 1536},
}  # fmt: skip


def _config(tokenizer: Any, s: dict[str, int]):
    from transformers import Qwen2_5_VLConfig

    ids = tokenizer.convert_tokens_to_ids
    half = s["hidden"] // s["heads"] // 2  # mrope sections cover half the head: temporal, height, width
    sections = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    text = {"vocab_size": len(tokenizer), "hidden_size": s["hidden"], "intermediate_size": s["mlp"],
            "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"], "num_key_value_heads": s["kv_heads"],
            "max_position_embeddings": 4096, "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": sections},
            "bos_token_id": ids("<|endoftext|>"), "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    vision = {"depth": s["v_depth"], "hidden_size": s["v_hidden"], "intermediate_size": s["v_mlp"],
              "num_heads": s["v_heads"], "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2,
              "temporal_patch_size": 2, "window_size": 112, "out_hidden_size": s["hidden"],
              "fullatt_block_indexes": [s["v_depth"] - 1]}  # fmt: skip
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                            image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                            vision_start_token_id=ids("<|vision_start|>"),
                            vision_end_token_id=ids("<|vision_end|>"))  # fmt: skip


def build(size: str, seed: int = 0):
    """``(model, processor)`` of ``size``: random weights from ``seed``, fp32, eval mode."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from medrl.models.families.qwen_vl import build_processor, build_tokenizer
    from medrl.models.tiny import seeded

    if size not in SHAPES:
        raise ValueError(f"unknown size {size!r}: the sizes are {', '.join(SHAPES)}")
    processor = build_processor(build_tokenizer(), min_pixels=IMAGE_PIXELS, max_pixels=IMAGE_PIXELS)
    config = _config(processor.tokenizer, SHAPES[size])
    model = seeded(lambda: Qwen2_5_VLForConditionalGeneration(config), seed)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    return model.eval(), processor


def model_dir(size: str) -> Path:
    """The saved folder of ``size`` (built on first use)."""
    from medrl.models.tiny import TINY_VERSION, cached_model

    return cached_model(f"bench-qwen2.5-vl-{size}-v{TINY_VERSION}.1", lambda: (*build(size), {}))


def parameters(size: str) -> dict[str, int]:
    """Parameter counts of ``size``: all, the language model's and the vision tower's (merger included)."""
    from safetensors import safe_open

    counts = {"total": 0, "language": 0, "vision": 0}
    with safe_open(str(model_dir(size) / "model.safetensors"), framework="pt") as fh:
        for key in fh.keys():
            n = fh.get_slice(key).get_shape()
            numel = 1
            for d in n:
                numel *= d
            counts["total"] += numel
            counts["vision" if ".visual." in f".{key}" else "language"] += numel
    return counts


if __name__ == "__main__":
    for name in SHAPES:
        print(name, model_dir(name), parameters(name))
