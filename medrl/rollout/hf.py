"""``hf``: transformers ``generate`` on the policy in memory, batched over prompts and samples.

Each ``generate`` call carries a chunk of prompts with all ``n`` samples of each prompt, left-padded.
The vision tower and the prompt prefill run once per prompt, not once per sample: the engine prefills
each prompt but its last token itself, copies that cache ``n`` times and lets ``generate`` go on from it,
so the decode loop runs once per chunk. (``num_return_sequences=n`` would prefill every copy: at 19M
parameters, 16 prompts x 16 samples, that prefill took 54 % of the call.) The copies' cache has room
reserved for the completion, so each step appends in place rather than copying the cache. The copies'
tokens equal ``num_return_sequences``' under the same seed, for every family. Greedy completions take a second call
with ``do_sample=False``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from medrl.data.collate import item_images
from medrl.rollout.decoding import banned_token_ids, end_token_ids, finish_completion, prompt_texts
from medrl.rollout.engine import Engine
from medrl.rollout.kv_cache import reserve_room
from medrl.rollout.types import Completion, Item, PromptResult, SamplingParams

# Generation settings a checkpoint's generation_config.json may carry (instruct checkpoints ship e.g.
# repetition_penalty 1.05, top_k 1, top_p 0.001, temperature 0.1): transformers fills every field left
# None from the checkpoint, so each one that reshapes the distribution is pinned to its neutral value.
_NEUTRAL = {
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "min_new_tokens": 0,
    "num_beams": 1,
}


class _RecordAndBan(LogitsProcessor):
    """Records raw log-probs of the chosen tokens (optional) and bans the vision placeholders.

    It runs before transformers' temperature/top-k/top-p warpers (custom processors are merged ahead of
    them), so the recorded log-probs are those of the unmodified distribution. Only one step's
    distribution is held at a time: a step's chosen token is read from ``input_ids`` on the next call.
    """

    def __init__(self, banned: list[int], record: bool) -> None:
        self.banned, self.record = banned, record
        self.previous: torch.Tensor | None = None  # [N, V] log-softmax of the last step
        self.steps: list[torch.Tensor] = []  # each [N]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.record:
            if self.previous is not None:
                self.steps.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
            self.previous = torch.log_softmax(scores.float(), dim=-1)
        if self.banned:
            scores = scores.clone()
            scores[:, self.banned] = float("-inf")
        return scores

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        """``[N, T]`` log-probs once generation is over; ``last_tokens`` ``[N]`` is the final step's choice."""
        if self.previous is not None:
            self.steps.append(self.previous.gather(1, last_tokens[:, None]).squeeze(1))
        return torch.stack(self.steps, dim=1)


class HFEngine(Engine):
    """Batched transformers generation on an in-memory VLM (the policy itself when colocated).

    Args:
        model: a transformers VLM of any supported family, or a PEFT model wrapping one.
        processor: its processor (tokenizer, image processor, chat template).
        max_batch_sequences: most sequences (prompts x samples) per ``generate`` call; bounds memory.
    """

    name = "hf"

    def __init__(self, model: torch.nn.Module, processor: Any, max_batch_sequences: int = 256) -> None:
        if max_batch_sequences < 1:
            raise ValueError(f"max_batch_sequences must be >= 1, got {max_batch_sequences}")
        self.model, self.processor = model, processor
        self.tokenizer = processor.tokenizer
        self.max_batch_sequences = max_batch_sequences
        extra = model.generation_config.eos_token_id if hasattr(model, "generation_config") else None
        extra_ids = extra if isinstance(extra, list) else [extra] if isinstance(extra, int) else []
        self.end_ids = end_token_ids(self.tokenizer, extra_ids)
        self.banned = banned_token_ids(self.tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _inputs(self, texts: list[str], items: Sequence[Item]) -> dict[str, torch.Tensor]:
        images = [item_images(item) for item in items]
        if not any(images):
            images_arg = None
        elif not all(images):
            missing = [i for i, img in enumerate(images) if not img]
            raise ValueError(f"items {missing} have no image while others do: one call takes all-image or no-image")
        else:
            images_arg = images
        # Left padding, so the prompts' ends line up for batched decoding (asked per call: the processor is
        # shared with training code that may pad the other way).
        batch = self.processor(text=texts, images=images_arg, return_tensors="pt", padding=True, padding_side="left")
        dtype = next(self.model.parameters()).dtype
        out = {}
        for key, value in batch.items():
            value = value.to(self.device)
            out[key] = value.to(dtype) if value.is_floating_point() else value
        return out

    def _config(self, params: SamplingParams, sample: bool) -> GenerationConfig:
        kwargs: dict[str, Any] = dict(
            _NEUTRAL,
            max_new_tokens=params.max_new_tokens,
            eos_token_id=self.end_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            use_cache=True,
        )
        if sample:
            kwargs.update(
                do_sample=True,
                num_return_sequences=params.n,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k,
            )
        else:  # do_sample=False ignores the warpers, so the checkpoint's sampling defaults cannot act
            kwargs.update(do_sample=False, num_return_sequences=1)
        if params.stop:
            kwargs["stop_strings"] = list(params.stop)
        return GenerationConfig(**kwargs)

    def _shared_prefill(self, inputs: dict[str, torch.Tensor], n: int, new_tokens: int) -> dict[str, Any]:
        """``generate``'s inputs for ``n`` copies of each prompt, its prefix already in a shared-then-copied cache.

        The prefill covers every prompt token but the last (images included), once per prompt; ``generate``
        then feeds the last token of each copy and samples from there, so the first sampled token goes
        through the same logits processors as every other. The copies' cache keeps room for ``new_tokens``
        (:mod:`medrl.rollout.kv_cache`), so decoding appends in place instead of copying it every step.
        """
        ids = inputs["input_ids"]
        # Every per-token tensor (mask, token types) is cut with the ids; images and grids go in whole.
        head = {k: v[:, :-1] if v.dim() >= 2 and v.shape[:2] == ids.shape else v for k, v in inputs.items()}
        cache = self.model(**head, use_cache=True, logits_to_keep=1).past_key_values
        cache.batch_repeat_interleave(n)
        reserve_room(cache, new_tokens + 1)  # + the prompt's last token, fed by generate
        # Qwen-VL keeps the prompt's multimodal rotary offsets (one per prompt) for decoding: one per copy now.
        for module in self.model.modules():
            if isinstance(getattr(module, "rope_deltas", None), torch.Tensor):
                module.rope_deltas = module.rope_deltas.repeat_interleave(n, dim=0)
        tail = {k: inputs[k].repeat_interleave(n, dim=0) for k in ("input_ids", "attention_mask") if k in inputs}
        return {**tail, "past_key_values": cache}

    def _run(self, texts: list[str], items: Sequence[Item], params: SamplingParams, sample: bool) -> list[Completion]:
        """``[len(texts) * k]`` completions, prompt-major (k = n when sampling, 1 when greedy)."""
        inputs = self._inputs(texts, items)
        recorder = _RecordAndBan(self.banned, record=params.logprobs)
        extra: dict[str, Any] = {"tokenizer": self.tokenizer} if params.stop else {}
        config = self._config(params, sample)
        if sample and params.n > 1 and inputs["input_ids"].shape[1] > 1:
            inputs, config.num_return_sequences = self._shared_prefill(inputs, params.n, params.max_new_tokens), 1
        out = self.model.generate(
            **inputs,
            generation_config=config,
            logits_processor=LogitsProcessorList([recorder]),
            **extra,
        )
        generated = out[:, inputs["input_ids"].shape[1] :]  # [N, T] with N = prompts x k
        logprobs = recorder.finish(generated[:, -1]) if params.logprobs else None  # [N, T]
        completions = []
        for row in range(generated.shape[0]):
            lp = None if logprobs is None else logprobs[row].tolist()
            completions.append(
                finish_completion(self.tokenizer, generated[row].tolist(), self.end_ids, params.stop, lp)
            )
        return completions

    def generate(self, items: Sequence[Item], params: SamplingParams) -> list[PromptResult]:
        """See :meth:`Engine.generate`. One ``generate`` call per chunk of prompts, all samples included."""
        items = list(items)
        texts = prompt_texts(self.processor, items)
        results = [PromptResult(prompt=t) for t in texts]
        per_call = max(1, self.max_batch_sequences // max(params.n, 1))
        was_training = self.model.training
        self.model.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=devices, enabled=params.seed is not None):
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                for start in range(0, len(items), per_call):
                    chunk = slice(start, start + per_call)
                    if params.n > 0:
                        samples = self._run(texts[chunk], items[chunk], params, sample=True)
                        for offset, result in enumerate(results[chunk]):
                            result.samples = samples[offset * params.n : (offset + 1) * params.n]
                    if params.greedy:
                        greedy = self._run(texts[chunk], items[chunk], params, sample=False)
                        for result, completion in zip(results[chunk], greedy, strict=True):
                            result.greedy = completion
        finally:
            self.model.train(was_training)
        return results

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy ``(name, tensor)`` pairs into the engine's model in place (names as in its ``state_dict``)."""
        state = self.model.state_dict()
        with torch.no_grad():
            for name, tensor in weights:
                if name not in state:
                    raise KeyError(f"weight {name!r} is not in the engine's model ({type(self.model).__name__})")
                state[name].copy_(tensor)

    def sync(self, policy: torch.nn.Module) -> None:
        """No-op when the engine generates with ``policy`` itself (it shares its memory); else copy weights."""
        if policy is self.model:
            return
        super().sync(policy)
