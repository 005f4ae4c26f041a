"""The InternVL family (InternVL3 in the transformers ``-hf`` layout), and its offline ``tiny:internvl``.

InternVL puts an InternViT tower (``vision_tower``) beside an MLP ``multi_modal_projector`` after a pixel
shuffle, writes ``<IMG_CONTEXT>`` in prompts (its processor expands it to ``<img>`` + ``image_seq_length``
context tokens + ``</img>``) and can cut large images into 448 px tiles (``crop_to_patches``, an
image-processor option; the tiny model does not crop). Its language model is Qwen2's, so turns end with
``<|im_end|>``. The original ``InternVLChatModel`` checkpoints (remote code) are not this layout: use the
``-hf`` ones (``OpenGVLab/InternVL3-8B-hf``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from medrl.models.families import FEATURES, Family
from medrl.models.tiny import TINY_VERSION, build_tokenizer, cached_model, random_model

INTERNVL_VERSION = 1
IMAGE_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>")
FAMILIES = (
    Family(
        name="internvl", model_types=("internvl",), architectures="InternVL3 (-hf layout)",
        examples="OpenGVLab/InternVL3-8B-hf, OpenGVLab/InternVL3-2B-hf", placeholders=(*IMAGE_TOKENS, "<video>"),
        turn_ends=("<|im_end|>",), tower="vision_tower", projector="multi_modal_projector",
        support=dict.fromkeys(FEATURES, "tested") | {"FSDP2": "tested (slow)"},
        tiny={"tiny:internvl": "medrl.models.families.internvl:tiny_internvl_dir"},
        image_options={"crop_to_patches": False}, cls_tokens=1,
    ),
)  # fmt: skip
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<IMG_CONTEXT>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_internvl(seed: int = 0) -> tuple[Any, Any]:
    """``(model, processor)``: a random 2-layer InternVL (Qwen2 text, hidden 128, head size 32; a 2-block
    InternViT on 64 px images, 16 px patches, pixel shuffle 0.5: 4 context tokens per image), eval mode, fp32."""
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
    )

    named = {"start_image_token": IMAGE_TOKENS[0], "end_image_token": IMAGE_TOKENS[1],
             "context_image_token": IMAGE_TOKENS[2], "video_token": "<video>"}  # fmt: skip
    tokenizer = build_tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *IMAGE_TOKENS, "<video>"],
        eos="<|im_end|>",
        pad="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        **named,
    )
    ids = tokenizer.convert_tokens_to_ids
    size = {"height": 64, "width": 64}
    image_processor = GotOcr2ImageProcessor(size=size, crop_to_patches=False, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=4,
        video_processor=InternVLVideoProcessor(size=size),
        chat_template=CHAT_TEMPLATE,
    )
    text = {
        "model_type": "qwen2",
        "vocab_size": len(tokenizer),
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": ids("<|im_end|>"),
        "tie_word_embeddings": True,
    }
    vision = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": [64, 64], "patch_size": [16, 16]}  # fmt: skip
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=ids(IMAGE_TOKENS[2]),
                            image_seq_length=4, downsample_ratio=0.5, tie_word_embeddings=True)  # fmt: skip
    return random_model(InternVLForConditionalGeneration, config, seed, tokenizer), processor


def tiny_internvl_dir(seed: int = 0, root: str | os.PathLike | None = None) -> Path:
    """The saved ``tiny:internvl`` folder for ``seed``, built on first use."""
    name = f"tiny-internvl-v{TINY_VERSION}.{INTERNVL_VERSION}-seed{seed}"
    return cached_model(name, lambda: (*build_tiny_internvl(seed), {}), root)
