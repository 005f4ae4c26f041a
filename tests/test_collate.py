"""The SFT collator: loss only on the assistant's answer tokens, reasoning targets, padding-aware batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from medrl.data import vqa
from medrl.data.collate import IGNORE_INDEX, SFTCollator, encode_chat, target_text


def _item(answer: str = "B", seed: int = 0, size: int = 28, **extra) -> dict:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    prompt = vqa.format_prompt("What does this chest X-ray show?", {"A": "normal", "B": "pneumonia"})
    return {"image": image, "messages": vqa.chat_messages(prompt), "answer": answer, **extra}


def test_only_answer_tokens_carry_loss_token_by_token(tiny, medmnist) -> None:
    from medrl.data.medmnist import MedMNISTDataModule

    _, processor = tiny
    item = MedMNISTDataModule("pneumoniamnist", **medmnist.kwargs(), mode="vqa").dataset("train")[0]
    batch = SFTCollator(processor)([item])
    ids, labels = batch.inputs["input_ids"][0].tolist(), batch.labels[0].tolist()
    tok = processor.tokenizer
    # The target is the gold letter in the answer format, closed by the end-of-turn token.
    expected = tok(f"<answer>{item['answer']}</answer>", add_special_tokens=False)["input_ids"]
    expected.append(tok.convert_tokens_to_ids("<|im_end|>"))
    start = len(ids) - len(expected)
    assert tok.decode(ids[:start]).endswith("<|im_start|>assistant\n")  # everything before is the prompt
    image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
    assert ids.count(image_pad) == 4  # a 28 px image becomes 4 merged vision tokens, all in the prompt
    for position, (token, label) in enumerate(zip(ids, labels, strict=True)):
        if position < start:
            assert label == IGNORE_INDEX, f"prompt token {position} ({tok.decode([token])!r}) carries loss"
        else:
            assert label == token == expected[position - start], f"answer token {position} is not supervised"
    assert batch.assistant_mask[0].sum().item() == len(expected)


def test_reasoning_trace_becomes_the_target_when_present(tiny) -> None:
    _, processor = tiny
    batch = SFTCollator(processor)([_item("A", think="clear lungs")])
    supervised = batch.inputs["input_ids"][0][batch.assistant_mask[0]]
    assert processor.tokenizer.decode(supervised) == "<think>clear lungs</think>\n<answer>A</answer><|im_end|>"
    assert target_text({"answer": "C", "think": "   "}) == "<answer>C</answer>"  # a blank trace is no trace
    with pytest.raises(KeyError, match="answer"):
        target_text({"question": "?"})


def test_padded_rows_give_the_same_logits_and_labels_as_unpadded(tiny) -> None:
    model, processor = tiny
    items = [_item("A", 0), _item("B", 1, size=56, think="a long trace " * 5), _item("B", 2)]
    batch = SFTCollator(processor)(items)
    assert batch.inputs["attention_mask"][:, 0].tolist() == [0, 1, 0]  # left padding on the short rows
    with torch.no_grad():
        together = model(**batch.inputs).logits
        for row, item in enumerate(items):
            alone = SFTCollator(processor)([item])
            width = alone.inputs["input_ids"].shape[1]
            assert torch.equal(batch.labels[row, -width:], alone.labels[0])
            assert (batch.labels[row, :-width] == IGNORE_INDEX).all()
            torch.testing.assert_close(together[row, -width:], model(**alone.inputs).logits[0], atol=1e-5, rtol=1e-5)


def test_prompts_only_match_the_processor_and_token_completions_are_kept(tiny) -> None:
    _, processor = tiny
    items = [_item("A", 0), _item("B", 1)]
    prompts = encode_chat(processor, [i["messages"] for i in items], [i["image"] for i in items])
    assert not prompts.assistant_mask.any()
    texts = [processor.apply_chat_template(i["messages"], tokenize=False, add_generation_prompt=True) for i in items]
    direct = processor(text=texts, images=[i["image"] for i in items], padding=True, return_tensors="pt")
    assert torch.equal(prompts.inputs["input_ids"], direct["input_ids"])
    torch.testing.assert_close(prompts.inputs["pixel_values"], direct["pixel_values"])

    sampled = [[41, 42, 43], [44]]  # generated token ids are appended as they are, no end token added
    batch = encode_chat(processor, [i["messages"] for i in items], [i["image"] for i in items], completions=sampled)
    for row, ids in enumerate(sampled):
        assert batch.inputs["input_ids"][row][batch.assistant_mask[row]].tolist() == ids
    assert batch.prompt_lengths.tolist() == prompts.inputs["attention_mask"].sum(1).tolist()


def test_truncated_targets_lose_their_end_token_and_bad_input_is_named(tiny) -> None:
    _, processor = tiny
    batch = SFTCollator(processor, max_completion_tokens=3)([_item("A", think="long " * 20)])
    supervised = batch.inputs["input_ids"][0][batch.assistant_mask[0]].tolist()
    assert len(supervised) == 3 and processor.tokenizer.convert_tokens_to_ids("<|im_end|>") not in supervised
    with pytest.raises(ValueError, match="2 conversations but 1 completions"):
        encode_chat(processor, [_item()["messages"]] * 2, completions=["x"])
