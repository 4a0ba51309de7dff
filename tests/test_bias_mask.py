"""attention(bias=, mask=) and the bias gradient against the float64 reference.

Every case runs on the CPU kernels and, through the ``device`` fixture, on the
CUDA kernels (tiny shapes, for the simulator).  Biases and masks come in every
broadcast shape: full, per head, shared by all heads, one per key, one per row
(a bias constant along the keys: its gradient is a sum that cancels to 0).
"""
import os
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest

import fastattn
from cases import BF16, F16, F32, F64, OPTIONS, Shape, accum, backward_reference, random
from conftest import assert_close, on_devices
from fastattn import reference


def _bias_shape(kind, s):
    return {"full": (s.batch, s.heads_q, s.seq_q, s.seq_k), "rows-keys": (s.seq_q, s.seq_k),
            "heads": (s.heads_q, s.seq_q, s.seq_k), "head-keys": (1, s.heads_q, 1, s.seq_k),
            "keys": (s.seq_k,), "batch-rows": (s.batch, 1, s.seq_q, 1), "scalar": (1, 1, 1, 1)}[kind]


def _mask(kind, s, rng):
    """A boolean mask of a kind; "empty-rows" also masks every key of some rows."""
    if kind == "padding":  # keys past each sequence's length: [B, 1, 1, Sk]
        lengths = rng.integers(1, s.seq_k + 1, size=s.batch)
        return (np.arange(s.seq_k) < lengths[:, None])[:, None, None, :]
    if kind == "random":
        return rng.random((s.seq_q, s.seq_k)) < 0.7
    if kind == "empty-rows":
        keep = rng.random((s.batch, s.heads_q, s.seq_q, s.seq_k)) < 0.6
        keep[:, :, ::3] = False
        return keep
    raise KeyError(kind)


@dataclass(frozen=True)
class BiasCase:
    shape: Shape
    option: str
    dtype: np.dtype
    bias: str = None      # a kind of _bias_shape, or None
    bias_dtype: str = "q"  # "q" (the dtype of q) or "f32"
    mask: str = None      # a kind of _mask, or None
    neg_inf: bool = False  # some bias entries -inf: an additive mask

    @property
    def id(self):
        parts = [self.shape.id, self.option, str(self.dtype)]
        if self.bias:
            parts.append(f"bias-{self.bias}-{self.bias_dtype}" + ("-inf" if self.neg_inf else ""))
        if self.mask:
            parts.append(f"mask-{self.mask}")
        return "-".join(parts)

    def make(self, rng):
        s = self.shape
        q, k, v = random(s.q, self.dtype, rng), random(s.kv, self.dtype, rng), random(s.kv, self.dtype, rng)
        options = OPTIONS[self.option](s, rng)
        if self.bias:
            bias = rng.standard_normal(_bias_shape(self.bias, s))
            if self.neg_inf:
                bias[rng.random(bias.shape) < 0.3] = -np.inf
            options["bias"] = bias.astype(F32 if self.bias_dtype == "f32" else self.dtype)
        if self.mask:
            options["mask"] = _mask(self.mask, s, rng)
        return q, k, v, options


CPU_CASES = [
    BiasCase(Shape(2, 8, 2, 113, 203, 40), "causal", F32, bias="full"),
    BiasCase(Shape(2, 4, 4, 1, 239, 59), "plain", F16, bias="rows-keys", mask="padding"),
    BiasCase(Shape(1, 4, 2, 127, 256, 80), "window-32-8", BF16, bias="head-keys", bias_dtype="f32", mask="random"),
    BiasCase(Shape(2, 4, 1, 65, 97, 96), "all", F64, bias="batch-rows", mask="empty-rows"),
    BiasCase(Shape(2, 8, 2, 113, 203, 111), "softcap", F32, bias="keys", mask="empty-rows"),
    BiasCase(Shape(1, 2, 2, 17, 40, 256), "alibi-h", F16, bias="heads", bias_dtype="f32"),
    BiasCase(Shape(2, 4, 2, 33, 70, 64), "scale", BF16, mask="empty-rows"),
    BiasCase(Shape(2, 6, 1, 200, 100, 32), "causal", F32, bias="full", neg_inf=True),
    BiasCase(Shape(2, 4, 2, 239, 1, 16), "plain", F64, bias="scalar", mask="padding"),
]
CUDA_CASES = [
    BiasCase(Shape(2, 4, 2, 9, 13, 8), "causal", F32, bias="full"),
    BiasCase(Shape(1, 4, 1, 7, 11, 16), "plain", F16, bias="head-keys", bias_dtype="f32", mask="padding"),
    BiasCase(Shape(2, 2, 2, 5, 9, 8), "all", BF16, bias="rows-keys", mask="empty-rows"),
    BiasCase(Shape(2, 2, 1, 6, 7, 8), "softcap", F64, bias="batch-rows", mask="random"),
    BiasCase(Shape(1, 2, 2, 6, 10, 8), "window-3-1", F32, bias="keys", neg_inf=True),
]
GRID = on_devices(CPU_CASES, CUDA_CASES)


def put_options(device, options):
    return {n: device.put(x) if isinstance(x, np.ndarray) else x for n, x in options.items()}


@pytest.mark.parametrize("device, case", GRID, indirect=["device"])
def test_forward_with_bias_and_mask_matches_reference(device, case, rng):
    q, k, v, options = case.make(rng)
    out, lse = fastattn.attention(device.put(q), device.put(k), device.put(v), return_lse=True,
                                  **put_options(device, options))
    ref_out, ref_lse = reference.attention(q, k, v, return_lse=True, **options)
    assert_close(device.get(out), ref_out, case.dtype, "out")
    assert_close(device.get(lse), ref_lse, case.dtype, "lse")


@pytest.mark.parametrize("device, case", GRID, indirect=["device"])
def test_backward_with_bias_and_mask_matches_reference(device, case, rng):
    q, k, v, options = case.make(rng)
    out, lse = reference.attention(q, k, v, return_lse=True, **options)
    out, lse = out.astype(case.dtype), lse.astype(accum(case.dtype))
    dout = random(q.shape, case.dtype, rng)
    want_dbias = "bias" in options
    grads = fastattn.attention_backward(*map(device.put, (dout, q, k, v, out, lse)), return_dbias=want_dbias,
                                        **put_options(device, options))
    expected, magnitudes = backward_reference(dout, q, k, v, **options)
    assert len(grads) == len(expected)
    for name, got, ref, mag in zip(("dq", "dk", "dv", "dbias"), grads, expected, magnitudes):
        got = device.get(got)
        want_dtype = options["bias"].dtype if name == "dbias" else case.dtype
        assert got.dtype == want_dtype, f"{name}: dtype {got.dtype}, expected {want_dtype}"
        assert_close(got, ref, case.dtype, name, magnitude=mag)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)], indirect=True)
def test_a_mask_equals_a_minus_inf_bias(device, rng):
    """mask=keep and bias=where(keep, 0, -inf) are the same attention, forward and backward."""
    s = Shape(1, 2, 1, 7, 9, 8)
    q, k, v = (random(x, F32, rng) for x in (s.q, s.kv, s.kv))
    keep = _mask("empty-rows", s, rng)
    as_bias = np.where(keep, 0.0, -np.inf).astype(F32)
    dq, dk, dv = (device.put(x) for x in (q, k, v))
    by_mask = fastattn.attention(dq, dk, dv, mask=device.put(keep), return_lse=True)
    by_bias = fastattn.attention(dq, dk, dv, bias=device.put(as_bias), return_lse=True)
    for a, b in zip(by_mask, by_bias):
        np.testing.assert_array_equal(device.get(a), device.get(b))
    dout = device.put(random(s.q, F32, rng))
    g_mask = fastattn.attention_backward(dout, dq, dk, dv, *by_mask, mask=device.put(keep))
    g_bias = fastattn.attention_backward(dout, dq, dk, dv, *by_bias, bias=device.put(as_bias))
    for a, b in zip(g_mask, g_bias):
        np.testing.assert_array_equal(device.get(a), device.get(b))


def test_fully_masked_rows_give_zero_output_and_gradients(rng):
    s = Shape(1, 2, 2, 4, 6, 8)
    q, k, v = (random(x, F32, rng) for x in (s.q, s.kv, s.kv))
    keep = np.ones((4, 6), bool)
    keep[1] = False
    bias = random((4, 6), F32, rng)
    out, lse = fastattn.attention(q, k, v, bias=bias, mask=keep, return_lse=True)
    assert (out[:, :, 1] == 0).all() and (lse[:, :, 1] == -np.inf).all()
    dq, _, _, dbias = fastattn.attention_backward(np.ones_like(out), q, k, v, out, lse, bias=bias, mask=keep,
                                                  return_dbias=True)
    assert (dq[:, :, 1] == 0).all() and (dbias[1] == 0).all() and np.isfinite(dbias).all()


def test_dbias_matches_finite_differences(rng):
    """The kernel's dbias against central differences of sum(out * dout) in float64."""
    s = Shape(1, 2, 1, 3, 5, 4)
    q, k, v = (random(x, F64, rng) for x in (s.q, s.kv, s.kv))
    bias = rng.standard_normal((1, 2, 3, 1)) + rng.standard_normal((5,))  # a full [1, 2, 3, 5] bias
    bias = np.ascontiguousarray(bias)
    dout = random(s.q, F64, rng)
    out, lse = fastattn.attention(q, k, v, bias=bias, causal=True, return_lse=True)
    *_, dbias = fastattn.attention_backward(dout, q, k, v, out, lse, bias=bias, causal=True, return_dbias=True)
    step = 1e-6
    numeric = np.zeros_like(bias)
    for idx in np.ndindex(bias.shape):
        up, down = bias.copy(), bias.copy()
        up[idx] += step
        down[idx] -= step
        loss = [float((fastattn.attention(q, k, v, bias=b, causal=True) * dout).sum()) for b in (up, down)]
        numeric[idx] = (loss[0] - loss[1]) / (2 * step)
    np.testing.assert_allclose(dbias, numeric, rtol=1e-6, atol=1e-8)


def test_bias_with_broadcast_axes_is_read_in_place(monkeypatch, rng):
    """A [Sq, Sk] bias reaches the kernel without a copy: the kernel sees the caller's memory."""
    from fastattn.cpu import attention as cpu_attention

    seen = []
    original = cpu_attention._extra

    def spy(extra, spec):
        packed = original(extra, spec)
        seen.append(packed[0])
        return packed

    monkeypatch.setattr(cpu_attention, "_extra", spy)
    s = Shape(2, 4, 2, 5, 7, 8)
    q, k, v = (random(x, F32, rng) for x in (s.q, s.kv, s.kv))
    bias = random((5, 7), F32, rng)
    fastattn.attention(q, k, v, bias=bias)
    assert np.shares_memory(seen[0], bias) and seen[0].size == bias.size


def test_cpu_dbias_gives_the_same_bits_at_any_thread_count(rng, monkeypatch):
    """Bias gradients shared by batches, heads or keys are summed in a fixed order: 1 and 2 threads agree."""
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        env = dict(os.environ, NUMBA_NUM_THREADS="2")
        test = f"{__file__}::test_cpu_dbias_gives_the_same_bits_at_any_thread_count"
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        return
    monkeypatch.setattr(fastattn.config, "cpu_bwd_block_k", 16)
    s = Shape(2, 8, 2, 57, 200, 32)
    q, k, v = (random(x, F32, rng) for x in (s.q, s.kv, s.kv))
    dout = random(s.q, F32, rng)
    before = numba.get_num_threads()
    try:
        for bias_shape in [(57, 200), (2, 1, 57, 1), (1, 8, 1, 200)]:
            bias = random(bias_shape, F32, rng)
            out, lse = fastattn.attention(q, k, v, bias=bias, causal=True, return_lse=True)
            grads = {}
            for threads in (1, 2):
                numba.set_num_threads(threads)
                grads[threads] = fastattn.attention_backward(dout, q, k, v, out, lse, bias=bias, causal=True,
                                                             return_dbias=True)
            for name, one, two in zip(("dq", "dk", "dv", "dbias"), grads[1], grads[2]):
                assert one.tobytes() == two.tobytes(), f"{name} of a {bias_shape} bias differs between 1 and 2 threads"
        # a packed batch (its backward runs the same owner tables), a bias shared by its sequences
        cu = np.array([0, 150, 151, 200], np.int32)
        pq, pk, pv, pdout = (random((200, 4, 32), F32, rng) for _ in range(4))
        pbias = random((1, 4, 150, 150), F32, rng)
        out, lse = fastattn.attention_varlen(pq, pk, pv, cu, cu, causal=True, bias=pbias, return_lse=True)
        grads = {}
        for threads in (1, 2):
            numba.set_num_threads(threads)
            grads[threads] = fastattn.attention_varlen_backward(pdout, pq, pk, pv, out, lse, cu, cu, causal=True,
                                                                bias=pbias, return_dbias=True)
        for name, one, two in zip(("dq", "dk", "dv", "dbias"), grads[1], grads[2]):
            assert one.tobytes() == two.tobytes(), f"varlen {name} differs between 1 and 2 threads"
    finally:
        numba.set_num_threads(before)
