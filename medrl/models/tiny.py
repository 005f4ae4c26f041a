"""``tiny``: a Qwen2.5-VL-architecture model with random weights, built offline from a seed.

It is the test model and the embedded default: 2 text layers (hidden 128), a 2-block vision tower, a
byte-level BPE tokenizer trained in memory on medrl's own prompt vocabulary and carrying the Qwen chat and
vision special tokens, a chat template, and a ``Qwen2_5_VLProcessor``. :func:`tiny_dir` saves it once with
``save_pretrained`` under the medrl cache, so transformers, PEFT and vLLM all load it like any local model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from medrl.core.env import CACHE_ENV, cache_dir
from medrl.core.errors import UserError
from medrl.core.io import umask_modes
from medrl.models.families import FAMILY_TOKENS
from medrl.models.tiny_corpus import CORPUS

# Bump when anything below changes what gets built, so stale cached copies are rebuilt.
TINY_VERSION = 1
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Placeholders a random model must never generate: a sampled <|image_pad|> makes the next forward pass
# miscount image tokens.
VISION_PLACEHOLDERS = list(FAMILY_TOKENS["qwen2_vl"][0])

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


def _corpus() -> list[str]:
    """Text the tokenizer learns merges from (see :mod:`medrl.models.tiny_corpus`)."""
    return list(CORPUS)


def build_tokenizer(vocab_size: int = 1024):
    """A ``PreTrainedTokenizerFast`` with the Qwen special tokens (ids 0-7), trained offline, byte-level."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte has a token: no UNK, ever
        show_progress=False,
    )
    tok.train_from_iterator(_corpus() * 4, trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        padding_side="left",  # batched generation pads on the left
        model_max_length=4096,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


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


def tiny_config(tokenizer, hidden: int = 128, layers: int = 2, vision_hidden: int = 64, vision_depth: int = 2):
    """A ``Qwen2_5_VLConfig`` small enough to train on a laptop CPU."""
    from transformers import Qwen2_5_VLConfig

    ids = tokenizer.convert_tokens_to_ids
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        # mrope sections must add up to head_dim / 2 (head_dim = 128 / 4 = 32 -> 16).
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]},
        "bos_token_id": ids("<|endoftext|>"),
        "eos_token_id": ids("<|im_end|>"),
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": True,
    }
    vision_config = {
        "depth": vision_depth,
        "hidden_size": vision_hidden,
        "intermediate_size": vision_hidden * 2,
        "num_heads": 4,
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
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


def build_tiny(seed: int = 0):
    """``(model, processor)``: the tiny Qwen2.5-VL with weights drawn from ``seed``, in eval mode, fp32."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    processor = build_processor(build_tokenizer())
    tokenizer = processor.tokenizer
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = Qwen2_5_VLForConditionalGeneration(tiny_config(tokenizer))
    finally:
        torch.random.set_rng_state(generator_state)  # building a model must not move the caller's RNG
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval(), processor


def tiny_dir(seed: int = 0, root: str | os.PathLike | None = None) -> Path:
    """The saved tiny model folder for ``seed``, built on first use (atomically: see :func:`build_folder`)."""
    return cached_model(f"tiny-qwen2.5-vl-v{TINY_VERSION}-seed{seed}", lambda: (*build_tiny(seed), {}), root)


def cached_model(
    name: str, build: Callable[[], tuple[Any, Any, dict[str, str]]], root: str | os.PathLike | None = None
) -> Path:
    """``root/name`` (default root: the medrl cache's ``models/``), made on first use by ``build()`` ->
    ``(model, processor, extra files)``; the folder appears whole, in one rename."""
    target = (Path(root) if root is not None else cache_dir() / "models") / name

    def write(tmp: Path) -> None:
        model, processor, extra = build()
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        for file, text in extra.items():
            (tmp / file).write_text(text)

    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    return build_folder(target, write, name, uses_env_cache=root is None)


def build_folder(target: Path, write: Callable[[Path], None], what: str, uses_env_cache: bool = True) -> Path:
    """Make ``target`` by ``write(tmp)`` into a temp folder beside it, then one rename: a crash or a kill
    leaves no half-written folder that a later run would load; if another process got there first, its copy
    is kept."""
    base = target.parent
    try:
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=base, prefix=f".{target.name}."))
    except PermissionError as exc:
        where = f"{CACHE_ENV}={os.environ[CACHE_ENV]}" if uses_env_cache and os.environ.get(CACHE_ENV) else str(base)
        raise UserError(
            f"cannot build {what} in {base}: {where} is not writable; point {CACHE_ENV} at a folder you "
            f"can write (e.g. `export {CACHE_ENV}=$HOME/.cache/medrl`)"
        ) from exc
    try:
        write(tmp)
        umask_modes(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race: keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
