"""Step time of the Fig. 6a transformer: numstab against the same model in PyTorch (CPU).

    python scripts/bench_transformer.py [--dtype float32] [--repeats 3] [--threads 1]

One full-batch training step (forward, cross-entropy, backward, AdamW update) of the authors'
model (p = 113, operands 1..112, f = 0.4: 5017 pairs; Embedding(113, 128), one
TransformerEncoderLayer(128, 4, 2048, dropout 0.1), Linear(128, 113) at the last position),
numstab's ``Run.advance`` against PyTorch's modules with ``torch.optim.AdamW``. The two are
interleaved, with the same BLAS / intra-op thread count; the median of ``--repeats`` steps of
each is printed, after one warm-up step each.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from numstab.run import TrainConfig
from numstab.run.loop import Run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(model="transformer", residue_start=1, dtype=args.dtype, lr=1e-3)
    run = Run(cfg)
    dt = getattr(torch, args.dtype)
    emb = torch.nn.Embedding(113, 128, dtype=dt)
    layer = torch.nn.TransformerEncoderLayer(128, 4, 2048, 0.1, batch_first=True, dtype=dt)
    un = torch.nn.Linear(128, 113, dtype=dt)
    params = [*emb.parameters(), *layer.parameters(), *un.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.99), eps=1e-25, weight_decay=0.0)
    x = torch.tensor(np.asarray(run.data.x_train))
    y = torch.tensor(np.asarray(run.data.y_train))

    def torch_step():
        layer.train()
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(un(layer(emb(x))[:, -1]), y)
        loss.backward()
        opt.step()

    steps = {"numstab": lambda: run.advance(log=False), "pytorch": torch_step}
    times = {name: [] for name in steps}
    with threadpool_limits(args.threads):
        for i in range(args.repeats + 1):
            for name, step in steps.items():
                t0 = time.perf_counter()
                step()
                if i:  # the first step of each warms up
                    times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.dtype}, {args.threads} thread(s), median of {args.repeats} steps:")
    for k, v in med.items():
        print(f"  {k:8s} {v:.3f} s/step")
    print(f"  numstab / pytorch = {med['numstab'] / med['pytorch']:.2f}")


if __name__ == "__main__":
    main()
