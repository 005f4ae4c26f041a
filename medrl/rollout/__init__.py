"""Rollout engines behind one interface: ``hf`` (transformers generate) and ``vllm`` (colocated vLLM)."""

from medrl.rollout.base import Completion, Engine, PolicyModule, PromptResult, SamplingParams, make_engine

__all__ = ["Completion", "Engine", "PolicyModule", "PromptResult", "SamplingParams", "make_engine"]
