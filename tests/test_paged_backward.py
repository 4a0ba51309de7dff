"""paged_attention_backward and write_kv_cache.

The backward is compared with a dense backward on the gathered keys whose key
gradients are scattered back with ``np.add.at`` (``reference.paged_attention_backward``),
so a block shared by several sequences must hold the sum of their contributions.
"""
import ml_dtypes
import numpy as np
import pytest

import fastattn
from cases import BF16, F16, F32, F64, random
from conftest import assert_close, on_devices
from fastattn import reference
from paged_cases import E4M3, E5M2, PagedCase, paged_inputs


def put_all(device, *arrays):
    return [device.put(x) for x in arrays]


def put_options(device, options):
    return {n: device.put(x) if n == "alibi_slopes" else x for n, x in options.items()}


def gradient_magnitudes(dout, q, k_cache, v_cache, table, lens, options):
    """Largest sums of absolute terms of dq, dk and dv (what rounding errors scale with).

    The same formula as the reference, applied to |.| of every factor.  A key or
    value gradient sums over the query heads of its group and over every sequence
    whose table holds its block, so those sums are scattered into the cache's
    physical rows before the maximum; dq sums over neither.
    """
    scale = options.get("scale") or 1.0 / np.sqrt(q.shape[-1])
    out, lse = reference.paged_attention(q, k_cache, v_cache, table, lens, return_lse=True, **options)
    dout, q = dout.astype(np.float64), q.astype(np.float64)
    delta = np.abs((dout * out).sum(-1))
    dq_mag = 0.0
    dk_mag, dv_mag = np.zeros(k_cache.shape), np.zeros(v_cache.shape)
    heads_kv, block_size = k_cache.shape[2], k_cache.shape[1]
    group = q.shape[1] // heads_kv
    slopes = options.get("alibi_slopes")
    for b, length in enumerate(lens):
        if not length:
            continue
        k = np.repeat(reference.gather_kv(k_cache, table[b], length), group, axis=0)
        v = np.repeat(reference.gather_kv(v_cache, table[b], length), group, axis=0)
        # the forward's scores (window, softcap and ALiBi included): softcap's gradient is at most 1
        s = reference._scores(q[b:b + 1], k[None], scale, options.get("softcap", 0.0),
                              None if slopes is None else np.asarray(slopes)[None], options.get("causal", False),
                              options.get("window", (-1, -1)))[0][0]
        with np.errstate(invalid="ignore"):  # rows that see no key: -inf - -inf
            p = np.where(np.isfinite(s), np.exp(s - lse[b][..., None]), 0.0)
        terms = p * (np.abs(dout[b] @ v.swapaxes(1, 2)) + delta[b][..., None])
        dq_mag = max(dq_mag, (scale * terms @ np.abs(k)).max())
        per_key = [(scale * terms.swapaxes(1, 2) @ np.abs(q[b])), p.swapaxes(1, 2) @ np.abs(dout[b])]
        tokens = np.arange(length)
        blocks, slots = np.asarray(table[b])[tokens // block_size], tokens % block_size
        for mag, acc in zip(per_key, (dk_mag, dv_mag)):  # [Hq, Sk, D] -> summed over the group, per cache row
            by_head = mag.reshape(heads_kv, group, length, -1).sum(axis=1)
            np.add.at(acc, (blocks, slots), by_head.transpose(1, 0, 2))
    return np.array([dq_mag, dk_mag.max(), dv_mag.max()])


BACKWARD_CPU = [
    PagedCase((37, 129, 0), 8, 2, 64, 16, seq_q=5, option="causal", dtype=F32, shared=2),
    PagedCase((37, 129, 0), 8, 2, 64, 16, seq_q=5, option="plain", dtype=F32, shared=0),
    PagedCase((64, 70, 33), 4, 1, 32, 32, seq_q=1, option="plain", dtype=F16, shared=1),
    PagedCase((200, 129), 8, 8, 80, 16, seq_q=17, option="causal", dtype=BF16, shared=2),
    PagedCase((40, 41), 4, 4, 128, 8, seq_q=40, option="scale", dtype=F64, shared=2),
    PagedCase((1, 5, 37), 4, 2, 32, 16, seq_q=1, option="causal", dtype=F32, shared=0),
    PagedCase((64, 70, 33), 8, 2, 32, 16, seq_q=7, option="window", dtype=F32, shared=0),
    PagedCase((37, 129), 4, 2, 64, 16, seq_q=5, option="softcap", dtype=BF16, shared=1),
    PagedCase((40, 41, 19), 8, 2, 32, 8, seq_q=3, option="alibi", dtype=F16, shared=2),
]
BACKWARD_CUDA = [
    PagedCase((9, 12, 0), 4, 2, 8, 4, seq_q=3, option="causal", dtype=F32, shared=2),
    PagedCase((7, 5), 2, 1, 8, 4, seq_q=1, option="plain", dtype=F16, shared=0),
    PagedCase((6, 8), 2, 2, 5, 2, seq_q=6, option="scale", dtype=F64, shared=2),
    PagedCase((10,), 2, 1, 8, 8, seq_q=2, option="causal", dtype=BF16),
    PagedCase((9, 12), 4, 2, 8, 4, seq_q=3, option="window", dtype=F32),
    PagedCase((9, 7), 4, 2, 8, 4, seq_q=2, option="softcap", dtype=F32),
    PagedCase((10, 6), 4, 2, 8, 4, seq_q=2, option="alibi", dtype=F16, shared=1),
]


@pytest.mark.parametrize("device, case", on_devices(BACKWARD_CPU, BACKWARD_CUDA), indirect=["device"])
def test_backward_matches_dense_backward_scattered(device, case, rng):
    q, k_cache, v_cache, table, lens, options = paged_inputs(case, rng)
    dout = random(q.shape, case.dtype, rng)
    out, lse = fastattn.paged_attention(*put_all(device, q, k_cache, v_cache, table, lens), return_lse=True,
                                        **put_options(device, options))
    grads = fastattn.paged_attention_backward(*put_all(device, dout, q, k_cache, v_cache), out, lse,
                                              *put_all(device, table, lens), **put_options(device, options))
    grads = [device.get(g) for g in grads]
    expected = reference.paged_attention_backward(dout, q, k_cache, v_cache, block_table=table, seq_lens=lens,
                                                  **options)
    magnitudes = gradient_magnitudes(dout, q, k_cache, v_cache, table, lens, options)
    for name, got, ref, mag in zip(("dq", "dk_cache", "dv_cache"), grads, expected, magnitudes):
        assert got.dtype == case.dtype and got.shape == ref.shape
        assert_close(got, ref, case.dtype, name, magnitude=mag)
    read = np.zeros(k_cache.shape[0], bool)
    for b, length in enumerate(lens):
        read[table[b, :-(-length // case.block_size)]] = True
    for name, got in zip(("dk_cache", "dv_cache"), grads[1:]):
        assert np.all(got[~read].astype(np.float64) == 0), f"{name}: blocks no sequence reads must be 0"
    if case.shared:
        assert (np.abs(grads[1][table[0, 0]].astype(np.float64)) > 0).any()


def test_cpu_backward_is_bitwise_deterministic(rng, monkeypatch):
    """Shared blocks are summed by one task in a fixed order: the same bits every run and thread count."""
    import numba

    case = PagedCase((120, 97, 64, 111), 8, 2, 32, 16, seq_q=9, option="causal", shared=3)
    q, k_cache, v_cache, table, lens, options = paged_inputs(case, rng)
    dout = random(q.shape, F32, rng)
    out, lse = fastattn.paged_attention(q, k_cache, v_cache, table, lens, return_lse=True, **options)
    runs = [fastattn.paged_attention_backward(dout, q, k_cache, v_cache, out, lse, table, lens, **options)
            for _ in range(3)]
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        runs.append(fastattn.paged_attention_backward(dout, q, k_cache, v_cache, out, lse, table, lens, **options))
    finally:
        numba.set_num_threads(threads)
    for run in runs[1:]:
        for name, a, b in zip(("dq", "dk_cache", "dv_cache"), runs[0], run):
            assert a.tobytes() == b.tobytes(), f"{name} differs between runs"


def test_backward_inputs_are_not_modified(device, rng):
    case = PagedCase((9, 12), 4, 2, 8, 4, seq_q=3, option="causal", shared=1)
    q, k_cache, v_cache, table, lens, options = paged_inputs(case, rng)
    dout = random(q.shape, F32, rng)
    out, lse = fastattn.paged_attention(q, k_cache, v_cache, table, lens, return_lse=True, **options)
    arrays = dict(dout=dout, q=q, k_cache=k_cache, v_cache=v_cache, out=out, lse=lse, table=table, lens=lens)
    before = {n: x.copy() for n, x in arrays.items()}
    dev = {n: device.put(x) for n, x in arrays.items()}
    fastattn.paged_attention(dev["q"], dev["k_cache"], dev["v_cache"], dev["table"], dev["lens"], **options)
    fastattn.paged_attention_backward(*dev.values(), **options)
    for n, x in dev.items():
        assert np.asarray(device.get(x) if device.name == "cuda" else x).tobytes() == before[n].tobytes(), n


# --- write_kv_cache ------------------------------------------------------------------------

def _expected_cache(cache, x, slots, scale, dtype):
    """What write_kv_cache must leave: x / scale cast to the cache dtype (saturating for fp8)."""
    expected = cache.copy()
    block_size, heads = cache.shape[1], cache.shape[2]
    scale = np.asarray(scale, np.float32).astype(np.float64)  # scales are float32, as fastattn keeps them
    values = x.astype(np.float64) / np.broadcast_to(scale, (heads,))[:, None]
    if dtype in (E4M3, E5M2):
        big = float(ml_dtypes.finfo(dtype).max)
        values = np.clip(values, -big, big)
    for t, slot in enumerate(slots):
        if slot >= 0:
            expected[slot // block_size, slot % block_size] = values[t].astype(np.float32).astype(dtype) \
                if dtype != F64 else values[t]
    return expected


WRITE_CASES = {
    # name: (cache dtype, input dtype, k_scale, v_scale)
    "f32": (F32, F32, 1.0, 1.0),
    "f64": (F64, F64, 1.0, 1.0),
    "f16-from-f32": (F16, F32, 1.0, 1.0),
    "bf16": (BF16, BF16, 1.0, 1.0),
    "e4m3": (E4M3, F32, 0.05, 0.5),
    "e5m2-from-bf16": (E5M2, BF16, 2.0, 0.25),
    "e4m3-per-head": (E4M3, F16, "heads", "heads"),
}


@pytest.mark.parametrize("name", WRITE_CASES)
def test_write_kv_cache(device, name, rng):
    cache_dtype, dtype, k_scale, v_scale = WRITE_CASES[name]
    heads = 2
    k_scale = rng.uniform(0.05, 0.5, heads) if k_scale == "heads" else k_scale
    v_scale = rng.uniform(0.05, 0.5, heads) if v_scale == "heads" else v_scale
    k_cache = random((5, 4, heads, 8), F32, rng).astype(cache_dtype)
    v_cache = random((5, 4, heads, 8), F32, rng).astype(cache_dtype)
    k, v = (random((6, heads, 8), F32, rng) * 30).astype(dtype), random((6, heads, 8), dtype, rng)
    slots = np.array([3, -1, 17, 19, -5, 0])
    expected_k = _expected_cache(k_cache, k, slots, k_scale, cache_dtype)
    expected_v = _expected_cache(v_cache, v, slots, v_scale, cache_dtype)
    before = (k.copy(), v.copy(), slots.copy())
    dk, dv = device.put(k_cache), device.put(v_cache)
    scales = {n: device.put(s) if isinstance(s, np.ndarray) else s for n, s in (("k_scale", k_scale),
                                                                              ("v_scale", v_scale))}
    result = fastattn.write_kv_cache(*put_all(device, k, v), dk, dv, device.put(slots), **scales)
    assert result is None
    got_k, got_v = (device.get(x) if device.name == "cuda" else x for x in (dk, dv))
    assert got_k.dtype == cache_dtype
    np.testing.assert_array_equal(got_k.view(np.uint8), expected_k.view(np.uint8))
    np.testing.assert_array_equal(got_v.view(np.uint8), expected_v.view(np.uint8))
    for a, b in zip((k, v, slots), before):
        assert a.tobytes() == b.tobytes()


def test_write_then_read_round_trip(rng):
    """Tokens written one decode step at a time are what paged_attention then reads."""
    bs, hkv, d = 4, 2, 16
    k_cache, v_cache = np.zeros((8, bs, hkv, d), np.float32), np.zeros((8, bs, hkv, d), np.float32)
    table = np.array([[5, 2, 7]], np.int32)
    k, v = random((10, hkv, d), F32, rng), random((10, hkv, d), F32, rng)
    for t in range(10):
        slot = np.array([table[0, t // bs] * bs + t % bs])
        fastattn.write_kv_cache(k[t:t + 1], v[t:t + 1], k_cache, v_cache, slot)
    q = random((1, 4, 1, d), F32, rng)
    out = fastattn.paged_attention(q, k_cache, v_cache, table, 10)
    dense = fastattn.reference.attention(q, k.transpose(1, 0, 2)[None], v.transpose(1, 0, 2)[None])
    assert_close(out, dense, F32, "out")
