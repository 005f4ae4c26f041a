"""Seconds per GRPO optimizer step: medrl (HF and vLLM engines) against TRL's ``GRPOTrainer``, on ``tiny``.

Both sides get the same model, prompts (real PneumoniaMNIST VQA items), group size, completion length,
reward functions (medrl's accuracy and format), beta 0, one update per generation batch and the same number
of optimizer steps; each runs in its own fresh process with the same torch thread count. The first
``--warmup`` steps of each run are excluded (a cold process's first steps are far slower).

    python bench/grpo_step.py                       # medrl-hf, medrl-vllm and trl, alternating, 3 rounds
    python bench/grpo_step.py --impls medrl-hf trl --rounds 5 --threads 2

Needs ``$MEDRL_DATA_DIR`` (the real pneumoniamnist.npz).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

IMPLS = ("medrl-hf", "medrl-vllm", "trl")


def _items(n: int) -> list[dict]:
    from medrl.data.modalities import PneumoniaMNIST

    data = PneumoniaMNIST(mode="vqa", train_samples=n, seed=0)
    return [data.dataset("train")[i] for i in range(n)]


def run_medrl(
    args: argparse.Namespace, engine: str, stages: list[dict[str, float]] | None = None, share_prompt: bool = True
) -> list[float]:
    """Seconds of each timed optimizer step; ``stages``, when given, receives each step's stage seconds.
    ``share_prompt`` False runs the update with every completion's own copy of its prompt (the unshared pass)."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader

    from bench.sizes import model_dir
    from medrl.lit.grpo import GRPOModule
    from medrl.lit.grpo_args import CareArgs, EngineArgs, LossArgs, OptimArgs, SamplingArgs

    stamps: list[float] = []

    class Stamp(Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *_: object) -> None:
            stamps.append(time.perf_counter())
            if stages is not None:
                metrics = trainer.callback_metrics.items()
                step = {k.removeprefix("time/"): float(v) for k, v in metrics if k.startswith("time/")}
                # Tokens, for the achieved FLOP/s: the completions' mean length (prompts are measured once).
                if (length := trainer.callback_metrics.get("completion/length")) is not None:
                    step["completion_tokens_mean"] = float(length)
                stages.append(step)

    module = GRPOModule(
        model=str(model_dir(getattr(args, "size", "tiny"))),
        dtype="float32",  # as TRL's side (bf16=False); "auto" would pick it on CPU anyway
        engine=EngineArgs(engine, {"max_model_len": 1024, "kv_cache_gib": 0.5} if engine == "vllm" else None),
        sampling=SamplingArgs(num_generations=args.generations, max_completion_length=args.completion_length),
        rewards={"accuracy": 1.0, "format": 1.0},
        care=CareArgs(enabled=False),  # TRL has no CARE bonus
        optim=OptimArgs(lr=1e-5, micro_batch_size=args.prompts * args.generations),
        # as TRL with one iteration: no extra log-prob pass
        loss=LossArgs(old_logprobs="recompute", share_prompt=share_prompt),
    )
    items = _items(args.prompts * (args.steps + args.warmup))
    loader = DataLoader(items, batch_size=args.prompts, shuffle=False, collate_fn=list)
    start = time.perf_counter()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=args.steps + args.warmup,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Stamp()],
    )
    trainer.fit(module, loader)
    if stages is not None:
        stages[:] = stages[args.warmup :]
    return _step_times([start, *stamps], args.warmup)


def run_trl(args: argparse.Namespace, stages: list[dict[str, float]] | None = None) -> list[float]:
    """Seconds of each timed optimizer step; ``stages``, when given, receives TRL's own profiling timings.

    TRL times its blocks (``transformers.generate``, reward and log-prob passes, ``compute_loss``) with
    ``profiling_context`` but only reports them to experiment trackers; they are collected here per step.
    """
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from bench.sizes import model_dir
    from medrl.models.hub import load_vlm
    from medrl.rl.rewards import accuracy_reward, format_reward

    def text_of(completions: list) -> list[str]:
        return [c[0]["content"] if isinstance(c, list) else c for c in completions]

    def accuracy(completions, answer, **_):
        return accuracy_reward(text_of(completions), answer=answer)

    def fmt(completions, **_):
        return format_reward(text_of(completions))

    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *_: object, **__: object) -> None:
            stamps.append(time.perf_counter())

    items = _items(args.prompts * (args.steps + args.warmup))
    rows = [{"prompt": item["messages"], "image": item["image"], "answer": item["answer"]} for item in items]
    model, processor = load_vlm(str(model_dir(getattr(args, "size", "tiny"))))
    config = GRPOConfig(
        output_dir=os.path.join(args.out, "trl"),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=args.prompts * args.generations,
        num_generations=args.generations,
        max_completion_length=args.completion_length,
        temperature=1.0,
        beta=0.0,
        num_iterations=1,
        learning_rate=1e-5,
        # medrl's optimizer: torch AdamW, no weight decay, constant learning rate, gradient norm clipped at 5
        optim="adamw_torch",
        weight_decay=0.0,
        lr_scheduler_type="constant",
        max_grad_norm=5.0,
        max_steps=args.steps + args.warmup,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        shuffle_dataset=False,
        seed=0,
    )
    if stages is not None:
        _collect_trl_profiling(stages)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[accuracy, fmt],
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=processor,
        callbacks=[Stamp()],
    )
    start = time.perf_counter()
    trainer.train()
    if stages is not None:
        stages[:] = stages[args.warmup : args.warmup + args.steps]
    return _step_times([start, *stamps], args.warmup)


def _collect_trl_profiling(stages: list[dict[str, float]]) -> None:
    """Route TRL's profiling timings into ``stages[step]`` (seconds summed per block name)."""
    from trl.extras import profiling

    log_metrics = profiling.ProfilingContext._log_metrics

    def record(self, duration: float) -> None:
        while len(stages) <= (self.step or 0):
            stages.append({})
        name = self.name.split(".", 1)[-1]  # drop the trainer class name
        stages[self.step or 0][name] = stages[self.step or 0].get(name, 0.0) + duration
        log_metrics(self, duration)

    profiling.ProfilingContext._log_metrics = record


def _step_times(stamps: list[float], warmup: int) -> list[float]:
    times = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return times[warmup:]


def _child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    times = run_trl(args) if args.child == "trl" else run_medrl(args, args.child.removeprefix("medrl-"))
    print("RESULT " + json.dumps({"impl": args.child, "times": times}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per implementation, alternating")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per optimizer step")
    parser.add_argument("--generations", type=int, default=8, help="G, completions per prompt")
    parser.add_argument("--completion-length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps per run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every run")
    parser.add_argument("--out", default="runs/bench_grpo")
    parser.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    times: dict[str, list[float]] = {impl: [] for impl in args.impls}
    for round_ in range(args.rounds):
        for impl in args.impls:
            cmd = [sys.executable, __file__, "--child", impl, *sys.argv[1:]]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            result = next((line for line in out.stdout.splitlines() if line.startswith("RESULT ")), None)
            if out.returncode or result is None:
                sys.exit(f"{impl} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
            step_times = json.loads(result.removeprefix("RESULT "))["times"]
            times[impl] += step_times
            print(f"round {round_ + 1} {impl:<11} median {statistics.median(step_times):.3f} s/step", flush=True)
    print(
        f"\n{args.prompts} prompts x G={args.generations} x {args.completion_length} tokens, "
        f"{args.threads} thread(s), {args.steps} timed steps x {args.rounds} runs each"
    )
    print(f"{'impl':<11} {'median s/step':>14} {'mean':>8}")
    for impl, values in times.items():
        print(f"{impl:<11} {statistics.median(values):>14.3f} {statistics.mean(values):>8.3f}")
    if "trl" in times:
        for impl in (i for i in times if i != "trl"):
            ratio = statistics.median(times["trl"]) / statistics.median(times[impl])
            print(f"TRL / {impl}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
