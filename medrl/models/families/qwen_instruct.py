"""``tiny-instruct``: ``tiny`` taught the answer format and nothing else, the CPU study's base model.

The paper's base models are instruction-tuned VLMs that already answer ``<think>...</think><answer>X</answer>``;
random ``tiny`` almost never does, so RL from it gets no reward. ``tiny-instruct`` is ``tiny`` after a short,
seeded supervised run on *format-only* questions: a modality-free question ("Which option is correct?"),
2-5 options drawn from a neutral word list, a random-noise image, and a gold letter drawn uniformly at
random, under the letter instruction or the one that asks for the option's text (half each). It learns to
write the format and to name one of the offered letters, but there is nothing to learn about any image or task,
so its support on a real question is at chance level (measured at build time and stored in ``instruct.json``
beside the weights). Asked for an option's text (``answer_with: text``), it
still answers with a letter, which is read as such: its support there is chance too.

Its image tokens are centred, before and after that run: the projector's output bias loses the mean output
over noise images. A random tower's output is mostly one direction shared by every image (cosine 0.99996
between the mean features of noise and of blood cells; RMS 2.7, of which 0.7 varies between images), which
buried what an image shows under what every image shows: SFT of the uncentred base on BloodMNIST stayed
blind (image reliance 0.000 after 1,000 steps), the centred one read its images within 500 (see
docs/reproducing.md). Centring on noise uses no study data, and the base still knows no task.

Built offline on first use (about half a minute on a 2-core CPU) and cached atomically like ``tiny``:
``tiny-instruct`` (seed 0) or ``tiny-instruct:SEED``.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medrl.core.prompts import LETTERS, chat_messages, format_prompt, instruction_for
from medrl.models.families.qwen_vl import build_tiny
from medrl.models.tiny import TINY_VERSION, cached_model

# Bump when the recipe below changes, so stale cached copies are rebuilt.
INSTRUCT_VERSION = 2
QUESTIONS = (
    "Which option is correct?",
    "Which option describes this image?",
    "Which of the options is shown?",
    "Which option applies here?",
)
WORDS = (
    "normal", "abnormal", "benign", "malignant", "present", "absent", "left", "right", "small", "large",
    "grade 0", "grade 1", "grade 2", "grade 3", "grade 4", "type 1", "type 2", "type 3", "other", "none",
)  # fmt: skip
THINK = "I compare the image with each option."
# Steps and rate: enough for the format to hold on >= 95 % of greedy answers (checked at build time).
STEPS, BATCH, LR = 300, 16, 3e-3
MIN_FORMAT_RATE = 0.9


def format_question(rng: random.Random) -> tuple[list[dict], str, str]:
    """One format-only question: ``(messages, gold letter, letters offered)``."""
    n = rng.randint(2, 5)
    options = {LETTERS[i]: w for i, w in enumerate(rng.sample(WORDS, n))}
    gold = LETTERS[rng.randrange(n)]
    # Half the questions carry the instruction that asks for the option's text: the base still answers with a
    # letter (copying an option's text is a skill it is not taught), where without them it derailed into
    # broken tags on every such question (measured: 0 format reward in GRPO from it on BloodMNIST).
    instruction = instruction_for("text" if rng.random() < 0.5 else "letter")
    return chat_messages(format_prompt(rng.choice(QUESTIONS), options, instruction)), gold, "".join(options)


def _noise(rng: random.Random, size: int = 28) -> Any:
    from PIL import Image

    pixels = np.random.default_rng(rng.randrange(2**32)).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _batch(processor: Any, rng: random.Random, size: int) -> dict[str, torch.Tensor]:
    """A training batch: chat prompt + target, loss on the target (and its end token) only."""
    prompts, fulls, images = [], [], []
    for _ in range(size):
        messages, gold, _ = format_question(rng)
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompts.append(prompt)
        fulls.append(f"{prompt}<think>{THINK}</think><answer>{gold}</answer><|im_end|>")
        images.append(_noise(rng))
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "right"
    batch = processor(text=fulls, images=images, return_tensors="pt", padding=True)
    prompt_lengths = [len(ids) for ids in processor(text=prompts, images=images)["input_ids"]]
    labels = batch["input_ids"].clone()
    for row, length in enumerate(prompt_lengths):
        labels[row, :length] = -100
    labels[batch["attention_mask"] == 0] = -100
    return {**batch, "labels": labels}


@torch.no_grad()
def format_rate(model: Any, processor: Any, seed: int, n: int = 64) -> dict[str, float]:
    """Greedy answers to ``n`` fresh format-only questions: the share well-formed and naming an offered letter,
    and the share right (chance on these questions is the mean of 1/options, about 0.38)."""
    from medrl.metrics.answers import parse_answer

    rng = random.Random(f"check-{seed}")
    processor.tokenizer.padding_side = "left"
    formed = right = chance = 0.0
    for _ in range(n):
        messages, gold, letters = format_question(rng)
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[prompt], images=[_noise(rng)], return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=32, do_sample=False)
        text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        letter = parse_answer(text, letters)
        formed += float(text.strip().startswith("<think>") and "</answer>" in text and letter in letters)
        right += float(letter == gold)
        chance += 1 / len(letters)
    return {"format_rate": formed / n, "accuracy": right / n, "chance": chance / n, "questions": n}


@torch.no_grad()
def centre_image_tokens(model: Any, processor: Any, rng: random.Random, images: int = 64) -> float:
    """Subtract the mean projector output over ``images`` noise images from the projector's last bias, so the
    image tokens the language model reads carry what varies between images; returns the removed mean's RMS."""
    noise = [_noise(rng) for _ in range(images)]
    inputs = processor.image_processor(images=noise, return_tensors="pt")
    out = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    tokens = out.pooler_output if hasattr(out, "pooler_output") else out
    mean = tokens.reshape(-1, tokens.shape[-1]).mean(0)
    model.model.visual.merger.mlp[-1].bias.sub_(mean)
    return float(mean.pow(2).mean().sqrt())


def build_tiny_instruct(seed: int = 0) -> tuple[Any, Any, dict[str, Any]]:
    """``(model, processor, record)``: ``tiny`` (``seed``) after the format-only SFT, with its measured rates."""
    model, processor = build_tiny(seed)
    rng = random.Random(f"tiny-instruct-{seed}")
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    start = time.perf_counter()
    try:
        centre_image_tokens(model, processor, rng)  # trained on the centred tokens it keeps
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
        for step in range(STEPS):
            for group in optimizer.param_groups:  # linear warm-up over the first 10 %, then constant
                group["lr"] = LR * min(1.0, (step + 1) / (STEPS // 10))
            loss = model(**_batch(processor, rng, BATCH)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        model.eval()
        centred = centre_image_tokens(model, processor, rng)  # the run moves the bias a little: centre again
        record = {"base": f"tiny:{seed}", "steps": STEPS, "batch": BATCH, "lr": LR, "final_loss": round(loss.item(), 4),
                  "centred_rms": round(centred, 4), "seconds": round(time.perf_counter() - start, 1),
                  **format_rate(model, processor, seed)}  # fmt: skip
    finally:
        torch.random.set_rng_state(state)  # building a model must not move the caller's RNG
    if record["format_rate"] < MIN_FORMAT_RATE:
        rate = record["format_rate"]
        raise RuntimeError(f"tiny-instruct (seed {seed}) writes the answer format on only {rate:.0%} of its greedy "
                           "answers; the recipe needs more steps")  # fmt: skip
    return model, processor, record


def tiny_instruct_dir(seed: int = 0, root: str | os.PathLike | None = None) -> Path:
    """The saved ``tiny-instruct`` folder for ``seed``, built on first use and renamed into place atomically."""

    def build() -> tuple[Any, Any, dict[str, str]]:
        model, processor, record = build_tiny_instruct(seed)
        return model, processor, {"instruct.json": json.dumps(record, indent=1) + "\n"}

    return cached_model(f"tiny-instruct-v{TINY_VERSION}.{INSTRUCT_VERSION}-seed{seed}", build, root)
