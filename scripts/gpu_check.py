"""The GPU check: numstab on CuPy against NumPy, in one short run (< 4 minutes on one GPU).

    python scripts/gpu_check.py [--json PATH] [--steps-timed 50] [--skip-tests]

Prints a compact report:

1. GPU facts: device, CuPy / CUDA versions, TF32 for float32 matmul (forced off: it changes the
   arithmetic being measured), flush-to-zero behaviour, and the reduction order (CUB's tree,
   not NumPy's pairwise sum: the SC fraction on the GPU is measured in the order the GPU used).
2. The ``gpu``-marked tests of the suite.
3. Per format (float32, float64, float16, bfloat16): one full-batch training step of the
   paper configuration on CuPy and on NumPy from the same initialisation: the largest
   difference in ulps of the format of the logits, the losses and the gradients, and the SC
   fraction both ways.
4. Time per step on the GPU (median of >= 50 synchronized steps after warm-up) against NumPy
   on the host and, where PyTorch with CUDA is installed, an equivalent PyTorch step; the
   target is a CuPy float32 step no slower than PyTorch eager on the same GPU.
5. The projected wall time of the paper's 80 000-step Fig. 1 configuration.

Without CuPy or a CUDA device it says so in one line and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# TF32 changes float32 matmul to a 10-bit-mantissa product: keep it off for what we measure.
os.environ.setdefault("CUPY_TF32", "0")

FORMATS = ("float32", "float64", "float16", "bfloat16")


def gpu_facts(cp) -> dict:
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"]
    return {
        "device": name.decode() if isinstance(name, bytes) else str(name),
        "compute_capability": dev.compute_capability,
        "cupy": cp.__version__,
        "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(),
        "cuda_driver": cp.cuda.runtime.driverGetVersion(),
        "tf32": os.environ.get("CUPY_TF32", "0") == "1",
        "flush_to_zero": "CuPy compiles elementwise/reduction kernels without --ftz: float32 "
                         "subnormals are kept (IEEE)",
        "reduction_order": "CUB block/warp tree (not NumPy's pairwise sum)",
    }


def run_gpu_tests(timeout: int) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
    return {"exit_code": proc.returncode, "summary": tail[0],
            "seconds": time.perf_counter() - t0}


def _max_ulps(a, b, fmt) -> float:
    import numpy as np

    from numstab.audit import ulp_error
    from numstab.backend import to_numpy

    a, b = to_numpy(a), to_numpy(b)
    if a.size == 0:
        return 0.0
    return float(np.max(ulp_error(a, b.astype(np.float64), fmt)))


def compare_step(fmt: str, cp) -> dict:
    """One evaluation + gradient on both backends from the same parameters."""
    import numpy as np

    from numstab.backend import to_numpy
    from numstab.run import Run, TrainConfig

    cfg = TrainConfig(dtype=fmt, steps=1)
    host = Run(cfg)
    dev = Run(cfg.replace(backend="cupy"))
    ev_h = host.evaluate("train", with_grads=True)
    ev_d = dev.evaluate("train", with_grads=True)
    g_h = host.gradients(ev_h)
    g_d = dev.gradients(ev_d)
    out = {
        "logits_max_ulps": _max_ulps(ev_d.logits, ev_h.logits, fmt),
        "loss_max_ulps": _max_ulps(ev_d.loss, ev_h.loss, cfg.policy.loss.name),
        "grad_max_ulps": {k: _max_ulps(g_d[k], g_h[k], fmt) for k in g_h},
        "sc_fraction_numpy": float(np.mean(to_numpy(host.collapse(ev_h)))),
        "sc_fraction_cupy": float(np.mean(to_numpy(dev.collapse(ev_d)))),
    }
    return out


def time_steps(run, n: int, sync) -> list[float]:
    times = []
    for _ in range(n):
        sync()
        t0 = time.perf_counter()
        run.advance(log=False)
        sync()
        times.append(time.perf_counter() - t0)
    return times


def time_backends(fmt: str, cp, n_gpu: int, n_cpu: int) -> dict:
    from numstab.run import Run, TrainConfig

    cfg = TrainConfig(dtype=fmt, steps=10**6)
    dev = Run(cfg.replace(backend="cupy"))
    sync = cp.cuda.Device().synchronize
    time_steps(dev, 10, sync)  # warm-up: kernel compilation, cuBLAS handles, allocator
    gpu = time_steps(dev, n_gpu, sync)
    host = Run(cfg)
    time_steps(host, 2, lambda: None)
    cpu = time_steps(host, n_cpu, lambda: None)
    return {"gpu_median_ms": 1e3 * statistics.median(gpu),
            "gpu_min_ms": 1e3 * min(gpu), "gpu_max_ms": 1e3 * max(gpu),
            "cpu_median_ms": 1e3 * statistics.median(cpu)}


def time_torch(n: int) -> dict | None:
    """The authors' step (one-hot input, nn.Linear, log_softmax + NLL, AdamW) on CUDA."""
    try:
        import torch
    except ImportError:
        return {"status": "PyTorch not installed"}
    if not torch.cuda.is_available():
        return {"status": "PyTorch has no CUDA device"}
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    import numpy as np

    from numstab.data import modular_arithmetic

    d = modular_arithmetic(113, "add", train_fraction=0.4, seed=0)
    x = torch.zeros((d.n_train, 226), device="cuda")
    x[torch.arange(d.n_train), torch.as_tensor(d.x_train[:, 0])] = 1
    x[torch.arange(d.n_train), torch.as_tensor(d.x_train[:, 1])] = 1
    y = torch.as_tensor(np.asarray(d.y_train), device="cuda")
    model = torch.nn.Sequential(
        torch.nn.Linear(226, 200, bias=False), torch.nn.ReLU(),
        torch.nn.Linear(200, 200, bias=False), torch.nn.ReLU(),
        torch.nn.Linear(200, 113, bias=False),
    ).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.9, 0.99), eps=1e-25,
                            weight_decay=0.0)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.nll_loss(torch.log_softmax(model(x), dim=-1), y)
        loss.backward()
        opt.step()

    for _ in range(10):
        step()
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"status": f"torch {torch.__version__}", "median_ms": 1e3 * statistics.median(times)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="also write the report as JSON here")
    ap.add_argument("--steps-timed", type=int, default=50, help="GPU steps timed per format")
    ap.add_argument("--skip-tests", action="store_true", help="do not run the gpu tests")
    args = ap.parse_args(argv)

    from numstab.backend import get_backend

    try:
        cp = get_backend("cupy")
    except RuntimeError as exc:
        print(f"gpu_check: no GPU here, nothing to check: {exc}")
        return 0
    t_start = time.perf_counter()
    report = {"host": platform.node(), "facts": gpu_facts(cp)}
    print("GPU:", json.dumps(report["facts"]))
    if not args.skip_tests:
        report["gpu_tests"] = run_gpu_tests(timeout=90)
        print("gpu tests:", report["gpu_tests"]["summary"])
    report["formats"] = {}
    print(f"{'format':9s} {'logits ulp':>10s} {'loss ulp':>9s} {'grad ulp':>9s} "
          f"{'SC np/cp':>13s} {'GPU ms':>8s} {'CPU ms':>8s}")
    for fmt in FORMATS:
        try:
            cmp = compare_step(fmt, cp)
            tim = time_backends(fmt, cp, args.steps_timed, 3)
        except Exception as exc:  # report and go on: one format failing says something too
            report["formats"][fmt] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"{fmt:9s} ERROR {type(exc).__name__}: {exc}")
            continue
        report["formats"][fmt] = {**cmp, **tim}
        gmax = max(cmp["grad_max_ulps"].values())
        print(f"{fmt:9s} {cmp['logits_max_ulps']:10.1f} {cmp['loss_max_ulps']:9.1f} "
              f"{gmax:9.1f} {cmp['sc_fraction_numpy']:6.3f}/{cmp['sc_fraction_cupy']:6.3f} "
              f"{tim['gpu_median_ms']:8.2f} {tim['cpu_median_ms']:8.1f}")
    torch_t = time_torch(args.steps_timed)
    report["torch"] = torch_t
    f32 = report["formats"].get("float32", {})
    if "median_ms" in (torch_t or {}) and "gpu_median_ms" in f32:
        ratio = f32["gpu_median_ms"] / torch_t["median_ms"]
        report["cupy_over_torch_float32"] = ratio
        print(f"PyTorch eager float32 step {torch_t['median_ms']:.2f} ms; CuPy/PyTorch = "
              f"{ratio:.2f} (target <= 1)")
    else:
        print(f"PyTorch: {torch_t.get('status')}")
    if "gpu_median_ms" in f32:
        proj = 80_000 * f32["gpu_median_ms"] / 1e3
        report["fig1_80000_steps_projected_s"] = proj
        print(f"projected Fig. 1 (80 000 float32 steps): {proj / 60:.1f} min on this GPU")
    report["seconds"] = time.perf_counter() - t_start
    print(f"gpu_check took {report['seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
