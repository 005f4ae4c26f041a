"""Rollout engines behind one interface: ``hf`` (transformers generate) and ``vllm`` (colocated vLLM).

``types`` (what engines speak), ``engine`` (the interface), ``decoding`` (shared decoding helpers),
``factory`` (build one by name or on a model argument), ``hf``, ``vllm``, ``weights`` (policy -> engine).
"""

from medrl.rollout.engine import Engine
from medrl.rollout.factory import make_engine, open_engine
from medrl.rollout.types import Completion, PolicyModule, PromptResult, SamplingParams

__all__ = ["Completion", "Engine", "PolicyModule", "PromptResult", "SamplingParams", "make_engine", "open_engine"]
