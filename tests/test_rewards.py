"""Rewards: accuracy and format against the known cheats, custom rewards by import path, the CARE bonus."""

from __future__ import annotations

import doctest

import pytest
import torch

from medrl.rl import rewards
from medrl.rl.rewards import (
    accuracy_reward,
    answer_confidence,
    answer_mask,
    answer_token_span,
    care_bonus,
    format_reward,
    load_reward,
    score_completions,
)

GOOD = "<think>the lungs look clear</think>\n<answer>A</answer>"


def test_doctests() -> None:
    result = doctest.testmod(rewards, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 10 and result.failed == 0


@pytest.mark.parametrize(
    ("completion", "gold", "expected", "why"),
    [
        (GOOD, "A", 1.0, "well-formed and right"),
        (GOOD, "B", 0.0, "well-formed and wrong"),
        ("<think>x</think><answer></answer>", "A", 0.0, "empty answer block"),
        ("<think>x</think><answer>   </answer> A", "A", 0.0, "empty block: the letter after it must not count"),
        ("<answer>A, B</answer>", "A", 0.0, "two letters in one block"),
        ("<answer>A or B</answer>", "B", 0.0, "hedging between options"),
        ("<answer>A B C D</answer>", "A", 0.0, "every option at once"),
        ("<answer>AB</answer>", "A", 0.0, "letters run together"),
        ("<answer>B</answer><answer>A</answer>", "A", 1.0, "several blocks: the last one counts"),
        ("<answer>A</answer><answer>B</answer>", "A", 0.0, "several blocks: an early right answer does not count"),
        ("<answer>A</answer> and also B", "A", 1.0, "text after the block does not change the answer"),
        ("The answer is A.", "A", 0.0, "no answer block at all"),
        ("<think>hmm</think><answer>A", "A", 0.0, "unclosed block (truncated completion)"),
        ("", "A", 0.0, "empty completion"),
        ("<answer>(a)</answer>", "A", 1.0, "normalised: brackets and case"),
        ("<answer> A. normal </answer>", "A", 1.0, "normalised: letter with its option text"),
    ],
)
def test_accuracy_against_cheats(completion: str, gold: str, expected: float, why: str) -> None:
    assert accuracy_reward([completion], answer=[gold]) == [expected], why


def test_accuracy_letter_outside_the_options_is_wrong() -> None:
    # Two options (A, B): a completion answering "C" can never be right, and a gold letter outside the options
    # (a data bug) must not be matched by a model guessing that letter either.
    options = [{"A": "normal", "B": "pneumonia"}] * 2
    assert accuracy_reward(["<answer>C</answer>", "<answer>C</answer>"], answer=["A", "C"], options=options) == [0, 0]


def test_accuracy_checks_lengths() -> None:
    with pytest.raises(ValueError, match="2 completions, 1 answers"):
        accuracy_reward([GOOD, GOOD], answer=["A"])


@pytest.mark.parametrize(
    ("completion", "expected", "why"),
    [
        (GOOD, 1.0, "think then answer"),
        ("  <think></think><answer>B</answer>\n", 1.0, "surrounding whitespace and an empty think are allowed"),
        ("<answer>A</answer>", 0.0, "no think block"),
        ("<answer>A</answer><think>x</think>", 0.0, "wrong order"),
        ("<think>x</think><answer>A</answer><answer>B</answer>", 0.0, "several answer blocks"),
        ("<think>x</think><answer>A</answer></answer>", 0.0, "a stray closing tag"),
        ("<think>a</think><think>b</think><answer>A</answer>", 0.0, "several think blocks"),
        ("<think>x</think><answer>A</answer> so A", 0.0, "text after </answer>"),
        ("preamble <think>x</think><answer>A</answer>", 0.0, "text before <think>"),
        ("<think>x</think><answer></answer>", 0.0, "empty answer"),
        ("<think>x<answer>A</answer></think><answer>A</answer>", 0.0, "an answer hidden inside the reasoning"),
        ("", 0.0, "empty completion"),
    ],
)
def test_format_against_cheats(completion: str, expected: float, why: str) -> None:
    assert format_reward([completion]) == [expected], why


def test_custom_reward_by_import_path_and_columns_are_passed(tmp_path, monkeypatch) -> None:
    (tmp_path / "my_rewards.py").write_text(
        "def length_penalty(completions, prompt, **_):\n"
        "    return [-len(c) / 100 for c, _p in zip(completions, prompt, strict=True)]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    fns = {name: load_reward(name) for name in ("accuracy", "format", "my_rewards:length_penalty")}
    parts = score_completions([GOOD, "<answer>B</answer>"], {"answer": ["A", "A"], "prompt": ["p", "p"]}, fns)
    assert parts["accuracy"].tolist() == [1.0, 0.0]
    assert parts["format"].tolist() == [1.0, 0.0]
    assert parts["my_rewards:length_penalty"].tolist() == pytest.approx([-len(GOOD) / 100, -0.18])
    assert load_reward("my_rewards.length_penalty") is fns["my_rewards:length_penalty"]


def test_load_reward_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="neither a built-in"):
        load_reward("accurcy")
    with pytest.raises(ValueError, match="cannot import 'nope'"):
        load_reward("medrl.rl.rewards:nope")


def test_score_completions_rejects_bad_reward_outputs() -> None:
    with pytest.raises(ValueError, match="'short' returned 1 values for 2"):
        score_completions(["a", "b"], {}, {"short": lambda completions, **_: [1.0]})
    with pytest.raises(ValueError, match="'nan' returned a non-finite value for row 1"):
        score_completions(["a", "b"], {}, {"nan": lambda completions, **_: [1.0, float("nan")]})


def test_answer_span_on_real_tokens() -> None:
    from medrl.models.families.qwen_vl import build_tokenizer

    tok = build_tokenizer()
    text = "<think> The image shows it, so the answer is B. </think> <answer> B </answer>"
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    pieces = [tok.decode([i], skip_special_tokens=True) for i in ids]
    span = answer_token_span(pieces)
    assert span is not None
    # The tokens of the span decode to exactly the answer (plus the whitespace BPE glues to it).
    assert tok.decode(ids[span[0] : span[1]]).strip() == "B"
    mask = answer_mask([span, None], len(ids))
    assert mask[0].sum().item() == span[1] - span[0] and not mask[1].any()


def test_answer_confidence_hand_worked() -> None:
    # Row 0 answers with two tokens of probability 0.8 and 0.2: exp(mean(log .8, log .2)) = sqrt(.16) = 0.4.
    # Row 1 has no answer tokens: confidence 0. Row 2 is certain (p = 1): capped at 0.95.
    lp = torch.log(torch.tensor([[0.3, 0.8, 0.2], [0.5, 0.5, 0.5], [1.0, 1.0, 0.1]]))
    mask = torch.tensor([[0, 1, 1], [0, 0, 0], [1, 1, 0]], dtype=torch.bool)
    assert answer_confidence(lp, mask).tolist() == pytest.approx([0.4, 0.0, 0.95])
    assert answer_confidence(lp, mask, cap=None)[2].item() == pytest.approx(1.0)


def test_care_bonus_hand_built_groups() -> None:
    acc = torch.tensor(
        [
            [1.0, 1.0, 0.0, 0.0],  # mean .5: the two correct ones are selected
            [0.0, 0.0, 0.0, 0.0],  # nothing correct: no bonus at all
            [1.0, 1.0, 1.0, 1.0],  # all correct: only confidence decides
        ]
    )
    conf = torch.tensor(
        [
            [0.60, 0.595, 0.95, 0.95],  # selected mean .5975; .595 >= .5875 -> both earn; wrong ones never
            [0.90, 0.90, 0.90, 0.90],
            [0.10, 0.20, 0.30, 0.40],  # mean .25: .30 and .40 earn; .20 < .24 does not
        ]
    )
    expected = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]])
    assert torch.equal(care_bonus(acc, conf, coefficient=0.5, margin=0.01), expected)
    # Without the margin the .595 sample falls below the .5975 mean.
    assert care_bonus(acc, conf, margin=0.0)[0].tolist() == [0.5, 0.0, 0.0, 0.0]


def _care_bonus_loop(acc: torch.Tensor, conf: torch.Tensor, coefficient: float, margin: float) -> torch.Tensor:
    out = torch.zeros_like(acc)
    for b in range(acc.shape[0]):
        mean_acc = sum(acc[b].tolist()) / acc.shape[1]
        chosen = [g for g in range(acc.shape[1]) if acc[b, g] > 0 and acc[b, g] >= mean_acc]
        if not chosen:
            continue
        bar = sum(conf[b, g].item() for g in chosen) / len(chosen) - margin
        for g in chosen:
            if conf[b, g] >= bar:
                out[b, g] = coefficient * acc[b, g]
    return out


def test_care_bonus_matches_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    acc = (torch.rand(64, 8, generator=gen) > 0.5).float()
    conf = torch.rand(64, 8, generator=gen).clamp(max=0.95)
    torch.testing.assert_close(care_bonus(acc, conf, 0.5, 0.01), _care_bonus_loop(acc, conf, 0.5, 0.01))
