"""Planning time and packing efficiency of ``plan_micro_batches`` on synthetic lengths.

    python bench/packing.py [--num 2000000] [--budget 16384] [--repeat 1]

Distributions: ``short`` (uniform 12-28 tokens), ``lognormal`` (median ~900 tokens,
clipped to the budget), ``mixed`` (uniform 1 .. budget/2). Prints, per distribution, the
best wall and process CPU time of ``--repeat`` plans (CPU time is the steadier figure on a
shared machine), the number of micro-batches and the packing
efficiency (real tokens / (batches x budget)). The lengths are drawn with a fixed seed.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from drift_engine.data.packing import plan_micro_batches


def draw(kind: str, num: int, budget: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if kind == "short":
        return torch.randint(12, 29, (num,), generator=g)
    if kind == "lognormal":
        x = torch.empty(num).log_normal_(mean=6.8, std=0.6, generator=g)
        return x.round().clamp(1, budget).to(torch.int64)
    if kind == "mixed":
        return torch.randint(1, budget // 2 + 1, (num,), generator=g)
    raise ValueError(kind)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num", type=int, default=2_000_000)
    parser.add_argument("--budget", type=int, default=16384)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--dist", default="short,lognormal,mixed")
    args = parser.parse_args()
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.num} trajectories, budget {args.budget}"
    )
    print(f"{'lengths':<10} {'wall s':>8} {'cpu s':>8} {'batches':>9} {'efficiency':>10}")
    for kind in args.dist.split(","):
        lengths = draw(kind, args.num, args.budget)
        wall = cpu = float("inf")
        for _ in range(args.repeat):
            start, start_cpu = time.perf_counter(), time.process_time()
            plan = plan_micro_batches(lengths, args.budget, seed=0)
            cpu = min(cpu, time.process_time() - start_cpu)
            wall = min(wall, time.perf_counter() - start)
        efficiency = int(lengths.sum()) / (len(plan) * args.budget)
        print(f"{kind:<10} {wall:>8.2f} {cpu:>8.2f} {len(plan):>9} {efficiency:>10.1%}")


if __name__ == "__main__":
    main()
