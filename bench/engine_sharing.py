"""What sharing one vLLM engine between GRPO and the Pass@K callback saves: engines started, peak memory.

Each variant runs in a fresh process: GRPO with ``engine.name: vllm`` on ``tiny`` plus ``PassAtKCallback``
on ``vllm`` (one training step with its validation, ``fast_dev_run``). ``shared`` is medrl as it is: the
callback samples with the module's engine. ``separate`` hides the module's engine from the callback, which
then starts a second one (medrl before the engines were shared). Peak memory is the largest sum over the
process and its children (vLLM may run its engine core in a child), sampled every 50 ms: resident (RSS)
and virtual. On CPU vLLM's KV cache is allocated but mostly never touched at this size, so it shows in the
virtual size, not the resident one; on a GPU it is ``gpu_memory_utilization`` of the card, per engine.

    python bench/engine_sharing.py               # both variants, a table on stdout, JSON with --json FILE
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tree_memory(pid: int) -> tuple[int, int]:
    """``(rss, vms)`` summed over the process and its children, in bytes."""
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0, 0
    rss = vms = 0
    for p in procs:
        try:
            info = p.memory_info()
        except psutil.Error:
            continue
        rss, vms = rss + info.rss, vms + info.vms
    return rss, vms


def child(variant: str, kv_cache_gib: float) -> dict[str, float | int | str]:
    """Run one variant here; returns what it measured."""
    import os

    import lightning as L
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MEDRL_OFFLINE", "1")
    torch.set_num_threads(1)
    from medrl.callbacks.pass_at_k import PassAtKCallback
    from medrl.data.modalities import PneumoniaMNIST
    from medrl.lit.grpo import GRPOModule
    from medrl.lit.grpo_args import EngineArgs, OptimArgs, SamplingArgs
    from medrl.rollout import vllm as vllm_module

    started: list[object] = []
    original_init = vllm_module.VLLMEngine.__init__

    def counting_init(self, *args, **kwargs):  # counts engines as they start
        started.append(self)
        original_init(self, *args, **kwargs)

    vllm_module.VLLMEngine.__init__ = counting_init
    options = {"max_model_len": 512, "kv_cache_gib": kv_cache_gib}

    class Separate(GRPOModule):
        rollout_engine = None  # the callback cannot see the module's engine: it starts its own

    cls = GRPOModule if variant == "shared" else Separate
    module = cls(
        model="tiny",
        engine=EngineArgs("vllm", options),
        sampling=SamplingArgs(num_generations=2, max_completion_length=8, val_max_new_tokens=8),
        optim=OptimArgs(lr=1e-5, micro_batch_size=8),
    )
    callback = PassAtKCallback(engine="vllm", n=2, max_new_tokens=8, batch_size=4, engine_options=options)
    root = tempfile.mkdtemp(prefix="medrl-engine-sharing-")  # a synthetic file is written there on first use
    data = PneumoniaMNIST(root=root, synthetic=True, mode="vqa", batch_size=2, train_samples=4, val_samples=2)
    peak = [0, 0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss, vms = _tree_memory(os.getpid())
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], vms)
            time.sleep(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    trainer = L.Trainer(accelerator="cpu", fast_dev_run=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[callback])  # fmt: skip
    trainer.fit(module, data)
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    return {"variant": variant, "engines_started": len(started), "peak_rss_gib": peak[0] / 2**30,
            "peak_vms_gib": peak[1] / 2**30, "seconds": seconds}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kv_cache_gib", type=float, default=0.25, help="each engine's KV cache (GiB)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--child", choices=["shared", "separate"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.kv_cache_gib)))
        return 0
    rows = []
    for variant in ("separate", "shared"):
        cmd = [sys.executable, __file__, "--child", variant, "--kv_cache_gib", str(args.kv_cache_gib)]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
        if out.returncode != 0:
            print(out.stderr[-4000:], file=sys.stderr)
            return 1
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("| variant | vLLM engines started | peak RSS (GiB) | peak virtual (GiB) | wall (s) |")
    print("|---|---|---|---|---|")
    for r in rows:
        cells = f"{r['peak_rss_gib']:.2f} | {r['peak_vms_gib']:.1f} | {r['seconds']:.1f}"
        print(f"| {r['variant']} | {r['engines_started']} | {cells} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
