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


def build(size: str, seed: int = 0):
    """``(model, processor)`` of ``size``: random weights from ``seed``, fp32, eval mode."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from medrl.models.families.qwen_vl import build_processor, build_tokenizer, tiny_config
    from medrl.models.tiny import random_model

    if size not in SHAPES:
        raise ValueError(f"unknown size {size!r}: the sizes are {', '.join(SHAPES)}")
    processor = build_processor(build_tokenizer(), min_pixels=IMAGE_PIXELS, max_pixels=IMAGE_PIXELS)
    d = SHAPES[size]
    config = tiny_config(processor.tokenizer, hidden=d["hidden"], layers=d["layers"], vision_hidden=d["v_hidden"],
                         vision_depth=d["v_depth"], heads=d["heads"], kv_heads=d["kv_heads"], mlp=d["mlp"],
                         vision_heads=d["v_heads"], vision_mlp=d["v_mlp"])  # fmt: skip
    return random_model(Qwen2_5_VLForConditionalGeneration, config, seed, processor.tokenizer), processor


def model_dir(size: str) -> Path:
    """The saved folder of ``size`` (built on first use)."""
    from medrl.models.tiny import TINY_VERSION, cached_model

    # `tiny-*` is how medrl tells offline random-weight builds from checkpoints (probe rows record them as not
    # pretrained), whatever their size.
    return cached_model(f"tiny-bench-qwen2.5-vl-{size}-v{TINY_VERSION}.1", lambda: (*build(size), {}))


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
