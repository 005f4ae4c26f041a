"""``vllm``: vLLM's offline ``LLM``, colocated with training, with the policy's weights pushed in place.

vLLM runs in the calling process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): its engine core and its single
worker are plain objects here, so :meth:`VLLMEngine.load_weights` hands the policy's tensors straight to
the vLLM model's own ``load_weights`` through ``LLM.apply_model`` -- no disk, no pickling, no second copy
in another process. With multiprocessing on (vLLM's default), the model lives in a spawned engine
process and every push would serialise the full weights through a socket, and ``apply_model`` would
need ``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` to ship the loading function at all.

Each question is one request with ``SamplingParams(n=...)``: vLLM processes the image and the prompt
once and forks the ``n`` samples from the cached prefix. The greedy completion is a second request in
the same ``generate`` call.
"""

from __future__ import annotations

import copy
import gc
import os
import random
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medrl.core.dtypes import dtype_name, resolve_dtype
from medrl.core.seeds import derive_seed
from medrl.data.collate import item_images
from medrl.models.families import family_of, family_of_folder
from medrl.rollout.decoding import banned_token_ids, end_token_ids, finish_completion, prompt_texts
from medrl.rollout.engine import Engine
from medrl.rollout.types import Item, PromptResult, SamplingParams


def _request_seed(seed: int, index: int) -> int:
    """A seed per prompt: vLLM gives the i-th of n samples ``seed + i``, so prompts need spread-out seeds,
    or sample j of every question would share one random stream."""
    return derive_seed([seed, index])


def _save_policy(model: torch.nn.Module, processor: Any, folder: Path) -> None:
    """Save an in-memory policy (merged, if PEFT) with its processor, for vLLM to start from.

    vLLM's ``load_format="dummy"`` would avoid the write, but it also randomises persistent buffers that
    no checkpoint carries (a fused image normalisation, in one family's tower), which a later weight push
    cannot repair.
    Weights go through safetensors directly: ``save_pretrained`` writes nothing on ranks other than 0 once
    ``torch.distributed`` is initialised, and every rank needs its own copy here.
    """
    from safetensors.torch import save_file

    from medrl.rollout.weights import policy_weights

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    family = family_of(base)
    state, seen = {}, set()
    for name, tensor in policy_weights(model):
        if tensor.data_ptr() in seen:  # tied weights (lm_head = embeddings): the config says to tie them
            continue
        seen.add(tensor.data_ptr())
        state[family.vllm_name(name)] = tensor.detach().contiguous().cpu()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(base.config)
    # vLLM picks its model class from `architectures`, which only from_pretrained/save_pretrained fill in.
    config.architectures = config.architectures or [type(base).__name__]
    config.save_pretrained(folder)
    if getattr(base, "generation_config", None) is not None:
        base.generation_config.save_pretrained(folder)
    processor.save_pretrained(folder)


def _renamed_copy(path: Path) -> Path | None:
    """A temporary copy of ``path``'s checkpoint with its family's vLLM names, if any name needs it (a folder
    ``save_pretrained`` wrote for Gemma 3); None, writing nothing, when vLLM can load ``path`` as it is."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    family = family_of_folder(path)
    files = sorted(path.glob("*.safetensors"))
    if not family.vllm_renames or not files:
        return None
    with safe_open(str(files[0]), framework="pt") as fh:
        if all(family.vllm_name(key) == key for key in fh.keys()):
            return None
    folder = Path(tempfile.mkdtemp(prefix="medrl-vllm-"))
    for item in path.iterdir():
        if item.is_file() and item.suffix != ".safetensors":
            shutil.copy2(item, folder / item.name)
    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            state = {family.vllm_name(key): fh.get_tensor(key) for key in fh.keys()}
        save_file(state, str(folder / file.name), metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        import json

        data = json.loads(index.read_text())
        data["weight_map"] = {family.vllm_name(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data))
    return folder


def gpu_switches(
    on_gpu: bool, enforce_eager: bool | None, sleep_mode: bool | None, max_num_batched_tokens: int | None
) -> dict[str, Any]:
    """vLLM's memory and speed switches, their null defaults resolved for the device: CUDA graphs and sleep
    mode on a GPU; eager and no sleep mode on a CPU, where graphs need Triton and there is nothing to free.

    >>> gpu_switches(False, None, None, None)
    {'enforce_eager': True}
    >>> gpu_switches(True, None, None, 8192)
    {'enforce_eager': False, 'enable_sleep_mode': True, 'max_num_batched_tokens': 8192}
    """
    out: dict[str, Any] = {"enforce_eager": (not on_gpu) if enforce_eager is None else enforce_eager}
    if on_gpu if sleep_mode is None else sleep_mode:
        out["enable_sleep_mode"] = True
    if max_num_batched_tokens is not None:
        out["max_num_batched_tokens"] = max_num_batched_tokens
    return out


class VLLMEngine(Engine):
    """vLLM offline inference in this process, with in-place weight updates from the training policy.

    Args:
        model: a model argument (``tiny``, a folder, a hub id), or the in-memory policy (full or PEFT),
            which is saved once to a temporary folder for vLLM to start from; later updates go in place.
        processor: the model's processor; required with an in-memory model, else loaded from the folder.
        dtype: weight dtype in vLLM (``auto``: the policy's dtype, else fp32 on CPU and bf16 on GPU).
        max_model_len: longest prompt + completion in tokens.
        kv_cache_gib: KV-cache size on CPU, in GiB (vLLM's ``kv_cache_memory_bytes``).
        gpu_memory_utilization: share of GPU memory vLLM may take on GPU (leave room for training).
        max_num_seqs: most sequences decoded together (1024 keeps 64 questions x 16 samples in one batch:
            on CPU with tiny, 1024 instead of 256 made Pass@K sampling 1.7x faster).
        enforce_eager: skip CUDA-graph capture and compilation; null: eager on CPU (required there without
            Triton), graphs on a GPU (decoding without per-step launch overhead; TRL and verl default to them).
        sleep_mode: free vLLM's GPU memory during the update (:meth:`sleep`: weights and KV cache discarded,
            as TRL's ``vllm_enable_sleep_mode`` does at level 2, since new weights are pushed after every step
            anyway); null: on with a GPU, off on CPU (nothing to free there).
        max_num_batched_tokens: tokens vLLM's scheduler processes per step (prefill and decode together);
            null: vLLM's default.
        seed: vLLM's engine seed.
        max_images: the most images one prompt may carry (vLLM's ``limit_mm_per_prompt``; it sizes the
            encoder cache for that many, so the commands set it from their data).
        image_options: the family's image-processor settings (``max_pixels``, ``do_image_splitting``, ...),
            for a model argument; an in-memory policy's processor already carries its own.
    """

    name = "vllm"

    def __init__(
        self,
        model: str | os.PathLike | torch.nn.Module = "tiny",
        processor: Any = None,
        dtype: str = "auto",
        max_model_len: int = 2048,
        kv_cache_gib: float = 1.0,
        gpu_memory_utilization: float = 0.3,
        max_num_seqs: int = 1024,
        enforce_eager: bool | None = None,
        sleep_mode: bool | None = None,
        max_num_batched_tokens: int | None = None,
        seed: int = 0,
        max_images: int = 1,
        image_options: dict[str, Any] | None = None,
    ) -> None:
        from medrl.models.hub import load_processor, resolve_model

        self._tmp: Path | None = None
        self._shares_process_group = False
        policy = model if isinstance(model, torch.nn.Module) else None
        if policy is not None:
            if processor is None:
                raise ValueError("VLLMEngine(model=<in-memory model>) needs its processor")
            self._tmp = Path(tempfile.mkdtemp(prefix="medrl-vllm-"))
            _save_policy(policy, processor, self._tmp)
            path = self._tmp
            param_dtype = next(policy.parameters()).dtype
        else:
            path = resolve_model(model)
            processor = processor or load_processor(path, image_options)
            param_dtype = None
            self._tmp = _renamed_copy(path)
            path = self._tmp or path
        self.family = family_of_folder(path)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.end_ids = end_token_ids(self.tokenizer)
        self.banned = banned_token_ids(self.tokenizer)
        on_gpu = torch.cuda.is_available()
        if dtype == "auto":
            dtype = dtype_name(param_dtype or resolve_dtype("auto"))  # an in-memory policy's own dtype first
        switches = gpu_switches(on_gpu, enforce_eager, sleep_mode, max_num_batched_tokens)
        self.sleep_mode = bool(switches.get("enable_sleep_mode"))
        self._asleep = False
        kwargs: dict[str, Any] = dict(
            model=str(path),
            dtype=dtype,
            max_model_len=max_model_len,
            limit_mm_per_prompt={"image": max(1, max_images)},
            max_num_seqs=max_num_seqs,
            seed=seed,
            disable_log_stats=True,
            **switches,
        )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                # Under DDP every rank runs its own vLLM (tensor parallel 1). vLLM would otherwise adopt the
                # training process group as its world and refuse a size it did not expect; the external
                # launcher mode takes rank and world from the environment and keeps one replica per rank.
                os.environ.setdefault("RANK", str(torch.distributed.get_rank()))
                os.environ.setdefault("WORLD_SIZE", str(torch.distributed.get_world_size()))
                os.environ.setdefault("LOCAL_RANK", str(torch.distributed.get_rank()))
                kwargs["distributed_executor_backend"] = "external_launcher"
                self._shares_process_group = True
        if on_gpu:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 1024**3)
            # A prompt split across scheduler steps makes vLLM rewind the request's seeded generator, which
            # CPU generators cannot do ("CPU Generator does not use offset"): on CPU, never split a prompt.
            kwargs["enable_chunked_prefill"] = False
        if image_options:  # vLLM runs the family's HF processor itself: same settings as the trainer's
            kwargs["mm_processor_kwargs"] = dict(image_options)
        self.max_images = max(1, max_images)
        self.llm = self._start(kwargs)

    @staticmethod
    def _start(kwargs: dict[str, Any]):
        from vllm import LLM

        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the model must live here for in-place pushes
        # vLLM's CPU worker replaces torch.set_num_threads with a warning for the rest of the process, and
        # vLLM seeds the global RNGs: both would leak into training code running in this process.
        set_num_threads = torch.set_num_threads
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                return LLM(**kwargs)
        finally:
            torch.set_num_threads = set_num_threads
            random.setstate(py_state)
            np.random.set_state(np_state)

    def _vllm_params(self, params: SamplingParams, index: int, greedy: bool):
        from vllm import SamplingParams as VSamplingParams

        common: dict[str, Any] = dict(
            max_tokens=params.max_new_tokens,
            stop=list(params.stop) or None,
            include_stop_str_in_output=True,  # same text convention as the HF engine
            stop_token_ids=self.end_ids,
            bad_words=[self.tokenizer.convert_ids_to_tokens(i) for i in self.banned] or None,
            logprobs=0 if params.logprobs else None,  # 0: only the sampled token's log-prob
            skip_special_tokens=True,
        )
        if greedy:
            return VSamplingParams(n=1, temperature=0.0, **common)
        seed = None if params.seed is None else _request_seed(params.seed, index)
        return VSamplingParams(
            n=params.n, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, seed=seed, **common
        )

    def sleep(self) -> None:
        """Free vLLM's GPU memory for the update (sleep mode only): weights and KV cache are discarded; the
        next :meth:`load_weights` brings the weights back, the next :meth:`generate` the KV cache."""
        if self.sleep_mode and not self._asleep:
            self.llm.sleep(level=2)
            self._asleep = True

    def _wake(self, tags: list[str]) -> None:
        if self._asleep:
            self.llm.wake_up(tags=tags)
            self._asleep = "kv_cache" not in tags  # waking the cache last means fully awake

    def generate(self, items: Sequence[Item], params: SamplingParams) -> list[PromptResult]:
        """See :meth:`Engine.generate`. One vLLM ``generate`` call for every prompt, sample and greedy."""
        self._wake(["kv_cache"])
        items = list(items)
        texts = prompt_texts(self.processor, items)
        requests, sampling, owners = [], [], []
        for i, (text, item) in enumerate(zip(texts, items, strict=True)):
            images = item_images(item)
            if len(images) > self.max_images:
                raise ValueError(f"a prompt has {len(images)} images but this engine was started for at most "
                                 f"{self.max_images}: start it with max_images={len(images)}")  # fmt: skip
            request: dict[str, Any] = {"prompt": text}
            if images:
                request["multi_modal_data"] = {"image": images[0] if len(images) == 1 else images}
            if params.n > 0:
                requests.append(request)
                sampling.append(self._vllm_params(params, i, greedy=False))
                owners.append((i, False))
            if params.greedy:
                requests.append(request)
                sampling.append(self._vllm_params(params, i, greedy=True))
                owners.append((i, True))
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        results = [PromptResult(prompt=t) for t in texts]
        for (i, is_greedy), output in zip(owners, outputs, strict=True):
            completions = []
            for sample in sorted(output.outputs, key=lambda o: o.index):
                lps = None
                if params.logprobs and sample.logprobs is not None:
                    lps = [step[tid].logprob for step, tid in zip(sample.logprobs, sample.token_ids, strict=True)]
                # Re-decode with the HF tokenizer so both engines produce identical text for identical ids.
                completions.append(
                    finish_completion(self.tokenizer, list(sample.token_ids), self.end_ids, params.stop, lps)
                )
            if is_greedy:
                results[i].greedy = completions[0]
            else:
                results[i].samples = completions
        return results

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy a full set of HF-named weights into vLLM's model in place.

        Goes through the worker's ``reload_weights`` rather than the model's ``load_weights``: after the
        first load vLLM repacks some weights into kernel layouts (on CPU, the linear layers) and drops
        their loaders, so a second plain ``load_weights`` fails. ``reload_weights`` restores the checkpoint
        layout, lets the model map HF names (``model.language_model.*``, ``model.visual.*``) and fuse
        q/k/v and gate/up as it copies, and repacks. It clears only the worker's side of the vision
        caches, so the scheduler's encoder cache and the front end's multi-modal cache are cleared here
        too (else the next image request fails with "Encoder cache miss"), and so are the cached KV
        prefixes, which were computed with the old weights.
        """
        batch = [(self.family.vllm_name(name), tensor) for name, tensor in weights]
        if not batch:
            raise ValueError("no weights to load")
        self._wake(["weights"])  # the weights' memory first; the KV cache waits for the next generate
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": batch, "is_checkpoint_format": True})
        engine = self.llm.llm_engine
        engine.reset_encoder_cache()
        engine.reset_mm_cache()
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Shut vLLM down and remove the skeleton folder of an in-memory model."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            client = llm.llm_engine.engine_core  # in process: vLLM's InprocClient
            if self._shares_process_group:
                # EngineCore.shutdown ends by destroying torch.distributed's world group, which under DDP is
                # the training's own: shut the worker and scheduler down by hand, and keep vLLM's collection
                # finalizer (the same shutdown) from running later.
                finalizer = getattr(client, "_finalizer", None)
                if finalizer is not None:
                    finalizer.detach()
                core = client.engine_core
                core.model_executor.shutdown()
                core.scheduler.shutdown()
                gc.unfreeze()  # EngineCore freezes the startup heap; its shutdown would undo that
            else:
                client.shutdown()
            self.llm = None
            gc.collect()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
