"""The Qwen-VL families: Qwen2-VL and Qwen2.5-VL (OctoMed, Lingshu, HuatuoGPT-Vision are Qwen2.5-VL), and Qwen3-VL.

Qwen keeps its projector inside the vision tower (``visual.merger``), marks images with
``<|vision_start|><|image_pad|>...<|vision_end|>`` and sizes them by pixel budget (``min_pixels`` /
``max_pixels``), which :class:`medrl.models.qwen_tower.QwenVisionEncoder` honours for probes.
Offline models: ``tiny`` (Qwen2.5-VL, the test model), ``tiny-instruct`` (``tiny`` taught the answer
format, :mod:`medrl.models.families.qwen_instruct`) and ``tiny:qwen3_vl``.
"""

from __future__ import annotations

import os
from pathlib import Path

from medrl.models.families import FEATURES, Family
from medrl.models.tiny import TINY_VERSION, cached_model, random_model
from medrl.models.tiny import build_tokenizer as _build_tokenizer

PLACEHOLDERS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
TURN_ENDS = ("<|im_end|>", "<|endoftext|>")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *PLACEHOLDERS]
# Placeholders a random model must never generate: a sampled <|image_pad|> makes the next forward pass
# miscount image tokens.
VISION_PLACEHOLDERS = list(PLACEHOLDERS)

_TESTED = dict.fromkeys(FEATURES, "tested") | {"FSDP2": "tested (slow)"}
FAMILIES = (
    Family(
        name="qwen2_vl", model_types=("qwen2_vl", "qwen2_5_vl"),
        architectures="Qwen2-VL, Qwen2.5-VL (OctoMed, Lingshu, HuatuoGPT-Vision)",
        examples="Qwen/Qwen2.5-VL-7B-Instruct, OctoMed/OctoMed-7B, lingshu-medical-mllm/Lingshu-7B",
        placeholders=PLACEHOLDERS, turn_ends=TURN_ENDS, tower="visual", projector="merger", support=_TESTED,
        tiny={"tiny": "medrl.models.families.qwen_vl:tiny_dir",
              "tiny-instruct": "medrl.models.families.qwen_instruct:tiny_instruct_dir"},
        encoder="qwen", encoder_class="medrl.models.qwen_tower:QwenVisionEncoder",
    ),
    Family(
        name="qwen3_vl", model_types=("qwen3_vl",), architectures="Qwen3-VL (dense)",
        examples="Qwen/Qwen3-VL-8B-Instruct", placeholders=PLACEHOLDERS, turn_ends=TURN_ENDS, tower="visual",
        projector="merger", support=_TESTED,
        tiny={"tiny:qwen3_vl": "medrl.models.families.qwen_vl:tiny_qwen3_vl_dir"},
        encoder="qwen", encoder_class="medrl.models.qwen_tower:QwenVisionEncoder",
    ),
)  # fmt: skip

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _vision_token_ids(tokenizer) -> dict[str, int]:
    """The config's ids of the image, video and vision-bracket tokens (the same in every Qwen-VL config)."""
    ids = tokenizer.convert_tokens_to_ids
    names = {"image": "<|image_pad|>", "video": "<|video_pad|>", "vision_start": "<|vision_start|>",
             "vision_end": "<|vision_end|>"}  # fmt: skip
    return {f"{key}_token_id": ids(token) for key, token in names.items()}


def build_tokenizer():
    """The tiny Qwen tokenizer: byte-level BPE with the Qwen special tokens (ids 0-7) and chat template."""
    return _build_tokenizer(SPECIAL_TOKENS, eos="<|im_end|>", pad="<|endoftext|>", chat_template=CHAT_TEMPLATE)


def build_processor(tokenizer=None, min_pixels: int = 56 * 56, max_pixels: int = 112 * 112):
    """A ``Qwen2_5_VLProcessor`` (patch 14, merge 2): a 28 px image becomes 56x56, i.e. 4 merged tokens."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    tokenizer = tokenizer or build_tokenizer()
    image_processor = Qwen2VLImageProcessor(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    # transformers 5.x needs a real video processor here even for image-only use.
    video_processor = Qwen2VLVideoProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def tiny_config(
    tokenizer, hidden: int = 128, layers: int = 2, vision_hidden: int = 64, vision_depth: int = 2, heads: int = 4,
    kv_heads: int = 2, mlp: int | None = None, vision_heads: int = 4, vision_mlp: int | None = None,
):  # fmt: skip
    """A ``Qwen2_5_VLConfig``: the defaults are ``tiny`` (small enough to train on a laptop CPU); the widths,
    depths and heads scale it (``bench/sizes.py`` builds its 20m and 100m models here). MLP widths default to
    twice the hidden size."""
    from transformers import Qwen2_5_VLConfig

    ids = tokenizer.convert_tokens_to_ids
    half = hidden // heads // 2  # mrope sections (temporal, height, width) add up to half the head size
    sections = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]  # head 32: [4, 6, 6]
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": mlp or hidden * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": sections},
        "bos_token_id": ids("<|endoftext|>"),
        "eos_token_id": ids("<|im_end|>"),
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": True,
    }
    vision_config = {
        "depth": vision_depth,
        "hidden_size": vision_hidden,
        "intermediate_size": vision_mlp or vision_hidden * 2,
        "num_heads": vision_heads,
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "out_hidden_size": hidden,  # the merger projects to the language model's width
        "fullatt_block_indexes": [vision_depth - 1],
    }
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        tie_word_embeddings=True,
        **_vision_token_ids(tokenizer),
    )


def build_tiny(seed: int = 0):
    """``(model, processor)``: the tiny Qwen2.5-VL with weights drawn from ``seed``, in eval mode, fp32."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    processor = build_processor(build_tokenizer())
    tokenizer = processor.tokenizer
    return random_model(Qwen2_5_VLForConditionalGeneration, tiny_config(tokenizer), seed, tokenizer), processor


def tiny_dir(seed: int = 0, root: str | os.PathLike | None = None) -> Path:
    """The saved tiny model folder for ``seed``, built on first use (atomically: see ``cached_model``)."""
    return cached_model(f"tiny-qwen2.5-vl-v{TINY_VERSION}-seed{seed}", lambda: (*build_tiny(seed), {}), root)


def build_tiny_qwen3_vl(seed: int = 0):
    """``(model, processor)``: a random 2-layer Qwen3-VL (patch 16, merge 2, deepstack from block 0), fp32."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    tokenizer = build_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    pixels = {"min_pixels": 64 * 64, "max_pixels": 128 * 128}
    image_processor = Qwen2VLImageProcessor(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3,
                                            image_std=[0.5] * 3, **pixels)  # fmt: skip
    processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
                                 video_processor=Qwen3VLVideoProcessor(patch_size=16, **pixels))  # fmt: skip
    text = {"vocab_size": len(tokenizer), "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [6, 5, 5],
                                "mrope_interleaved": True},
            "bos_token_id": ids("<|endoftext|>"), "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": tokenizer.pad_token_id, "tie_word_embeddings": True}  # fmt: skip
    vision = {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2, "patch_size": 16,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 128,
              "num_position_embeddings": 64, "deepstack_visual_indexes": [0]}  # fmt: skip
    config = Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=True,
        **_vision_token_ids(tokenizer),
    )
    return random_model(Qwen3VLForConditionalGeneration, config, seed, tokenizer), processor


def tiny_qwen3_vl_dir(seed: int = 0, root: str | os.PathLike | None = None) -> Path:
    """The saved ``tiny:qwen3_vl`` folder for ``seed``, built on first use."""
    return cached_model(f"tiny-qwen3-vl-v{TINY_VERSION}-seed{seed}", lambda: (*build_tiny_qwen3_vl(seed), {}), root)
