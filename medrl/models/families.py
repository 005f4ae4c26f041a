"""The special tokens of each VLM family that the engines must know by name.

Two lists per family: the image placeholders a model must never generate (a sampled placeholder makes the
next forward pass count more image tokens than there are images), and the tokens that end an assistant turn.
The engines ban, and stop at, every listed token that a model's tokenizer actually has, so one model's list
costs nothing on another. This is the first piece of the per-family adapters; the rest (vision towers,
LoRA targets, weight sync) still assumes Qwen-VL.
"""

from __future__ import annotations

# family -> (image placeholders, turn ends)
FAMILY_TOKENS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "qwen2_vl": (
        ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"),
        ("<|im_end|>", "<|endoftext|>"),
    ),
    "idefics3": (("<image>", "<fake_token_around_image>", "<global-img>"), ("<end_of_utterance>",)),
    "gemma3": (("<start_of_image>", "<image_soft_token>", "<end_of_image>"), ("<end_of_turn>",)),
    "internvl": (("<img>", "</img>", "<IMG_CONTEXT>"), ("<|im_end|>",)),
}


def vision_placeholders() -> list[str]:
    """Every family's image placeholder tokens, in a fixed order."""
    return list(dict.fromkeys(t for placeholders, _ in FAMILY_TOKENS.values() for t in placeholders))


def turn_end_tokens() -> list[str]:
    """Every family's end-of-turn tokens, in a fixed order."""
    return list(dict.fromkeys(t for _, ends in FAMILY_TOKENS.values() for t in ends))
