"""Runs ``medrl fit`` (LightningCLI) with a recorder, for the multi-process tests in test_distributed.py.

    python tests/dist_worker.py --out DIR [--fixed-rollouts] [--checkpoint-every-step] CLI-ARGS...

CLI-ARGS are those of ``medrl fit`` (``--config configs/rl.yaml --config configs/strategy/ddp.yaml ...``).
Lightning's DDP / FSDP launch starts the other processes by running this same command again, so each
process parses the same arguments and writes ``DIR/rank<R>.pt``: the global batch's item indices, the
first step's loss and answer-token count, the gradients the first optimizer step applied, and the trained
weights before training and after every step (gathered whole under FSDP).

``--fixed-rollouts`` replaces the GRPO module's rollout engine with completions that are a fixed function of
each question (below), so a step's loss and update can be compared across process counts: sampled rollouts
would differ, since each process seeds its sampling with its rank.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from medrl.models.sharding import full_tensor
from medrl.rollout.decoding import end_token_ids
from medrl.rollout.engine import Engine
from medrl.rollout.types import Completion, Item, PromptResult, SamplingParams


class FixedRollouts(Engine):
    """Completions that depend only on the question: right and wrong answers, with and without the format.

    Which template comes first rotates with the item's index, so groups get different rewards and hence
    different advantages. No log-probs are returned, so the step is on-policy (old log-probs = the policy's).
    """

    name = "fixed"

    def __init__(self, processor: Any) -> None:
        self.tokenizer = processor.tokenizer
        self.end = end_token_ids(self.tokenizer)[0]

    def _texts(self, item: Item, n: int) -> list[str]:
        gold = item["answer"]
        wrong = next(letter for letter in item["options"] if letter != gold)
        templates = [
            f"<think>the image shows it</think><answer>{gold}</answer>",
            f"<answer>{wrong}</answer>",
            "I cannot tell from this image",
            f"<answer>{gold}</answer> because of the opacity",
            f"<think>hm</think><answer>{wrong}</answer>",
        ]
        start = int(item["index"]) % len(templates)
        return [templates[(start + i) % len(templates)] for i in range(n)]

    def generate(self, items: Sequence[Item], params: SamplingParams) -> list[PromptResult]:
        results = []
        for item in items:
            samples = []
            for text in self._texts(item, max(params.n, 1)):
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.end]
                samples.append(Completion(text=text, token_ids=ids, finish_reason="stop"))
            results.append(PromptResult(prompt="", samples=samples[: params.n], greedy=samples[0]))
        return results

    def load_weights(self, weights) -> None:
        for _ in weights:  # consume (FSDP gathers as it iterates): the completions do not depend on weights
            pass


class Recorder(L.Callback):
    """Writes what one process saw and did in the run to ``out/rank<R>.pt`` when training ends."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.record: dict[str, Any] = {"indices": [], "weights": {}, "grads": None}

    def _weights(self, module: L.LightningModule) -> dict[str, torch.Tensor]:
        return {n: full_tensor(p.detach()).clone() for n, p in module.named_parameters() if p.requires_grad}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record["world_size"] = trainer.world_size
        self.record["start_step"] = trainer.global_step
        self.record["weights"][trainer.global_step] = self._weights(pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # After the backward (and GRPO's clipping), before the update: the gradients the first step applies.
        if self.record["grads"] is None:
            params = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
            self.record["grads"] = {n: full_tensor(p.grad).clone() for n, p in params}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.record["indices"].append([int(item["index"]) for item in batch])
        if "loss" not in self.record:
            self.record["loss"] = float(trainer.callback_metrics["train/loss"])
            tokens = trainer.callback_metrics.get("train/answer_tokens")
            self.record["tokens"] = None if tokens is None else float(tokens)
        self.record["weights"][trainer.global_step] = self._weights(pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(self.record, self.out / f"rank{trainer.global_rank}.pt")


def run(argv: list[str]) -> None:
    """Parse the worker's own flags, build ``medrl fit`` from the rest, and train with the recorder."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from medrl.study.configs import MedRLCLI

    argv = list(argv)
    out = Path(argv.pop(argv.index("--out") + 1))
    argv.remove("--out")
    fixed = "--fixed-rollouts" in argv
    every_step = "--checkpoint-every-step" in argv
    argv = [a for a in argv if a not in ("--fixed-rollouts", "--checkpoint-every-step")]
    ckpt_path = None
    if "--ckpt_path" in argv:
        ckpt_path = argv.pop(argv.index("--ckpt_path") + 1)
        argv.remove("--ckpt_path")
    cli = MedRLCLI(args=argv, run=False)
    if fixed:
        cli.model.engine = FixedRollouts(cli.model.processor)
    cli.trainer.callbacks.append(Recorder(out))
    if every_step:
        ckpt = ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=1, save_top_k=-1)
        cli.trainer.callbacks.append(ckpt)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)


if __name__ == "__main__":
    torch.set_num_threads(1)  # two processes on a shared 2-core machine: one thread each
    run(sys.argv[1:])
