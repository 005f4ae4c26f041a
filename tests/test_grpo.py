"""The GRPO LightningModule on the tiny VLM and PneumoniaMNIST VQA: stages, updates, skips, resume, CLI.

The files are the real ones when $MEDRL_DATA_DIR holds them, synthetic stand-ins otherwise (conftest).

The tiny model's random weights never write a well-formed answer, so the runs that must move the weights use
a dense verifiable reward written to a temporary module and passed by import path (the way users add their
own rewards): the share of vowels among the completion's letters.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from medrl.data.modalities import PneumoniaMNIST
from medrl.lit.grpo import GRPOModule
from medrl.lit.grpo_args import MOVED_OPTIONS
from medrl.lit.grpo_step import STAGES, eval_mode
from medrl.lit.trajectory import answer_window_mask, build_trajectory
from medrl.models.lora import LoRAConfig
from medrl.rl.ema import EMAReference
from medrl.rl.types import Trajectory
from medrl.rollout.types import Completion, PromptResult

VOWELS = "toy_rewards:vowel_share"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy_rewards(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("rewards")
    (folder / "toy_rewards.py").write_text(
        "def vowel_share(completions, **_):\n"
        "    out = []\n"
        "    for text in completions:\n"
        "        letters = [c for c in text if c.isalpha()]\n"
        "        out.append(sum(c in 'aeiou' for c in letters) / max(len(letters), 1))\n"
        "    return out\n"
        "def overflow(completions, **_):\n"
        "    return [1e39 * (i % 2) for i in range(len(completions))]\n"
    )
    sys.path.insert(0, str(folder))
    yield VOWELS
    sys.path.remove(str(folder))


def _data(medmnist, batch_size: int = 2, train_samples: int = 8) -> PneumoniaMNIST:
    return PneumoniaMNIST(
        **medmnist.kwargs(), mode="vqa", batch_size=batch_size, train_samples=train_samples, val_samples=2
    )


def _module(tiny_dir: Path, **overrides) -> GRPOModule:
    """A GRPOModule on tiny; options by their field names (``beta=0.1`` goes to ``loss``, ``care=False``
    switches CARE off), gathered into the groups the constructor takes."""
    flat = dict(num_generations=4, max_completion_length=8, lr=1e-3, micro_batch_size=8) | overrides
    kwargs: dict = dict(model=str(tiny_dir), seed=0)
    groups: dict[str, dict] = {"sampling": {}, "loss": {}, "care": {}, "engine": {}, "optim": {}}
    for name, value in flat.items():
        if name in (
            "rewards",
            "finetune",
            "lora",
            "vision",
            "dtype",
            "log_completions_every",
            "log_completions_prompts",
        ):
            kwargs[name] = value
        elif name == "care":
            groups["care"]["enabled"] = value
        elif name == "engine":
            groups["engine"]["name"] = value
        else:
            group, _, field = MOVED_OPTIONS[name].partition(".")
            groups[group][field] = value
    return GRPOModule(**kwargs, **groups)


def _trainer(tmp_path: Path, **overrides) -> L.Trainer:
    kwargs = dict(
        accelerator="cpu",
        logger=CSVLogger(tmp_path / "logs", name="", version=""),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        log_every_n_steps=1,
    )
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


def _metrics(tmp_path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((tmp_path / "logs" / "metrics.csv").open()))


def _trained(module: GRPOModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------- pieces


def test_ema_hand_worked() -> None:
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = EMAReference(model, decay=0.5, every=2)
    with torch.no_grad():
        model.weight.fill_(1.0)
    assert not ema.maybe_update(model, 1)  # step 1: not a multiple of 2, the average stays 0
    assert ema.maybe_update(model, 2)  # step 2: 0.5 * 0 + 0.5 * 1 = 0.5
    assert ema.shadow["weight"].item() == 0.5
    with ema.swapped_in(model):
        assert model.weight.item() == 0.5  # the reference weights, for scoring
    assert model.weight.item() == 1.0  # and the policy's own weights back afterwards
    restored = EMAReference(model, decay=0.9, every=7)
    restored.load_state_dict(ema.state_dict())
    assert (restored.decay, restored.every, restored.shadow["weight"].item()) == (0.5, 2, 0.5)


def test_ema_keeps_float32_for_a_bf16_model() -> None:
    # A 0.5 % step (decay 0.995) on a bf16 weight of 1.0 would round away (bf16 spacing at 1.0 is 2^-7).
    model = torch.nn.Linear(1, 1, bias=False).to(torch.bfloat16)
    torch.nn.init.ones_(model.weight)
    ema = EMAReference(model, decay=0.995, every=1)
    with torch.no_grad():
        model.weight.fill_(2.0)
    ema.update(model)
    assert ema.shadow["weight"].dtype == torch.float32
    assert ema.shadow["weight"].item() == pytest.approx(1.005)


def _fake_results(tokenizer, texts: list[list[str]]) -> list[PromptResult]:
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = []
    for group in texts:
        samples = []
        for text in group:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [end]
            samples.append(Completion(text=text, token_ids=ids, logprobs=[-1.0] * len(ids), finish_reason="stop"))
        out.append(PromptResult(prompt="", samples=samples))
    return out


def test_trajectory_from_engine_results(tiny, medmnist) -> None:
    _, processor = tiny
    items = [_data(medmnist).dataset("train")[i] for i in range(2)]
    texts = [["<think>x</think><answer>A</answer>", "no answer"], ["<answer> B </answer>", "<answer>C</answer> ok"]]
    traj = build_trajectory(processor, items, _fake_results(processor.tokenizer, texts))
    assert (traj.num_rows, traj.num_groups, traj.group_size) == (4, 2, 2)
    lengths = traj.completion_mask.sum(1).tolist()
    # Completions end in the last column; the engine's log-probs sit on exactly their tokens.
    assert traj.completion_mask[:, -1].all()
    assert traj.old_logprobs.sum(1).tolist() == [-float(n) for n in lengths]
    assert traj.inputs["image_grid_thw"].shape == (4, 3)
    mask = answer_window_mask(processor.tokenizer, traj, [0, 1, 2, 3])
    decoded = [processor.tokenizer.decode(traj.completion_ids[r][mask[r]]).strip() for r in range(4)]
    assert decoded == ["A", "", "B", "C"]
    # Selecting and re-joining groups gives back the same rows, image patches included.
    again = Trajectory.cat([traj.select_groups([1]), traj.select_groups([0])], processor.tokenizer.pad_token_id)
    assert again.texts == texts[1] + texts[0]
    patches = traj.inputs["pixel_values"].chunk(4)  # every row has the same number of image patches
    assert torch.equal(again.inputs["pixel_values"], torch.cat([patches[2], patches[3], patches[0], patches[1]]))
    state = Trajectory.from_state_dict(traj.state_dict())
    assert torch.equal(state.completion_mask, traj.completion_mask) and state.texts == traj.texts


def test_care_bonus_in_the_module_uses_the_ema_reference(tiny_dir: Path, medmnist) -> None:
    module = _module(tiny_dir, num_generations=4)
    processor = module.processor
    items = [_data(medmnist).dataset("train")[0]]
    gold = items[0]["answer"]
    wrong = "A" if gold != "A" else "B"
    texts = [
        [f"<answer>{gold}</answer>", f"<think>hm</think><answer>{gold}</answer>", f"<answer>{wrong}</answer>", "x"]
    ]
    traj = build_trajectory(processor, items, _fake_results(processor.tokenizer, texts))
    with torch.no_grad():  # make the policy differ from its average, so it matters which one scores
        for p in module.model.parameters():
            p.add_(0.05)
    accuracy = torch.tensor([1.0, 1.0, 0.0, 0.0])
    bonus, confidence = module.step().care_bonus(traj, accuracy)
    # By hand: the reference (EMA = initial weights) scores the answer tokens of the two correct samples.
    from medrl.lit.trajectory import batched_logprobs
    from medrl.rl.rewards import answer_confidence, care_bonus

    with module.ema.swapped_in(module.model), eval_mode(module.model):
        ref = batched_logprobs(module.model, traj, 8, [0, 1])
    mask = answer_window_mask(processor.tokenizer, traj, [0, 1])
    expected_conf = answer_confidence(ref, mask, 0.95)
    torch.testing.assert_close(confidence, expected_conf)
    expected = care_bonus(accuracy[None], torch.cat([expected_conf, torch.zeros(2)])[None], 0.5, 0.01)[0]
    torch.testing.assert_close(bonus, expected)
    assert bonus[2:].eq(0).all() and bonus[:2].max() == 0.5  # wrong samples never; the more confident one does


# ---------------------------------------------------------------------------------------------- runs


def test_steps_change_every_trainable_weight_and_log_stage_times(tiny_dir, medmnist, toy_rewards, tmp_path):
    module = _module(tiny_dir, rewards={"accuracy": 1.0, toy_rewards: 1.0}, ema_every=1)
    before = _trained(module)
    _trainer(tmp_path, max_steps=2).fit(module, _data(medmnist))
    after = _trained(module)
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert not unchanged, f"{len(unchanged)} trainable weights did not move, e.g. {unchanged[:3]}"
    # The vision tower is frozen by default and must not move.
    frozen = {n: p for n, p in module.model.named_parameters() if not p.requires_grad}
    assert frozen and all(".visual." in f".{n}" for n in frozen)
    # The EMA (updated every step here) moved away from the initial weights, toward the policy.
    name = next(iter(before))
    assert not torch.equal(module.ema.shadow[name], before[name])
    rows = [r for r in _metrics(tmp_path) if r.get("time/update")]
    assert len(rows) == 2
    for stage in STAGES:
        assert all(float(r[f"time/{stage}"]) >= 0 for r in rows), stage
    assert all(float(r["time/generate"]) > 0 and float(r["time/update"]) > 0 for r in rows)
    assert all(float(r["train/skipped_nonfinite"]) == 0 for r in rows)
    assert all(0 <= float(r[f"reward/{toy_rewards}"]) <= 1 for r in rows)


def test_non_finite_loss_is_skipped_and_logged(tiny_dir, medmnist, toy_rewards, tmp_path):
    # A reward that overflows float32 (1e39 becomes inf in the reward tensor) makes the advantages inf - inf =
    # NaN: the loss is NaN and must not be applied. (Groups with all-equal rewards no longer give 0 / 0: their
    # advantages are exactly 0, see test_advantages.py.)
    module = _module(tiny_dir, care=False, rewards={"toy_rewards:overflow": 1.0})
    before = _trained(module)
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=2)
    trainer.fit(module, _data(medmnist))
    assert trainer.global_step == 0
    assert all(torch.equal(before[n], p) for n, p in _trained(module).items())
    rows = [r for r in _metrics(tmp_path) if r.get("train/skipped_nonfinite")]
    assert [float(r["train/skipped_nonfinite"]) for r in rows] == [1.0, 1.0]


# The frontier options together: GSPO ratios, the k2 KL with its bias correction, an entropy bonus on the top
# half of tokens by entropy, the Pass@k advantage and truncated completions masked.
FRONTIER = dict(importance_sampling="sequence", beta=0.05, kl_estimator="k2", kl_bias_correction=True,
                entropy_coef=0.01, top_entropy_quantile=0.5, advantage_estimator="grpo_passk",
                mask_truncated_completions=False)  # fmt: skip


@pytest.mark.parametrize("options", [{}, FRONTIER], ids=["defaults", "frontier"])
def test_resumed_run_continues_identically(tiny_dir, medmnist, toy_rewards, tmp_path, options):
    # Six batches per epoch; a checkpoint after step 2 (mid-epoch) resumed to step 4 must reach exactly the
    # weights, EMA reference and logged rewards of a run that never stopped.
    def module() -> GRPOModule:
        return _module(tiny_dir, rewards={"accuracy": 1.0, toy_rewards: 1.0}, ema_every=1, **options)

    def data() -> PneumoniaMNIST:
        return _data(medmnist, batch_size=2, train_samples=12)

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    straight = module()
    _trainer(tmp_path / "a", max_steps=4, callbacks=[ckpt], enable_checkpointing=True).fit(straight, data())
    resumed = module()
    trainer = _trainer(tmp_path / "b", max_steps=4)
    trainer.fit(resumed, data(), ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=2.ckpt"))
    assert trainer.global_step == 4
    for name, value in _trained(straight).items():
        assert torch.equal(value, _trained(resumed)[name]), name
    for name, value in straight.ema.shadow.items():
        assert torch.equal(value, resumed.ema.shadow[name]), name
    rewards_a = [r[f"reward/{toy_rewards}"] for r in _metrics(tmp_path / "a") if r.get(f"reward/{toy_rewards}")]
    rewards_b = [r[f"reward/{toy_rewards}"] for r in _metrics(tmp_path / "b") if r.get(f"reward/{toy_rewards}")]
    assert len(rewards_a) == 4 and rewards_b == rewards_a[2:]


def _short_run(tiny_dir, medmnist, toy_rewards, tmp_path, **options) -> tuple[GRPOModule, L.Trainer, list[dict]]:
    """Two batches of GRPO on the dense toy reward (CARE off), with ``options`` on top; returns the logged rows."""
    module = _module(tiny_dir, rewards={toy_rewards: 1.0}, care=False, **options)
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=2)
    trainer.fit(module, _data(medmnist))
    return module, trainer, [r for r in _metrics(tmp_path) if r.get("train/loss")]


def test_lora_trains_only_the_adapters_with_the_disabled_adapters_as_kl_reference(
    tiny_dir, medmnist, toy_rewards, tmp_path
):
    before = _trained(_module(tiny_dir, finetune="lora", rewards={toy_rewards: 1.0}, care=False))
    module, _, rows = _short_run(tiny_dir, medmnist, toy_rewards, tmp_path, finetune="lora", beta=0.04)
    after = _trained(module)
    assert set(after) == set(before) and all("lora_" in n for n in after)
    assert all(not torch.equal(before[n], after[n]) for n in after)
    # Step 1: the adapters start at B = 0, so the policy is its reference and the KL is 0; step 2 has moved.
    assert float(rows[0]["train/kl"]) == pytest.approx(0.0, abs=1e-6) and float(rows[1]["train/kl"]) > 0


def test_dapo_aggregation_trains(tiny_dir, medmnist, toy_rewards, tmp_path):
    module, trainer, rows = _short_run(tiny_dir, medmnist, toy_rewards, tmp_path, loss_aggregation="dapo")
    assert trainer.global_step == 2 and len(rows) == 2
    assert all(torch.isfinite(torch.tensor(float(r["train/loss"]))) for r in rows)
    assert all(float(r["train/grad_norm"]) > 0 for r in rows)


def test_mu_two_reuses_rollouts_off_policy_with_recomputed_old_logprobs(tiny_dir, medmnist, toy_rewards, tmp_path):
    options = dict(mu=2, old_logprobs="recompute", epsilon_high=0.28)  # with DAPO's clip-higher
    _, trainer, rows = _short_run(tiny_dir, medmnist, toy_rewards, tmp_path, **options)
    assert trainer.global_step == 4  # 2 batches x mu = 2 optimizer steps
    # The second pass over each batch runs off-policy: the ratio, averaged over both passes, is no longer 1.
    assert len(rows) == 2 and all(float(r["train/ratio_mean"]) != 1.0 for r in rows)


def test_the_frontier_options_train_and_log_their_diagnostics(tiny_dir, medmnist, toy_rewards, tmp_path):
    before = _trained(_module(tiny_dir, rewards={toy_rewards: 1.0}, care=False))
    module, trainer, rows = _short_run(tiny_dir, medmnist, toy_rewards, tmp_path, **FRONTIER)
    assert trainer.global_step == 2 and any(not torch.equal(before[n], p) for n, p in _trained(module).items())
    for key in ("train/clip_fraction_low", "train/clip_fraction_high", "train/ratio_min", "train/ratio_max",
                "train/approx_kl", "train/entropy", "train/entropy_bonus", "train/kl", "completion/length_max",
                "groups/no_signal", "reward/std", "completion/truncated"):  # fmt: skip
        assert all(key in r and r[key] != "" for r in rows), key
    assert all(float(r["train/entropy_bonus"]) > 0 for r in rows)
    # The hf engine returns its log-probs: the mismatch against the trainer's own is logged (and tiny: fp32 both).
    assert all(float(r["train/engine_logprob_diff"]) < 1e-3 for r in rows)


SHARED_CASES = {
    "defaults": {},  # CARE on: its EMA scorer shares too
    "frontier": FRONTIER,  # GSPO, the KL reference pass, entropy bonus on the top half
    "mu2": dict(mu=2, old_logprobs="recompute"),  # the old-policy pass
    "split": dict(micro_batch_size=3),  # every group of 4 split across micro-batches
    # LoRA without its dropout: dropout draws its masks per tensor shape, and the shared pass's shapes differ
    "lora": dict(finetune="lora", lora=LoRAConfig(dropout=0.0), beta=0.04, mask_truncated_completions=True),
    "dynamic": dict(dynamic_sampling=True, loss_aggregation="dapo"),
    "mis": dict(mismatch_correction="mis", mismatch_low=0.5, mismatch_level="sequence"),  # engine log-probs
}


@pytest.mark.parametrize("options", SHARED_CASES.values(), ids=SHARED_CASES.keys())
def test_a_step_with_the_shared_prompt_equals_the_unshared_step(tiny_dir, medmnist, toy_rewards, tmp_path, options):
    rows = {}
    for share in (False, True):
        torch.manual_seed(0)  # LoRA's A matrices are drawn at construction
        module = _module(tiny_dir, rewards={"accuracy": 1.0, toy_rewards: 1.0}, share_prompt=share, **options)
        _trainer(tmp_path / str(share), max_steps=1).fit(module, _data(medmnist, train_samples=4))
        rows[share] = [r for r in _metrics(tmp_path / str(share)) if r.get("train/loss")][-1]
    plain, shared = rows[False], rows[True]
    assert shared[f"reward/{toy_rewards}"] == plain[f"reward/{toy_rewards}"]  # the same rollouts
    assert float(shared["train/loss"]) == pytest.approx(float(plain["train/loss"]), abs=1e-6)
    for key in ("train/grad_norm", "train/entropy", "train/kl", "train/ratio_mean"):
        assert float(shared[key]) == pytest.approx(float(plain[key]), rel=1e-5, abs=1e-7), key


def test_the_completions_table_rescores_to_the_logged_rewards(tiny_dir, medmnist, toy_rewards, tmp_path):
    from medrl.rl.rewards import load_reward

    rewards = {"accuracy": 1.0, toy_rewards: 1.0}
    module = _module(tiny_dir, rewards=rewards, care=False, log_completions_every=1, log_completions_prompts=2)
    _trainer(tmp_path, max_epochs=1, limit_train_batches=2).fit(module, _data(medmnist))
    logged = [r for r in _metrics(tmp_path) if r.get("train/loss")]
    tables = sorted((tmp_path / "logs" / "completions").glob("step_*.jsonl"))
    assert [t.name for t in tables] == ["step_000001.jsonl", "step_000002.jsonl"]
    for table, row in zip(tables, logged, strict=True):
        lines = [json.loads(line) for line in table.read_text().splitlines()]
        assert len(lines) == 2 * 4 and {"completion", "answer", "reward", "advantage", "image"} <= set(lines[0])
        # The whole batch (2 prompts x G = 4) is in the table: re-scored, its mean is the logged reward.
        fn = load_reward(toy_rewards)
        again = fn(completions=[line["completion"] for line in lines])
        assert again == pytest.approx([line["rewards"][toy_rewards] for line in lines])
        assert sum(again) / len(again) == pytest.approx(float(row[f"reward/{toy_rewards}"]), abs=1e-6)


def test_masked_truncated_completions_carry_no_loss(tiny_dir, medmnist) -> None:
    # Two completions of one prompt: one ends with <|im_end|>, one reaches the 8-token cap without it.
    module = _module(tiny_dir, max_completion_length=8, mask_truncated_completions=True)
    tokenizer = module.processor.tokenizer
    items = [_data(medmnist).dataset("train")[0]]
    ended = _fake_results(tokenizer, [["<answer>A</answer>"]])[0].samples[0]
    ids = tokenizer("a b c d e f g h i j", add_special_tokens=False)["input_ids"][:8]
    cut = Completion(text=tokenizer.decode(ids), token_ids=ids, logprobs=[-1.0] * 8, finish_reason="length")
    traj = build_trajectory(module.processor, items, [PromptResult(prompt="", samples=[ended, cut])])
    step = module.step()
    assert step.truncated(traj).tolist() == [False, True]
    mask = step.loss_mask(traj)
    assert mask[0].sum() == traj.completion_mask[0].sum() > 0 and mask[1].sum() == 0
    unmasked = _module(tiny_dir, max_completion_length=8).step()
    assert torch.equal(unmasked.loss_mask(traj), traj.completion_mask)


def test_dynamic_sampling_keeps_every_group_of_a_continuous_reward(tiny_dir, medmnist, toy_rewards, tmp_path):
    _, trainer, rows = _short_run(tiny_dir, medmnist, toy_rewards, tmp_path, dynamic_sampling=True)
    assert trainer.global_step == 2  # no batch waited: a continuous reward always has signal
    assert all(float(r["sampling/kept_groups"]) == 1.0 and float(r["sampling/waiting"]) == 0.0 for r in rows)


def test_cli_fast_dev_run(tiny_dir, medmnist, tmp_path):
    from medrl.study.configs import MedRLCLI

    cli = MedRLCLI(
        args=[
            "fit",
            "--config",
            str(Path(__file__).resolve().parents[1] / "configs" / "rl.yaml"),
            "--trainer.fast_dev_run=1",
            f"--trainer.default_root_dir={tmp_path}",
            f"--model.init_args.model={tiny_dir}",
            *medmnist.cli(),
        ]
    )
    assert cli.trainer.global_step == 1
    metrics = cli.trainer.callback_metrics
    assert {"time/generate", "time/update", "reward/accuracy", "reward/format", "val/accuracy"} <= set(metrics)


def test_mean_reward_rises_on_a_learnable_task(tiny_dir, medmnist, toy_rewards, tmp_path):
    # 25 steps of 2 prompts x 8 samples x 16 tokens, with CARE and the accuracy reward on as in the study.
    # Measured on this CPU (seeded, deterministic): the vowel share goes 0.349, 0.398, 0.368, 0.374, 0.403 in
    # the first five steps (mean 0.378) and 0.575, 0.583, 0.607, 0.632, 0.626 in the last five (mean 0.605).
    module = _module(
        tiny_dir,
        num_generations=8,
        max_completion_length=16,
        lr=5e-3,
        micro_batch_size=32,
        rewards={"accuracy": 1.0, toy_rewards: 1.0},
    )
    _trainer(tmp_path, max_steps=25).fit(module, _data(medmnist, batch_size=2, train_samples=64))
    rewards = [float(r[f"reward/{toy_rewards}"]) for r in _metrics(tmp_path) if r.get(f"reward/{toy_rewards}")]
    assert len(rewards) == 25
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.15, (first, last, rewards)


@pytest.mark.slow  # vLLM starts in about 30 s on CPU; the run itself takes about 20 s
def test_vllm_engine_receives_the_weights_after_each_step(tiny_dir, medmnist, toy_rewards, tmp_path):
    # With mu = 1 the old log-probs are vLLM's own: if the sync stage failed to push the new weights, vLLM
    # would keep sampling from the initial policy and the ratio would drift from 1 as the policy moves.
    # Measured: ratio means within 0.9916..1.0015 over 25 steps while the reward rose 0.365 -> 0.597.
    module = _module(
        tiny_dir,
        engine="vllm",
        engine_options={"max_model_len": 512, "kv_cache_gib": 0.25},
        num_generations=8,
        max_completion_length=16,
        lr=5e-3,
        micro_batch_size=32,
        rewards={"accuracy": 1.0, toy_rewards: 1.0},
    )
    _trainer(tmp_path, max_steps=16).fit(module, _data(medmnist, batch_size=2, train_samples=64))
    rows = [r for r in _metrics(tmp_path) if r.get("time/sync")]
    assert len(rows) == 16
    assert all(float(r["time/sync"]) > 0 for r in rows)
    assert all(abs(float(r["train/ratio_mean"]) - 1) < 0.02 for r in rows)
    rewards = [float(r[f"reward/{toy_rewards}"]) for r in rows]
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.05, rewards


@pytest.mark.slow  # vLLM starts in about 30 s on CPU
def test_pass_at_k_callback_samples_with_the_grpo_modules_own_vllm_engine(tiny_dir, medmnist, tmp_path):
    # One engine, not two: a second vLLM would hold another copy of the weights and its own KV cache
    # (bench/engine_sharing.py measures what that costs).
    from medrl.callbacks.pass_at_k import PassAtKCallback

    module = _module(
        tiny_dir,
        engine="vllm",
        engine_options={"max_model_len": 512, "kv_cache_gib": 0.25},
        num_generations=2,
        max_completion_length=8,
    )
    callback = PassAtKCallback(engine="vllm", n=2, max_new_tokens=8, batch_size=4, output_dir=str(tmp_path / "pk"))
    seen: dict[str, bool] = {}

    class Watch(L.Callback):
        def on_train_end(self, trainer: L.Trainer, pl_module: GRPOModule) -> None:
            seen["shared"] = pl_module.engine is not None and callback.engine is pl_module.engine

    _trainer(tmp_path, max_steps=1, callbacks=[callback, Watch()]).fit(module, _data(medmnist))
    assert seen == {"shared": True} and not callback._owns_engine
    summary = json.loads((tmp_path / "pk" / "before_training" / "summary.json").read_text())
    assert summary["metrics"]["all"]["questions"] > 0


@pytest.mark.slow  # vLLM starts in about 30 s on CPU; 20 steps take about a minute
def test_twenty_vllm_steps_with_tis_log_every_diagnostic(tiny_dir, medmnist, toy_rewards, tmp_path):
    from medrl.rl.rewards import load_reward

    module = _module(
        tiny_dir,
        engine="vllm",
        engine_options={"max_model_len": 512, "kv_cache_gib": 0.25},
        mismatch_correction="tis",
        num_generations=4,
        max_completion_length=16,
        lr=5e-3,
        micro_batch_size=16,
        rewards={"accuracy": 1.0, toy_rewards: 1.0},
        log_completions_every=5,
        log_completions_prompts=2,
    )
    _trainer(tmp_path, max_steps=20).fit(module, _data(medmnist, batch_size=2, train_samples=64))
    rows = [r for r in _metrics(tmp_path) if r.get("train/loss")]
    assert len(rows) == 20
    for key in ("train/clip_fraction_low", "train/clip_fraction_high", "train/ratio_mean", "train/ratio_min",
                "train/ratio_max", "train/approx_kl", "train/entropy", "train/engine_logprob_diff",
                "train/engine_logprob_diff_max", "train/engine_outside_band", "completion/length",
                "completion/length_max", "completion/truncated", "groups/no_signal", "reward/std"):  # fmt: skip
        assert all(r.get(key, "") != "" for r in rows), key
    # vLLM's and the trainer's fp32 log-probs of tiny differ by float noise only: the band is never left.
    assert all(float(r["train/engine_logprob_diff"]) < 1e-2 for r in rows)
    tables = sorted((tmp_path / "logs" / "completions").glob("step_*.jsonl"))
    assert [t.name for t in tables] == [f"step_{s:06d}.jsonl" for s in (5, 10, 15, 20)]
    fn = load_reward(toy_rewards)
    for table in tables:
        lines = [json.loads(line) for line in table.read_text().splitlines()]
        again = fn(completions=[line["completion"] for line in lines])
        assert again == pytest.approx([line["rewards"][toy_rewards] for line in lines])


@pytest.mark.slow  # two spawned processes: 1-2 minutes on 2 busy cores
def test_ddp_on_two_processes(tiny_dir, medmnist, toy_rewards, tmp_path):
    # Manual optimization under DDP: several backward passes per step, the non-finite flags and the dapo token
    # count agreed across processes, and both ranks stepping in lockstep.
    module = _module(tiny_dir, rewards={"accuracy": 1.0, toy_rewards: 1.0}, loss_aggregation="dapo", micro_batch_size=4)
    before = _trained(module)
    _trainer(tmp_path, max_steps=2, strategy="ddp_spawn", devices=2).fit(module, _data(medmnist))
    # ddp_spawn hands rank 0's weights back to this process (its loop state stays in the workers).
    assert any(not torch.equal(before[n], p) for n, p in _trained(module).items())
    rows = [r for r in _metrics(tmp_path) if r.get("time/update")]
    assert len(rows) == 2 and all(float(r["train/skipped_nonfinite"]) == 0 for r in rows)


def test_dynamic_sampling_drops_flat_groups_refills_and_checkpoints_its_buffer(tiny_dir, medmnist) -> None:
    module = _module(tiny_dir, care=False, dynamic_sampling=True, max_sampling_rounds=3)
    processor = module.processor
    items = [_data(medmnist).dataset("train")[i] for i in range(2)]

    def batch(rewards: list[float]) -> Trajectory:
        texts = [["a", "b", "c", "d"], ["e", "f", "g", "h"]]
        traj = build_trajectory(processor, items, _fake_results(processor.tokenizer, texts))
        traj.rewards = torch.tensor(rewards, dtype=torch.float32)
        return traj

    # Batch 1: group 0 is flat (no signal) and is dropped; group 1 is kept; 1 of the 2 prompts needed: wait.
    ready, metrics = module.step().advantage(batch([1, 1, 1, 1, 0, 1, 0, 0]), 2, module.buffer)
    assert ready is None and metrics["sampling/waiting"] == 1.0
    assert metrics["sampling/kept_groups"] == 0.5 and len(module.buffer.parts) == 1 and module.buffer.rounds == 1
    # The waiting buffer survives a checkpoint.
    checkpoint = {"state_dict": {k: v for k, v in module.state_dict().items()}}
    module.on_save_checkpoint(checkpoint)
    other = _module(tiny_dir, care=False, dynamic_sampling=True, max_sampling_rounds=3)
    other.on_load_checkpoint(checkpoint)
    assert len(other.buffer.parts) == 1 and other.buffer.parts[0].texts == ["e", "f", "g", "h"]
    assert other.buffer.rounds == 1
    # Batch 2 brings two more signal groups: the batch is full (2 groups), the surplus is dropped.
    merged, metrics = other.step().advantage(batch([0, 1, 0, 0, 2, 0, 0, 0]), 2, other.buffer)
    assert merged is not None and merged.num_groups == 2 and other.buffer.parts == [] and other.buffer.rounds == 0
    assert merged.texts == ["e", "f", "g", "h", "a", "b", "c", "d"]
    # Advantages come from each sample's own group: (0, 1, 0, 0) -> mean 0.25, std 0.5 -> 1.4997 / -0.4999.
    expected = [-0.25 / 0.5001, 0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001]
    assert merged.advantages[4:].tolist() == pytest.approx(expected)


@pytest.mark.parametrize("kl_reference", ["initial", "ema"])
def test_kl_reference_for_full_finetuning(tiny_dir, medmnist, toy_rewards, tmp_path, kl_reference):
    # On the first of two passes the policy equals both references (KL 0); on the second it has moved.
    module = _module(tiny_dir, rewards={toy_rewards: 1.0}, care=False, beta=0.1, mu=2, kl_reference=kl_reference)
    _trainer(tmp_path, max_steps=2).fit(module, _data(medmnist))
    rows = [r for r in _metrics(tmp_path) if r.get("train/kl")]
    assert len(rows) == 1 and float(rows[0]["train/kl"]) > 0
    assert (module._reference_model is not None) == (kl_reference == "initial")
