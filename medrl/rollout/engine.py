"""The generation interface every rollout engine implements.

An engine takes a batch of VQA items (an image and chat messages, as ``MedMNISTDataModule(mode="vqa")``
yields them) and returns, for each prompt, ``n`` sampled completions and optionally one greedy completion.
Two engines implement it: :class:`medrl.rollout.hf.HFEngine` (transformers ``generate`` on the policy in
memory) and :class:`medrl.rollout.vllm.VLLMEngine` (vLLM's offline ``LLM``, colocated, weights pushed in
place). Callers (the Pass@K callback, the GRPO module, the evaluation verbs) see this module and
:mod:`medrl.rollout.types`; :func:`medrl.rollout.factory.open_engine` builds either engine.

Conventions shared by both engines, so their outputs are interchangeable:

- ``token_ids`` are the generated tokens only (no prompt), and include the end-of-turn token when the
  completion stopped on it (``finish_reason == "stop"``), so a policy-gradient loss can teach stopping.
- ``text`` is ``token_ids`` decoded without special tokens; a stop string, when one ended the completion,
  is kept in the text (``</answer>`` as a stop must still parse as an answer).
- ``logprobs[t]`` is ``log p(token_ids[t] | prompt, token_ids[:t])`` under the model's unmodified
  distribution (temperature 1, no top-k/top-p, no token bans): the quantity GRPO's ratio needs, and what
  vLLM reports by default (``logprobs_mode="raw_logprobs"``).
- The vision placeholder tokens (every family's, :mod:`medrl.models.families`) are never generated.
- A fixed ``seed`` makes a call repeatable: the same items, parameters and weights give the same samples.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence

import torch

from medrl.rollout.types import Item, PromptResult, SamplingParams
from medrl.rollout.weights import policy_weights


class Engine(abc.ABC):
    """A rollout engine: prompts in, completions out; weights can be refreshed from the training policy."""

    name: str = "engine"

    @abc.abstractmethod
    def generate(self, items: Sequence[Item], params: SamplingParams) -> list[PromptResult]:
        """Sample ``params.n`` completions (plus a greedy one if asked) for each item.

        Args:
            items: ``[B]`` VQA items; each needs ``"messages"`` and ``"image"``.
            params: sampling parameters for the whole call.

        Returns:
            ``[B]`` results, in the order of ``items``.
        """

    @abc.abstractmethod
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the engine's weights in place with ``(name, tensor)`` pairs named as in the HF model.

        Names follow ``model.state_dict()`` of the transformers model (PEFT prefixes removed); pass the full
        set, as :func:`medrl.rollout.weights.policy_weights` yields it (vLLM reprocesses layer by layer).
        """

    def sync(self, policy: torch.nn.Module) -> None:
        """Make the engine generate with ``policy``'s current weights (call after each optimizer step).

        Full models send every weight; PEFT LoRA models send their merged weights (base + scaled B A)
        without changing the policy. Engines that share the policy's memory override this with a no-op.
        """
        self.load_weights(policy_weights(policy))

    def sleep(self) -> None:  # noqa: B027 - optional hook: only engines holding GPU memory of their own need it
        """Free memory the engine holds while the trainer updates (until the next sync or generate)."""

    def close(self) -> None:  # noqa: B027 - optional hook: only engines holding processes need it
        """Free what the engine holds (processes, caches); the engine is unusable afterwards."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
