"""What only the CUDA backend has: its launch config and its device-array handling.

The numeric grid runs on CUDA through the ``device`` fixture of test_attention.py.
"""
import numba
import numpy as np
import pytest

import fastattn
from cases import F16, F32, Case, Shape, backward_reference, inputs, random
from conftest import CUDA, use_test_cuda_config, assert_close, cuda_unavailable_reason
from fastattn import reference

pytestmark = CUDA


@pytest.fixture
def cuda(monkeypatch):
    reason = cuda_unavailable_reason()
    if reason:
        pytest.skip(reason)
    use_test_cuda_config(monkeypatch)
    from numba import cuda

    return cuda


def test_head_dim_above_cuda_max_head_dim_is_rejected(cuda):
    d = fastattn.config.cuda_max_head_dim + 1
    q, k, v, dout = (cuda.to_device(np.ones((1, 2, 3, d), np.float32)) for _ in range(4))
    with pytest.raises(ValueError, match=rf"^q: .*D <= {d - 1} on CUDA .*cuda_max_head_dim.*got {d}"):
        fastattn.attention(q, k, v)
    lse = cuda.to_device(np.zeros((1, 2, 3), np.float32))
    with pytest.raises(ValueError, match=r"^q: .*cuda_max_head_dim"):
        fastattn.attention_backward(dout, q, k, v, dout, lse)


def test_head_dim_limit_follows_the_config(cuda, monkeypatch, rng):
    monkeypatch.setattr(fastattn.config, "cuda_max_head_dim", 24)
    q, k, v = (random(s, F32, rng) for s in ((1, 2, 3, 20), (1, 1, 5, 20), (1, 1, 5, 20)))
    out = fastattn.attention(*(cuda.to_device(x) for x in (q, k, v)), causal=True)
    assert_close(out.copy_to_host(), reference.attention(q, k, v, causal=True), F32, "out")


@pytest.mark.parametrize("tiles", [(1, 1, 1, 1), (1, 3, 2, 2), (4, 1, 1, 4), (2, 2, 4, 2)], ids=str)
def test_other_tile_shapes_give_the_same_results(cuda, monkeypatch, tiles, rng):
    """(tm, tn, ny, nx): one thread, odd score blocks, one row of threads, more rows than columns."""
    monkeypatch.setattr(fastattn.config, "cuda_tiles", tiles)
    case = Case(Shape(1, 2, 1, 7, 11, 8), "all", F16)
    q, k, v, options = inputs(case, rng)
    dout = random(q.shape, F16, rng)
    dev = [cuda.to_device(x) for x in (dout, q, k, v)]
    slopes = cuda.to_device(options["alibi_slopes"])
    opts = dict(options, alibi_slopes=slopes)
    out, lse = fastattn.attention(*dev[1:], return_lse=True, **opts)
    grads = fastattn.attention_backward(*dev, out, lse, **opts)
    ref_out, ref_lse = reference.attention(q, k, v, return_lse=True, **options)
    assert_close(out.copy_to_host(), ref_out, F16, "out")
    assert_close(lse.copy_to_host(), ref_lse, F16, "lse")
    expected, magnitudes = backward_reference(dout, q, k, v, **options)
    for name, got, ref, mag in zip(("dq", "dk", "dv"), grads, expected, magnitudes):
        assert_close(got.copy_to_host(), ref, F16, name, magnitude=mag)


@pytest.mark.skipif(numba.config.ENABLE_CUDASIM,
                    reason="the CUDA simulator's arrays expose no __cuda_array_interface__ to adopt")
def test_foreign_cuda_arrays_are_adopted_zero_copy(cuda, rng):
    """Objects that only expose __cuda_array_interface__ (CuPy, PyTorch) work as inputs."""

    class Foreign:
        def __init__(self, array):
            self._array = array

        @property
        def __cuda_array_interface__(self):
            return self._array.__cuda_array_interface__

    q, k, v = (random(s, F32, rng) for s in ((1, 2, 4, 8), (1, 2, 6, 8), (1, 2, 6, 8)))
    out = fastattn.attention(*(Foreign(cuda.to_device(x)) for x in (q, k, v)), causal=True)
    assert_close(out.copy_to_host(), reference.attention(q, k, v, causal=True), F32, "out")


BUCKET_DIMS = [13, 32, 61, 96, 125, 192, 253]  # one head dim in each bucket (16 ... 256), padded or exact


@pytest.mark.parametrize("dtype", [F32, np.dtype(np.float64)], ids=str)
@pytest.mark.parametrize("head_dim", BUCKET_DIMS)
def test_every_head_dim_bucket_forward_and_backward(cuda, monkeypatch, head_dim, dtype, rng):
    """Each head-dim specialisation of the dense kernels, causal GQA, against the reference."""
    monkeypatch.setattr(fastattn.config, "cuda_max_head_dim", 256)
    case = Case(Shape(1, 2, 1, 3, 5, head_dim), "causal", dtype)
    q, k, v, options = inputs(case, rng)
    dout = random(q.shape, dtype, rng)
    dev = [cuda.to_device(x) for x in (dout, q, k, v)]
    out, lse = fastattn.attention(*dev[1:], return_lse=True, **options)
    grads = fastattn.attention_backward(*dev, out, lse, **options)
    ref_out, ref_lse = reference.attention(q, k, v, return_lse=True, **options)
    assert_close(out.copy_to_host(), ref_out, dtype, "out")
    assert_close(lse.copy_to_host(), ref_lse, dtype, "lse")
    expected, magnitudes = backward_reference(dout, q, k, v, **options)
    for name, got, ref, mag in zip(("dq", "dk", "dv"), grads, expected, magnitudes):
        assert_close(got.copy_to_host(), ref, dtype, name, magnitude=mag)


@pytest.mark.parametrize("head_dim", BUCKET_DIMS)
def test_every_head_dim_bucket_paged(cuda, monkeypatch, head_dim, rng):
    """Each head-dim specialisation of the paged forward and backward."""
    from paged_cases import PagedCase, paged_inputs

    monkeypatch.setattr(fastattn.config, "cuda_max_head_dim", 256)
    case = PagedCase((5, 3), 2, 1, head_dim, 2, seq_q=2, option="causal")
    q, k_cache, v_cache, table, lens, options = paged_inputs(case, rng)
    dev = [cuda.to_device(x) for x in (q, k_cache, v_cache, table, lens)]
    out, lse = fastattn.paged_attention(*dev, return_lse=True, **options)
    ref_out, ref_lse = reference.paged_attention(q, k_cache, v_cache, table, lens, return_lse=True, **options)
    assert_close(out.copy_to_host(), ref_out, F32, "out")
    assert_close(lse.copy_to_host(), ref_lse, F32, "lse")
    dout = random(q.shape, F32, rng)
    got = fastattn.paged_attention_backward(cuda.to_device(dout), dev[0], dev[1], dev[2], out, lse, dev[3], dev[4],
                                            **options)
    want = fastattn.paged_attention_backward(dout, q, k_cache, v_cache, out.copy_to_host(), lse.copy_to_host(),
                                             table, lens, **options)
    for name, g, w in zip(("dq", "dk_cache", "dv_cache"), got, want):
        assert_close(g.copy_to_host(), w, F32, name)
