"""Bad input never reaches a kernel: each check names the argument it rejects.

The catalogue runs on NumPy arrays and, through the ``device`` fixture, on
CUDA device arrays (no kernel is launched, so it is cheap in the simulator).
"""
import ml_dtypes
import numpy as np
import pytest

import fastattn
from fastattn import reference
from conftest import CUDA, cuda_unavailable_reason

B, HQ, HKV, SQ, SK, D = 2, 4, 2, 5, 7, 8


def arrays(dtype=np.float32):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, HQ, SQ, D)).astype(dtype)
    k = rng.standard_normal((B, HKV, SK, D)).astype(dtype)
    v = rng.standard_normal((B, HKV, SK, D)).astype(dtype)
    return {"q": q, "k": k, "v": v}


def backward_arrays(dtype=np.float32):
    a = arrays(dtype)
    out, lse = reference.attention(a["q"], a["k"], a["v"], return_lse=True)
    accum = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    return {"dout": np.ones_like(a["q"]), **a, "out": out.astype(dtype), "lse": lse.astype(accum)}


def f32(shape):
    return np.zeros(shape, np.float32)


# name: (changes to the arrays, changes to the options, error type, message pattern)
FORWARD_ERRORS = {
    "q-rank-3": ({"q": f32((HQ, SQ, D))}, {}, ValueError, r"^q: expected a 4-d array"),
    "k-rank-5": ({"k": f32((1, B, HKV, SK, D))}, {}, ValueError, r"^k: expected a 4-d array"),
    "v-rank-2": ({"v": f32((SK, D))}, {}, ValueError, r"^v: expected a 4-d array"),
    "k-batch": ({"k": f32((B + 1, HKV, SK, D)), "v": f32((B + 1, HKV, SK, D))}, {}, ValueError,
                r"^k: expected .*B=2"),
    "k-head-dim": ({"k": f32((B, HKV, SK, D + 1)), "v": f32((B, HKV, SK, D + 1))}, {}, ValueError,
                   r"^k: expected .*D=8"),
    "v-seq": ({"v": f32((B, HKV, SK + 1, D))}, {}, ValueError, r"^v: expected the shape of k"),
    "v-heads": ({"v": f32((B, HKV * 2, SK, D))}, {}, ValueError, r"^v: expected the shape of k"),
    "hq-not-multiple-of-hkv": ({"k": f32((B, 3, SK, D)), "v": f32((B, 3, SK, D))}, {}, ValueError,
                               r"^k: .*divides Hq=4.*Hkv=3"),
    "hkv-zero": ({"k": f32((B, 0, SK, D)), "v": f32((B, 0, SK, D))}, {}, ValueError, r"^k: "),
    "head-dim-zero": ({"q": f32((B, HQ, SQ, 0)), "k": f32((B, HKV, SK, 0)), "v": f32((B, HKV, SK, 0))}, {},
                      ValueError, r"^q: .*D >= 1"),
    "q-int32": ({"q": np.zeros((B, HQ, SQ, D), np.int32)}, {}, TypeError, r"^q: expected float32.*got int32"),
    "q-int64-all": ({n: np.zeros(s, np.int64) for n, s in
                     (("q", (B, HQ, SQ, D)), ("k", (B, HKV, SK, D)), ("v", (B, HKV, SK, D)))}, {}, TypeError,
                    r"^q: .*int64"),
    "q-bool": ({"q": np.zeros((B, HQ, SQ, D), bool)}, {}, TypeError, r"^q: "),
    "q-complex": ({"q": np.zeros((B, HQ, SQ, D), np.complex64)}, {}, TypeError, r"^q: "),
    "q-fp8": ({n: np.zeros(s, ml_dtypes.float8_e4m3fn) for n, s in
               (("q", (B, HQ, SQ, D)), ("k", (B, HKV, SK, D)), ("v", (B, HKV, SK, D)))}, {}, TypeError,
              r"^q: .*float8_e4m3fn"),
    "k-float64-vs-q-float32": ({"k": np.zeros((B, HKV, SK, D))}, {}, TypeError,
                               r"^k: expected dtype float32.*got float64"),
    "v-float16-vs-q-float32": ({"v": np.zeros((B, HKV, SK, D), np.float16)}, {}, TypeError,
                               r"^v: expected dtype float32.*got float16"),
    "k-bfloat16-vs-q-float32": ({"k": np.zeros((B, HKV, SK, D), ml_dtypes.bfloat16)}, {}, TypeError,
                                r"^k: .*bfloat16"),
    "scale-nan": ({}, {"scale": float("nan")}, ValueError, r"^scale: expected a finite float"),
    "scale-inf": ({}, {"scale": float("inf")}, ValueError, r"^scale: "),
    "scale-str": ({}, {"scale": "0.1"}, TypeError, r"^scale: "),
    "scale-bool": ({}, {"scale": True}, TypeError, r"^scale: "),
    "softcap-negative": ({}, {"softcap": -1.0}, ValueError, r"^softcap: expected a finite float >= 0"),
    "softcap-nan": ({}, {"softcap": float("nan")}, ValueError, r"^softcap: "),
    "softcap-inf": ({}, {"softcap": float("inf")}, ValueError, r"^softcap: "),
    "softcap-none": ({}, {"softcap": None}, TypeError, r"^softcap: "),
    "window-left-below-minus-one": ({}, {"window": (-2, 0)}, ValueError, r"^window: .*left.*>= -1.*got -2"),
    "window-right-below-minus-one": ({}, {"window": (3, -5)}, ValueError, r"^window: .*right.*got -5"),
    "window-float": ({}, {"window": (2.0, 0)}, TypeError, r"^window: expected int"),
    "window-bool": ({}, {"window": (True, 0)}, TypeError, r"^window: "),
    "window-one-int": ({}, {"window": 3}, TypeError, r"^window: expected a pair"),
    "window-triple": ({}, {"window": (1, 2, 3)}, TypeError, r"^window: expected a pair"),
    "causal-str": ({}, {"causal": "yes"}, TypeError, r"^causal: expected a bool"),
    "alibi-wrong-length": ({}, {"alibi_slopes": f32((HQ + 1,))}, ValueError,
                           r"^alibi_slopes: expected shape \[Hq\] = \(4,\) or \[B, Hq\] = \(2, 4\), got \(5,\)"),
    "alibi-kv-heads": ({}, {"alibi_slopes": f32((HKV,))}, ValueError, r"^alibi_slopes: "),
    "alibi-transposed": ({}, {"alibi_slopes": f32((HQ, B))}, ValueError, r"^alibi_slopes: .*got \(4, 2\)"),
    "alibi-3d": ({}, {"alibi_slopes": f32((1, B, HQ))}, ValueError, r"^alibi_slopes: "),
    "alibi-float16": ({}, {"alibi_slopes": np.zeros(HQ, np.float16)}, TypeError,
                      r"^alibi_slopes: expected float32 or float64, got float16"),
    "alibi-int": ({}, {"alibi_slopes": np.zeros(HQ, np.int64)}, TypeError, r"^alibi_slopes: .*int64"),
    "bias-does-not-broadcast": ({}, {"bias": f32((SQ + 1, SK))}, ValueError,
                                r"^bias: expected a shape broadcastable to \[B, Hq, Sq, Sk\] = \(2, 4, 5, 7\), "
                                r"got \(6, 7\)"),
    "bias-kv-heads": ({}, {"bias": f32((B, HKV, SQ, SK))}, ValueError, r"^bias: .*got \(2, 2, 5, 7\)"),
    "bias-5d": ({}, {"bias": f32((1, B, HQ, SQ, SK))}, ValueError, r"^bias: expected at most 4 dims"),
    "bias-float16": ({}, {"bias": np.zeros((SQ, SK), np.float16)}, TypeError,
                     r"^bias: expected float32, got float16"),
    "bias-int": ({}, {"bias": np.zeros((SQ, SK), np.int32)}, TypeError, r"^bias: .*int32"),
    "mask-float": ({}, {"mask": f32((SQ, SK))}, TypeError,
                   r"^mask: expected a boolean array \(True = the key takes part\), got float32"),
    "mask-int": ({}, {"mask": np.ones((SQ, SK), np.int8)}, TypeError, r"^mask: .*int8"),
    "mask-does-not-broadcast": ({}, {"mask": np.ones((SK, SQ), bool)}, ValueError,
                                r"^mask: expected a shape broadcastable to .*got \(7, 5\)"),
}

BACKWARD_ERRORS = {
    "dout-shape": ({"dout": f32((B, HQ, SQ + 1, D))}, ValueError, r"^dout: expected the shape of q"),
    "dout-rank": ({"dout": f32((HQ, SQ, D))}, ValueError, r"^dout: "),
    "dout-dtype": ({"dout": np.zeros((B, HQ, SQ, D))}, TypeError, r"^dout: expected dtype float32"),
    "out-shape": ({"out": f32((B, HQ, SQ, D + 1))}, ValueError, r"^out: expected the shape of q"),
    "out-dtype": ({"out": np.zeros((B, HQ, SQ, D), np.float16)}, TypeError, r"^out: .*float16"),
    "lse-shape": ({"lse": f32((B, HQ, SQ, 1))}, ValueError, r"^lse: expected shape \[B, Hq, Sq\] = \(2, 4, 5\)"),
    "lse-kv-heads": ({"lse": f32((B, HKV, SQ))}, ValueError, r"^lse: "),
    "lse-float64-for-float32": ({"lse": np.zeros((B, HQ, SQ))}, TypeError,
                                r"^lse: expected dtype float32 .*got float64"),
    "lse-float16": ({"lse": np.zeros((B, HQ, SQ), np.float16)}, TypeError, r"^lse: "),
    "k-shape": ({"k": f32((B, HKV, SK, D + 2))}, ValueError, r"^k: "),
    "q-dtype-differs": ({"q": np.zeros((B, HQ, SQ, D))}, TypeError, r"^k: expected dtype float64"),
}


@pytest.mark.parametrize("name", FORWARD_ERRORS)
def test_attention_rejects(device, name):
    changes, options, error, pattern = FORWARD_ERRORS[name]
    a = {**arrays(), **changes}
    options = {n: device.put(x) if isinstance(x, np.ndarray) else x for n, x in options.items()}
    with pytest.raises(error, match=pattern):
        fastattn.attention(device.put(a["q"]), device.put(a["k"]), device.put(a["v"]), **options)


@pytest.mark.parametrize("name", [n for n, (_, o, _, _) in FORWARD_ERRORS.items() if o])
def test_attention_backward_rejects_bad_options(device, name):
    _, options, error, pattern = FORWARD_ERRORS[name]
    a = {n: device.put(x) for n, x in backward_arrays().items()}
    options = {n: device.put(x) if isinstance(x, np.ndarray) else x for n, x in options.items()}
    with pytest.raises(error, match=pattern):
        fastattn.attention_backward(a["dout"], a["q"], a["k"], a["v"], a["out"], a["lse"], **options)


@pytest.mark.parametrize("name", BACKWARD_ERRORS)
def test_attention_backward_rejects(device, name):
    changes, error, pattern = BACKWARD_ERRORS[name]
    a = {n: device.put(x) for n, x in {**backward_arrays(), **changes}.items()}
    with pytest.raises(error, match=pattern):
        fastattn.attention_backward(a["dout"], a["q"], a["k"], a["v"], a["out"], a["lse"])


def test_dbias_needs_a_bias(device):
    a = {n: device.put(x) for n, x in backward_arrays().items()}
    with pytest.raises(ValueError, match=r"^return_dbias: expected a bias to differentiate, got bias=None"):
        fastattn.attention_backward(a["dout"], a["q"], a["k"], a["v"], a["out"], a["lse"], return_dbias=True)


def test_bias_of_the_dtype_of_q_is_accepted():
    a = backward_arrays(np.float16)
    fastattn.attention(a["q"], a["k"], a["v"], bias=np.zeros((SQ, SK), np.float16))
    with pytest.raises(TypeError, match=r"^bias: expected float32 or float16 \(the dtype of q\), got float64"):
        fastattn.attention(a["q"], a["k"], a["v"], bias=np.zeros((SQ, SK)))


def test_float64_lse_must_be_float64():
    a = backward_arrays(np.float64)
    lse32 = a["lse"].astype(np.float32)
    with pytest.raises(TypeError, match=r"^lse: expected dtype float64 .*got float32"):
        fastattn.attention_backward(a["dout"], a["q"], a["k"], a["v"], a["out"], lse32)


@pytest.mark.parametrize("bad", [{"a": 1}, "q", object(), None], ids=["dict", "str", "object", "none"])
def test_non_arrays_are_rejected_naming_the_argument(bad):
    a = arrays()
    with pytest.raises(TypeError, match=r"^v: expected a NumPy array or a CUDA device array"):
        fastattn.attention(a["q"], a["k"], bad)


def test_errors_say_what_came():
    a = arrays()
    with pytest.raises(ValueError) as info:
        fastattn.attention(a["q"], f32((B, HKV, SK, D + 1)), f32((B, HKV, SK, D + 1)))
    assert "(2, 2, 7, 9)" in str(info.value)


@CUDA
@pytest.mark.parametrize("cpu_args", [("k",), ("q", "v"), ("alibi_slopes",)], ids="-".join)
def test_mixed_devices_are_rejected_naming_the_arguments(cpu_args):
    reason = cuda_unavailable_reason()
    if reason:
        pytest.skip(reason)
    from numba import cuda

    a = {**arrays(), "alibi_slopes": np.ones(HQ, np.float32)}
    a = {n: x if n in cpu_args else cuda.to_device(x) for n, x in a.items()}
    with pytest.raises(TypeError, match="NumPy arrays or all CUDA device arrays") as info:
        fastattn.attention(a["q"], a["k"], a["v"], alibi_slopes=a["alibi_slopes"])
    message = str(info.value)
    for name in a:
        where = "cpu" if name in cpu_args else "cuda"
        assert f"{name} on {where}" in message, message


@CUDA
def test_mixed_devices_in_backward_are_rejected():
    reason = cuda_unavailable_reason()
    if reason:
        pytest.skip(reason)
    from numba import cuda

    a = {n: cuda.to_device(x) for n, x in backward_arrays().items()}
    a["lse"] = a["lse"].copy_to_host()
    with pytest.raises(TypeError, match="lse on cpu"):
        fastattn.attention_backward(a["dout"], a["q"], a["k"], a["v"], a["out"], a["lse"])
