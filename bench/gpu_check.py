"""medrl's GPU paths measured in one short command: SFT, GRPO with CARE, FSDP2 and gradient checkpointing.

Random weights at real shapes, built offline: Qwen2.5-VL-3B's configuration with ``--layers`` decoder
layers and vision blocks (the vocabulary is tiny's 1,024 tokens, so a random policy's samples decode),
224 px images (64 image tokens), 512-token completions. Each check writes what it measured and whether
it passed; the whole run writes ``results.json`` and ``results.md`` to ``--out`` (default ``$OUT``).

    python bench/gpu_check.py                        # on the GPU, about 5 minutes on one H200
    python bench/gpu_check.py --device cpu --tiny    # the same checks at toy size on a CPU (the slow suite)

Checks: ``peak`` (the measured matmul rate every MFU is a fraction of: bf16 on GPU, fp32 on CPU), ``sft``
(bf16 steps: tokens/s, MFU, peak memory), ``grpo`` (the hf engine and CARE: seconds per step and stage,
generation tokens/s, update MFU), ``fsdp`` (FSDP2 through Lightning on one device: the same first-step loss
as without it, fp32 both), ``checkpointing`` (gradient checkpointing off/on: peak memory and seconds per
step). A check that fails records its error and the rest still run; the exit code is 1 if any failed.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _sizes(tiny: bool) -> dict[str, int]:
    if tiny:
        return {"image": 56, "completion": 16, "prompts": 2, "generations": 4, "sft_batch": 4, "steps": 2}
    return {"image": 224, "completion": 512, "prompts": 2, "generations": 8, "sft_batch": 8, "steps": 3}


def build_model(tiny: bool, layers: int, folder: Path) -> Path:
    """Save the check's model to ``folder``: tiny, or Qwen2.5-VL-3B's shapes with ``layers`` layers."""
    if tiny:
        from medrl.models.families.qwen_vl import tiny_dir

        return tiny_dir(0, root=folder)
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from medrl.models.families.qwen_vl import build_processor, build_tokenizer, tiny_config

    processor = build_processor(build_tokenizer(), min_pixels=224 * 224, max_pixels=224 * 224)
    config = tiny_config(processor.tokenizer, hidden=2048, layers=layers, vision_hidden=1280, vision_depth=layers)
    text = config.text_config
    text.intermediate_size, text.num_attention_heads, text.num_key_value_heads = 11008, 16, 2
    text.head_dim = 128
    text.max_position_embeddings = 128000
    text.rope_parameters = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}
    vision = config.vision_config
    vision.intermediate_size, vision.num_heads, vision.out_hidden_size = 3420, 16, 2048
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    path = folder / f"qwen2.5-vl-3b-shapes-{layers}l"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def items(n: int, image: int, answer_words: int = 48) -> list[dict[str, Any]]:
    """VQA items in medrl's format: random images, a 4-option question, a reasoning trace and the answer."""
    import numpy as np
    from PIL import Image

    from medrl.data import vqa

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        options = {c: f"finding {c.lower()} {i}" for c in "ABCD"}
        prompt = vqa.format_prompt("What does this image show?", options)
        pixels = rng.integers(0, 255, (image, image, 3), dtype=np.uint8)
        out.append({
            "image": Image.fromarray(pixels), "prompt": prompt, "messages": vqa.chat_messages(prompt),
            "answer": "ABCD"[i % 4], "options": options, "label": i % 4, "index": i, "flag": "synthetic",
            "think": " ".join(["the image shows a finding"] * (answer_words // 5)),
        })  # fmt: skip
    return out


class Peak:
    """The device's measured dense matmul rate (FLOP/s), and memory/timing helpers for either device."""

    def __init__(self, device: str) -> None:
        import torch

        self.device = torch.device(device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.flops = 0.0

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def measure(self) -> dict[str, Any]:
        import torch

        n = 8192 if self.device.type == "cuda" else 1024
        a, b = (torch.randn(n, n, device=self.device, dtype=self.dtype) for _ in range(2))
        for _ in range(3):
            a @ b
        self.sync()
        start, reps = time.perf_counter(), 10
        for _ in range(reps):
            a @ b
        self.sync()
        seconds = (time.perf_counter() - start) / reps
        self.flops = 2 * n**3 / seconds
        return {"n": n, "dtype": str(self.dtype), "tflops": self.flops / 1e12}

    def reset_memory(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory_gib(self) -> float | None:
        import torch

        if self.device.type != "cuda":
            return None  # the CPU has no allocator high-water mark worth quoting
        return torch.cuda.max_memory_allocated(self.device) / 2**30


def _trainer(device: str, steps: int, callbacks: list, **kwargs: Any):
    import lightning as L

    return L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, max_steps=steps, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=0, callbacks=callbacks, **kwargs)  # fmt: skip


def _fit(device: str, steps: int, clock: StepClock, module: Any, loader: Any) -> None:
    """Train ``steps`` steps, in bf16 on a GPU (weights and compute) and fp32 on a CPU."""
    precision = "bf16-true" if device == "cuda" else "32-true"
    _trainer(device, steps, [clock.hook], precision=precision).fit(module, loader)


class StepClock:
    """Each step's wall time, first-step loss and logged metrics."""

    def __init__(self, peak: Peak) -> None:
        import lightning as L

        outer = self

        class Hook(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                peak.sync()
                outer._start = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                peak.sync()
                outer.seconds.append(time.perf_counter() - outer._start)
                if isinstance(outputs, dict) and "loss" in outputs:
                    outer.losses.append(float(outputs["loss"]))
                outer.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})

        self.hook = Hook()
        self.seconds: list[float] = []
        self.losses: list[float] = []
        self.metrics: list[dict[str, float]] = []
        self._start = 0.0


def _sft_module(path: Path, dtype: str, checkpointing: bool = False):
    import torch

    from medrl.lit.sft import SFTModule

    class SFT(SFTModule):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-5)

    return SFT(model=str(path), finetune="full", dtype=dtype, gradient_checkpointing=checkpointing,
               max_completion_tokens=None)  # fmt: skip


def _loader(data: list[dict], batch: int):
    from torch.utils.data import DataLoader

    return DataLoader(data, batch_size=batch, shuffle=False, collate_fn=list)


def _params(module) -> int:
    return sum(p.numel() for p in module.model.parameters())


def check_sft(path: Path, args: argparse.Namespace, peak: Peak, size: dict[str, int]) -> dict[str, Any]:
    """bf16 SFT steps (fp32 on CPU): seconds, tokens/s and MFU (6 x parameters x tokens per second)."""
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    module = _sft_module(path, dtype)
    data = items(size["sft_batch"] * (size["steps"] + 1), size["image"])
    tokens = _tokens(module, data[: size["sft_batch"]])
    clock = StepClock(peak)
    peak.reset_memory()
    precision = "bf16-true" if args.device == "cuda" else "32-true"
    _trainer(args.device, size["steps"] + 1, [clock.hook], precision=precision).fit(
        module, _loader(data, size["sft_batch"])
    )
    timed = clock.seconds[1:]  # the first step compiles kernels and warms the allocator
    per_step = sum(timed) / len(timed)
    rate = tokens / per_step
    return {"steps": len(timed), "seconds_per_step": per_step, "tokens_per_step": tokens, "tokens_per_s": rate,
            "parameters": _params(module), "mfu": 6 * _params(module) * rate / peak.flops,
            "peak_memory_gib": peak.peak_memory_gib(), "loss_first": clock.losses[0],
            "passed": all(map(math.isfinite, clock.losses))}  # fmt: skip


def _tokens(module, batch: list[dict]) -> int:
    """Sequence tokens (prompt, image and answer) of one SFT batch, padding excluded."""
    encoded = module.collator(batch)
    return int(encoded.inputs["attention_mask"].sum())


def check_grpo(path: Path, args: argparse.Namespace, peak: Peak, size: dict[str, int]) -> dict[str, Any]:
    """GRPO with the hf engine and CARE: seconds per step and per stage, generation tokens/s, update MFU."""
    from medrl.lit.grpo import GRPOModule
    from medrl.lit.grpo_args import CareArgs, OptimArgs, SamplingArgs

    group = size["prompts"] * size["generations"]
    module = GRPOModule(
        model=str(path),
        dtype="bfloat16" if args.device == "cuda" else "float32",
        sampling=SamplingArgs(num_generations=size["generations"], max_completion_length=size["completion"]),
        care=CareArgs(enabled=True, ema_every=1),
        optim=OptimArgs(lr=1e-6, micro_batch_size=group // 2, gradient_checkpointing=args.device == "cuda"),
    )
    clock = StepClock(peak)
    peak.reset_memory()
    data = items(size["prompts"] * (size["steps"] + 1), size["image"])
    precision = "bf16-true" if args.device == "cuda" else "32-true"
    _trainer(args.device, size["steps"] + 1, [clock.hook], precision=precision).fit(
        module, _loader(data, size["prompts"])
    )
    timed = clock.metrics[1:]
    stages = {k.removeprefix("time/"): sum(m[k] for m in timed) / len(timed) for k in timed[0] if k.startswith("time/")}
    length = sum(m["completion/length"] for m in timed) / len(timed)
    generated = length * group
    params = _params(module)
    # The update runs forward and backward over every sequence (prompt + completion); ~6 x params per token.
    trained = _tokens_of_rollouts(module, data[: size["prompts"]], group, length)
    return {"steps": len(timed), "seconds_per_step": sum(clock.seconds[1:]) / len(timed), "stages": stages,
            "completion_length": length, "generation_tokens_per_s": generated / stages["generate"],
            "update_mfu": 6 * params * trained / stages["update"] / peak.flops, "parameters": params,
            "peak_memory_gib": peak.peak_memory_gib(),
            "passed": stages["generate"] > 0 and all(math.isfinite(m.get("train/loss", 0.0)) for m in timed),
            }  # fmt: skip


def _tokens_of_rollouts(module, batch: list[dict], group: int, completion: float) -> float:
    from medrl.data.collate import encode_chat

    prompts = encode_chat(module.processor, [b["messages"] for b in batch], [b["image"] for b in batch])
    return float(prompts.inputs["attention_mask"].sum()) * group / len(batch) + completion * group


def check_fsdp(path: Path, args: argparse.Namespace, peak: Peak, size: dict[str, int]) -> dict[str, Any]:
    """FSDP2 through Lightning on one device gives the first step's loss of a plain run (fp32 both)."""
    from medrl.models.sharding import FSDP2Strategy

    data = items(size["sft_batch"], size["image"])
    losses = {}
    for name, strategy in (("plain", "auto"), ("fsdp2", FSDP2Strategy(mixed_precision="none"))):
        clock = StepClock(peak)
        _trainer(args.device, 1, [clock.hook], strategy=strategy, precision="32-true").fit(
            _sft_module(path, "float32"), _loader(data, size["sft_batch"])
        )
        losses[name] = clock.losses[0]
    gap = abs(losses["fsdp2"] - losses["plain"])
    return {**losses, "difference": gap, "passed": gap <= 1e-4 * max(1.0, abs(losses["plain"]))}


def check_checkpointing(path: Path, args: argparse.Namespace, peak: Peak, size: dict[str, int]) -> dict[str, Any]:
    """Gradient checkpointing off and on: peak memory and seconds per SFT step, the same first loss."""
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    data = items(size["sft_batch"] * (size["steps"] + 1), size["image"])
    out: dict[str, Any] = {}
    for on in (False, True):
        clock = StepClock(peak)
        peak.reset_memory()
        _fit(args.device, size["steps"] + 1, clock, _sft_module(path, dtype, on), _loader(data, size["sft_batch"]))
        seconds = sum(clock.seconds[1:]) / size["steps"]
        memory = peak.peak_memory_gib()
        first = clock.losses[0]
        out["on" if on else "off"] = {"seconds_per_step": seconds, "peak_memory_gib": memory, "loss_first": first}
    same = abs(out["on"]["loss_first"] - out["off"]["loss_first"]) <= 1e-2 * max(1.0, abs(out["off"]["loss_first"]))
    saves = out["on"]["peak_memory_gib"] is None or out["on"]["peak_memory_gib"] < out["off"]["peak_memory_gib"]
    return {**out, "passed": same and saves}


CHECKS: dict[str, Callable[..., dict[str, Any]]] = {
    "sft": check_sft, "grpo": check_grpo, "fsdp": check_fsdp, "checkpointing": check_checkpointing,
}  # fmt: skip


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def markdown(results: dict[str, Any]) -> str:
    """The results as a table: one row per check, its key figures and pass/fail."""
    r = results["checks"]

    def fig(check: str, key: str, fmt: str = "{:.3g}") -> str:
        value = r.get(check, {}).get(key)
        return "-" if value is None else fmt.format(value)

    grpo = "{} s/step, generation {} tok/s, update MFU {}, peak {} GiB".format(
        fig("grpo", "seconds_per_step"),
        fig("grpo", "generation_tokens_per_s", "{:.0f}"),
        fig("grpo", "update_mfu", "{:.1%}"),
        fig("grpo", "peak_memory_gib", "{:.1f}"),
    )
    sft = "{} s/step, {} tok/s, MFU {}, peak {} GiB".format(
        fig("sft", "seconds_per_step"),
        fig("sft", "tokens_per_s", "{:.0f}"),
        fig("sft", "mfu", "{:.1%}"),
        fig("sft", "peak_memory_gib", "{:.1f}"),
    )
    rows = [
        ("peak", f"{fig('peak', 'tflops')} TFLOP/s ({r.get('peak', {}).get('dtype', '?')} matmul)"),
        ("sft", sft),
        ("grpo", grpo),
        ("fsdp", f"first loss {fig('fsdp', 'plain', '{:.6f}')} plain vs {fig('fsdp', 'fsdp2', '{:.6f}')} FSDP2"),
        ("checkpointing", "off {} s, {} GiB / on {} s, {} GiB".format(
            *(_num(r.get("checkpointing", {}).get(k, {}).get(m)) for k in ("off", "on")
              for m in ("seconds_per_step", "peak_memory_gib")))),
    ]  # fmt: skip
    lines = [f"GPU check on {results['machine']} ({results['date']}, {results['model']})", "",
             "| check | result | passed |", "|---|---|---|"]  # fmt: skip
    for name, text in rows:
        if name in r:
            passed = r[name].get("passed")
            lines.append(f"| {name} | {text if 'error' not in r[name] else r[name]['error']} | {passed} |")
    grpo_stages = r.get("grpo", {}).get("stages")
    if grpo_stages:
        lines += ["", "GRPO stages (s/step): " + ", ".join(f"{k} {v:.3g}" for k, v in grpo_stages.items())]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tiny model and toy sizes (CPU smoke run)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers and vision blocks of the 3B shapes")
    parser.add_argument("--checks", default=",".join(CHECKS), help="comma-separated subset of " + ",".join(CHECKS))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/gpu-check")))
    args = parser.parse_args()
    import torch

    from medrl.core.io import atomic_write_json, atomic_write_text
    from medrl.core.versions import check_versions

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no GPU is visible; pass --device cpu --tiny for the toy run", file=sys.stderr)
        return 2
    versions = check_versions()
    torch.manual_seed(0)
    machine = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    size = _sizes(args.tiny)
    results: dict[str, Any] = {"machine": machine, "date": time.strftime("%Y-%m-%d"), "versions": versions,
                               "sizes": size, "checks": {}}  # fmt: skip
    peak = Peak(args.device)
    results["checks"]["peak"] = {**peak.measure(), "passed": True}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="medrl-gpu-check-") as folder:
        path = build_model(args.tiny, args.layers, Path(folder))
        results["model"] = "tiny" if args.tiny else f"Qwen2.5-VL-3B shapes, {args.layers} layers"
        for name in args.checks.split(","):
            began = time.perf_counter()
            try:
                results["checks"][name] = CHECKS[name](path, args, peak, size)
            except Exception as exc:  # noqa: BLE001 - a failed check is recorded; the others still run
                results["checks"][name] = {"passed": False, "error": f"{type(exc).__name__}: {exc}",
                                           "traceback": traceback.format_exc(limit=-4)}  # fmt: skip
            results["checks"][name]["seconds"] = time.perf_counter() - began
            print(f"gpu_check: {name}: passed={results['checks'][name]['passed']} "
                  f"({results['checks'][name]['seconds']:.1f} s)", flush=True)  # fmt: skip
            atomic_write_json(args.out / "results.json", results)  # what ran so far survives a timeout
    results["seconds"] = time.perf_counter() - start
    atomic_write_json(args.out / "results.json", results)
    atomic_write_text(args.out / "results.md", markdown(results))
    print(markdown(results))
    return 0 if all(c.get("passed") for c in results["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
