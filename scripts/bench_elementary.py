"""Step-time cost of correctly rounded elementary functions: ``correct`` against ``libm``.

Times ``Run.advance`` of the paper's setup (p = 113, f = 0.4, 226-200-200-113, AdamW, full
batch) in both modes, alternating round by round in one process (so machine load affects both
alike), and prints the median step time of each and their ratio: wall time, and the process's
CPU time (with one BLAS thread, the step's own work; steadier on a loaded machine).

    python scripts/bench_elementary.py --dtype float32 --rounds 10 --steps 6 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from threadpoolctl import threadpool_limits

from numstab.run import Run, TrainConfig
from numstab.run.runtime import tune_allocator


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--rounds", type=int, default=10, help="alternating rounds (default 10)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per round (default 6)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--threads", type=int, default=1, help="BLAS threads (default 1)")
    args = p.parse_args(argv)
    print(f"allocator: {tune_allocator()}")
    runs = {m: Run(TrainConfig(dtype=args.dtype, elementary=m)) for m in ("correct", "libm")}
    times: dict[str, list[float]] = {m: [] for m in runs}
    cpu: dict[str, list[float]] = {m: [] for m in runs}
    with threadpool_limits(args.threads):
        for run in runs.values():
            for _ in range(args.warmup):
                run.advance(log=False)
        for _ in range(args.rounds):
            for mode, run in runs.items():
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(args.steps):
                    run.advance(log=False)
                times[mode].append((time.perf_counter() - t0) / args.steps)
                cpu[mode].append((time.process_time() - c0) / args.steps)
    print(f"{args.dtype}, {args.threads} BLAS thread(s), {args.rounds} rounds x {args.steps} "
          f"steps after {args.warmup} warm-up steps")
    for label, data in (("wall", times), ("CPU", cpu)):
        med = {m: statistics.median(v) for m, v in data.items()}
        steps = ", ".join(f"{m} {1e3 * v:.2f} ms" for m, v in med.items())
        print(f"  {label:4s} median step: {steps}; ratio correct / libm "
              f"{med['correct'] / med['libm']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
