"""paged_attention and paged_attention_fp8 against the float64 reference (gather, then dense).

Every numeric test runs on the CPU kernels and, through the ``device``
fixture, on the CUDA kernels (tiny shapes, for the simulator).
"""
import ml_dtypes
import numpy as np
import pytest

import fastattn
from cases import BF16, F16, F32, random
from conftest import assert_close, on_devices
from fastattn import reference
from paged_cases import CPU_CASES, CUDA_CASES, E4M3, E5M2, PagedCase, paged_inputs

GRID = on_devices(CPU_CASES, CUDA_CASES)


def put_all(device, *arrays):
    return [device.put(x) for x in arrays]


def put_options(device, options):
    return {n: device.put(x) if n == "alibi_slopes" else x for n, x in options.items()}


def accum(dtype):
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


@pytest.mark.parametrize("device, case", GRID, indirect=["device"])
def test_forward_matches_reference(device, case, rng):
    q, k_cache, v_cache, table, lens, options = paged_inputs(case, rng)
    out, lse = fastattn.paged_attention(*put_all(device, q, k_cache, v_cache, table, lens), return_lse=True,
                                        **put_options(device, options))
    out, lse = device.get(out), device.get(lse)
    assert out.dtype == case.dtype and lse.dtype == accum(case.dtype)
    ref_out, ref_lse = reference.paged_attention(q, k_cache, v_cache, table, lens, return_lse=True, **options)
    assert_close(out, ref_out, case.dtype, "out")
    assert_close(lse, ref_lse, case.dtype, "lse")
    empty = lens == 0
    assert np.all(out[empty].astype(np.float64) == 0) and np.all(lse[empty] == -np.inf)


@pytest.mark.parametrize("block_k", [1, 5, 128])
@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
def test_decode_tiles_of_any_size(block_k, dtype, rng, monkeypatch):
    """The decode kernel's key tiles (odd sizes, one key, the prefetched next tile) change no result."""
    case = PagedCase((200, 37, 1), 8, 2, 48, 16, option="causal", dtype=dtype, shared=0)
    q, k_cache, v_cache, table, lens, options = paged_inputs(case, rng)
    monkeypatch.setattr(fastattn.config, "cpu_decode_block_k", block_k)
    out, lse = fastattn.paged_attention(q, k_cache, v_cache, table, lens, return_lse=True, **options)
    ref_out, ref_lse = reference.paged_attention(q, k_cache, v_cache, table, lens, return_lse=True, **options)
    assert_close(out, ref_out, dtype, "out")
    assert_close(lse, ref_lse, F32, "lse")


@pytest.mark.parametrize("split_min_keys", [1, 7, 64])
def test_split_kv_gives_the_same_result_as_one_pass(split_min_keys, rng, monkeypatch):
    """One long sequence split over the cores (flash decoding) and merged."""
    case = PagedCase((1000, 3), 4, 1, 32, 16, option="causal", shared=0)
    q, k_cache, v_cache, table, lens, options = paged_inputs(case, rng)
    monkeypatch.setattr(fastattn.config, "cpu_split_min_keys", split_min_keys)
    from fastattn import _validate
    from fastattn.cpu.paged import _rows_per_task, num_splits

    spec = _validate.paged_args(q, k_cache, v_cache, table, lens, causal=True, scale=None,
                                window=(-1, -1), softcap=0.0, alibi_slopes=None)[-1]
    assert num_splits(spec, _rows_per_task(spec)) > 1  # white box: the splits are what is tested
    out, lse = fastattn.paged_attention(q, k_cache, v_cache, table, lens, return_lse=True, **options)
    ref_out, ref_lse = reference.paged_attention(q, k_cache, v_cache, table, lens, return_lse=True, **options)
    assert_close(out, ref_out, F32, "out")
    assert_close(lse, ref_lse, F32, "lse")


def test_cuda_split_kv(device, rng, monkeypatch):
    """Both backends with splits of a few keys (on the CPU and on CUDA)."""
    monkeypatch.setattr(fastattn.config, "cpu_split_min_keys", 4)
    monkeypatch.setattr(fastattn.config, "cuda_split_min_keys", 3)
    case = PagedCase((23, 5), 2, 1, 8, 4, seq_q=2, option="causal")
    q, k_cache, v_cache, table, lens, options = paged_inputs(case, rng)
    out = device.get(fastattn.paged_attention(*put_all(device, q, k_cache, v_cache, table, lens), **options))
    assert_close(out, reference.paged_attention(q, k_cache, v_cache, table, lens, **options), F32, "out")


@pytest.mark.parametrize("length", [21, np.int32(21), np.int64(21)], ids=["int", "np.int32", "np.int64"])
def test_seq_lens_as_one_int_and_int64_tables(device, length, rng):
    """One length for all sequences is a number on no device (NumPy integers included)."""
    case = PagedCase((21, 21), 4, 2, 8, 4, seq_q=2, option="causal")
    q, k_cache, v_cache, table, lens, options = paged_inputs(case, rng)
    args = put_all(device, q, k_cache, v_cache, table.astype(np.int64))
    out = device.get(fastattn.paged_attention(*args, length, **options))
    assert_close(out, reference.paged_attention(q, k_cache, v_cache, table, lens, **options), F32, "out")


def test_paged_equals_dense_attention_on_contiguous_blocks(device, rng):
    """A table that lists blocks in order is dense attention over the same keys."""
    b, hkv, length, d, bs = 2, 2, 12, 8, 4
    k = random((b, hkv, length, d), F32, rng)
    v = random((b, hkv, length, d), F32, rng)
    q = random((b, 4, 3, d), F32, rng)
    caches = [x.transpose(0, 2, 1, 3).reshape(b * length // bs, bs, hkv, d).copy() for x in (k, v)]
    table = np.arange(b * length // bs, dtype=np.int32).reshape(b, -1)
    paged = fastattn.paged_attention(*put_all(device, q, *caches, table), length, causal=True)
    dense = fastattn.attention(*put_all(device, q, k, v), causal=True)
    np.testing.assert_allclose(device.get(paged), device.get(dense), rtol=0, atol=1e-6)


# --- fp8 caches ---------------------------------------------------------------------------

FP8_CASES = {
    # name: (case, cache dtype, q_scale, k_scale, v_scale, o_scale)
    "e4m3-f32q": (PagedCase((37, 0, 129), 8, 2, 64, 16, option="causal"), E4M3, 1.0, 0.05, 0.02, None),
    "e5m2-f16q": (PagedCase((5, 200), 4, 1, 32, 32, dtype=F16), E5M2, 1.0, 0.5, 2.0, None),
    "e4m3-per-head": (PagedCase((129, 1), 8, 4, 80, 16, dtype=BF16, shared=0), E4M3, 1.0, "heads", "heads", None),
    "e4m3-fp8q-fp8o": (PagedCase((64, 70), 4, 2, 32, 16, seq_q=3, option="causal", dtype=E4M3, shared=2), E4M3,
                       0.25, 0.125, 0.5, 0.01),
    "e5m2-fp8q-fp8o": (PagedCase((50,), 4, 1, 32, 8, dtype=E5M2), E5M2, 0.5, 1.0, "heads", 0.05),
    "e4m3-window": (PagedCase((64, 70), 4, 2, 32, 16, seq_q=5, option="window"), E4M3, 1.0, 0.05, 0.02, None),
    "e4m3-softcap": (PagedCase((37, 129), 8, 2, 64, 16, option="softcap", dtype=F16), E4M3, 1.0, 0.1, 0.05, None),
    "e5m2-alibi": (PagedCase((41, 3), 4, 2, 32, 8, seq_q=2, option="alibi", dtype=BF16), E5M2, 1.0, "heads",
                   0.5, None),
}
CUDA_FP8 = {
    "e4m3-f32q": (PagedCase((9, 0), 4, 2, 8, 4, option="causal"), E4M3, 1.0, 0.05, 0.02, None),
    "e5m2-fp8q-fp8o": (PagedCase((7,), 2, 1, 8, 4, dtype=E5M2), E5M2, 0.5, "heads", 2.0, 0.05),
    "e4m3-softcap": (PagedCase((9, 3), 4, 2, 8, 4, option="softcap"), E4M3, 1.0, 0.1, 0.05, None),
    "e5m2-alibi": (PagedCase((7, 10), 4, 2, 8, 4, seq_q=2, option="alibi"), E5M2, 1.0, 0.5, "heads", None),
}


def _fp8_inputs(case, cache_dtype, rng):
    """Inputs with values spread over the fp8 range (the caches hold the raw, unscaled bytes)."""
    q, k_cache, v_cache, table, lens, options = paged_inputs(case, rng, cache_dtype=np.float32)
    q = (q.astype(np.float32) * 2).astype(case.dtype)
    k_cache, v_cache = ((x * 8).astype(cache_dtype) for x in (k_cache, v_cache))
    return q, k_cache, v_cache, table, lens, options


def _scale(value, heads, rng):
    return rng.uniform(0.02, 0.3, heads).astype(np.float32) if value == "heads" else value


def fp8_grid():
    rows = [pytest.param("cpu", name, id=f"cpu-{name}") for name in FP8_CASES]
    return rows + [pytest.param("cuda", name, id=f"cuda-{name}", marks=pytest.mark.cuda) for name in CUDA_FP8]


@pytest.mark.parametrize("device, name", fp8_grid(), indirect=["device"])
def test_fp8_matches_reference(device, name, rng):
    case, cache_dtype, q_scale, k_scale, v_scale, o_scale = (CUDA_FP8 if device.name == "cuda" else FP8_CASES)[name]
    q, k_cache, v_cache, table, lens, options = _fp8_inputs(case, cache_dtype, rng)
    k_scale, v_scale = _scale(k_scale, case.heads_kv, rng), _scale(v_scale, case.heads_kv, rng)
    scales = dict(q_scale=q_scale, k_scale=k_scale, v_scale=v_scale)
    dev_scales = {n: device.put(s) if isinstance(s, np.ndarray) else s for n, s in scales.items()}
    out, lse = fastattn.paged_attention_fp8(*put_all(device, q, k_cache, v_cache, table, lens), o_scale=o_scale,
                                            return_lse=True, **dev_scales, **put_options(device, options))
    out, lse = device.get(out), device.get(lse)
    ref_out, ref_lse = reference.paged_attention(q, k_cache, v_cache, table, lens, return_lse=True,
                                                 **scales, **options)
    assert lse.dtype == np.float32
    assert_close(lse, ref_lse, F32, "lse")
    if o_scale is None:
        assert out.dtype == np.float32
        assert_close(out, ref_out, F32, "out")
        return
    assert out.dtype == cache_dtype
    # fp8 output: the float32 result rounded once; within one unit in the last place of the reference
    expected = ref_out / o_scale
    finfo = ml_dtypes.finfo(cache_dtype)
    ulp = np.maximum(np.abs(expected), float(finfo.smallest_normal)) * 2.0 ** -finfo.nmant
    got = out.astype(np.float64)
    clipped = np.clip(expected, -float(finfo.max), float(finfo.max))
    assert np.all(np.abs(got - clipped) <= ulp), np.abs(got - clipped).max()
    exact = got == clipped.astype(cache_dtype).astype(np.float64)
    assert exact.mean() > 0.99, f"only {exact.mean():.1%} of the fp8 outputs are the nearest value"


def test_fp8_output_saturates(rng):
    """Values beyond the fp8 range become +-max, never NaN or inf."""
    case = PagedCase((9,), 2, 1, 8, 4)
    q, k_cache, v_cache, table, lens, _ = _fp8_inputs(case, E4M3, rng)
    out = fastattn.paged_attention_fp8(q, k_cache, v_cache, table, lens, v_scale=1000.0, o_scale=1e-3)
    big = float(ml_dtypes.finfo(E4M3).max)
    ref = reference.paged_attention(q, k_cache, v_cache, table, lens, v_scale=1000.0) / 1e-3
    saturated = np.abs(ref) > big
    assert saturated.any()
    np.testing.assert_array_equal(out.astype(np.float64)[saturated], np.sign(ref[saturated]) * big)
    assert np.isfinite(out.astype(np.float64)).all()


def test_fp8_scales_fold_exactly(rng):
    """Per-head scales equal to a float scale give identical bits (they are folded the same way)."""
    case = PagedCase((40, 3), 4, 2, 16, 8, option="causal")
    q, k_cache, v_cache, table, lens, options = _fp8_inputs(case, E4M3, rng)
    a = fastattn.paged_attention_fp8(q, k_cache, v_cache, table, lens, k_scale=0.5, v_scale=0.25, **options)
    b = fastattn.paged_attention_fp8(q, k_cache, v_cache, table, lens, k_scale=np.full(2, 0.5),
                                     v_scale=np.full(2, 0.25, np.float32), **options)
    assert a.tobytes() == b.tobytes()


def test_fp8_equals_float32_attention_over_the_decoded_cache(rng):
    """fp8 cache attention equals float32 attention over the decoded cache (no hidden rounding)."""
    case = PagedCase((77, 20), 8, 2, 64, 16, option="causal")
    q, k_cache, v_cache, table, lens, options = _fp8_inputs(case, E5M2, rng)
    fp8 = fastattn.paged_attention_fp8(q, k_cache, v_cache, table, lens, k_scale=0.25, **options)
    decoded = fastattn.paged_attention(q, k_cache.astype(np.float32) * np.float32(0.25),
                                       v_cache.astype(np.float32), table, lens, **options)
    np.testing.assert_allclose(fp8, decoded, rtol=0, atol=2e-6)


# --- merge_attention_states ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", [F32, F16, BF16, np.dtype(np.float64)], ids=str)
def test_merge_of_key_splits_is_attention_over_all_keys(device, dtype, rng):
    q = random((2, 3, 4, 8), dtype, rng)
    k, v = random((2, 3, 11, 8), dtype, rng), random((2, 3, 11, 8), dtype, rng)
    cuts = [slice(0, 2), slice(2, 2), slice(2, 9), slice(9, 11)]  # an empty part among them
    parts = [fastattn.attention(*put_all(device, q, *(np.ascontiguousarray(x[:, :, c]) for x in (k, v))),
                                return_lse=True) for c in cuts]
    out, lse = fastattn.merge_attention_states([p[0] for p in parts], [p[1] for p in parts])
    out, lse = device.get(out), device.get(lse)
    assert out.dtype == dtype and lse.dtype == accum(dtype)
    ref_out, ref_lse = reference.attention(q, k, v, return_lse=True)
    assert_close(out, ref_out, dtype, "out")
    assert_close(lse, ref_lse, dtype, "lse")


def test_merge_handles_minus_inf_and_matches_reference(device, rng):
    outs = random((3, 2, 5, 4), F32, rng)
    lses = random((3, 2, 5), F32, rng) * 3
    lses[:, 0, 0] = -np.inf         # no part saw a key: zeros and -inf
    lses[1:, 1, 2] = -np.inf        # one part only
    lses[0, 1, 3] = 80.0            # large values: no overflow
    lses[0, 1, 4] = -np.inf         # the first part saw no key, the others did
    out, lse = fastattn.merge_attention_states(*put_all(device, outs, lses))
    out, lse = device.get(out), device.get(lse)
    ref_out, ref_lse = reference.merge_attention_states(outs, lses)
    assert_close(out, ref_out, F32, "out")
    assert_close(lse, ref_lse, F32, "lse")
    assert np.all(out[0, 0] == 0) and lse[0, 0] == -np.inf
    np.testing.assert_array_equal(out[1, 2], outs[0, 1, 2])
