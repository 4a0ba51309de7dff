"""The CPU kernels' tile products (fastattn/cpu/_gemm.py): the micro-kernels and their BLAS fallback.

Each product is held to the classical bound of a dot product of length k,
``|got - exact| <= (k + 2) eps (|a| @ |b| + |out|)`` element by element: Higham's
gamma_k with one more rounding for the add into ``out``, written with ``eps``, twice the
unit roundoff, so it is about twice the worst case. That factor also covers the
reference for float64 tiles (which take BLAS), itself a float64 product.
"""
import numba
import numpy as np
import pytest
from numba import njit

import fastattn
from conftest import assert_close
from paged_cases import PagedCase, paged_inputs
from fastattn.cpu._gemm import (KC, MR, PANEL, add_matmul, add_matmul_tn, matmul_nt, matmul_packed,
                                matmul_packed_tn, pack_transposed, simd_gemm, target_has_avx512)


@njit
def _nt(a, b, out, simd):
    panels = np.empty(b.size, b.dtype)
    pack_transposed(b, panels, simd)
    matmul_nt(a, b, panels, out, simd)


@njit
def _nn(a, b, out, simd):
    add_matmul(a, b, out, np.empty_like(out), simd)


@njit
def _tn(at, b, out, simd):
    add_matmul_tn(at, b, out, np.empty_like(out), simd)


def _within_bound(got, a, b, start, dtype):
    """Whether ``got`` is ``start + a @ b`` within the rounding bound of the module docstring."""
    a64, b64, s64 = (x.astype(np.float64) for x in (a, b, start))
    k = a.shape[1]
    bound = (k + 2) * np.finfo(dtype).eps * (np.abs(a64) @ np.abs(b64) + np.abs(s64))
    return bool(np.all(np.abs(got - (s64 + a64 @ b64)) <= bound))


SHAPES = [  # (m, n, k): rows past a multiple of MR, tail panels of 16, 32 and 48 columns, n % 16 != 0 (BLAS)
    (256, 512, 64), (2 * MR + 1, PANEL + 48, 33), (1, 16, 1), (MR - 1, 112, 128), (5, 96, 17), (7, 24, 8),
    (3, 80, 256),
]


@pytest.mark.parametrize("simd", [True, False], ids=["micro-kernels", "blas"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("m,n,k", SHAPES, ids=lambda x: str(x))
@pytest.mark.parametrize("product", ["a @ b.T", "out + a @ b", "out + a.T @ b"])
def test_tile_products_are_within_the_rounding_bound(product, m, n, k, dtype, simd, rng):
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    start = rng.standard_normal((m, n)).astype(dtype)
    if product == "a @ b.T":
        start[:] = 0
        got = np.full((m, n), np.nan, dtype)
        _nt(a, np.ascontiguousarray(b.T), got, simd)
    elif product == "out + a @ b":
        got = start.copy()
        _nn(a, b, got, simd)
    else:
        got = start.copy()
        _tn(np.ascontiguousarray(a.T), b, got, simd)
    assert _within_bound(got, a, b, start, dtype)


@njit
def _packed(a, b, out, simd):
    matmul_packed(a, b, out, np.empty(KC * PANEL, out.dtype), simd)


@njit
def _packed_tn(wide, c0, c1, b, out, simd):
    matmul_packed_tn(wide[:, c0:c1], b, out, np.empty(KC * PANEL, out.dtype), simd)


@pytest.mark.parametrize("simd", [True, False], ids=["micro-kernels", "blas"])
@pytest.mark.parametrize("m,n,k", [(2 * MR + 1, PANEL + 32, 2 * KC + 7), (3, 16, 5), (7, 24, KC), (3, 16, 0)],
                         ids=lambda x: str(x))
def test_the_projections_products_are_within_the_rounding_bound(m, n, k, simd, rng):
    """``a @ b`` with ``b`` packed a block of KC rows at a time (C order, or a transpose like ``weight.T``)
    and ``a.T @ b`` with ``a`` a block of columns of a wider array: several blocks, tails, BLAS widths."""
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    zero = np.zeros((m, n), np.float32)
    for layout in (b, np.asfortranarray(b)):
        got = np.full((m, n), np.nan, np.float32)
        _packed(a, layout, got, simd)
        assert _within_bound(got, a, b, zero, np.float32)
    wide = np.zeros((k, m + 9), np.float32)
    wide[:, 4:4 + m] = a.T
    got = np.full((m, n), np.nan, np.float32)
    _packed_tn(wide, 4, 4 + m, b, got, simd)
    assert _within_bound(got, a, b, zero, np.float32)


def test_the_bound_catches_one_dropped_term(rng):
    """A product that loses one of its k terms (a micro-kernel stepping one element short) fails the bound."""
    a = rng.standard_normal((2 * MR + 1, 64)).astype(np.float32)
    b = rng.standard_normal((64, PANEL)).astype(np.float32)
    got = np.zeros((a.shape[0], b.shape[1]), np.float32)
    _nn(a[:, :-1].copy(), b[:-1].copy(), got, True)
    assert not _within_bound(got, a, b, np.zeros_like(got), np.float32)


def test_a_block_of_rows_is_written_in_place(rng):
    """The backward adds a block of dq rows straight into its [B, H, S, D] array: nothing else changes."""
    a, b = rng.standard_normal((9, 48)).astype(np.float32), rng.standard_normal((48, 32)).astype(np.float32)
    dq = np.zeros((2, 3, 20, 32), np.float32)
    _nn(a, b, dq[1, 2, 5:14], True)
    assert _within_bound(dq[1, 2, 5:14], a, b, np.zeros((9, 32), np.float32), np.float32)
    dq[1, 2, 5:14] = 0
    assert not dq.any()


@pytest.mark.parametrize("choice", ["simd", "blas"])
def test_attention_matches_the_oracle_on_either_product(choice, rng, monkeypatch):
    """Forward and backward, causal with a ragged last key tile, on each path whatever the CPU."""
    monkeypatch.setattr(fastattn.config, "cpu_gemm", choice)
    monkeypatch.setattr(fastattn.config, "cpu_block_k", 64)
    monkeypatch.setattr(fastattn.config, "cpu_bwd_block_k", 32)
    q, k, v, dout = (rng.standard_normal((1, 2, 150, 32)).astype(np.float32) for _ in range(4))
    out, lse = fastattn.attention(q, k, v, causal=True, return_lse=True)
    grads = fastattn.attention_backward(dout, q, k, v, out, lse, causal=True)
    ref_out = fastattn.reference.attention(q, k, v, causal=True)
    refs = fastattn.reference.attention_backward(dout, q, k, v, causal=True)
    assert_close(out, ref_out, np.float32, "out")
    for name, got, ref in zip(("dq", "dk", "dv"), grads, refs):
        assert_close(got, ref, np.float32, name)


def test_the_choice_is_checked(monkeypatch):
    monkeypatch.setattr(fastattn.config, "cpu_gemm", "mkl")
    with pytest.raises(ValueError, match="cpu_gemm: expected 'auto', 'simd' or 'blas', got 'mkl'"):
        simd_gemm()


def test_auto_follows_numbas_target_features(monkeypatch):
    monkeypatch.setattr(numba.core.config, "CPU_FEATURES", "+avx2,+fma,-avx512f")
    assert not target_has_avx512()
    monkeypatch.setattr(numba.core.config, "CPU_FEATURES", "+avx2,+avx512f,+avx512bw")
    assert target_has_avx512()
