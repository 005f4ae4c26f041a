"""The ``hf`` engine on the tiny VLM and real PneumoniaMNIST items: batching, seeds, stops, bans, log-probs."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import pytest
import torch

from medrl.data.medmnist import MedMNISTDataModule
from medrl.models.families.qwen_vl import VISION_PLACEHOLDERS
from medrl.rollout import SamplingParams, make_engine
from medrl.rollout.decoding import end_token_ids, prompt_texts
from medrl.rollout.hf import HFEngine
from medrl.rollout.types import Completion
from medrl.rollout.weights import policy_weights


@pytest.fixture(scope="module")
def items(medmnist) -> list[dict]:
    ds = MedMNISTDataModule(flag="pneumoniamnist", mode="vqa", **medmnist.kwargs(), val_samples=3).dataset("val")
    out = [ds[i] for i in range(3)]
    # A longer prompt, so the batch really needs left padding.
    long = dict(out[2])
    long["messages"] = copy.deepcopy(long["messages"])
    long["messages"][-1]["content"][1]["text"] = "Look closely at the lung fields. " + long["prompt"]
    return [out[0], out[1], long]


@pytest.fixture(scope="module")
def engine(tiny) -> HFEngine:
    model, processor = tiny
    return make_engine("hf", model, processor)


def pad_completions(
    completions: Sequence[Completion], pad_id: int, max_len: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Right-pad completions into tensors for a loss.

    Returns:
        ``(ids [N, T] long, mask [N, T] bool, logprobs [N, T] float32 or None)`` where ``N`` is
        ``len(completions)`` and ``T`` the longest completion (or ``max_len``); padding has mask False and
        log-prob 0. Log-probs are returned only when every completion carries them.
    """
    if not completions:
        raise ValueError("no completions to pad")
    width = max_len if max_len is not None else max(max(len(c) for c in completions), 1)
    ids = torch.full((len(completions), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(completions), width), dtype=torch.bool)
    has_lp = all(c.logprobs is not None for c in completions)
    logprobs = torch.zeros((len(completions), width), dtype=torch.float32) if has_lp else None
    for row, c in enumerate(completions):
        length = min(len(c), width)
        ids[row, :length] = torch.tensor(c.token_ids[:length], dtype=torch.long)
        mask[row, :length] = True
        if logprobs is not None:
            logprobs[row, :length] = torch.tensor(c.logprobs[:length], dtype=torch.float32)  # type: ignore[index]
    return ids, mask, logprobs


def test_samples_and_greedy_follow_the_conventions(engine: HFEngine, items: list[dict]) -> None:
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=12, greedy=True, logprobs=True, seed=0)
    results = engine.generate(items, params)
    assert len(results) == len(items)
    ends = set(end_token_ids(engine.tokenizer))
    placeholders = set(engine.tokenizer.convert_tokens_to_ids(VISION_PLACEHOLDERS))
    for result in results:
        assert len(result.samples) == 3 and result.greedy is not None
        assert result.prompt.endswith("<|im_start|>assistant\n")
        for c in [*result.samples, result.greedy]:
            assert 1 <= len(c.token_ids) <= 12 and len(c.logprobs) == len(c.token_ids)
            assert not placeholders & set(c.token_ids)
            if c.finish_reason == "length":
                assert len(c.token_ids) == 12 and not ends & set(c.token_ids)
            else:  # stopped on an end token: it is the last token and kept
                assert c.token_ids[-1] in ends and not ends & set(c.token_ids[:-1])
            assert c.text == engine.tokenizer.decode(c.token_ids, skip_special_tokens=True)
            assert all(lp <= 0 for lp in c.logprobs)
    ids, mask, logprobs = pad_completions(results[0].samples, pad_id=engine.tokenizer.pad_token_id)
    assert ids.shape == mask.shape == logprobs.shape == (3, max(len(c) for c in results[0].samples))


def test_one_generate_call_holds_every_prompt_and_sample(engine: HFEngine, items: list[dict]) -> None:
    calls: list[tuple[int, int]] = []
    real_generate = engine.model.generate

    def counting_generate(**kwargs):
        cached = kwargs.get("past_key_values")
        prefix = 0 if cached is None else cached.get_seq_length()
        calls.append((kwargs["input_ids"].shape[0], kwargs["generation_config"].num_return_sequences, prefix))
        return real_generate(**kwargs)

    engine.model.generate = counting_generate
    try:
        engine.generate(items, SamplingParams(n=4, max_new_tokens=4, greedy=True))
    finally:
        del engine.model.generate  # back to the class's method
    # One sampling call with 3 prompts x 4 samples, their prompts but the last token already in the cache (the
    # prefill ran once per prompt), and one greedy call with 3 prompts: no loop over samples.
    width = engine._inputs(prompt_texts(engine.processor, items), items)["input_ids"].shape[1]
    assert calls == [(12, 1, width - 1), (3, 1, 0)]


def test_seed_repeats_and_differs(engine: HFEngine, items: list[dict]) -> None:
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=8, seed=7)
    first = [c.token_ids for r in engine.generate(items, params) for c in r.samples]
    again = [c.token_ids for r in engine.generate(items, params) for c in r.samples]
    other = [c.token_ids for r in engine.generate(items, params.with_(seed=8)) for c in r.samples]
    assert first == again
    assert first != other
    assert len({tuple(t) for t in first}) > 1  # samples of one call differ from each other


def test_greedy_is_the_same_batched_or_alone(engine: HFEngine, items: list[dict]) -> None:
    params = SamplingParams(n=0, greedy=True, max_new_tokens=10)
    tokenizer = engine.processor.tokenizer
    tokenizer.padding_side = "right"  # training code may leave it so; the engine asks for left padding itself
    try:
        batched = [r.greedy.token_ids for r in engine.generate(items, params)]
    finally:
        tokenizer.padding_side = "left"
    alone = [engine.generate([item], params)[0].greedy.token_ids for item in items]
    assert batched == alone  # left padding leaves each prompt's continuation unchanged


def test_logprobs_match_a_teacher_forced_forward(engine: HFEngine, items: list[dict]) -> None:
    item = items[2]
    completion = engine.generate([item], SamplingParams(n=1, temperature=0.8, max_new_tokens=10, logprobs=True))
    sample = completion[0].samples[0]
    prompt = engine.processor(text=[completion[0].prompt], images=[item["image"]], return_tensors="pt")
    completion_ids = torch.tensor([sample.token_ids])
    full = torch.cat([prompt["input_ids"], completion_ids], dim=1)
    # mm_token_type_ids marks the image tokens; without it the model gives them text rope positions.
    token_types = torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(completion_ids)], dim=1)
    with torch.no_grad():
        logits = engine.model(
            input_ids=full,
            attention_mask=torch.ones_like(full),
            mm_token_type_ids=token_types,
            pixel_values=prompt["pixel_values"],
            image_grid_thw=prompt["image_grid_thw"],
        ).logits[0]
    start = prompt["input_ids"].shape[1]
    # Raw distribution (temperature 1, no bans): the log-prob of each generated token given its prefix.
    expected = torch.log_softmax(logits[start - 1 : start - 1 + len(sample)], -1)
    expected = expected.gather(1, torch.tensor(sample.token_ids)[:, None]).squeeze(1)
    assert torch.allclose(torch.tensor(sample.logprobs), expected, atol=1e-4)


def test_stop_strings_end_completions(engine: HFEngine, items: list[dict]) -> None:
    results = engine.generate(items, SamplingParams(n=4, temperature=1.0, max_new_tokens=16, stop=(" ",), seed=1))
    stopped = 0
    for c in (c for r in results for c in r.samples):
        if c.finish_reason == "stop" and c.text.endswith(" "):
            stopped += 1
            assert " " not in c.text[:-1]  # cut right after the first stop string
        else:
            assert " " not in c.text
    assert stopped > 0  # the random model emits spaces often: the stop must have acted somewhere


def test_vision_placeholders_are_never_generated(tiny, items: list[dict]) -> None:
    model, processor = tiny
    banned = processor.tokenizer.convert_tokens_to_ids(VISION_PLACEHOLDERS)

    def prefer_placeholders(_module, _inputs, logits):
        logits = logits.clone()
        logits[..., banned] += 100.0  # the model now all but insists on a placeholder
        return logits

    hook = model.lm_head.register_forward_hook(prefer_placeholders)
    try:
        text = processor.apply_chat_template(items[0]["messages"], add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[text], images=[items[0]["image"]], return_tensors="pt")
        raw = model.generate(**inputs, do_sample=False, max_new_tokens=4)[0, inputs["input_ids"].shape[1] :]
        assert set(raw.tolist()) & set(banned)  # without the ban it happens
        params = SamplingParams(n=4, max_new_tokens=6, greedy=True)
        results = make_engine("hf", model, processor).generate(items, params)
    finally:
        hook.remove()
    generated = {t for r in results for c in [*r.samples, r.greedy] for t in c.token_ids}
    assert not generated & set(banned)


def test_bad_sampling_params_are_refused() -> None:
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=0)
    with pytest.raises(ValueError, match="asks for nothing"):
        SamplingParams(n=0)
    assert SamplingParams(stop="</answer>").stop == ("</answer>",)


def test_lora_policy_weights_are_the_merged_weights(tiny) -> None:
    from peft import LoraConfig, get_peft_model

    model, _ = tiny
    # init_lora_weights=False draws B at random too, so the adapter is not a no-op.
    targets = r".*language_model.*\.(q_proj|v_proj)"
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    pushed = dict(policy_weights(peft_model))
    merged = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    assert pushed.keys() == merged.keys() == model.state_dict().keys()
    for name, tensor in merged.items():
        assert torch.allclose(pushed[name], tensor, atol=1e-6), name
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(pushed[q], model.state_dict()[q])  # the adapter really changed the weight


def test_reserved_cache_layer_appends_like_concatenation_and_grows_past_its_room() -> None:
    from transformers.cache_utils import DynamicLayer

    from medrl.rollout.kv_cache import ReservedLayer

    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn(3, 2, 5, 4, generator=gen), torch.randn(3, 2, 5, 4, generator=gen)
    plain = DynamicLayer()
    plain.update(keys, values)
    reserved = ReservedLayer(keys, values, reserve=2)
    for step in range(4):  # two steps within the room, then two past it
        new_k, new_v = torch.randn(3, 2, 1, 4, generator=gen), torch.randn(3, 2, 1, 4, generator=gen)
        want, got = plain.update(new_k, new_v), reserved.update(new_k, new_v)
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1]), step
        assert reserved.get_seq_length() == 6 + step
