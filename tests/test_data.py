"""Tests for numstab.data: sizes, labels against brute force, splits, encodings, validation."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import numstab.data as data_module
from numstab.data import (
    MODULAR_OPS,
    TASKS,
    Dataset,
    bit_width,
    code_table,
    dense_inputs,
    digits,
    get_dataset,
    is_prime,
    modular_arithmetic,
    sparse_parity,
    split_indices,
)

SMALL_PRIMES = [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31]


# ------------------------------------------------------------------ independent references


def brute_label(a: int, b: int, p: int, op: str) -> int:
    """Pure-Python label; the inverse is found by search, not by pow()."""
    if op == "add":
        return (a + b) % p
    if op == "sub":
        return (a - b) % p
    if op == "mul":
        return (a * b) % p
    inv = next(c for c in range(1, p) if (b * c) % p == 1)
    return (a * inv) % p


def all_pairs(p: int, op: str) -> list[tuple[int, int]]:
    lo = 1 if op == "div" else 0
    return [(a, b) for a in range(p) for b in range(lo, p)]


def onehot_pairs(ds: Dataset, split: str) -> list[tuple[int, int]]:
    x = getattr(ds, f"x_{split}")
    p = ds.meta["p"]
    return [(int(r[0]), int(r[1]) - p) for r in x]


def bits_to_int(bits: np.ndarray) -> np.ndarray:
    """Rows of 0/1 (most significant bit first) -> integers, by plain Python arithmetic."""
    out = []
    for row in np.asarray(bits):
        v = 0
        for bit in row:
            assert bit in (0.0, 1.0)
            v = 2 * v + int(bit)
        out.append(v)
    return np.array(out, dtype=np.int64)


def binary_pairs(ds: Dataset, split: str) -> list[tuple[int, int]]:
    x = getattr(ds, f"x_{split}")
    width = ds.meta["code_width"]
    codes = ds.meta["codes"]
    decode = {c: v for v, c in enumerate(codes)}
    a_codes, b_codes = bits_to_int(x[:, :width]), bits_to_int(x[:, width:])
    return [(decode[int(ca)], decode[int(cb)]) for ca, cb in zip(a_codes, b_codes, strict=True)]


# ------------------------------------------------------------------ sizes and split rule


@pytest.mark.parametrize("op", MODULAR_OPS)
def test_sizes_p113(op):
    ds = modular_arithmetic(113, op, train_fraction=0.4, seed=0)
    n_total = 113 * 112 if op == "div" else 113**2
    assert ds.n_train + ds.n_test == n_total
    assert ds.n_train == int(0.4 * n_total)
    assert ds.x_train.shape == (ds.n_train, 2) and ds.x_train.dtype == np.int64
    assert ds.y_train.dtype == np.int64 and ds.y_test.dtype == np.int64
    assert ds.n_classes == 113 and ds.n_inputs == 226
    assert ds.meta["n_total"] == n_total


def test_paper_split_has_5107_training_pairs():
    ds = modular_arithmetic(113, "add", train_fraction=0.4, seed=0)
    assert ds.n_train == 5107
    assert ds.n_test == 113**2 - 5107
    assert ds.meta["n_train"] == 5107


@pytest.mark.parametrize("op", MODULAR_OPS)
@pytest.mark.parametrize("seed", [0, 3])
def test_split_follows_documented_permutation(op, seed):
    p, f = 13, 0.3
    pairs = all_pairs(p, op)
    perm = np.random.default_rng(seed).permutation(len(pairs))
    n_train = int(f * len(pairs))
    ds = modular_arithmetic(p, op, train_fraction=f, seed=seed)
    assert onehot_pairs(ds, "train") == [pairs[i] for i in perm[:n_train]]
    assert onehot_pairs(ds, "test") == [pairs[i] for i in perm[n_train:]]
    train_idx, test_idx = split_indices(len(pairs), f, seed)
    np.testing.assert_array_equal(np.concatenate([train_idx, test_idx]), perm)


@pytest.mark.parametrize("op", MODULAR_OPS)
@pytest.mark.parametrize("encoding", ["onehot", "binary"])
def test_train_test_disjoint_and_cover_all_pairs(op, encoding):
    p = 17
    ds = modular_arithmetic(p, op, train_fraction=0.4, seed=1, encoding=encoding)
    decode = onehot_pairs if encoding == "onehot" else binary_pairs
    train, test = decode(ds, "train"), decode(ds, "test")
    assert len(set(train)) == len(train) and len(set(test)) == len(test)
    assert not set(train) & set(test)
    assert set(train) | set(test) == set(all_pairs(p, op))


# ------------------------------------------------------------------ labels


@settings(max_examples=60, deadline=None)
@given(
    p=st.sampled_from(SMALL_PRIMES),
    op=st.sampled_from(MODULAR_OPS),
    encoding=st.sampled_from(["onehot", "binary"]),
    permute=st.booleans(),
    seed=st.integers(0, 2**32),
    f=st.floats(0.2, 0.8),
)
def test_labels_match_brute_force(p, op, encoding, permute, seed, f):
    permute = permute and encoding == "binary"
    n_total = len(all_pairs(p, op))
    if not 1 <= int(f * n_total) <= n_total - 1:
        with pytest.raises(ValueError, match="empty"):
            modular_arithmetic(p, op, train_fraction=f, seed=seed, encoding=encoding)
        return
    ds = modular_arithmetic(
        p, op, train_fraction=f, seed=seed, encoding=encoding, permute_codes=permute
    )
    decode = onehot_pairs if encoding == "onehot" else binary_pairs
    for split in ("train", "test"):
        pairs = decode(ds, split)
        expected = [brute_label(a, b, p, op) for a, b in pairs]
        assert getattr(ds, f"y_{split}").tolist() == expected


def test_labels_p113_div_and_sub_spot_checks():
    p = 113
    ds = modular_arithmetic(p, "div", train_fraction=0.5)
    for (a, b), y in zip(onehot_pairs(ds, "train"), ds.y_train.tolist(), strict=True):
        assert (y * b) % p == a % p
    ds = modular_arithmetic(p, "sub", train_fraction=0.5)
    for (a, b), y in zip(onehot_pairs(ds, "test"), ds.y_test.tolist(), strict=True):
        assert 0 <= y < p and (y + b) % p == a


def test_composite_modulus_allowed_except_div():
    ds = modular_arithmetic(12, "mul", train_fraction=0.5)
    for (a, b), y in zip(onehot_pairs(ds, "train"), ds.y_train.tolist(), strict=True):
        assert y == (a * b) % 12
    with pytest.raises(ValueError, match=r"prime.*p=12|p=12.*prime"):
        modular_arithmetic(12, "div")


# ------------------------------------------------------------------ determinism


@pytest.mark.parametrize(
    "make",
    [
        lambda s: modular_arithmetic(23, "add", seed=s),
        lambda s: modular_arithmetic(23, "div", seed=s, encoding="binary", permute_codes=True),
        lambda s: sparse_parity(12, 3, 500, seed=s),
    ],
)
def test_determinism_and_seed_sensitivity(make):
    a1, a2, b = make(5), make(5), make(6)
    for name in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a1, name), getattr(a2, name))
    assert a1.meta == a2.meta
    assert not np.array_equal(a1.x_train, b.x_train)


def test_different_seed_changes_split_not_pair_set():
    d0, d1 = modular_arithmetic(31, "mul", seed=0), modular_arithmetic(31, "mul", seed=1)
    assert set(onehot_pairs(d0, "train")) != set(onehot_pairs(d1, "train"))
    assert d0.n_train == d1.n_train


# ------------------------------------------------------------------ one-hot encoding


@pytest.mark.parametrize("op", ["add", "div"])
def test_dense_onehot_equals_two_concatenated_onehots(op):
    p = 11
    ds = modular_arithmetic(p, op, train_fraction=0.5, seed=2)
    for split in ("train", "test"):
        dense = ds.dense(split)
        assert dense.shape == (getattr(ds, f"n_{split}"), 2 * p) and dense.dtype == np.float32
        pairs = np.array(onehot_pairs(ds, split))
        eye = np.eye(p, dtype=np.float32)
        expected = np.concatenate([eye[pairs[:, 0]], eye[pairs[:, 1]]], axis=1)
        np.testing.assert_array_equal(dense, expected)
        np.testing.assert_array_equal(dense_inputs(getattr(ds, f"x_{split}"), ds), expected)


def test_dense_onehot_matmul_equals_gather():
    ds = modular_arithmetic(13, "sub", seed=0)
    w = np.random.default_rng(0).standard_normal((ds.n_inputs, 7))
    x = ds.x_train
    np.testing.assert_array_equal(ds.dense(dtype=np.float64) @ w, w[x[:, 0]] + w[x[:, 1]])


def test_dense_inputs_by_encoding_name_and_counts_repeats():
    x = np.array([[0, 3], [2, 2]])
    out = dense_inputs(x, "onehot", 4, dtype=np.float64)
    np.testing.assert_array_equal(out, [[1, 0, 0, 1], [0, 0, 2, 0]])
    assert out.dtype == np.float64
    with pytest.raises(ValueError, match="n_inputs"):
        dense_inputs(x, "onehot")
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        dense_inputs(x, "onehot", 3)
    with pytest.raises(ValueError, match="'nope'"):
        dense_inputs(x, "nope")
    ds = modular_arithmetic(5, "add", train_fraction=0.5)
    with pytest.raises(ValueError, match="n_inputs=9"):
        dense_inputs(ds.x_train, ds, 9)


# ------------------------------------------------------------------ binary encoding


@pytest.mark.parametrize(
    ("p", "width"),
    [(2, 1), (3, 2), (4, 2), (5, 3), (8, 3), (9, 4), (113, 7), (127, 7), (128, 7), (129, 8)],
)
def test_bit_width_is_ceil_log2(p, width):
    assert bit_width(p) == width == math.ceil(math.log2(p))


@pytest.mark.parametrize("permute", [False, True])
@pytest.mark.parametrize("op", MODULAR_OPS)
def test_binary_codes_decode_to_the_same_pairs_as_onehot(permute, op):
    p = 113
    onehot = modular_arithmetic(p, op, seed=4)
    binary = modular_arithmetic(p, op, seed=4, encoding="binary", permute_codes=permute)
    assert binary.n_inputs == 14 and binary.x_train.shape == (binary.n_train, 14)
    assert binary.x_train.dtype == np.float32
    assert set(np.unique(binary.x_train).tolist()) == {0.0, 1.0}
    # the code permutation uses its own stream: the split is the same as one-hot's
    assert binary_pairs(binary, "train") == onehot_pairs(onehot, "train")
    assert binary_pairs(binary, "test") == onehot_pairs(onehot, "test")
    np.testing.assert_array_equal(binary.y_train, onehot.y_train)
    np.testing.assert_array_equal(binary.dense("test"), binary.x_test)


def test_plain_binary_is_the_residue_in_bits():
    ds = modular_arithmetic(10, "add", encoding="binary", train_fraction=0.5)
    assert ds.meta["codes"] == list(range(10))
    a_bits = ds.x_train[:, :4]
    pairs = onehot_pairs(modular_arithmetic(10, "add", train_fraction=0.5), "train")
    np.testing.assert_array_equal(bits_to_int(a_bits), [a for a, _ in pairs])
    # most significant bit first: 1 -> 0001, 8 -> 1000
    row = next(i for i, (a, _) in enumerate(pairs) if a == 8)
    np.testing.assert_array_equal(a_bits[row], [1, 0, 0, 0])


@pytest.mark.parametrize("p", [2, 5, 64, 113])
@pytest.mark.parametrize("seed", [0, 1, 99])
def test_code_permutation_is_a_seeded_bijection(p, seed):
    codes = code_table(p, permute_codes=True, seed=seed)
    np.testing.assert_array_equal(np.sort(codes), np.arange(p))
    stream = np.random.default_rng(np.random.SeedSequence(seed).spawn(1)[0])
    np.testing.assert_array_equal(codes, stream.permutation(p))
    np.testing.assert_array_equal(code_table(p, seed=seed), np.arange(p))
    if p >= 64:
        assert not np.array_equal(codes, np.arange(p))
        assert not np.array_equal(codes, code_table(p, permute_codes=True, seed=seed + 1))


def test_permuted_binary_rows_differ_from_plain():
    plain = modular_arithmetic(113, "add", encoding="binary")
    permuted = modular_arithmetic(113, "add", encoding="binary", permute_codes=True)
    assert not np.array_equal(plain.x_train, permuted.x_train)
    np.testing.assert_array_equal(plain.y_train, permuted.y_train)
    assert permuted.name != plain.name


# ------------------------------------------------------------------ sparse parity


@pytest.mark.parametrize(
    ("n_bits", "k", "n_samples", "f"),
    [(43, 3, 2000, 0.5), (10, 4, 1024, 0.3), (4, 1, 16, 0.5), (63, 2, 300, 0.7), (80, 5, 300, 0.5)],
)
def test_sparse_parity(n_bits, k, n_samples, f):
    ds = sparse_parity(n_bits, k, n_samples, train_fraction=f, seed=7)
    x = np.concatenate([ds.x_train, ds.x_test])
    y = np.concatenate([ds.y_train, ds.y_test])
    assert x.shape == (n_samples, n_bits) and x.dtype == np.float32
    assert ds.n_train == int(f * n_samples)
    assert set(np.unique(x).tolist()) <= {0.0, 1.0}
    assert np.unique(x, axis=0).shape[0] == n_samples
    expected = [sum(int(b) for b in row[:k]) % 2 for row in x]
    assert y.tolist() == expected and y.dtype == np.int64
    assert ds.n_classes == 2 and ds.n_inputs == n_bits and ds.encoding == "bits"
    if n_samples >= 300:  # both labels and both bit values occur in every column
        assert set(y.tolist()) == {0, 1}
        assert np.all(x.min(axis=0) == 0) and np.all(x.max(axis=0) == 1)


def test_sparse_parity_full_cube_and_split_rule():
    ds = sparse_parity(5, 2, 32, train_fraction=0.25, seed=3)
    x = np.concatenate([ds.x_train, ds.x_test])
    assert {tuple(r) for r in x.astype(int).tolist()} == {
        tuple((v >> s) & 1 for s in range(4, -1, -1)) for v in range(32)
    }
    train_idx, _ = split_indices(32, 0.25, 3)
    assert ds.n_train == 8 and train_idx.size == 8


def test_sparse_parity_rejection_path_removes_duplicates(monkeypatch):
    # Force the wide-vector path (normally n_bits > 62) on a 6-bit cube, where duplicates abound.
    monkeypatch.setattr(data_module, "_MAX_INT_BITS", 0)
    ds = sparse_parity(6, 2, 64, train_fraction=0.5, seed=1)
    x = np.concatenate([ds.x_train, ds.x_test])
    assert np.unique(x, axis=0).shape[0] == 64
    y = np.concatenate([ds.y_train, ds.y_test])
    assert y.tolist() == [int(r[0] + r[1]) % 2 for r in x]


def test_paper_parity_defaults():
    ds = sparse_parity()
    assert ds.n_inputs == 43 and ds.n_train == 1000 and ds.n_test == 1000
    assert ds.meta["k"] == 3 and ds.meta["input_values"] == [0, 1]


# ------------------------------------------------------------------ container and factory


def test_dataset_container():
    ds = modular_arithmetic(7, "add", train_fraction=0.5, encoding="binary", permute_codes=True)
    summary = ds.to_dict()
    text = json.dumps(summary)  # JSON-serialisable, no arrays
    assert "x_train" not in summary and "n_train" in text
    assert summary["meta"]["p"] == 7 and summary["n_inputs"] == 6
    summary["meta"]["p"] = 0
    assert ds.meta["p"] == 7  # to_dict returns a copy
    hash(ds)  # identity hash: fields hold arrays and a dict
    assert ds == ds and ds != modular_arithmetic(7, "add", train_fraction=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.n_classes = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="read-only"):
        ds.x_train[0, 0] = 5
    with pytest.raises(ValueError, match="'val'"):
        ds.dense("val")
    json.dumps(sparse_parity(8, 2, 100).to_dict())


def test_get_dataset_factory():
    for task in MODULAR_OPS:
        a = get_dataset(task, p=7, train_fraction=0.5, seed=2)
        b = modular_arithmetic(7, task, train_fraction=0.5, seed=2)
        np.testing.assert_array_equal(a.x_train, b.x_train)
        np.testing.assert_array_equal(a.y_test, b.y_test)
        assert a.meta["op"] == task
    par = get_dataset("parity", n_bits=9, k=2, n_samples=100, seed=1)
    np.testing.assert_array_equal(par.x_train, sparse_parity(9, 2, 100, seed=1).x_train)
    with pytest.raises(ValueError, match=r"'xor'.*parity"):
        get_dataset("xor")
    with pytest.raises(TypeError, match="op="):
        get_dataset("add", op="mul")
    # every task name builds (the digits need scikit-learn, in the test extra)
    assert set(TASKS) == {*MODULAR_OPS, "parity", "digits"}
    dig = get_dataset("digits", train_fraction=0.5, seed=3)
    np.testing.assert_array_equal(dig.x_test, digits(train_fraction=0.5, seed=3).x_test)


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("call", "exc", "pattern"),
    [
        (lambda: modular_arithmetic(1), ValueError, r"p=1\b.*>= 2"),
        (lambda: modular_arithmetic(-5), ValueError, r"p=-5"),
        (lambda: modular_arithmetic(2.5), TypeError, r"p=2\.5"),
        (lambda: modular_arithmetic(113.0), TypeError, r"p=113\.0"),
        (lambda: modular_arithmetic("113"), TypeError, r"p='113'"),
        (lambda: modular_arithmetic(True), TypeError, r"p=True"),
        (lambda: modular_arithmetic(7, "pow"), ValueError, r"'pow'.*'add'.*'div'"),
        (lambda: modular_arithmetic(9, "div"), ValueError, r"p=9.*not prime"),
        (lambda: modular_arithmetic(7, encoding="ascii"), ValueError, r"'ascii'.*'onehot'"),
        (lambda: modular_arithmetic(7, permute_codes=True), ValueError, r"permute_codes"),
        (lambda: modular_arithmetic(7, encoding="binary", permute_codes=1), TypeError, "=1"),
        (lambda: modular_arithmetic(7, train_fraction=0.0), ValueError, r"=0\.0.*\(0, 1\)"),
        (lambda: modular_arithmetic(7, train_fraction=1.0), ValueError, r"=1\.0.*\(0, 1\)"),
        (lambda: modular_arithmetic(7, train_fraction=-0.2), ValueError, r"=-0\.2"),
        (lambda: modular_arithmetic(7, train_fraction=float("nan")), ValueError, "nan"),
        (lambda: modular_arithmetic(7, train_fraction="0.4"), TypeError, r"='0\.4'"),
        (lambda: modular_arithmetic(2, train_fraction=0.1), ValueError, r"=0\.1.*empty train"),
        (lambda: modular_arithmetic(7, seed=1.5), TypeError, r"seed=1\.5"),
        (lambda: modular_arithmetic(7, seed="0"), TypeError, r"seed='0'"),
        (lambda: modular_arithmetic(7, seed=None), TypeError, r"seed=None"),
        (lambda: modular_arithmetic(7, seed=-1), ValueError, r"seed=-1.*>= 0"),
        (lambda: sparse_parity(0, 1, 2), ValueError, r"n_bits=0.*>= 1"),
        (lambda: sparse_parity(4.0, 1, 2), TypeError, r"n_bits=4\.0"),
        (lambda: sparse_parity(5, 6, 10), ValueError, r"k=6.*n_bits=5"),
        (lambda: sparse_parity(5, 0, 10), ValueError, r"k=0.*>= 1"),
        (lambda: sparse_parity(5, 2, 33), ValueError, r"n_samples=33.*2\*\*n_bits = 32"),
        (lambda: sparse_parity(5, 2, 1), ValueError, r"n_samples=1"),
        (lambda: sparse_parity(5, 2, 10, train_fraction=1.5), ValueError, r"=1\.5"),
        (lambda: sparse_parity(5, 2, 10, train_fraction=0.05), ValueError, r"empty train"),
        (lambda: sparse_parity(5, 2, 10, seed=0.0), TypeError, r"seed=0\.0"),
        (lambda: split_indices(10, 0.5, seed=[1, 2]), TypeError, r"seed=\[1, 2\]"),
        (lambda: get_dataset(3), ValueError, r"task=3.*'parity'"),
        (lambda: bit_width(1), ValueError, r"p=1"),
        (lambda: is_prime("7"), TypeError, r"n='7'"),
    ],
)
def test_validation_errors(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_numpy_integer_arguments_accepted():
    ds = modular_arithmetic(np.int64(7), "add", seed=np.int32(3), train_fraction=np.float32(0.5))
    assert ds.n_classes == 7 and isinstance(ds.meta["p"], int)
    json.dumps(ds.to_dict())


def test_is_prime():
    primes = [n for n in range(200) if is_prime(n)]
    assert primes == [n for n in range(2, 200) if all(n % d for d in range(2, n))]
