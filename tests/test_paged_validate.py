"""Bad paged input never reaches a kernel: each check names the argument it rejects.

Numba does not bounds-check, so block-table entries and slots outside the
cache must be caught here.  The catalogue runs on NumPy arrays and, through
the ``device`` fixture, on CUDA device arrays (no kernel is launched).
"""
import ml_dtypes
import numpy as np
import pytest

import fastattn

B, HQ, HKV, SQ, D, NB, BS = 2, 4, 2, 3, 8, 6, 4
E4M3 = ml_dtypes.float8_e4m3fn


def f32(shape):
    return np.zeros(shape, np.float32)


def good(cache_dtype=np.float32):
    return {"q": f32((B, HQ, SQ, D)), "k_cache": np.zeros((NB, BS, HKV, D), cache_dtype),
            "v_cache": np.zeros((NB, BS, HKV, D), cache_dtype),
            "block_table": np.array([[0, 1, -1], [2, 5, 99]], np.int32), "seq_lens": np.array([7, 5], np.int32)}


# name: (changes, options, error, message pattern)
PAGED_ERRORS = {
    "q-rank": ({"q": f32((HQ, SQ, D))}, {}, ValueError, r"^q: expected a 4-d array"),
    "k-cache-rank": ({"k_cache": f32((NB, BS, D))}, {}, ValueError, r"^k_cache: expected a 4-d array"),
    "k-cache-head-dim": ({"k_cache": f32((NB, BS, HKV, D + 1))}, {}, ValueError, r"^k_cache: .*D=8"),
    "v-cache-shape": ({"v_cache": f32((NB + 1, BS, HKV, D))}, {}, ValueError, r"^v_cache: expected the shape"),
    "heads-not-divisible": ({"k_cache": f32((NB, BS, 3, D)), "v_cache": f32((NB, BS, 3, D))}, {}, ValueError,
                            r"^k_cache: .*divides Hq=4"),
    "cache-dtype": ({"k_cache": np.zeros((NB, BS, HKV, D)), "v_cache": np.zeros((NB, BS, HKV, D))}, {},
                    TypeError, r"^k_cache: expected dtype float32 \(the dtype of q\), got float64"),
    "v-cache-dtype": ({"v_cache": np.zeros((NB, BS, HKV, D), np.float16)}, {}, TypeError,
                      r"^v_cache: expected the dtype of k_cache"),
    "fp8-cache-plain-call": ({"k_cache": np.zeros((NB, BS, HKV, D), E4M3),
                              "v_cache": np.zeros((NB, BS, HKV, D), E4M3)}, {}, TypeError,
                             r"^k_cache: .*paged_attention_fp8"),
    "table-float": ({"block_table": np.zeros((B, 3))}, {}, TypeError, r"^block_table: expected an integer array"),
    "table-rank": ({"block_table": np.zeros(3, np.int32)}, {}, ValueError, r"^block_table: expected a 2-d array"),
    "table-batch": ({"block_table": np.zeros((B + 1, 3), np.int32)}, {}, ValueError, r"^block_table: .*B=2"),
    "table-entry-too-big": ({"block_table": np.array([[0, 6, 0], [2, 5, 0]], np.int32)}, {}, ValueError,
                            r"^block_table: expected entries in \[0, 6\).*got 6 at \[0, 1\]"),
    "table-entry-negative": ({"block_table": np.array([[0, 1, 0], [-1, 5, 0]], np.int32)}, {}, ValueError,
                             r"^block_table: .*got -1 at \[1, 0\]"),
    "lens-float": ({"seq_lens": np.array([7.0, 5.0])}, {}, TypeError, r"^seq_lens: expected an integer array"),
    "lens-shape": ({"seq_lens": np.array([7, 5, 1], np.int32)}, {}, ValueError, r"^seq_lens: expected shape \[B\]"),
    "lens-negative": ({"seq_lens": np.array([7, -1], np.int32)}, {}, ValueError,
                      r"^seq_lens: expected lengths >= 0, got -1 for sequence 1"),
    "lens-beyond-table": ({"seq_lens": np.array([13, 5], np.int32)}, {}, ValueError,
                          r"^seq_lens: expected lengths <= 12 .*got 13"),
    "lens-below-sq": ({"seq_lens": np.array([7, 2], np.int32)}, {}, ValueError,
                      r"^seq_lens: expected lengths of 0 or >= Sq=3.*got 2 for sequence 1"),
    "lens-int-negative": ({"seq_lens": -3}, {}, ValueError, r"^seq_lens: "),
    "scale-nan": ({}, {"scale": float("nan")}, ValueError, r"^scale: "),
    "softcap-negative": ({}, {"softcap": -1.0}, ValueError, r"^softcap: "),
    "window-bad": ({}, {"window": (-3, 0)}, ValueError, r"^window: "),
    "alibi-shape": ({}, {"alibi_slopes": f32(HKV)}, ValueError, r"^alibi_slopes: "),
}


@pytest.mark.parametrize("name", PAGED_ERRORS)
def test_paged_attention_rejects(device, name):
    changes, options, error, pattern = PAGED_ERRORS[name]
    a = {n: x if np.isscalar(x) else device.put(x) for n, x in {**good(), **changes}.items()}
    options = {n: device.put(x) if isinstance(x, np.ndarray) else x for n, x in options.items()}
    with pytest.raises(error, match=pattern):
        fastattn.paged_attention(*a.values(), **options)


def test_unread_table_entries_may_hold_anything():
    """Entries past a sequence's last block (here -1 and 99) are never read, so they are allowed."""
    a = good()
    rng = np.random.default_rng(0)
    a["k_cache"], a["v_cache"] = (rng.standard_normal((NB, BS, HKV, D)).astype(np.float32) for _ in range(2))
    out = fastattn.paged_attention(*a.values())
    assert np.isfinite(out).all()


FP8_ERRORS = {
    "float-caches": ({"k_cache": f32((NB, BS, HKV, D)), "v_cache": f32((NB, BS, HKV, D))}, {}, TypeError,
                     r"^k_cache: expected float8_e4m3fn or float8_e5m2"),
    "mixed-fp8-formats": ({"v_cache": np.zeros((NB, BS, HKV, D), ml_dtypes.float8_e5m2)}, {}, TypeError,
                          r"^v_cache: expected the dtype of k_cache"),
    "q-float64": ({"q": np.zeros((B, HQ, SQ, D))}, {}, TypeError, r"^q: expected float32, float16, bfloat16 or fp8"),
    "k-scale-zero": ({}, {"k_scale": 0.0}, ValueError, r"^k_scale: expected finite scales > 0, got 0"),
    "v-scale-nan": ({}, {"v_scale": float("nan")}, ValueError, r"^v_scale: "),
    "v-scale-negative-head": ({}, {"v_scale": np.array([1.0, -2.0])}, ValueError, r"^v_scale: .*got -2"),
    "k-scale-shape": ({}, {"k_scale": np.ones(HQ)}, ValueError, r"^k_scale: expected a float or shape \[Hkv\]"),
    "q-scale-array": ({}, {"q_scale": np.ones(HKV)}, TypeError, r"^q_scale: expected a float"),
    "o-scale-inf": ({}, {"o_scale": float("inf")}, ValueError, r"^o_scale: "),
    "o-scale-str": ({}, {"o_scale": "1"}, TypeError, r"^o_scale: "),
    "table-out-of-range": ({"block_table": np.array([[0, 1, 0], [2, 7, 0]], np.int32)}, {}, ValueError,
                           r"^block_table: "),
}


@pytest.mark.parametrize("name", FP8_ERRORS)
def test_paged_attention_fp8_rejects(name):
    changes, options, error, pattern = FP8_ERRORS[name]
    a = {**good(E4M3), **changes}
    with pytest.raises(error, match=pattern):
        fastattn.paged_attention_fp8(*a.values(), **options)


def backward_arrays():
    a = good()
    out, lse = fastattn.paged_attention(*a.values(), return_lse=True)
    return {"dout": f32(out.shape), "q": a["q"], "k_cache": a["k_cache"], "v_cache": a["v_cache"], "out": out,
            "lse": lse, "block_table": a["block_table"], "seq_lens": a["seq_lens"]}


BACKWARD_ERRORS = {
    "dout-shape": ({"dout": f32((B, HQ, SQ + 1, D))}, ValueError, r"^dout: expected the shape of q"),
    "out-dtype": ({"out": np.zeros((B, HQ, SQ, D), np.float16)}, TypeError, r"^out: "),
    "lse-shape": ({"lse": f32((B, HQ))}, ValueError, r"^lse: expected shape \[B, Hq, Sq\]"),
    "lse-dtype": ({"lse": np.zeros((B, HQ, SQ))}, TypeError, r"^lse: expected dtype float32"),
    "table-out-of-range": ({"block_table": np.array([[0, 1, 0], [2, 6, 0]], np.int32)}, ValueError,
                           r"^block_table: "),
    "lens-negative": ({"seq_lens": np.array([-7, 5], np.int32)}, ValueError, r"^seq_lens: "),
}


@pytest.mark.parametrize("name", BACKWARD_ERRORS)
def test_paged_attention_backward_rejects(name):
    changes, error, pattern = BACKWARD_ERRORS[name]
    a = {**backward_arrays(), **changes}
    with pytest.raises(error, match=pattern):
        fastattn.paged_attention_backward(*a.values())


def write_arrays(cache_dtype=np.float32):
    return {"k": f32((3, HKV, D)), "v": f32((3, HKV, D)), "k_cache": np.zeros((NB, BS, HKV, D), cache_dtype),
            "v_cache": np.zeros((NB, BS, HKV, D), cache_dtype), "slot_mapping": np.array([0, -1, 23])}


WRITE_ERRORS = {
    "k-rank": ({"k": f32((3, D))}, {}, ValueError, r"^k: expected a 3-d array"),
    "k-heads": ({"k": f32((3, HKV + 1, D))}, {}, ValueError, r"^k: expected shape \[T, Hkv, D\] with Hkv=2"),
    "v-shape": ({"v": f32((2, HKV, D))}, {}, ValueError, r"^v: expected the shape of k"),
    "k-int": ({"k": np.zeros((3, HKV, D), np.int32)}, {}, TypeError, r"^k: expected float32"),
    "v-dtype": ({"v": np.zeros((3, HKV, D))}, {}, TypeError, r"^v: expected dtype float32 \(the dtype of k\)"),
    "slots-float": ({"slot_mapping": np.array([0.0, 1.0, 2.0])}, {}, TypeError, r"^slot_mapping: expected an integer"),
    "slots-shape": ({"slot_mapping": np.array([0, 1])}, {}, ValueError, r"^slot_mapping: expected shape \[T\]"),
    "slot-beyond-cache": ({"slot_mapping": np.array([0, 1, 24])}, {}, ValueError,
                          r"^slot_mapping: expected slots < 24 .*got 24"),
    "slot-twice": ({"slot_mapping": np.array([5, 1, 5])}, {}, ValueError, r"^slot_mapping: expected each slot at most once"),
    "cache-int": ({"k_cache": np.zeros((NB, BS, HKV, D), np.int8), "v_cache": np.zeros((NB, BS, HKV, D), np.int8)},
                  {}, TypeError, r"^k_cache: "),
    "scale-for-float-cache": ({}, {"k_scale": 2.0}, ValueError, r"^k_scale: expected 1.0 for a float32 cache"),
    "scale-zero": ({}, {"v_scale": 0.0}, ValueError, r"^v_scale: "),
}


@pytest.mark.parametrize("name", WRITE_ERRORS)
def test_write_kv_cache_rejects_and_writes_nothing(device, name):
    changes, options, error, pattern = WRITE_ERRORS[name]
    a = {**write_arrays(), **changes}
    a["k"] = a["k"] + 1 if a["k"].dtype.kind == "f" else a["k"]
    dev = {n: device.put(x) for n, x in a.items()}
    with pytest.raises(error, match=pattern):
        fastattn.write_kv_cache(*dev.values(), **options)
    for name in ("k_cache", "v_cache"):
        after = device.get(dev[name]) if device.name == "cuda" else dev[name]
        assert not np.asarray(after, np.float64).any(), f"{name} was written"


def test_fp8_write_scale_shape():
    a = write_arrays(E4M3)
    with pytest.raises(ValueError, match=r"^k_scale: expected a float or shape \[Hkv\]"):
        fastattn.write_kv_cache(*a.values(), k_scale=np.ones(3))


MERGE_ERRORS = {
    "empty": (lambda o, l: ([], []), ValueError, r"^outs: expected at least one"),
    "count": (lambda o, l: (o, l[:1]), ValueError, r"^lses: expected 2 arrays"),
    "shape": (lambda o, l: ([o[0], o[1][..., :3]], l), ValueError, r"^outs\[1\]: expected the shape of outs\[0\]"),
    "lse-shape": (lambda o, l: (o, [l[0], l[1][:, :1]]), ValueError, r"^lses\[1\]: expected shape"),
    "dtype": (lambda o, l: ([o[0], o[1].astype(np.float64)], l), TypeError, r"^outs\[1\]: expected dtype float32"),
    "lse-int": (lambda o, l: (o, [l[0], l[1].astype(np.int32)]), TypeError, r"^lses\[1\]: expected float32"),
}


@pytest.mark.parametrize("name", MERGE_ERRORS)
def test_merge_attention_states_rejects(name):
    make, error, pattern = MERGE_ERRORS[name]
    outs, lses = [f32((2, 3, 4))] * 2, [f32((2, 3))] * 2
    with pytest.raises(error, match=pattern):
        fastattn.merge_attention_states(*make(outs, lses))
