"""The special tokens of each VLM family that the engines must know by name.

Two lists per family: the image placeholders a model must never generate (a sampled placeholder makes the
next forward pass count more image tokens than there are images), and the tokens that end an assistant turn.
The engines ban, and stop at, every listed token that a model's tokenizer actually has, so one model's list
costs nothing on another. This is the first piece of the per-family adapters; the rest (vision towers,
LoRA targets, weight sync) still assumes Qwen-VL.

Also each family's module names for the vision tower and its projector, which ``vision: frozen | projector |
all`` freezes or trains: Qwen keeps the projector inside the tower (``visual.merger``), the others beside it.
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


# family -> (vision tower module, projector module), as path components of parameter names
VISION_MODULES: dict[str, tuple[str, str]] = {
    "qwen2_vl": ("visual", "merger"),
    "idefics3": ("vision_model", "connector"),
    "gemma3": ("vision_tower", "multi_modal_projector"),
    "internvl": ("vision_tower", "multi_modal_projector"),
}


def vision_modules(parameter_names: list[str]) -> tuple[str, str]:
    """``(tower, projector)`` module names of the family whose tower appears in ``parameter_names``; ValueError
    naming the known families when none does (a model medrl cannot tell the vision side of)."""
    parts = {part for name in parameter_names for part in name.split(".")}
    for tower, projector in VISION_MODULES.values():
        if tower in parts:
            return tower, projector
    raise ValueError(
        f"no vision tower among the model's modules: medrl knows the families {sorted(VISION_MODULES)} "
        f"(towers {sorted({t for t, _ in VISION_MODULES.values()})})"
    )


# What each family runs in medrl, as the test suite checks it on the family's tiny model: "tested", or
# "untested" (code paths exist but no test runs them), or "no". `medrl models` prints this table.
FEATURES = ("probe", "SFT", "GRPO (hf)", "GRPO (vLLM)", "vLLM weight sync", "LoRA", "FSDP2", "multi-image")
SUPPORT: dict[str, dict[str, str]] = {
    "qwen2_vl": {"probe": "tested", "SFT": "tested", "GRPO (hf)": "tested", "GRPO (vLLM)": "tested",
                 "vLLM weight sync": "tested", "LoRA": "tested", "FSDP2": "tested (slow)", "multi-image": "tiled"},
    "idefics3": {"probe": "tested", "SFT": "tested", "GRPO (hf)": "tested", "GRPO (vLLM)": "tested",
                 "vLLM weight sync": "tested", "LoRA": "tested", "FSDP2": "tested (slow)", "multi-image": "tiled"},
    "gemma3": dict.fromkeys(FEATURES, "untested"),
    "internvl": dict.fromkeys(FEATURES, "untested"),
}  # fmt: skip
# family -> (architectures it covers, its offline tiny model or None, example hub ids)
FAMILIES: dict[str, tuple[str, str | None, str]] = {
    "qwen2_vl": ("Qwen2-VL, Qwen2.5-VL (OctoMed, Lingshu, HuatuoGPT-Vision)", "tiny, tiny-instruct",
                 "Qwen/Qwen2.5-VL-7B-Instruct, OctoMed/OctoMed-7B"),
    "idefics3": ("Idefics3, SmolVLM", "tiny:smolvlm", "HuggingFaceTB/SmolVLM-256M-Instruct"),
    "gemma3": ("Gemma 3 (MedGemma)", None, "google/medgemma-4b-it"),
    "internvl": ("InternVL3 (-hf)", None, "OpenGVLab/InternVL3-8B-hf"),
}  # fmt: skip
