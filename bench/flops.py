"""This machine's sustained fp32 matmul rate: the physical limit the benchmark's achieved FLOP/s are read against.

Large square matmuls (``2 n^3`` FLOPs each) with the thread count the sides use, repeated for a few seconds
after a warm-up; the best of several timed bursts is the sustained peak (a burst disturbed by other work is
slower, never faster).

    python bench/flops.py --threads 1
"""

from __future__ import annotations

import argparse
import time


def peak_matmul_flops(threads: int = 1, n: int = 1024, seconds: float = 2.0, bursts: int = 3) -> dict[str, float]:
    """``{"flops": best FLOP/s, "median_flops": ..., "n": n, "threads": threads}`` of fp32 ``n x n`` matmuls."""
    import statistics

    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(0)
        a, b = torch.randn(n, n, generator=generator), torch.randn(n, n, generator=generator)
        out = torch.empty(n, n)
        for _ in range(3):
            torch.mm(a, b, out=out)  # warm-up: thread pool, caches
        rates = []
        for _ in range(bursts):
            count, start = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < seconds:
                torch.mm(a, b, out=out)
                count += 1
            rates.append(2 * n**3 * count / elapsed)
    finally:
        torch.set_num_threads(previous)
    return {"flops": max(rates), "median_flops": statistics.median(rates), "n": n, "threads": threads}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n", type=int, default=1024)
    args = parser.parse_args()
    result = peak_matmul_flops(args.threads, args.n)
    print(f"{result['flops'] / 1e9:.1f} GFLOP/s fp32 (median {result['median_flops'] / 1e9:.1f}), n={args.n}, "
          f"{args.threads} thread(s)")  # fmt: skip
