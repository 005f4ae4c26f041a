"""The policy loss against hand-worked tensors, each aggregation against a loop, and KL, clipping, finiteness."""

from __future__ import annotations

import doctest
import math

import pytest
import torch

from medrl.rl import logprobs as logprobs_module
from medrl.rl import losses
from medrl.rl.losses import aggregate, clipped_surrogate, global_token_count, is_finite, k3_kl, policy_loss


def test_doctests() -> None:
    for module in (losses, logprobs_module):
        result = doctest.testmod(module)
        assert result.attempted >= 2 and result.failed == 0, module.__name__


@pytest.mark.parametrize(
    ("ratio", "adv", "expected_loss", "clip_active", "why"),
    [
        (1.0, 1.0, -1.0, False, "on-policy: loss is -A"),
        (1.5, 1.0, -1.2, True, "ratio above 1 + 0.2 with A > 0: clipped to 1.2"),
        (1.5, -1.0, 1.5, False, "ratio above the range with A < 0: the unclipped term is the minimum"),
        (0.5, -1.0, 0.8, True, "ratio below 1 - 0.2 with A < 0: clipped to 0.8"),
        (0.5, 1.0, -0.5, False, "ratio below the range with A > 0: the unclipped term is the minimum"),
        (1.1, 2.0, -2.2, False, "inside the range: ratio x A"),
    ],
)
def test_clipped_surrogate_hand_worked(ratio: float, adv: float, expected_loss: float, clip_active: bool, why: str):
    old = torch.zeros(1, 1)
    loss, active, r = clipped_surrogate(old + math.log(ratio), old, torch.tensor([adv]), 0.2, 0.2)
    assert loss.item() == pytest.approx(expected_loss), why
    assert active.item() is clip_active, why
    assert r.item() == pytest.approx(ratio)


def test_clip_higher_is_asymmetric() -> None:
    # DAPO's clip-higher: epsilon_high 0.28 lets a ratio of 1.25 through for A > 0 (loss -1.25), while a ratio of
    # 0.75 with A < 0 is still clipped at 1 - 0.2 = 0.8 (loss 0.8).
    old = torch.zeros(2, 1)
    new = torch.log(torch.tensor([[1.25], [0.75]]))
    loss, active, _ = clipped_surrogate(new, old, torch.tensor([1.0, -1.0]), epsilon_low=0.2, epsilon_high=0.28)
    assert loss.flatten().tolist() == pytest.approx([-1.25, 0.8])
    assert active.flatten().tolist() == [False, True]


def test_k3_kl_hand_worked() -> None:
    # d = ref - logp: d = 0 -> 0; d = ln 2 -> 2 - ln 2 - 1 = 0.30685; d = -ln 2 -> 0.5 + ln 2 - 1 = 0.19315.
    logp = torch.tensor([[0.0, 0.0, 0.0]])
    ref = torch.tensor([[0.0, math.log(2), -math.log(2)]])
    assert k3_kl(logp, ref).flatten().tolist() == pytest.approx([0.0, 1 - math.log(2), math.log(2) - 0.5], abs=1e-6)
    assert (k3_kl(torch.randn(50, 7), torch.randn(50, 7)) >= 0).all()


def test_policy_loss_with_kl_hand_worked() -> None:
    # One sequence, two tokens, on-policy (ratio 1), A = 0.5: surrogate per token -0.5. Reference log-probs make
    # d = ln 2 on token 0 (KL 0.30685) and d = 0 on token 1 (KL 0). With beta 0.1 and token-mean:
    # loss = mean(-0.5 + 0.030685, -0.5 + 0) = -0.4846575; the logged KL is the token mean 0.153426.
    logp = torch.zeros(1, 2)
    ref = torch.tensor([[math.log(2), 0.0]])
    out = policy_loss(logp, logp, torch.tensor([0.5]), torch.ones(1, 2), ref_logprobs=ref, beta=0.1)
    assert out.loss.item() == pytest.approx((-0.5 + 0.1 * (1 - math.log(2)) - 0.5) / 2)
    assert out.policy.item() == pytest.approx(-0.5)
    assert out.kl.item() == pytest.approx((1 - math.log(2)) / 2)
    assert out.clip_fraction.item() == 0.0 and out.ratio_mean.item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="reference log-probs"):
        policy_loss(logp, logp, torch.tensor([0.5]), torch.ones(1, 2), beta=0.1)


def test_gradient_of_token_mean_hand_worked() -> None:
    # On-policy, grpo aggregation: loss = -(1/N) sum_i A_i * mean_t ratio_it, and d ratio / d logp = 1 at ratio 1,
    # so d loss / d logp_it = -A_i / (N * n_i). Sequence 0: A = 1, 2 tokens -> -1/4; sequence 1: A = -2, 1 token
    # -> +2/2 = 1; padding gets no gradient.
    logp = torch.zeros(2, 2, requires_grad=True)
    out = policy_loss(logp, logp.detach(), torch.tensor([1.0, -2.0]), torch.tensor([[1, 1], [1, 0]]))
    out.loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.25, -0.25], [1.0, 0.0]]))


def _loop_aggregate(per_token: torch.Tensor, mask: torch.Tensor, aggregation: str, max_length: int) -> float:
    pairs = zip(per_token.tolist(), mask.tolist(), strict=True)
    rows = [[v for v, m in zip(r, mr, strict=True) if m] for r, mr in pairs]
    if aggregation == "grpo":
        return sum(sum(r) / max(len(r), 1) for r in rows) / len(rows)
    if aggregation == "dr_grpo":
        return sum(sum(r) for r in rows) / (len(rows) * max_length)
    return sum(sum(r) for r in rows) / max(sum(len(r) for r in rows), 1)


def _random_batch(seed: int, n: int = 12, length: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    per_token = torch.randn(n, length, generator=gen)
    lengths = torch.randint(0, length + 1, (n,), generator=gen)  # includes empty completions
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    return per_token, mask


@pytest.mark.parametrize("aggregation", ["grpo", "dr_grpo", "dapo"])
def test_aggregation_matches_loop(aggregation: str) -> None:
    per_token, mask = _random_batch(0)
    got = aggregate(per_token, mask, aggregation, max_length=16).item()  # type: ignore[arg-type]
    assert got == pytest.approx(_loop_aggregate(per_token, mask, aggregation, 16), rel=1e-5)


@pytest.mark.parametrize("aggregation", ["grpo", "dr_grpo", "dapo"])
def test_micro_batches_add_up_to_the_batch(aggregation: str) -> None:
    # The trainer splits a batch into micro-batches and passes the whole batch's normalisers; the pieces must
    # sum to the loss of the whole batch, or the loss would change with the micro-batch size.
    per_token, mask = _random_batch(3)
    whole = aggregate(per_token, mask, aggregation, max_length=9).item()  # type: ignore[arg-type]
    pieces = sum(
        aggregate(p, m, aggregation, max_length=9, num_sequences=12, num_tokens=mask.sum()).item()  # type: ignore[arg-type]
        for p, m in zip(per_token.split(5), mask.split(5), strict=True)
    )
    assert pieces == pytest.approx(whole, rel=1e-5)


def test_dr_grpo_needs_max_length_and_unknown_aggregation_fails() -> None:
    per_token, mask = _random_batch(0)
    with pytest.raises(ValueError, match="max_length"):
        aggregate(per_token, mask, "dr_grpo")
    with pytest.raises(ValueError, match="loss aggregation must be"):
        aggregate(per_token, mask, "mean")  # type: ignore[arg-type]


def test_non_finite_detection() -> None:
    assert is_finite(torch.tensor(1.5)) and is_finite(0.0)
    assert not is_finite(torch.tensor(float("nan"))) and not is_finite(torch.tensor(float("inf")))
    # A -inf log-prob (a token the policy now forbids) makes the loss NaN: exactly what the trainer must catch.
    logp = torch.tensor([[float("-inf"), 0.0]])
    out = policy_loss(
        logp, torch.zeros(1, 2), torch.tensor([-1.0]), torch.ones(1, 2), ref_logprobs=torch.zeros(1, 2), beta=0.1
    )
    assert not is_finite(out.loss)


def test_global_token_count_single_process() -> None:
    assert global_token_count(torch.tensor([[1, 1, 0], [1, 0, 0]])).item() == 3.0


def _dapo_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    per_token, mask = _random_batch(5)
    rows = slice(rank * 6, rank * 6 + 6)  # the two processes see different numbers of tokens
    weight = torch.ones(1, requires_grad=True)
    loss = aggregate(weight * per_token[rows], mask[rows], "dapo", num_tokens=global_token_count(mask[rows]))
    loss.backward()
    dist.all_reduce(weight.grad)  # what DDP does: average the gradients
    torch.save((weight.grad / world).clone(), f"{out_dir}/grad{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes importing torch: about 15 s on 2 cores
def test_dapo_is_the_same_on_two_processes(tmp_path) -> None:
    # The whole batch's token mean, d/dw of sum(w * l) / T = sum(l) / T, must equal the DDP average of the
    # two processes' gradients when each divides by the global count over the world size.
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_dapo_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    per_token, mask = _random_batch(5)
    expected = (per_token * mask).sum() / mask.sum()
    for rank in range(2):
        grad = torch.load(tmp_path / f"grad{rank}.pt", weights_only=True)
        assert grad.item() == pytest.approx(expected.item(), rel=1e-5)
