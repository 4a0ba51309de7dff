"""Fused QKV and output projections, forward and backward, against float64 NumPy.

Every test runs on the CPU kernels and, through the ``device`` fixture, on the
CUDA kernels (tiny shapes, for the simulator).
"""
from dataclasses import dataclass

import numpy as np
import pytest

import fastattn
from cases import BF16, DTYPE_ID, F16, F32, F64, random
from conftest import assert_close, on_devices


@dataclass(frozen=True)
class ProjCase:
    batch: int
    seq: int
    hidden: int
    heads_q: int
    heads_kv: int
    head_dim: int
    bias: bool
    dtype: np.dtype

    @property
    def id(self):
        return (f"b{self.batch}-s{self.seq}-h{self.hidden}-{self.heads_q}-{self.heads_kv}-d{self.head_dim}"
                f"-{'bias' if self.bias else 'nobias'}-{DTYPE_ID[np.dtype(self.dtype)]}")

    @property
    def n(self):
        return (self.heads_q + 2 * self.heads_kv) * self.head_dim


DTYPES = [F32, F64, F16, BF16]
HEADS = [(4, 4), (8, 2), (6, 1)]
SIZES = [(2, 1, 64, 16), (1, 17, 96, 32), (3, 113, 40, 8), (2, 130, 128, 64), (1, 239, 80, 16)]
CPU_CASES = [ProjCase(b, s, h, *HEADS[(i + j) % 3], d, bool((i + j) % 2), DTYPES[(i + 2 * j) % 4])
             for i, (b, s, h, d) in enumerate(SIZES) for j in range(2)]
CUDA_CASES = [ProjCase(1, 1, 6, 2, 2, 4, True, F32), ProjCase(2, 3, 5, 4, 2, 2, False, BF16),
              ProjCase(1, 5, 8, 3, 1, 4, True, F64), ProjCase(1, 4, 7, 2, 1, 3, True, F16)]


def f64(x):
    return np.asarray(x).astype(np.float64)


def split_heads(y, case):
    """[B, S, N] -> q, k, v head layouts (the unfused path)."""
    b, s, hq, hkv, d = case.batch, case.seq, case.heads_q, case.heads_kv, case.head_dim
    parts = np.split(y, [hq * d, (hq + hkv) * d], axis=-1)
    return [p.reshape(b, s, -1, d).transpose(0, 2, 1, 3) for p in parts]


def qkv_inputs(case, rng):
    x = random((case.batch, case.seq, case.hidden), case.dtype, rng)
    w = (random((case.n, case.hidden), F32, rng) / np.sqrt(case.hidden)).astype(case.dtype)
    bias = random((case.n,), case.dtype, rng) if case.bias else None
    return x, w, bias


GRID = on_devices(CPU_CASES, CUDA_CASES)


@pytest.mark.parametrize("device, case", GRID, indirect=["device"])
def test_qkv_projection(device, case, rng):
    x, w, bias = qkv_inputs(case, rng)
    q, k, v = fastattn.fused_qkv_projection(device.put(x), device.put(w), device.put(bias),
                                            num_heads=case.heads_q, num_kv_heads=case.heads_kv,
                                            head_dim=case.head_dim)
    y = f64(x) @ f64(w).T + (f64(bias) if case.bias else 0.0)
    magnitude = float((np.abs(f64(x)) @ np.abs(f64(w)).T).max())
    for name, got, ref in zip("qkv", (q, k, v), split_heads(y, case)):
        got = device.get(got)
        assert got.dtype == case.dtype and got.shape == ref.shape
        assert_close(got, ref, case.dtype, name, magnitude=magnitude)


@pytest.mark.parametrize("device, case", GRID, indirect=["device"])
def test_qkv_projection_backward(device, case, rng):
    x, w, _ = qkv_inputs(case, rng)
    shapes = [(case.batch, h, case.seq, case.head_dim) for h in (case.heads_q, case.heads_kv, case.heads_kv)]
    grads = [random(s, case.dtype, rng) for s in shapes]
    dx, dw, db = fastattn.fused_qkv_projection_backward(*(device.put(g) for g in grads), device.put(x),
                                                        device.put(w), has_bias=case.bias)
    dy = np.concatenate([f64(g).transpose(0, 2, 1, 3).reshape(case.batch, case.seq, -1) for g in grads], -1)
    expected = {"dx": dy @ f64(w), "dw": np.einsum("bsn,bsh->nh", dy, f64(x)), "db": dy.sum(axis=(0, 1))}
    magnitudes = {"dx": (np.abs(dy) @ np.abs(f64(w))).max(), "dw": np.einsum("bsn,bsh->nh", np.abs(dy),
                                                                             np.abs(f64(x))).max(),
                  "db": np.abs(dy).sum(axis=(0, 1)).max()}
    for name, got in (("dx", dx), ("dw", dw), ("db", db)):
        if name == "db" and not case.bias:
            assert got is None
            continue
        got = device.get(got)
        assert got.dtype == case.dtype
        assert_close(got, expected[name], case.dtype, name, magnitude=float(magnitudes[name]))


def output_inputs(case, rng):
    p = case.heads_q * case.head_dim
    a = random((case.batch, case.seq, p), case.dtype, rng)
    w = (random((case.hidden, p), F32, rng) / np.sqrt(p)).astype(case.dtype)
    bias = random((case.hidden,), case.dtype, rng) if case.bias else None
    residual = random((case.batch, case.seq, case.hidden), case.dtype, rng)
    return a, w, bias, residual


@pytest.mark.parametrize("device, case", GRID, indirect=["device"])
def test_output_projection_residual(device, case, rng):
    a, w, bias, residual = output_inputs(case, rng)
    y = device.get(fastattn.fused_output_projection_residual(*(device.put(t) for t in (a, w, bias, residual))))
    ref = f64(a) @ f64(w).T + (f64(bias) if case.bias else 0.0) + f64(residual)
    magnitude = float((np.abs(f64(a)) @ np.abs(f64(w)).T + np.abs(f64(residual))).max())
    assert y.dtype == case.dtype
    assert_close(y, ref, case.dtype, "y", magnitude=magnitude)


def test_output_projection_without_bias_or_residual(device, rng):
    a, w, _, _ = output_inputs(CUDA_CASES[0], rng)
    y = device.get(fastattn.fused_output_projection_residual(device.put(a), device.put(w), None, None))
    assert_close(y, f64(a) @ f64(w).T, F32, "y")


@pytest.mark.parametrize("device, case", GRID, indirect=["device"])
def test_output_projection_residual_backward(device, case, rng):
    a, w, _, _ = output_inputs(case, rng)
    dy = random((case.batch, case.seq, case.hidden), case.dtype, rng)
    da, dw, db, dr = fastattn.fused_output_projection_residual_backward(device.put(dy), device.put(a),
                                                                        device.put(w), has_bias=case.bias)
    expected = {"da": f64(dy) @ f64(w), "dw": np.einsum("bsh,bsp->hp", f64(dy), f64(a)),
                "db": f64(dy).sum(axis=(0, 1))}
    magnitudes = {"da": (np.abs(f64(dy)) @ np.abs(f64(w))).max(),
                  "dw": np.einsum("bsh,bsp->hp", np.abs(f64(dy)), np.abs(f64(a))).max(),
                  "db": np.abs(f64(dy)).sum(axis=(0, 1)).max()}
    for name, got in (("da", da), ("dw", dw), ("db", db)):
        if name == "db" and not case.bias:
            assert got is None
            continue
        assert_close(device.get(got), expected[name], case.dtype, name, magnitude=float(magnitudes[name]))
    dr = device.get(dr)
    assert dr.tobytes() == dy.tobytes()


def test_weight_gradients_are_bitwise_repeatable(rng):
    case = ProjCase(2, 130, 128, 8, 2, 64, True, F32)
    x, w, _ = qkv_inputs(case, rng)
    grads = [random((2, h, 130, 64), F32, rng) for h in (8, 2, 2)]
    first = fastattn.fused_qkv_projection_backward(*grads, x, w, has_bias=True)
    again = fastattn.fused_qkv_projection_backward(*grads, x, w, has_bias=True)
    for a, b in zip(first, again):
        assert a.tobytes() == b.tobytes()


def test_inputs_are_not_modified(device, rng):
    case = CUDA_CASES[0]
    x, w, bias = qkv_inputs(case, rng)
    a, wo, bo, residual = output_inputs(case, rng)
    arrays = dict(x=x, w=w, bias=bias, a=a, wo=wo, bo=bo, residual=residual)
    before = {n: v.copy() for n, v in arrays.items()}
    dev = {n: device.put(v) for n, v in arrays.items()}
    q, k, v = fastattn.fused_qkv_projection(dev["x"], dev["w"], dev["bias"], num_heads=2, num_kv_heads=2,
                                            head_dim=4)
    fastattn.fused_qkv_projection_backward(q, k, v, dev["x"], dev["w"], has_bias=True)
    y = fastattn.fused_output_projection_residual(dev["a"], dev["wo"], dev["bo"], dev["residual"])
    fastattn.fused_output_projection_residual_backward(y, dev["a"], dev["wo"], has_bias=True)
    for n, value in dev.items():
        after = device.get(value) if device.name == "cuda" else value
        assert after.tobytes() == before[n].tobytes(), f"{n} was modified"


# --- bad input ------------------------------------------------------------------------------

def _qkv(**changes):
    args = dict(x=np.zeros((2, 3, 8), np.float32), weight=np.zeros((24, 8), np.float32),
                bias=np.zeros(24, np.float32), num_heads=2, num_kv_heads=1, head_dim=6)
    args.update(changes)
    return args


QKV_ERRORS = {
    "x-rank": (_qkv(x=np.zeros((3, 8), np.float32)), ValueError, r"^x: expected a 3-d array"),
    "x-int": (_qkv(x=np.zeros((2, 3, 8), np.int32)), TypeError, r"^x: expected float32"),
    "weight-rows": (_qkv(weight=np.zeros((25, 8), np.float32)), ValueError, r"^weight: expected shape .*\(24, 8\)"),
    "weight-cols": (_qkv(weight=np.zeros((24, 9), np.float32)), ValueError, r"^weight: "),
    "weight-dtype": (_qkv(weight=np.zeros((24, 8))), TypeError, r"^weight: expected dtype float32"),
    "bias-shape": (_qkv(bias=np.zeros(23, np.float32)), ValueError, r"^bias: expected shape"),
    "heads-zero": (_qkv(num_heads=0), ValueError, r"^num_heads: expected an int >= 1"),
    "heads-float": (_qkv(num_heads=2.0), TypeError, r"^num_heads: expected an int"),
    "kv-not-divisor": (_qkv(num_heads=3, num_kv_heads=2, head_dim=24 // 7), ValueError,
                       r"^num_kv_heads: expected a divisor of num_heads=3"),
    "head-dim-bool": (_qkv(head_dim=True), TypeError, r"^head_dim: "),
}


@pytest.mark.parametrize("name", QKV_ERRORS)
def test_qkv_projection_rejects(name):
    args, error, pattern = QKV_ERRORS[name]
    x, w, b = args.pop("x"), args.pop("weight"), args.pop("bias")
    with pytest.raises(error, match=pattern):
        fastattn.fused_qkv_projection(x, w, b, **args)


def test_qkv_backward_rejects():
    x, w = np.zeros((2, 3, 8), np.float32), np.zeros((24, 8), np.float32)
    dq, dk = np.zeros((2, 2, 3, 6), np.float32), np.zeros((2, 1, 3, 6), np.float32)
    with pytest.raises(ValueError, match=r"^dv: expected shape"):
        fastattn.fused_qkv_projection_backward(dq, dk, np.zeros((2, 1, 4, 6), np.float32), x, w)
    with pytest.raises(TypeError, match=r"^dq: expected dtype float32"):
        fastattn.fused_qkv_projection_backward(dq.astype(np.float64), dk, dk, x, w)
    with pytest.raises(ValueError, match=r"^weight: expected shape"):
        fastattn.fused_qkv_projection_backward(dq, dk, dk, x, w[:20])
    with pytest.raises(TypeError, match=r"^has_bias: expected a bool"):
        fastattn.fused_qkv_projection_backward(dq, dk, dk, x, w, has_bias=1)


def test_output_projection_rejects():
    a, w = np.zeros((2, 3, 8), np.float32), np.zeros((5, 8), np.float32)
    with pytest.raises(ValueError, match=r"^attn_out: expected a 3-d array"):
        fastattn.fused_output_projection_residual(a[0], w, None, None)
    with pytest.raises(ValueError, match=r"^weight: expected shape \[H, P\]"):
        fastattn.fused_output_projection_residual(a, w[:, :7], None, None)
    with pytest.raises(ValueError, match=r"^bias: expected shape \[H\] = \(5,\)"):
        fastattn.fused_output_projection_residual(a, w, np.zeros(4, np.float32), None)
    with pytest.raises(ValueError, match=r"^residual: expected shape \[B, S, H\] = \(2, 3, 5\)"):
        fastattn.fused_output_projection_residual(a, w, None, np.zeros((2, 3, 4), np.float32))
    with pytest.raises(TypeError, match=r"^residual: expected dtype float32 \(the dtype of attn_out\)"):
        fastattn.fused_output_projection_residual(a, w, None, np.zeros((2, 3, 5)))
    with pytest.raises(ValueError, match=r"^dy: expected shape"):
        fastattn.fused_output_projection_residual_backward(np.zeros((2, 3, 4), np.float32), a, w)


@pytest.mark.parametrize("products", ["simd", "blas"])
@pytest.mark.parametrize("embed, head_dim", [(24, 4), (32, 16)], ids=["widths-24", "widths-of-16"])
def test_both_cpu_gemm_pools_give_the_same_gradients(embed, head_dim, products, monkeypatch):
    """config.cpu_proj_pool = "numba" (the layer's choice) computes what NumPy's pool computes, on the
    tile products' micro-kernels (widths of 16) or BLAS (other widths, or cpu_gemm="blas")."""
    rng = np.random.default_rng(7)
    monkeypatch.setattr(fastattn.config, "cpu_gemm", products)
    x = rng.standard_normal((2, 9, embed), np.float32)
    w = rng.standard_normal((3 * 2 * head_dim, embed), np.float32)
    b = rng.standard_normal(3 * 2 * head_dim).astype(np.float32)
    heads = dict(num_heads=2, num_kv_heads=2, head_dim=head_dim)
    attn = rng.standard_normal((2, 9, 2 * head_dim), np.float32)
    wo = rng.standard_normal((embed, 2 * head_dim), np.float32)
    results = {}
    for pool in ("numpy", "numba"):
        monkeypatch.setattr(fastattn.config, "cpu_proj_pool", pool)
        q, k, v = fastattn.fused_qkv_projection(x, w, b, **heads)
        grads = fastattn.fused_qkv_projection_backward(q, k, v, x, w, has_bias=True)
        y = fastattn.fused_output_projection_residual(attn, wo, None, x)
        out_grads = fastattn.fused_output_projection_residual_backward(x, attn, wo)
        results[pool] = [q, k, v, *grads, y, *(g for g in out_grads if g is not None)]
    for a, c in zip(results["numpy"], results["numba"]):
        # each is a sum of at most 32 products: a few float32 units apart at most
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5 * np.abs(c).max())


def test_the_auto_pool_follows_the_tile_products(monkeypatch):
    """cpu_proj_pool = "auto" (the default) is numba's pool where the micro-kernels run, else NumPy's."""
    from fastattn.cpu.projection import _pool

    assert fastattn.config.cpu_proj_pool == "auto"
    for products, pool in (("simd", "numba"), ("blas", "numpy")):
        monkeypatch.setattr(fastattn.config, "cpu_gemm", products)
        assert _pool(None) == pool
        assert _pool("numpy") == "numpy" and _pool("numba") == "numba"  # a caller's choice stands
    monkeypatch.setattr(fastattn.config, "cpu_proj_pool", "threads")
    with pytest.raises(ValueError, match="cpu_proj_pool: expected 'auto', 'numpy' or 'numba', got 'threads'"):
        _pool(None)
