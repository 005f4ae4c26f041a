"""The Gemma 3 family (MedGemma), and its offline ``tiny:gemma3``.

Gemma 3 puts a SigLIP tower (``vision_tower``) beside a pooling ``multi_modal_projector``, sees every image at
one fixed size (896 px in the released models; a processor option, no splitting by default), and writes
``<start_of_image>`` in prompts, which its processor expands to ``mm_tokens_per_image`` soft tokens between
``<start_of_image>``/``<end_of_image>``. Turns end with ``<end_of_turn>``; the assistant's role is ``model``.
transformers 5 names the tower's parameters ``model.vision_tower.embeddings...`` where vLLM's loader expects
the released checkpoints' layout ``...vision_tower.vision_model.embeddings...`` (and so does the folder
``save_pretrained`` writes, without the ``model.`` prefix): :attr:`Family.vllm_renames` maps both.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from medrl.models.families import FEATURES, Family
from medrl.models.tiny import TINY_VERSION, build_tokenizer, cached_model, random_model

GEMMA3_VERSION = 1
IMAGE_TOKENS = ("<start_of_image>", "<image_soft_token>", "<end_of_image>")
END_OF_TURN = "<end_of_turn>"
FAMILIES = (
    Family(
        name="gemma3", model_types=("gemma3",), architectures="Gemma 3 (MedGemma)",
        examples="google/medgemma-4b-it, google/gemma-3-4b-it", placeholders=IMAGE_TOKENS, turn_ends=(END_OF_TURN,),
        tower="vision_tower", projector="multi_modal_projector",
        support=dict.fromkeys(FEATURES, "tested") | {"FSDP2": "tested (slow)"},
        tiny={"tiny:gemma3": "medrl.models.families.gemma3:tiny_gemma3_dir"}, image_options={"do_pan_and_scan": False},
        vllm_renames=(("model.vision_tower.", "model.vision_tower.vision_model."),
                      ("vision_tower.", "vision_tower.vision_model.")),  # in memory; as save_pretrained writes
    ),
)  # fmt: skip
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<start_of_image>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def build_tiny_gemma3(seed: int = 0) -> tuple[Any, Any]:
    """``(model, processor)``: a random 2-layer Gemma 3 (text hidden 128, head size 32; a SigLIP tower on 64 px
    images, 16 px patches, pooled to 4 soft tokens per image), eval mode, fp32."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    named = {"boi_token": IMAGE_TOKENS[0], "image_token": IMAGE_TOKENS[1], "eoi_token": IMAGE_TOKENS[2]}
    tokenizer = build_tokenizer(["<pad>", "<eos>", "<bos>", "<start_of_turn>", END_OF_TURN, *IMAGE_TOKENS],
                                eos="<eos>", pad="<pad>", bos_token="<bos>", chat_template=CHAT_TEMPLATE, **named,
                                newline_tokens=True)  # fmt: skip
    ids = tokenizer.convert_tokens_to_ids
    image_processor = Gemma3ImageProcessor(size={"height": 64, "width": 64}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
                                image_seq_length=4)  # fmt: skip
    text = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        query_pre_attn_scalar=32,
        max_position_embeddings=4096,
        sliding_window=64,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[ids("<eos>"), ids(END_OF_TURN)],
    )
    vision = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                image_size=64, patch_size=16, vision_use_head=False)  # fmt: skip
    config = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                          boi_token_index=ids(IMAGE_TOKENS[0]), eoi_token_index=ids(IMAGE_TOKENS[2]),
                          image_token_index=ids(IMAGE_TOKENS[1]), tie_word_embeddings=True)  # fmt: skip
    return random_model(Gemma3ForConditionalGeneration, config, seed, tokenizer, END_OF_TURN), processor


def tiny_gemma3_dir(seed: int = 0, root: str | os.PathLike | None = None) -> Path:
    """The saved ``tiny:gemma3`` folder for ``seed``, built on first use."""
    name = f"tiny-gemma3-v{TINY_VERSION}.{GEMMA3_VERSION}-seed{seed}"
    return cached_model(name, lambda: (*build_tiny_gemma3(seed), {}), root)
