"""The Idefics3 / SmolVLM family, and its offline ``tiny:smolvlm``: a random 2-layer model, built offline.

Idefics3 puts a SigLIP tower (``vision_model``) beside a pixel-shuffle ``connector``, marks images with
``<fake_token_around_image><global-img><image>...`` and may split large images into tiles (``do_image_splitting``,
an image-processor option; the tiny model does not split). Its chat template ends turns with
``<end_of_utterance>``. The tiny model:

The family's real classes (``Idefics3ForConditionalGeneration``, ``Idefics3Processor``,
``Idefics3ImageProcessor``) with its special tokens (``<image>``, ``<fake_token_around_image>``,
``<global-img>``, ``<end_of_utterance>``) and a SmolVLM-style chat template; a Llama text model (hidden 128,
head size 32 so vLLM's CPU attention takes it) and a SigLIP-style vision tower (64 px images, 16 px patches,
pixel shuffle by 2: 4 image tokens per image, no image splitting). Cached atomically like ``tiny``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from medrl.models.families import FEATURES, Family
from medrl.models.tiny import TINY_VERSION, build_tokenizer, cached_model, random_model

SMOLVLM_VERSION = 2
END_OF_UTTERANCE = "<end_of_utterance>"
IMAGE_TOKENS = ["<image>", "<fake_token_around_image>", "<global-img>"]
FAMILIES = (
    Family(
        name="idefics3", model_types=("idefics3", "smolvlm"), architectures="Idefics3, SmolVLM",
        examples="HuggingFaceTB/SmolVLM-256M-Instruct, HuggingFaceTB/SmolVLM-500M-Instruct",
        placeholders=tuple(IMAGE_TOKENS), turn_ends=(END_OF_UTTERANCE,), tower="vision_model", projector="connector",
        support=dict.fromkeys(FEATURES, "tested") | {"FSDP2": "tested (slow)"},
        tiny={"tiny:smolvlm": "medrl.models.families.idefics3:tiny_smolvlm_dir",
              "tiny:smolvlm-256m": "medrl.models.families.idefics3:smolvlm_256m_shape_dir"},
        image_options={"do_image_splitting": False},
    ),
)  # fmt: skip
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<end_of_utterance>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


# Shapes: the tiny test model, and SmolVLM-256M-Instruct's published configuration (SmolLM2-135M text model,
# a 93M SigLIP-B/16 tower at 512 px, pixel shuffle 4: 64 image tokens per image), for timing at real size.
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {"text": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "num_key_value_heads": 2, "head_dim": 32},
             "vision": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                        "image_size": 64, "patch_size": 16},
             "scale_factor": 2, "vocab_size": None},
    "256m": {"text": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                      "num_key_value_heads": 3, "head_dim": 64, "rope_theta": 100000.0},
             "vision": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                        "num_attention_heads": 12, "image_size": 512, "patch_size": 16},
             "scale_factor": 4, "vocab_size": 49280},
}  # fmt: skip


def build_tiny_smolvlm(seed: int = 0, shape: str = "tiny") -> tuple[Any, Any]:
    """``(model, processor)``: a random Idefics3 of ``shape`` (:data:`SHAPES`) with weights drawn from ``seed``,
    eval mode, fp32. The ``256m`` shape's embedding has SmolVLM's 49,280 rows (the tokenizer uses the first
    ~1,000), so its compute per token is the real model's."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
        LlamaConfig,
    )
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

    tokenizer = build_tokenizer(["<|endoftext|>", "<|im_start|>", END_OF_UTTERANCE, *IMAGE_TOKENS],
                                eos=END_OF_UTTERANCE, pad="<|endoftext|>", chat_template=CHAT_TEMPLATE)  # fmt: skip
    dims = SHAPES[shape]
    side, scale = dims["vision"]["image_size"], dims["scale_factor"]
    image_processor = Idefics3ImageProcessor(
        do_image_splitting=False, size={"longest_edge": side}, max_image_size={"longest_edge": side}
    )
    tokens = (side // dims["vision"]["patch_size"] // scale) ** 2
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=tokens,
                                  chat_template=CHAT_TEMPLATE)  # fmt: skip
    text = LlamaConfig(vocab_size=dims["vocab_size"] or len(tokenizer), max_position_embeddings=8192,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       tie_word_embeddings=True, **dims["text"])  # fmt: skip
    vision = Idefics3VisionConfig(**dims["vision"])
    config = Idefics3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), scale_factor=scale,
                            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)  # fmt: skip
    return random_model(Idefics3ForConditionalGeneration, config, seed, tokenizer, END_OF_UTTERANCE), processor


def tiny_smolvlm_dir(seed: int = 0, root: str | os.PathLike | None = None) -> Path:
    """The saved ``tiny:smolvlm`` folder for ``seed``, built on first use."""
    name = f"tiny-smolvlm-v{TINY_VERSION}.{SMOLVLM_VERSION}-seed{seed}"
    return cached_model(name, lambda: (*build_tiny_smolvlm(seed), {}), root)


def smolvlm_256m_shape_dir(seed: int = 0, root: str | os.PathLike | None = None) -> Path:
    """``tiny:smolvlm-256m``: random weights in SmolVLM-256M-Instruct's shapes (~1 GB), built on first use; for
    timing the laptop plan offline (its answers are noise)."""
    name = f"tiny-smolvlm-256m-v{TINY_VERSION}.{SMOLVLM_VERSION}-seed{seed}"  # tiny-*: recorded as random weights
    return cached_model(name, lambda: (*build_tiny_smolvlm(seed, "256m"), {}), root)
