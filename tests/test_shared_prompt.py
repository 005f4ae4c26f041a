"""The shared-prompt pass (``loss.share_prompt``) against the unshared one, on every family's tiny model.

Three prompts (real PneumoniaMNIST questions and images) with three completions each, of different lengths
(an empty one included); the rows are taken out of order and across groups, as micro-batches take them.
"""

from __future__ import annotations

import logging

import pytest
import torch

from medrl.data.medmnist import MedMNISTDataModule
from medrl.lit import shared_prompt
from medrl.lit.trajectory import build_trajectory, forward_logprobs
from medrl.models.hub import load_vlm, resolve_model, vision_tower
from medrl.rollout.types import Completion, PromptResult

EVERY_TINY = ["tiny", "tiny:smolvlm", "tiny:gemma3", "tiny:internvl", "tiny:qwen3_vl"]
TEXTS = [
    ["<think>x</think><answer>A</answer>", "no", "<answer>B</answer> and then a few more words"],
    ["<answer> B </answer>", "<answer>C</answer> ok", ""],
    ["a", "b c d e f g h", "<answer>A</answer>"],
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def items(medmnist) -> list[dict]:
    data = MedMNISTDataModule(**medmnist.kwargs(), flag="pneumoniamnist", mode="vqa", train_samples=6)
    dataset = data.dataset("train")
    return [dataset[i] for i in range(3)]


def _trajectory(processor, items):
    results = []
    for group in TEXTS:
        ids = [processor.tokenizer(t, add_special_tokens=False)["input_ids"] for t in group]
        samples = [Completion(text=t, token_ids=i, logprobs=[-1.0] * len(i), finish_reason="stop")
                   for t, i in zip(group, ids, strict=True)]  # fmt: skip
        results.append(PromptResult(prompt="", samples=samples))
    return build_trajectory(processor, items, results)


def _pass(model, traj, rows, share: bool):
    """Log-probs, entropies and the gradient of a loss that uses both, on ``rows``."""
    model.zero_grad(set_to_none=True)
    logp, entropy = forward_logprobs(model, traj, rows, entropy=True, entropy_grad=True, share_prompt=share)
    mask = traj.completion_mask[rows]
    weights = torch.linspace(-1.0, 1.0, len(rows))[:, None]  # signed, like advantages
    ((logp * weights * mask).sum() + 0.1 * (entropy * mask).sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logp.detach(), entropy.detach(), grads


@pytest.mark.parametrize("tiny", EVERY_TINY)
def test_shared_prompt_equals_the_unshared_pass(tiny: str, items) -> None:
    model, processor = load_vlm(str(resolve_model(tiny)))
    model.train()
    for p in model.parameters():  # the tower too: the gradient must reach the one prompt pass
        p.requires_grad_(True)
    traj = _trajectory(processor, items)
    rows = [4, 0, 8, 1, 5, 3, 7]  # out of order, every group split
    mask = traj.completion_mask[rows]
    plain, shared = _pass(model, traj, rows, share=False), _pass(model, traj, rows, share=True)
    assert mask.sum(1).tolist()[4] == 0  # the empty completion is in there
    torch.testing.assert_close(shared[0][mask], plain[0][mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared[1][mask], plain[1][mask], rtol=1e-5, atol=1e-5)
    assert shared[2].keys() == plain[2].keys() and len(plain[2]) == len(list(model.parameters()))
    total = torch.cat([g.flatten() for g in plain[2].values()]).norm()
    for name, grad in plain[2].items():
        # Relative per tensor; the floor is for gradients that are 0 in exact arithmetic (a key bias's).
        err = (shared[2][name] - grad).norm()
        assert err <= 1e-5 * grad.norm() + 1e-8 * total, (name, float(err), float(grad.norm()))


def test_the_vision_tower_sees_each_prompt_once(tiny, items) -> None:
    model, processor = tiny
    traj = _trajectory(processor, items)
    seen: list[int] = []
    hook = vision_tower(model).register_forward_hook(lambda _m, args, _o: seen.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            forward_logprobs(model, traj, range(9), share_prompt=False)
            plain, seen[:] = sum(seen), []
            forward_logprobs(model, traj, range(9), share_prompt=True)
    finally:
        hook.remove()
    assert len(seen) == 1 and sum(seen) * 3 == plain  # one call, a third of the patches: 3 prompts, not 9 rows


def test_gradient_checkpointing_falls_back_with_one_line(items, caplog, monkeypatch) -> None:
    monkeypatch.setattr(shared_prompt, "_SAID", set())
    model, processor = load_vlm(str(resolve_model("tiny")))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    traj = _trajectory(processor, items)
    mask = traj.completion_mask
    with caplog.at_level(logging.WARNING, logger="medrl.lit.shared_prompt"):
        shared = _pass(model, traj, list(range(9)), share=True)
        _pass(model, traj, list(range(9)), share=True)
    said = [r.getMessage() for r in caplog.records if "share_prompt" in r.getMessage()]
    assert len(said) == 1 and all("gradient checkpointing" in s for s in said)
    plain = _pass(model, traj, list(range(9)), share=False)
    assert torch.equal(shared[0][mask], plain[0][mask])  # the unshared pass itself


def test_a_row_with_another_prompt_is_never_shared(tiny, items, caplog, monkeypatch) -> None:
    monkeypatch.setattr(shared_prompt, "_SAID", set())
    model, processor = tiny
    traj = _trajectory(processor, items)
    swapped = traj.select_rows([0, 1, 3, 4, 5, 6, 7, 8, 2])  # row 2 now sits in the last group
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="medrl.lit.shared_prompt"):
        plain = forward_logprobs(model, swapped, range(9), share_prompt=False)[0]
        shared = forward_logprobs(model, swapped, range(9), share_prompt=True)[0]
    mask = swapped.completion_mask
    torch.testing.assert_close(shared[mask], plain[mask], rtol=1e-5, atol=1e-5)
    assert any("another prompt" in r.getMessage() for r in caplog.records)


def test_a_question_with_several_images_is_refused(tiny, items) -> None:
    _, processor = tiny
    two = [{**items[0], "images": [items[0]["image"], items[1]["image"]]}, *items[1:]]
    with pytest.raises(ValueError, match="one image per question; question 0 of this batch has 2"):
        _trajectory(processor, two)
