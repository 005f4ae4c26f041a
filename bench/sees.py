"""Does a small VLM use its image? The measurements behind docs/reproducing.md ("How the CPU study's model came
to see").

    python bench/sees.py sensitivity --model tiny-instruct        # how much the answer token hears the image
    python bench/sees.py lookup --order fixed --steps 300         # colour -> letter, options in a fixed order
    python bench/sees.py lookup --order shuffled --steps 1500     # the study's format: find the option, copy its letter
    python bench/sees.py lookup --order text --steps 1500         # the same lookup with the answer word in the question
    python bench/sees.py recall --fused --filler 120 --curriculum # the lookup alone, in a plain 2-layer text decoder

``sensitivity`` reads real BloodMNIST validation images ($MEDRL_DATA_DIR): the share of the image features
that is one direction common to every image, and how far the next-token logits at the answer move between
images. ``lookup`` trains the random ``tiny`` (``--layers``) from scratch on synthetic colour questions in the
answer format and prints greedy accuracy on fresh questions every 250 steps against the chance level.
``recall`` strips the lookup to its bones in a plain 2-layer Qwen2 text decoder with single-token words:
``[filler] Q w ; A. w1 ; B. w2 ; ... ANS -> letter of w``, the filler a fixed run of tokens standing in for the
chat template; ``--fused`` makes each ``letter. word`` one token, ``--curriculum`` trains the first half
without the filler.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medrl.core.prompts import LETTERS, chat_messages, format_prompt  # noqa: E402

COLOURS = {"red": (200, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 200), "yellow": (220, 210, 50),
           "purple": (130, 50, 170), "orange": (230, 130, 30), "grey": (128, 128, 128), "black": (20, 20, 20),
           "white": (235, 235, 235), "pink": (240, 150, 190)}  # fmt: skip
THINK = "I compare the image with each option."


def _image_features(model: Any, processor: Any, images: list[Any]) -> torch.Tensor:
    inputs = processor.image_processor(images=images, return_tensors="pt")
    with torch.no_grad():
        found = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    found = getattr(found, "pooler_output", found)
    return torch.cat(list(found)) if isinstance(found, list | tuple) else found


def sensitivity(model_name: str, images: int = 6) -> None:
    """Print the image features' common direction and the answer token's logit spread across images."""
    from medrl.data.medmnist import MedMNISTDataModule
    from medrl.models.hub import load_vlm

    model, processor = load_vlm(model_name)
    dataset = MedMNISTDataModule("bloodmnist", mode="vqa", val_samples=images, num_options=4).dataset("val")
    items = [dataset[i] for i in range(images)]
    feats = _image_features(model, processor, [it["image"] for it in items])
    text_rms = model.get_input_embeddings().weight.pow(2).mean().sqrt().item()
    print(
        f"image features: RMS {feats.pow(2).mean().sqrt():.3f} (text embeddings {text_rms:.3f}), norm of the mean "
        f"{feats.mean(0).norm():.2f}, image-dependent RMS {(feats - feats.mean(0)).pow(2).mean().sqrt():.3f}"
    )
    prompt = processor.apply_chat_template(items[0]["messages"], add_generation_prompt=True, tokenize=False)
    prompt += f"<think>{THINK}</think><answer>"
    logits = []
    for item in items:  # one question, each image: only the image changes
        inputs = processor(text=[prompt], images=[item["image"]], return_tensors="pt")
        with torch.no_grad():
            logits.append(model(**inputs).logits[0, -1])
    stacked = torch.stack(logits)
    print(
        f"answer-token logits: range {stacked.max() - stacked.min():.2f}, largest move between images "
        f"{(stacked - stacked[0]).abs().max():.4f}"
    )


def _picture(colour: str, rng: random.Random) -> Any:
    from PIL import Image

    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, 18, (28, 28, 3))
    return Image.fromarray(np.clip(np.array(COLOURS[colour], dtype=float) + noise, 0, 255).astype(np.uint8))


def question(rng: random.Random, order: str) -> tuple[list[dict], str, str, Any]:
    """``(messages, gold letter, letters, image)``: 2-5 colour options; the image shows the gold colour."""
    n = rng.randint(2, 5)
    names = list(COLOURS)[:n] if order == "fixed" else rng.sample(list(COLOURS), n)
    gold = rng.randrange(n)
    text = f"Which option says {names[gold]}?" if order == "text" else "Which colour is this image?"
    options = {LETTERS[i]: name for i, name in enumerate(names)}
    return chat_messages(format_prompt(text, options)), LETTERS[gold], "".join(options), _picture(names[gold], rng)


def _short(messages: list[dict]) -> str:
    """The question without the chat template and instruction: image, question, options, then ``<answer>``."""
    text = messages[-1]["content"][-1]["text"].split("\n\nThink")[0]
    return f"<|vision_start|><|image_pad|><|vision_end|>{text}\n<answer>"


def _batch(processor: Any, rng: random.Random, size: int, order: str, short: bool = False) -> dict[str, torch.Tensor]:
    prompts, fulls, images = [], [], []
    for _ in range(size):
        messages, gold, _, image = question(rng, order)
        if short:  # the curriculum's first half: the lookup without the 80 tokens of chat template around it
            prompts.append(_short(messages))
            fulls.append(f"{prompts[-1]}{gold}</answer>")
            images.append(image)
            continue
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompts.append(prompt)
        fulls.append(f"{prompt}<think>{THINK}</think><answer>{gold}</answer><|im_end|>")
        images.append(image)
    processor.tokenizer.padding_side = "right"
    batch = processor(text=fulls, images=images, return_tensors="pt", padding=True)
    labels = batch["input_ids"].clone()
    for row, ids in enumerate(processor(text=prompts, images=images)["input_ids"]):
        labels[row, : len(ids)] = -100  # loss on the answer only
    labels[batch["attention_mask"] == 0] = -100
    return {**batch, "labels": labels}


@torch.no_grad()
def accuracy(model: Any, processor: Any, order: str, n: int = 48) -> tuple[float, float]:
    """Greedy accuracy on ``n`` fresh questions, and their chance level."""
    from medrl.metrics.answers import parse_answer

    rng, right, chance = random.Random("check"), 0, 0.0
    processor.tokenizer.padding_side = "left"
    for _ in range(n):
        messages, gold, letters, image = question(rng, order)
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[prompt], images=[image], return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=32, do_sample=False)
        text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        right += parse_answer(text, letters) == gold
        chance += 1 / len(letters)
    return right / n, chance / n


def fuse_options(model: Any, tokenizer: Any, names: list[str], letters: str = LETTERS[:10]) -> int:
    """Give every option line ``"X. name"`` one token of its own (the embedding table grows to match); returns
    how many were added. A letter and its option text in one token make the lookup one attention hop."""
    from tokenizers import AddedToken

    added = tokenizer.add_tokens(
        [AddedToken(f"{letter}. {name}", normalized=False, special=False) for letter in letters for name in names]
    )
    model.resize_token_embeddings(len(tokenizer))
    return added


def lookup(
    order: str, steps: int, layers: int, lr: float, batch: int, fused: bool = False, curriculum: bool = False
) -> None:
    """Train the random ``tiny`` from scratch on colour questions and print its accuracy every 250 steps."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from medrl.models.families.qwen_vl import build_tiny, tiny_config
    from medrl.models.tiny import random_model

    model, processor = build_tiny(0)
    if layers != 2:
        config = tiny_config(processor.tokenizer, layers=layers)
        model = random_model(Qwen2_5_VLForConditionalGeneration, config, 0, processor.tokenizer)
    if fused:
        print(f"fused option tokens: {fuse_options(model, processor.tokenizer, list(COLOURS))}", flush=True)
    rng, start = random.Random("train"), time.perf_counter()
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:  # linear warm-up over the first 10 %
            group["lr"] = lr * min(1.0, step / max(1, steps // 10))
        short = curriculum and step <= steps // 2
        loss = model(**_batch(processor, rng, batch, order, short)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 250 == 0 or step == steps:
            model.eval()
            acc, chance = accuracy(model, processor, order)
            model.train()
            print(
                f"step {step}: accuracy {acc:.3f} (chance {chance:.3f}), loss {loss.item():.3f}, "
                f"{time.perf_counter() - start:.0f} s",
                flush=True,
            )


def recall(fused: bool, filler: int, curriculum: bool, steps: int, layers: int, lr: float, pieces: int = 1) -> None:
    """Train a plain text decoder on the bare option lookup; print accuracy every 250 steps (with the filler).
    ``pieces`` > 1 writes the question's word as that many tokens (as BPE splits a word), options unchanged."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    sep, dot, ask, answer, first_fill, first_word, words, letters = 5, 6, 7, 8, 9, 20, 10, 5
    piece_base = first_word + words  # the question word's pieces, drawn from 40 tokens
    spelled = [[piece_base + random.Random(w).randrange(40) for _ in range(pieces)] for w in range(words)]
    fused_base = piece_base + 40  # token of "letter i. word w": fused_base + i * words + w
    fixed = [first_fill + random.Random(0).randrange(11) for _ in range(filler)]
    config = Qwen2Config(vocab_size=fused_base + letters * words, hidden_size=128, intermediate_size=512,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4, head_dim=32,
                         max_position_embeddings=512, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)

    def batch(rng: random.Random, size: int, pad: list[int]) -> tuple[torch.Tensor, ...]:
        rows, gold, chance = [], [], 0.0
        for _ in range(size):
            n = rng.randint(2, letters)
            picked, g = rng.sample(range(words), n), rng.randrange(n)
            row = [*pad, ask, *(spelled[picked[g]] if pieces > 1 else [first_word + picked[g]]), sep]
            for i, w in enumerate(picked):
                row += [fused_base + i * words + w] if fused else [i, dot, first_word + w]
                row.append(sep)
            rows.append([*row, answer])
            gold.append(g)
            chance += 1 / n
        width = max(map(len, rows))
        ids = torch.zeros(size, width, dtype=torch.long)
        mask = torch.zeros(size, width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :], mask[i, width - len(row) :] = torch.tensor(row), 1
        return ids, mask, torch.tensor(gold), torch.tensor(chance / size)

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng, start = random.Random(1), time.perf_counter()
    for step in range(1, steps + 1):
        ids, mask, gold, _ = batch(rng, 32, [] if curriculum and step <= steps // 2 else fixed)
        loss = torch.nn.functional.cross_entropy(model(input_ids=ids, attention_mask=mask).logits[:, -1], gold)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 250 == 0:
            with torch.no_grad():
                ids, mask, gold, chance = batch(random.Random(99), 256, fixed)
                guess = model(input_ids=ids, attention_mask=mask).logits[:, -1, :letters].argmax(-1)
            print(f"step {step}: accuracy {(guess == gold).float().mean():.3f} (chance {chance:.3f}), "
                  f"loss {loss.item():.3f}, {time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    sens = sub.add_parser("sensitivity", help="the image features and the answer token's spread")
    sens.add_argument("--model", default="tiny-instruct")
    look = sub.add_parser("lookup", help="train tiny on colour questions")
    look.add_argument("--order", choices=["fixed", "shuffled", "text"], default="shuffled")
    look.add_argument("--steps", type=int, default=1500)
    look.add_argument("--layers", type=int, default=2)
    look.add_argument("--lr", type=float, default=3e-3)
    look.add_argument("--batch", type=int, default=16)
    look.add_argument("--threads", type=int, default=2)
    look.add_argument("--fused", action="store_true", help="one token per option line (letter and text)")
    look.add_argument("--curriculum", action="store_true", help="the first half of the steps without the template")
    bare = sub.add_parser("recall", help="the bare lookup in a plain text decoder")
    bare.add_argument("--fused", action="store_true", help="one token per option (letter and word)")
    bare.add_argument("--filler", type=int, default=0, help="fixed tokens before the question (the chat template)")
    bare.add_argument("--curriculum", action="store_true", help="the first half of the steps without the filler")
    bare.add_argument("--steps", type=int, default=2000)
    bare.add_argument("--layers", type=int, default=2)
    bare.add_argument("--pieces", type=int, default=1, help="tokens of the question's word (BPE splits words)")
    bare.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    if args.what == "sensitivity":
        sensitivity(args.model)
    elif args.what == "recall":
        torch.set_num_threads(1)
        recall(args.fused, args.filler, args.curriculum, args.steps, args.layers, args.lr, args.pieces)
    else:
        torch.set_num_threads(args.threads)
        lookup(args.order, args.steps, args.layers, args.lr, args.batch, args.fused, args.curriculum)


if __name__ == "__main__":
    main()
