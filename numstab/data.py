"""Datasets of the paper: modular arithmetic and sparse parity, with deterministic splits.

Every generator is a pure function of its arguments. Randomness comes only from explicit integer
seeds, in two documented streams:

- **split stream** ``np.random.default_rng(seed)``: the train/test split is
  ``perm = default_rng(seed).permutation(N)``; samples ``perm[:int(train_fraction * N)]`` are the
  training set (in that order), the rest the test set (in that order).
- **data stream** ``np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))``, the
  first child of the seed (the same as ``SeedSequence(seed).spawn(1)[0]``): the random code
  permutation of the binary encoding and the random bit vectors of sparse parity. It is
  statistically independent of the split stream, so turning ``permute_codes`` on or off leaves
  the split unchanged.

Encodings (``Dataset.encoding``):

- ``"onehot"`` (modular arithmetic): ``x`` is an int64 array ``(N, 2)`` of **row indices**
  ``(a, p + b)`` into the model's first weight matrix ``W1`` of shape ``(2p, hidden)``; the first
  layer gathers ``W1[a] + W1[p + b]``, which equals ``dense_inputs(x, ds) @ W1`` (two
  concatenated one-hots, width ``n_inputs = 2p``).
- ``"binary"`` (modular arithmetic): each operand is written as a bit code of width
  ``bit_width(p) = ceil(log2 p)``, most significant bit first, and the two codes are concatenated:
  ``x`` is float32 ``(N, 2 * width)`` of 0/1. The code of value ``v`` is ``codes[v]`` where
  ``codes = code_table(p, permute_codes=..., seed=...)``: the identity, or a seeded random
  permutation of ``{0, ..., p-1}`` (a bijection, so the code space is the same, only the
  assignment of codes to residues is scrambled).
- ``"bits"`` (sparse parity): ``x`` is float32 ``(N, n_bits)`` of 0/1 (inputs are in ``{0, 1}``,
  not ``{-1, 1}``).
- ``"tokens"`` (modular arithmetic, the transformer's form): ``x`` is an int64 array ``(N, 2)``
  of the operands ``(a, b)`` as tokens of a vocabulary of ``n_inputs = p`` (a sequence of two;
  the model embeds them).

Residues: the operands run over ``residue_start .. p-1``: 0 (all residues, the MLP's data) or 1
(the authors' transformer data leaves 0 out); labels stay in ``[0, p)``.

Example
-------
>>> ds = modular_arithmetic(113, "add", train_fraction=0.4, seed=0)
>>> ds.x_train.shape, ds.x_test.shape, ds.n_inputs
((5107, 2), (7662, 2), 226)
>>> dense_inputs(ds.x_train[:3], ds).shape
(3, 226)
"""

from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from numstab.backend import as_dtype, is_ml_dtype

__all__ = [
    "ENCODINGS",
    "MODULAR_ENCODINGS",
    "MODULAR_OPS",
    "TASKS",
    "Dataset",
    "bit_width",
    "code_table",
    "dense_inputs",
    "digits",
    "get_dataset",
    "is_prime",
    "modular_arithmetic",
    "sparse_parity",
    "split_indices",
]

#: Binary operations of :func:`modular_arithmetic`.
MODULAR_OPS = ("add", "sub", "mul", "div")
#: Input encodings of :func:`modular_arithmetic`.
MODULAR_ENCODINGS = ("onehot", "binary", "tokens")
#: Every encoding a :class:`Dataset` may carry (``"bits"`` is sparse parity's, ``"pixels"``
#: the digits' grey levels in [0, 1], ``"tokens"`` the transformer's operand tokens).
ENCODINGS = ("onehot", "binary", "bits", "pixels", "tokens")
#: Task names understood by :func:`get_dataset`.
TASKS = (*MODULAR_OPS, "parity", "digits")

#: Above this many bits, sparse parity draws bit vectors directly (rejecting duplicates)
#: instead of sampling distinct integers below ``2**n_bits``.
_MAX_INT_BITS = 62


# --------------------------------------------------------------------------------------------
# Dataset container
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test split of one task, with the encoding needed to build the model's input.

    Equality and hashing are by identity (``eq=False``): the fields hold arrays and a dict,
    which have no useful value-hash. The arrays are made read-only on construction.

    Attributes
    ----------
    x_train : ndarray, (N_train, 2) int64 or (N_train, n_inputs) float32
        Training inputs: gather indices for ``"onehot"``, dense 0/1 for ``"binary"``/``"bits"``.
    y_train : ndarray, (N_train,) int64
        Training labels in ``[0, n_classes)``.
    x_test, y_test : ndarray
        Test inputs and labels, same layout.
    n_classes : int
        Number of classes (``p`` for modular arithmetic, 2 for parity).
    n_inputs : int
        Width of the model's input layer for this encoding (``2p`` for one-hot).
    encoding : str
        One of :data:`ENCODINGS`.
    name : str
        Short identifier, e.g. ``"add_p113_onehot"``.
    meta : dict
        JSON-serialisable description (task, sizes, seed, fraction, ...), for run outputs.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int
    n_inputs: int
    encoding: str
    name: str
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding={self.encoding!r} is unknown; valid: {ENCODINGS}")
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"x_{split} {x.shape} and y_{split} {y.shape} must be (N, d) and (N,)"
                )
            for arr in (x, y):
                arr.setflags(write=False)

    @classmethod
    def from_split(cls, x, y, train_idx, test_idx, **fields) -> Dataset:
        """The dataset of rows ``train_idx`` / ``test_idx`` of ``x`` and ``y`` (the other
        attributes as keywords)."""
        return cls(
            x_train=x[train_idx],
            y_train=y[train_idx],
            x_test=x[test_idx],
            y_test=y[test_idx],
            **fields,
        )

    @property
    def n_train(self) -> int:
        """Number of training samples."""
        return int(self.y_train.shape[0])

    @property
    def n_test(self) -> int:
        """Number of test samples."""
        return int(self.y_test.shape[0])

    def dense(self, split: str = "train", *, dtype: Any = np.float32) -> np.ndarray:
        """Dense model inputs ``(N, n_inputs)`` of one split (``"train"`` or ``"test"``).

        See :func:`dense_inputs`.
        """
        if split not in ("train", "test"):
            raise ValueError(f"split={split!r} is unknown; valid: ('train', 'test')")
        return dense_inputs(getattr(self, f"x_{split}"), self, dtype=dtype)

    def to_dict(self) -> dict:
        """JSON-serialisable summary (no arrays): sizes, shapes, dtypes and a copy of ``meta``."""
        return {
            "name": self.name,
            "encoding": self.encoding,
            "n_classes": int(self.n_classes),
            "n_inputs": int(self.n_inputs),
            "n_train": self.n_train,
            "n_test": self.n_test,
            "x_shape_train": [int(s) for s in self.x_train.shape],
            "x_shape_test": [int(s) for s in self.x_test.shape],
            "x_dtype": str(self.x_train.dtype),
            "y_dtype": str(self.y_train.dtype),
            "meta": copy.deepcopy(self.meta),
        }


def dense_inputs(
    x: np.ndarray,
    dataset_or_encoding: Dataset | str,
    n_inputs: int | None = None,
    *,
    dtype: Any = np.float32,
) -> np.ndarray:
    """Materialise the model input of an encoding as a dense ``(N, n_inputs)`` array.

    Parameters
    ----------
    x : ndarray, (N, 2) int or (N, n_inputs) float
        Inputs as stored in a :class:`Dataset`.
    dataset_or_encoding : Dataset or str
        A dataset (its ``encoding`` and ``n_inputs`` are used) or an encoding name from
        :data:`ENCODINGS`; with a name, ``n_inputs`` is required for ``"onehot"``.
    n_inputs : int, optional
        Input width; must match the dataset's when both are given.
    dtype : dtype, default float32
        Dtype of the result: a real floating or integer dtype (TypeError otherwise).

    Returns
    -------
    ndarray, (N, n_inputs) of ``dtype``
        For ``"onehot"``: the multi-hot count matrix, ``out[i, x[i, 0]] += 1``,
        ``out[i, x[i, 1]] += 1`` (for modular data, two concatenated one-hots of ``a`` and ``b``),
        so ``out @ W1 == W1[x[:, 0]] + W1[x[:, 1]]``. For ``"binary"``/``"bits"``: ``x`` cast to
        ``dtype`` (a new array); every value must be 0 or 1 (ValueError naming the first other
        value, NaN included); for ``"pixels"`` every value must lie in [0, 1].
    """
    if n_inputs is not None:
        n_inputs = _check_int("n_inputs", n_inputs, minimum=1)
    if isinstance(dataset_or_encoding, Dataset):
        encoding = dataset_or_encoding.encoding
        if n_inputs is not None and n_inputs != dataset_or_encoding.n_inputs:
            raise ValueError(
                f"n_inputs={n_inputs!r} disagrees with the dataset's "
                f"n_inputs={dataset_or_encoding.n_inputs}"
            )
        n_inputs = dataset_or_encoding.n_inputs
    else:
        encoding = dataset_or_encoding
        if not isinstance(encoding, str) or encoding not in ENCODINGS:
            raise ValueError(f"encoding={encoding!r} is unknown; valid: {ENCODINGS}")
    dtype = _check_dtype(dtype)
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (N, d), got shape {x.shape}")

    if encoding == "tokens":
        raise ValueError("'tokens' inputs are a sequence that the model embeds; no dense form")
    if encoding == "onehot":
        if n_inputs is None:
            raise ValueError("n_inputs is required to densify the 'onehot' encoding")
        if not np.issubdtype(x.dtype, np.integer):
            raise TypeError(f"'onehot' inputs must be integer row indices, got dtype {x.dtype}")
        if x.size and (x.min() < 0 or x.max() >= n_inputs):
            raise ValueError(
                f"'onehot' indices span [{x.min()}, {x.max()}], outside [0, {n_inputs})"
            )
        out = np.zeros((x.shape[0], n_inputs), dtype=dtype)
        rows = np.arange(x.shape[0])
        for j in range(x.shape[1]):  # one fancy add per column: no repeated (row, col) within it
            out[rows, x[:, j]] += 1
        return out

    if n_inputs is not None and x.shape[1] != n_inputs:
        raise ValueError(f"x has {x.shape[1]} columns but n_inputs={n_inputs}")
    if x.dtype.kind not in "fiub" and not is_ml_dtype(x.dtype, "bfloat16"):
        raise TypeError(f"{encoding!r} inputs must be real 0/1 values, got dtype {x.dtype}")
    if encoding == "pixels":
        bad = ~((x >= 0) & (x <= 1))  # also catches NaN
        allowed = "in [0, 1]"
    else:
        bad = (x != 0) & (x != 1)  # also catches NaN
        allowed = "0 or 1"
    if bad.any():
        raise ValueError(
            f"{encoding!r} inputs must be {allowed}, got {x[bad][0].item()!r} at index "
            f"{tuple(int(i) for i in np.argwhere(bad)[0])}"
        )
    return x.astype(dtype)


def _check_dtype(dtype) -> np.dtype:
    """The result dtype of :func:`dense_inputs`: a real floating or integer dtype."""
    if dtype is None:  # np.dtype(None) is float64: never guess
        raise TypeError("dtype must be a real floating or integer dtype (e.g. float32), got None")
    dt = as_dtype(dtype)
    if dt.kind not in "fiu" and not is_ml_dtype(dt, "bfloat16"):
        raise TypeError(f"dtype must be a real floating or integer dtype (e.g. float32), got {dt}")
    return dt


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    """``int(value)`` after checking it is a (non-bool) integer ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{name} must be an integer, got {name}={value!r} of type {type(value).__name__}"
        )
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value} is out of range; {name} must be >= {minimum}")
    return value


def _check_seed(seed: Any) -> int:
    return _check_int("seed", seed, minimum=0)


def _check_fraction(train_fraction: Any, n_total: int) -> tuple[float, int]:
    """Validate ``train_fraction`` and return it with ``n_train = int(train_fraction * N)``."""
    if isinstance(train_fraction, bool) or not isinstance(train_fraction, numbers.Real):
        raise TypeError(
            f"train_fraction must be a real number, got train_fraction={train_fraction!r} "
            f"of type {type(train_fraction).__name__}"
        )
    f = float(train_fraction)
    if not 0.0 < f < 1.0:  # also rejects NaN
        raise ValueError(
            f"train_fraction={train_fraction!r} is out of range; it must lie in the open "
            f"interval (0, 1)"
        )
    n_train = int(f * n_total)  # < n_total for every f < 1, so only the train side can empty
    if n_train < 1 or n_train > n_total - 1:
        which = "train" if n_train < 1 else "test"
        raise ValueError(
            f"train_fraction={train_fraction!r} with N={n_total} samples gives an empty {which} "
            f"split (int(train_fraction * N) = {n_train}); need 1 <= int(train_fraction * N) "
            f"<= {n_total - 1}"
        )
    return f, n_train


def _data_rng(seed: int) -> np.random.Generator:
    """The data stream: the first child of ``seed``, independent of ``default_rng(seed)``."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))


def is_prime(n: int) -> bool:
    """True when the integer ``n`` is prime (trial division; ``n < 2`` is not prime)."""
    n = _check_int("n", n)
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % d for d in range(3, math.isqrt(n) + 1, 2))


def split_indices(n_total: int, train_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The deterministic split of ``n_total`` sample indices.

    Parameters
    ----------
    n_total : int
        Number of samples ``N``.
    train_fraction : float
        In the open interval (0, 1); both splits must be non-empty.
    seed : int
        Non-negative integer seed.

    Returns
    -------
    train_idx : ndarray, (int(train_fraction * N),) int64
        ``perm[:n_train]`` where ``perm = np.random.default_rng(seed).permutation(N)``.
    test_idx : ndarray, (N - n_train,) int64
        ``perm[n_train:]``.
    """
    n_total = _check_int("n_total", n_total, minimum=2)
    _, n_train = _check_fraction(train_fraction, n_total)
    perm = np.random.default_rng(_check_seed(seed)).permutation(n_total).astype(np.int64)
    return perm[:n_train], perm[n_train:]


# --------------------------------------------------------------------------------------------
# Modular arithmetic
# --------------------------------------------------------------------------------------------


def bit_width(p: int) -> int:
    """Bits needed to write ``0 .. p-1``: ``ceil(log2 p)`` for ``p >= 2`` (7 for p = 113)."""
    p = _check_int("p", p, minimum=2)
    return (p - 1).bit_length()


def code_table(p: int, *, permute_codes: bool = False, seed: int = 0) -> np.ndarray:
    """Binary code of each residue: ``codes[v]`` is the integer written in bits for value ``v``.

    Parameters
    ----------
    p : int
        Modulus, ``>= 2``.
    permute_codes : bool, default False
        False: ``codes = arange(p)``. True: a random permutation of ``{0, ..., p-1}`` drawn from
        the data stream ``default_rng(SeedSequence(seed, spawn_key=(0,))).permutation(p)``.
    seed : int
        Non-negative integer seed (used only when ``permute_codes``).

    Returns
    -------
    ndarray, (p,) int64
        A bijection of ``{0, ..., p-1}``.
    """
    p = _check_int("p", p, minimum=2)
    seed = _check_seed(seed)
    if not isinstance(permute_codes, (bool, np.bool_)):
        raise TypeError(f"permute_codes must be a bool, got permute_codes={permute_codes!r}")
    if permute_codes:
        return _data_rng(seed).permutation(p).astype(np.int64)
    return np.arange(p, dtype=np.int64)


def _to_bits(values: np.ndarray, width: int) -> np.ndarray:
    """``(N,)`` non-negative ints -> ``(N, width)`` uint8 bits, most significant bit first."""
    shifts = np.arange(width - 1, -1, -1, dtype=np.int64)
    return ((values[:, None] >> shifts) & 1).astype(np.uint8)


def modular_arithmetic(
    p: int = 113,
    op: str = "add",
    *,
    train_fraction: float = 0.4,
    seed: int = 0,
    encoding: str = "onehot",
    permute_codes: bool = False,
    residue_start: int = 0,
) -> Dataset:
    """All pairs ``(a, b)`` of residues mod ``p`` labelled by ``(a op b) mod p``.

    Parameters
    ----------
    p : int, default 113
        Modulus, an integer ``>= 2``; ``op="div"`` requires ``p`` prime.
    op : {"add", "sub", "mul", "div"}
        ``a + b``, ``a - b``, ``a * b`` or ``a * b**-1`` (mod p; ``b != 0``, the inverse is
        ``pow(b, -1, p)``, tabulated once for ``b = 1 .. p-1``).
    train_fraction : float, default 0.4
        Fraction of pairs in the training set, in (0, 1); both splits must be non-empty.
    seed : int, default 0
        Non-negative integer seed of the split (and of the code permutation, see module notes).
    encoding : {"onehot", "binary", "tokens"}
        ``"onehot"``: ``x`` int64 ``(N, 2)`` holding row indices ``(a, p + b)``,
        ``n_inputs = 2p``. ``"binary"``: ``x`` float32 ``(N, 2 * bit_width(p))`` of 0/1,
        ``[bits(codes[a]), bits(codes[b])]`` most significant bit first. ``"tokens"``: ``x``
        int64 ``(N, 2)`` holding ``(a, b)``, ``n_inputs = p`` (the vocabulary).
    permute_codes : bool, default False
        Binary encoding only: pass the codes through a seeded random permutation
        (:func:`code_table`). Must be False for the other encodings.
    residue_start : {0, 1}, default 0
        Smallest operand: 0 (every residue) or 1 (the authors' transformer data).

    Returns
    -------
    Dataset
        ``N = n**2`` pairs with ``n = p - residue_start`` (``n * (n - 1)`` for div with
        ``residue_start = 0``, ``n**2`` with 1: ``b = 0`` is left out), enumerated a-major
        (``a`` then ``b``),
        split by :func:`split_indices`; ``y`` int64 in ``[0, p)``; ``n_classes = p``.
        ``meta`` holds task, op, p, train_fraction, seed, encoding, permute_codes, n_total,
        n_train, n_test, and for binary ``code_width`` and ``codes``.

    Examples
    --------
    >>> ds = modular_arithmetic(5, "div", train_fraction=0.5)
    >>> ds.n_train + ds.n_test
    20
    """
    p = _check_int("p", p, minimum=2)
    if op not in MODULAR_OPS:
        raise ValueError(f"op={op!r} is unknown; valid ops: {MODULAR_OPS}")
    if encoding not in MODULAR_ENCODINGS:
        raise ValueError(f"encoding={encoding!r} is unknown; valid encodings: {MODULAR_ENCODINGS}")
    if not isinstance(permute_codes, (bool, np.bool_)):
        raise TypeError(f"permute_codes must be a bool, got permute_codes={permute_codes!r}")
    residue_start = _check_int("residue_start", residue_start, minimum=0)
    if residue_start > 1:
        raise ValueError(f"residue_start must be 0 or 1, got residue_start={residue_start}")
    if permute_codes and encoding != "binary":
        raise ValueError(f"permute_codes=True needs encoding='binary', got encoding={encoding!r}")
    if op == "div" and not is_prime(p):
        raise ValueError(
            f"op='div' requires a prime modulus (every nonzero b must be invertible), "
            f"got p={p}, which is not prime"
        )
    seed = _check_seed(seed)

    residues = np.arange(residue_start, p, dtype=np.int64)
    b_values = residues[residues > 0] if op == "div" else residues
    a = np.repeat(residues, b_values.size)
    b = np.tile(b_values, residues.size)
    if op == "add":
        y = (a + b) % p
    elif op == "sub":
        y = (a - b) % p  # NumPy's % has the sign of the divisor: result in [0, p)
    elif op == "mul":
        y = (a * b) % p
    else:
        inverse = np.zeros(p, dtype=np.int64)
        inverse[1:] = [pow(v, -1, p) for v in range(1, p)]  # p - 1 ints: microseconds
        y = (a * inverse[b]) % p
    n_total = int(y.size)
    train_fraction, _ = _check_fraction(train_fraction, n_total)
    train_idx, test_idx = split_indices(n_total, train_fraction, seed)

    meta: dict[str, Any] = {
        "task": op,
        "op": op,
        "p": p,
        "train_fraction": train_fraction,
        "seed": seed,
        "encoding": encoding,
        "permute_codes": bool(permute_codes),
        "n_total": n_total,
        "n_train": int(train_idx.size),
        "n_test": int(test_idx.size),
        "order": "a-major",
        "residue_start": int(residue_start),
    }
    if encoding == "onehot":
        x = np.stack([a, p + b], axis=1)
        n_inputs = 2 * p
    elif encoding == "tokens":
        x = np.stack([a, b], axis=1)
        n_inputs = p
    else:
        width = bit_width(p)
        codes = code_table(p, permute_codes=bool(permute_codes), seed=seed)
        bits = _to_bits(codes, width).astype(np.float32)  # (p, width) lookup table
        x = np.concatenate([bits[a], bits[b]], axis=1)
        n_inputs = 2 * width
        meta["code_width"] = width
        meta["codes"] = [int(c) for c in codes]

    return Dataset.from_split(
        x,
        y,
        train_idx,
        test_idx,
        n_classes=p,
        n_inputs=n_inputs,
        encoding=encoding,
        name=f"{op}_p{p}_{encoding}"
        + ("_permuted" if permute_codes else "")
        + ("_from1" if residue_start else ""),
        meta=meta,
    )


# --------------------------------------------------------------------------------------------
# Sparse parity
# --------------------------------------------------------------------------------------------


def _unique_bit_rows(rng: np.random.Generator, n_samples: int, n_bits: int) -> np.ndarray:
    """``n_samples`` distinct uniformly random bit vectors, ``(n_samples, n_bits)`` uint8."""
    if n_bits <= _MAX_INT_BITS:
        ints = rng.choice(1 << n_bits, size=n_samples, replace=False).astype(np.int64)
        return _to_bits(ints, n_bits)
    rows = np.empty((0, n_bits), dtype=np.uint8)
    while rows.shape[0] < n_samples:  # 2**63+ vectors: duplicates are (almost) never drawn
        draw = rng.integers(0, 2, size=(n_samples - rows.shape[0], n_bits), dtype=np.uint8)
        candidates = np.concatenate([rows, draw])
        _, first = np.unique(candidates, axis=0, return_index=True)
        rows = candidates[np.sort(first)]  # keep first occurrences, in draw order
    return rows


def sparse_parity(
    n_bits: int = 43,
    k: int = 3,
    n_samples: int = 2000,
    *,
    train_fraction: float = 0.5,
    seed: int = 0,
) -> Dataset:
    """Distinct random bit vectors labelled by the parity (XOR) of their first ``k`` bits.

    The paper's setting is ``k = 3`` parity bits among 40 noise bits, i.e. ``n_bits = 43``.

    Parameters
    ----------
    n_bits : int, default 43
        Length of each bit vector, ``>= 1``.
    k : int, default 3
        Number of leading bits whose XOR is the label, ``1 <= k <= n_bits``.
    n_samples : int, default 2000
        Number of distinct vectors, ``2 <= n_samples <= 2**n_bits``.
    train_fraction : float, default 0.5
        Fraction in the training set, in (0, 1); both splits must be non-empty.
    seed : int, default 0
        Non-negative integer seed. Vectors come from the data stream (for ``n_bits <= 62``:
        distinct integers ``rng.choice(2**n_bits, n_samples, replace=False)`` written in bits,
        most significant first; above that, uniform bit draws with duplicates rejected); the
        split is :func:`split_indices` with the same seed.

    Returns
    -------
    Dataset
        ``x`` float32 ``(N, n_bits)`` with values in ``{0, 1}`` (not ``{-1, 1}``),
        ``y`` int64 in ``{0, 1}``, ``n_classes = 2``, ``n_inputs = n_bits``,
        ``encoding = "bits"``.
    """
    n_bits = _check_int("n_bits", n_bits, minimum=1)
    k = _check_int("k", k, minimum=1)
    if k > n_bits:
        raise ValueError(f"k={k} is out of range; need 1 <= k <= n_bits={n_bits}")
    n_samples = _check_int("n_samples", n_samples, minimum=2)
    if n_samples > 2**n_bits:
        raise ValueError(
            f"n_samples={n_samples} is out of range; only 2**n_bits = {2**n_bits} distinct "
            f"vectors of n_bits={n_bits} exist"
        )
    seed = _check_seed(seed)
    train_fraction, _ = _check_fraction(train_fraction, n_samples)

    bits = _unique_bit_rows(_data_rng(seed), n_samples, n_bits)
    y = (bits[:, :k].sum(axis=1, dtype=np.int64) % 2).astype(np.int64)
    x = bits.astype(np.float32)
    train_idx, test_idx = split_indices(n_samples, train_fraction, seed)
    meta = {
        "task": "parity",
        "n_bits": n_bits,
        "k": k,
        "parity_bits": list(range(k)),
        "n_samples": n_samples,
        "train_fraction": train_fraction,
        "seed": seed,
        "encoding": "bits",
        "input_values": [0, 1],
        "n_total": n_samples,
        "n_train": int(train_idx.size),
        "n_test": int(test_idx.size),
    }
    return Dataset.from_split(
        x,
        y,
        train_idx,
        test_idx,
        n_classes=2,
        n_inputs=n_bits,
        encoding="bits",
        name=f"parity_n{n_bits}_k{k}",
        meta=meta,
    )


def digits(*, train_fraction: float = 0.5, seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 handwritten digits: a stand-in for MNIST that needs no download.

    The paper's Fig. 14 trains on MNIST; this is the UCI optical-digits set that scikit-learn
    ships (1 797 images of 8 x 8 grey levels 0..16, 10 classes), so the setting runs offline.
    It is smaller and easier than MNIST: results on it are the stand-in's, not MNIST's.

    Parameters
    ----------
    train_fraction : float, default 0.5
        Fraction in the training set, in (0, 1); both splits must be non-empty.
    seed : int, default 0
        Seed of the split (:func:`split_indices`); the images are not shuffled otherwise.

    Returns
    -------
    Dataset
        ``x`` float32 ``(N, 64)``: grey level / 16 (exact), in [0, 1]; ``y`` int64 digits;
        ``n_classes = 10``, ``n_inputs = 64``, ``encoding = "pixels"``.

    Raises
    ------
    ImportError
        scikit-learn is not installed (``pip install 'numstab[digits]'``).
    """
    seed = _check_seed(seed)
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(
            "the digits task needs scikit-learn: pip install 'numstab[digits]'"
        ) from None
    data = load_digits()
    x = (np.asarray(data.data, dtype=np.float64) / 16).astype(np.float32)  # 0..16: exact
    y = np.asarray(data.target, dtype=np.int64)
    n = int(y.size)
    train_fraction, _ = _check_fraction(train_fraction, n)
    train_idx, test_idx = split_indices(n, train_fraction, seed)
    meta = {
        "task": "digits",
        "source": "scikit-learn load_digits (UCI optical recognition of handwritten digits)",
        "stand_in_for": "MNIST",
        "train_fraction": train_fraction,
        "seed": seed,
        "encoding": "pixels",
        "input_values": "grey level / 16, in [0, 1]",
        "n_total": n,
        "n_train": int(train_idx.size),
        "n_test": int(test_idx.size),
    }
    return Dataset.from_split(
        x,
        y,
        train_idx,
        test_idx,
        n_classes=10,
        n_inputs=x.shape[1],
        encoding="pixels",
        name="digits8x8",
        meta=meta,
    )


# --------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------


def get_dataset(task: str, **kwargs: Any) -> Dataset:
    """Build a dataset by task name.

    Parameters
    ----------
    task : {"add", "sub", "mul", "div", "parity", "digits"}
        A modular operation (passed as ``op`` to :func:`modular_arithmetic`; the modulus is the
        keyword ``p``), ``"parity"`` (:func:`sparse_parity`) or ``"digits"``
        (:func:`digits`).
    **kwargs
        Forwarded unchanged to the generator.

    Examples
    --------
    >>> get_dataset("mul", p=7, train_fraction=0.5).n_classes
    7
    """
    if not isinstance(task, str) or task not in TASKS:
        raise ValueError(f"task={task!r} is unknown; valid tasks: {TASKS}")
    if task == "parity":
        return sparse_parity(**kwargs)
    if task == "digits":
        return digits(**kwargs)
    if "op" in kwargs:
        raise TypeError(f"op={kwargs['op']!r} must not be given: the task {task!r} is the op")
    return modular_arithmetic(op=task, **kwargs)
