"""Check that this tree trains bit for bit like another revision.

Runs the same small configurations with the code of ``--base`` (a git revision, checked out
in a temporary worktree) and with this working tree, and compares the ``metrics.csv`` files:
the rows of every metric the base logs, in order and value for value (a newer tree may log more
metrics), and byte for byte when the current tree logs no metric the base lacks. Both sides run
on this machine with the same packages, so any difference is the code's.

    python scripts/check_bit_identity.py --base HEAD~3
    python scripts/check_bit_identity.py --base 95f89b1 --current-args "--elementary libm"

Exit code: 0 all identical, 1 a difference (the first differing row is printed), 2 bad input.
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ["--modulus", "23", "--hidden", "32", "32", "--steps", "60", "--log-every", "5",
        "--seed", "3", "--quiet"]

#: name -> (module, arguments): float32, float16, bfloat16, float64 runs and one compare run.
CASES = {
    "train-float32": ("numstab.train", [*TINY, "--lr", "0.05"]),
    "train-float16": ("numstab.train", [*TINY, "--dtype", "float16", "--lr", "0.05"]),
    "train-bfloat16": ("numstab.train", [*TINY, "--dtype", "bfloat16", "--loss", "stablemax"]),
    "train-float64": ("numstab.train", [*TINY, "--dtype", "float64", "--optimizer", "sgd",
                                        "--lr", "0.5", "--perp-grad", "tensor"]),
    "compare-float32": ("numstab.compare", [*TINY, "--audit-every", "20",
                                            "--audit-samples", "8"]),
}

TINY_TRANSFORMER = ["--model", "transformer", "--modulus", "23", "--d-model", "16", "--heads",
                    "2", "--d-ff", "64", "--steps", "12", "--log-every", "3", "--seed", "3",
                    "--quiet"]

#: Transformer runs (dropout 0.1, ⊥AdamW; pre-LN, StableMax attention, mini-batches), opt-in
#: with ``--cases`` for a base that has the transformer (7b1d1de or later).
TRANSFORMER_CASES = {
    "transformer-float32": ("numstab.train", [*TINY_TRANSFORMER, "--residue-start", "1",
                                              "--perp-grad", "tensor", "--lr", "1e-3"]),
    "transformer-float16": ("numstab.train", [*TINY_TRANSFORMER, "--dtype", "float16",
                                              "--norm-placement", "pre", "--attention",
                                              "stablemax", "--batch-size", "150"]),
    "transformer-bfloat16": ("numstab.train", [*TINY_TRANSFORMER, "--dtype", "bfloat16"]),
    "transformer-float64": ("numstab.train", [*TINY_TRANSFORMER, "--dtype", "float64",
                                              "--dropout", "0"]),
}
ALL_CASES = {**CASES, **TRANSFORMER_CASES}


def _run(tree: str, module: str, args: list[str], out: str, extra: list[str]) -> None:
    env = dict(os.environ, PYTHONPATH=tree)
    cmd = [sys.executable, "-m", module, *args, *extra, "--out", out]
    r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {tree} (rc {r.returncode}):\n{r.stderr}")


def _rows(path: str) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _compare(name: str, base: str, current: str) -> str | None:
    """None if identical, else a description of the first difference."""
    a, b = _rows(base), _rows(current)
    metrics = {r[3] for r in a[1:]}
    added = sorted({r[3] for r in b[1:]} - metrics)
    b = [b[0], *(r for r in b[1:] if r[3] in metrics)]  # a newer tree may log more metrics
    for i, (ra, rb) in enumerate(zip(a, b, strict=False)):  # lengths compared below
        if ra != rb:
            return f"row {i}: base {ra} != current {rb}"
    if len(a) != len(b):
        return f"base has {len(a)} rows, current {len(b)}"
    if not name.startswith("compare") and not added:
        with open(base, "rb") as fa, open(current, "rb") as fb:
            if fa.read() != fb.read():
                return "same rows, different bytes"
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="git revision to compare against")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(ALL_CASES),
                   help="default: the five MLP cases; the transformer-* cases need a base "
                   "with the transformer")
    p.add_argument("--base-args", default="", help="extra options for the base's commands")
    p.add_argument("--current-args", default="", help="extra options for this tree's commands")
    args = p.parse_args(argv)
    r = subprocess.run(["git", "rev-parse", "--verify", args.base + "^{commit}"], cwd=ROOT,
                       capture_output=True, text=True)
    if r.returncode != 0:
        print(f"check_bit_identity: error: unknown revision {args.base!r}", file=sys.stderr)
        return 2
    rev = r.stdout.strip()
    failed = 0
    with tempfile.TemporaryDirectory(prefix="numstab-bitid-") as tmp:
        wt = os.path.join(tmp, "base")
        subprocess.run(["git", "worktree", "add", "--detach", wt, rev], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            for name in args.cases:
                module, cargs = ALL_CASES[name]
                outs = {}
                for side, tree, extra in (("base", wt, args.base_args),
                                          ("current", ROOT, args.current_args)):
                    outs[side] = os.path.join(tmp, f"{name}-{side}")
                    _run(tree, module, cargs, outs[side], shlex.split(extra))
                diff = _compare(name, *(os.path.join(outs[s], "metrics.csv")
                                        for s in ("base", "current")))
                print(f"{name:18s} {'identical' if diff is None else 'DIFFERENT: ' + diff}")
                failed += diff is not None
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", wt], cwd=ROOT,
                           capture_output=True)
    print(f"base {rev[:12]} vs this tree: {len(args.cases) - failed} identical, {failed} differ")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
