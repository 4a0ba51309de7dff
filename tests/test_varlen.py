"""attention_varlen and its backward: packed sequences against the float64 reference, and bad offsets."""
import numpy as np
import pytest

import fastattn
from cases import BF16, F16, F32, F64, random
from conftest import assert_close, on_devices
from fastattn import reference

# (lengths of the queries, lengths of the keys, Hq, Hkv, D, options, dtype): odd lengths, an empty
# sequence, GQA and MQA, FlashAttention's odd head dims
CPU_CASES = {
    "gqa-113-203-d40-causal-f32": ([113, 0, 7], [203, 5, 7], 8, 2, 40, {"causal": True}, F32),
    "mqa-d59-window-f16": ([31, 9], [31, 70], 4, 1, 59, {"window": (8, 2)}, F16),
    "mha-d96-softcap-alibi-bf16": ([17, 1, 12], [17, 33, 12], 2, 2, 96, {"softcap": 2.0, "alibi": "bh"}, BF16),
    "gqa-d80-keys-empty-f64": ([5, 4], [0, 9], 4, 2, 80, {"causal": True}, F64),
}
CUDA_CASES = {
    "gqa-d8-causal-f32": ([5, 0, 3], [7, 2, 3], 4, 2, 8, {"causal": True}, F32),
    "mqa-d8-softcap-alibi-f16": ([4, 1], [6, 5], 2, 1, 8, {"softcap": 2.0, "alibi": "h"}, F16),
}
CASES = {**CPU_CASES, **CUDA_CASES}


def make(name, rng):
    lens_q, lens_k, hq, hkv, d, options, dtype = CASES[name]
    cu_q = np.cumsum([0] + lens_q).astype(np.int32)
    cu_k = np.cumsum([0] + lens_k).astype(np.int32)
    q = random((cu_q[-1], hq, d), dtype, rng)
    k, v = random((cu_k[-1], hkv, d), dtype, rng), random((cu_k[-1], hkv, d), dtype, rng)
    options = dict(options)
    alibi = options.pop("alibi", None)
    if alibi:
        shape = (hq,) if alibi == "h" else (len(lens_q), hq)
        options["alibi_slopes"] = rng.uniform(0.0, 0.3, shape).astype(np.float32)
    return q, k, v, cu_q, cu_k, options, dtype


def put_options(device, options):
    return {n: device.put(x) if n == "alibi_slopes" else x for n, x in options.items()}


@pytest.mark.parametrize("device, name", on_devices(list(CPU_CASES), list(CUDA_CASES)), indirect=["device"])
def test_varlen_matches_the_reference(device, name, rng):
    q, k, v, cu_q, cu_k, options, dtype = make(name, rng)
    dev = {n: device.put(x) for n, x in dict(q=q, k=k, v=v).items()}
    dopts = put_options(device, options)
    out, lse = fastattn.attention_varlen(dev["q"], dev["k"], dev["v"], cu_q, cu_k, return_lse=True, **dopts)
    ref_out, ref_lse = reference.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **options)
    assert_close(device.get(out), ref_out, dtype, "out")
    assert_close(device.get(lse), ref_lse, F64 if dtype == F64 else F32, "lse")
    dout = random(q.shape, dtype, rng)
    grads = fastattn.attention_varlen_backward(device.put(dout), dev["q"], dev["k"], dev["v"], out, lse, cu_q, cu_k,
                                               **dopts)
    expected = reference.attention_varlen_backward(dout, q, k, v, cu_q, cu_k, **options)
    # rounding errors scale with the sums of absolute terms: bounded by the gradient of |.| inputs
    magnitudes = reference.attention_varlen_backward(np.abs(dout), np.abs(q), np.abs(k), np.abs(v), cu_q, cu_k,
                                                     **{**options, "softcap": 0.0})
    for gname, got, ref, mag in zip(("dq", "dk", "dv"), grads, expected, magnitudes):
        got = device.get(got)
        assert got.dtype == dtype and got.shape == ref.shape
        assert_close(got, ref, dtype, gname, magnitude=np.abs(mag).max())


def test_varlen_is_the_same_as_separate_dense_calls(rng):
    q, k, v, cu_q, cu_k, options, dtype = make("gqa-113-203-d40-causal-f32", rng)
    out = fastattn.attention_varlen(q, k, v, cu_q, cu_k, **options)
    for i in range(len(cu_q) - 1):
        rows, keys = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        if cu_q[i + 1] == cu_q[i]:
            continue
        dense = fastattn.attention(*(x.transpose(1, 0, 2)[None] for x in (q[rows], k[keys], v[keys])), **options)
        assert np.array_equal(out[rows], dense[0].transpose(1, 0, 2))


# (lengths q, lengths k, Hq, Hkv, D, dtype, bias shape over [B, Hq, max_q, max_k], mask kind)
BIAS_CASES = {
    "gqa-d40-full-bias-f32": ([113, 0, 7], [203, 5, 7], 8, 2, 40, F32, "full", "padding"),
    "mqa-d59-shared-bias-f16": ([31, 9], [31, 70], 4, 1, 59, F16, "rows-keys", None),
}
CUDA_BIAS_CASES = {
    "gqa-d8-head-keys-bf16": ([5, 0, 3], [7, 2, 3], 4, 2, 8, BF16, "head-keys", "padding"),
}


def _bias_case(name, rng):
    lens_q, lens_k, hq, hkv, d, dtype, bias_kind, mask_kind = {**BIAS_CASES, **CUDA_BIAS_CASES}[name]
    cu_q = np.cumsum([0] + lens_q).astype(np.int32)
    cu_k = np.cumsum([0] + lens_k).astype(np.int32)
    q = random((cu_q[-1], hq, d), dtype, rng)
    k, v = random((cu_k[-1], hkv, d), dtype, rng), random((cu_k[-1], hkv, d), dtype, rng)
    b, mq, mk = len(lens_q), max(lens_q), max(lens_k)
    shape = {"full": (b, hq, mq, mk), "rows-keys": (mq, mk), "head-keys": (1, hq, 1, mk)}[bias_kind]
    options = {"bias": random(shape, F32, rng), "causal": True}
    if mask_kind == "padding":  # [B, 1, 1, max_k]: each sequence's keys past a random length are out
        keep = rng.integers(1, mk + 1, size=b)
        options["mask"] = (np.arange(mk) < keep[:, None])[:, None, None, :]
    return q, k, v, cu_q, cu_k, options, dtype


@pytest.mark.parametrize("device, name", on_devices(list(BIAS_CASES), list(CUDA_BIAS_CASES)), indirect=["device"])
def test_varlen_with_bias_and_mask_matches_the_reference(device, name, rng):
    """A bias and mask in padded coordinates: each sequence reads its top-left corner; dbias sums over sequences."""
    q, k, v, cu_q, cu_k, options, dtype = _bias_case(name, rng)
    dev = {n: device.put(x) for n, x in dict(q=q, k=k, v=v).items()}
    dopts = {n: device.put(x) if isinstance(x, np.ndarray) else x for n, x in options.items()}
    out, lse = fastattn.attention_varlen(dev["q"], dev["k"], dev["v"], cu_q, cu_k, return_lse=True, **dopts)
    ref_out = reference.attention_varlen(q, k, v, cu_q, cu_k, **options)
    assert_close(device.get(out), ref_out, dtype, "out")
    dout = random(q.shape, dtype, rng)
    grads = fastattn.attention_varlen_backward(device.put(dout), dev["q"], dev["k"], dev["v"], out, lse, cu_q, cu_k,
                                               return_dbias=True, **dopts)
    expected = reference.attention_varlen_backward(dout, q, k, v, cu_q, cu_k, return_dbias=True, **options)
    magnitudes = reference.attention_varlen_backward(np.abs(dout), np.abs(q), np.abs(k), np.abs(v), cu_q, cu_k,
                                                     return_dbias=True, **options)
    for gname, got, ref, mag in zip(("dq", "dk", "dv", "dbias"), grads, expected, magnitudes):
        got = device.get(got)
        assert got.shape == ref.shape
        assert_close(got, ref, dtype, gname, magnitude=np.abs(mag).max())


BAD = {
    "not-from-0": (dict(cu_seqlens_q=[1, 3, 5]), ValueError, r"^cu_seqlens_q: expected 0 as the first offset"),
    "decreasing": (dict(cu_seqlens_k=[0, 4, 2]), ValueError, r"^cu_seqlens_k: expected non-decreasing offsets"),
    "last-not-total": (dict(cu_seqlens_q=[0, 2, 4]), ValueError, r"^cu_seqlens_q: expected the last offset to be"),
    "batches-differ": (dict(cu_seqlens_k=[0, 7]), ValueError, r"^cu_seqlens_k: expected shape \[B \+ 1\] = \(3,\)"),
    "float-offsets": (dict(cu_seqlens_q=np.array([0.0, 2.0, 5.0])), TypeError, r"^cu_seqlens_q: expected an integer"),
    "short-hint": (dict(max_seqlen_q=2), ValueError, r"^max_seqlen_q: expected at least the longest sequence \(3\)"),
    "4d-q": (dict(q=np.zeros((1, 5, 2, 8), np.float32)), ValueError, r"^q: expected a 3-d array \[total_q, Hq, D\]"),
    "bias-not-padded-shape": (dict(bias=np.zeros((2, 2, 3, 5), np.float32)), ValueError,
                              r"^bias: expected a shape broadcastable to \[B, Hq, Sq, Sk\] = \(2, 2, 3, 4\)"),
    "float-mask": (dict(mask=np.ones((3, 4), np.float32)), TypeError, r"^mask: expected a boolean array"),
}


@pytest.mark.parametrize("name", BAD)
def test_varlen_rejects_bad_inputs(name):
    args = dict(q=np.zeros((5, 2, 8), np.float32), k=np.zeros((7, 1, 8), np.float32),
                v=np.zeros((7, 1, 8), np.float32), cu_seqlens_q=[0, 2, 5], cu_seqlens_k=[0, 4, 7])
    change, error, pattern = BAD[name]
    args.update(change)
    with pytest.raises(error, match=pattern):
        fastattn.attention_varlen(**args)


@pytest.mark.parametrize("device, name", on_devices(["gqa-113-203-d40-causal-f32"], ["gqa-d8-causal-f32"]),
                         indirect=["device"])
def test_varlen_dropout_matches_the_reference(device, name, rng):
    """Sequence i draws its keep bits as batch i, on the CPU (one packed loop) and on CUDA (one launch each)."""
    q, k, v, cu_q, cu_k, options, dtype = make(name, rng)
    dev = {n: device.put(x) for n, x in dict(q=q, k=k, v=v).items()}
    out, lse, seed = fastattn.attention_varlen(dev["q"], dev["k"], dev["v"], cu_q, cu_k, dropout_p=0.25, seed=77,
                                               return_lse=True, return_seed=True, **options)
    ref = reference.attention_varlen(q, k, v, cu_q, cu_k, dropout_p=0.25, seed=77, **options)
    mag = np.abs(reference.attention_varlen(q, k, np.abs(v), cu_q, cu_k, dropout_p=0.25, seed=77, **options)).max()
    assert_close(device.get(out), ref, dtype, "out", magnitude=mag)
    dout = random(q.shape, dtype, rng)
    grads = fastattn.attention_varlen_backward(device.put(dout), dev["q"], dev["k"], dev["v"], out, lse, cu_q, cu_k,
                                               dropout_p=0.25, seed=seed, **options)
    expected = reference.attention_varlen_backward(dout, q, k, v, cu_q, cu_k, dropout_p=0.25, seed=seed, **options)
    magnitudes = reference.attention_varlen_backward(np.abs(dout), np.abs(q), np.abs(k), np.abs(v), cu_q, cu_k,
                                                     dropout_p=0.25, seed=seed, **options)
    for gname, got, want, m in zip(("dq", "dk", "dv"), grads, expected, magnitudes):
        assert_close(device.get(got), want, dtype, gname, magnitude=np.abs(m).max())
