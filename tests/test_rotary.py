"""fastattn.rotary, rotary_backward and rotary_tables against float64 references and their definitions."""
import math

import numpy as np
import pytest

import fastattn
from cases import BF16, F16, F32, F64, random
from conftest import assert_close, on_devices
from fastattn import reference

# (x shape, rotary_dim, interleaved, positions kind, dtype)
CPU_CASES = {
    "full-half-f32": ((2, 4, 37, 64), 64, False, None, F32),
    "partial-interleaved-f16": ((1, 3, 19, 80), 32, True, "gaps", F16),
    "partial-half-per-batch-bf16": ((2, 2, 11, 128), 96, False, "per-batch", BF16),
    "full-interleaved-gaps-f64": ((1, 2, 9, 40), 40, True, "gaps", F64),
    "two-features-f32": ((1, 1, 5, 59), 2, False, "per-batch", F32),
}
CUDA_CASES = {
    "half-f32": ((2, 2, 3, 8), 6, False, "per-batch", F32),
    "interleaved-f16": ((1, 2, 4, 8), 8, True, "gaps", F16),
    "half-bf16": ((1, 1, 3, 16), 8, False, None, BF16),
    "interleaved-f64": ((1, 1, 2, 6), 4, True, "per-batch", F64),
}
MAX_POS = 64


def make(name, rng):
    shape, rotary_dim, interleaved, pos_kind, dtype = {**CPU_CASES, **CUDA_CASES}[name]
    b, _, s, _ = shape
    cos, sin = fastattn.rotary_tables(rotary_dim, MAX_POS, dtype=F64 if dtype == F64 else F32)
    positions = None
    if pos_kind == "gaps":  # increasing with jumps, as after evicted or skipped tokens
        positions = np.cumsum(rng.integers(1, 4, size=s)) - 1
    elif pos_kind == "per-batch":
        positions = rng.integers(0, MAX_POS, size=(b, s))
    return random(shape, dtype, rng), cos, sin, positions, interleaved, dtype


@pytest.mark.parametrize("device, name", on_devices(list(CPU_CASES), list(CUDA_CASES)), indirect=["device"])
def test_rotary_and_its_backward_match_the_reference(device, name, rng):
    x, cos, sin, positions, interleaved, dtype = make(name, rng)
    tables = device.put(cos), device.put(sin)
    out = device.get(fastattn.rotary(device.put(x), *tables, positions=positions, interleaved=interleaved))
    assert out.dtype == dtype
    assert_close(out, reference.rotary(x, cos, sin, positions=positions, interleaved=interleaved), dtype, "out")
    dy = random(x.shape, dtype, rng)
    dx = device.get(fastattn.rotary_backward(device.put(dy), *tables, positions=positions, interleaved=interleaved))
    ref = reference.rotary(dy, cos, sin, positions=positions, interleaved=interleaved, inverse=True)
    assert_close(dx, ref, dtype, "dx")


def test_backward_is_the_adjoint(rng):
    """<rotary(x), dy> = <x, rotary_backward(dy)>: the backward is the gradient of a linear map."""
    x, dy = rng.standard_normal((2, 3, 6, 16)), rng.standard_normal((2, 3, 6, 16))
    cos, sin = fastattn.rotary_tables(12, 32, dtype=F64)
    positions = rng.integers(0, 32, size=(2, 6))
    for interleaved in (False, True):
        y = fastattn.rotary(x, cos, sin, positions=positions, interleaved=interleaved)
        dx = fastattn.rotary_backward(dy, cos, sin, positions=positions, interleaved=interleaved)
        assert math.isclose(float((y * dy).sum()), float((x * dx).sum()), rel_tol=1e-12)


def test_gradient_matches_finite_differences(rng):
    x = rng.standard_normal((1, 1, 3, 8))
    dy = rng.standard_normal(x.shape)
    cos, sin = fastattn.rotary_tables(8, 8, dtype=F64)
    positions = np.array([5, 0, 2])
    dx = fastattn.rotary_backward(dy, cos, sin, positions=positions)
    step, numeric = 1e-6, np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[idx] += step
        down[idx] -= step
        loss = [float((fastattn.rotary(z, cos, sin, positions=positions) * dy).sum()) for z in (up, down)]
        numeric[idx] = (loss[0] - loss[1]) / (2 * step)
    np.testing.assert_allclose(dx, numeric, rtol=1e-7, atol=1e-9)


def test_features_past_rotary_dim_are_copied_bit_for_bit(rng):
    x = random((1, 2, 5, 24), BF16, rng)
    cos, sin = fastattn.rotary_tables(8, 16)
    out = fastattn.rotary(x, cos, sin)
    assert out[..., 8:].tobytes() == np.ascontiguousarray(x[..., 8:]).tobytes()
    assert (out[:, :, 0] == x[:, :, 0]).all()  # position 0 turns by nothing


def test_tables_follow_the_definition():
    cos, sin = fastattn.rotary_tables(16, 50, base=500.0, dtype=F64)
    inv = 500.0 ** (-np.arange(0, 16, 2) / 16)
    angles = np.arange(50)[:, None] * inv
    np.testing.assert_allclose(cos, np.cos(angles), rtol=0, atol=1e-15)
    np.testing.assert_allclose(sin, np.sin(angles), rtol=0, atol=1e-15)
    assert fastattn.rotary_tables(16, 50)[0].dtype == F32


def test_linear_and_ntk_scaling():
    plain = fastattn.rotary_tables(32, 64, dtype=F64)
    linear = fastattn.rotary_tables(32, 256, scaling={"type": "linear", "factor": 4.0}, dtype=F64)
    np.testing.assert_allclose(linear[0][::4], plain[0], atol=1e-12)  # position 4p reads like p
    ntk = fastattn.rotary_tables(32, 64, scaling={"type": "ntk", "factor": 4.0}, dtype=F64)
    bigger_base = fastattn.rotary_tables(32, 64, base=10000.0 * 4.0 ** (32 / 30), dtype=F64)
    np.testing.assert_allclose(ntk[0], bigger_base[0], atol=1e-12)


def _yarn_inv_freq(dim, base, factor, original, beta_fast=32.0, beta_slow=1.0):
    """Hugging Face's _compute_yarn_parameters, transcribed."""
    pos_freqs = base ** (np.arange(0, dim, 2) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)

    def find_correction_dim(num_rotations):
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(find_correction_dim(beta_fast)), 0)
    high = min(math.ceil(find_correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
    extrapolation_factor = 1 - ramp
    return interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor


def test_yarn_scaling_matches_the_transformers_formula():
    cos, sin = fastattn.rotary_tables(64, 100, scaling={"type": "yarn", "factor": 4.0, "original_max_position": 2048},
                                      dtype=F64)
    angles = np.arange(100)[:, None] * _yarn_inv_freq(64, 10000.0, 4.0, 2048)
    mscale = 0.1 * math.log(4.0) + 1.0
    np.testing.assert_allclose(cos, np.cos(angles) * mscale, atol=1e-12)
    np.testing.assert_allclose(sin, np.sin(angles) * mscale, atol=1e-12)


def test_llama3_scaling_keeps_high_and_divides_low_frequencies():
    spec = {"type": "llama3", "factor": 8.0, "original_max_position": 8192}
    scaled = fastattn.rotary_tables(128, 2, base=500000.0, scaling=spec, dtype=F64)[1][1]  # sin(inv_freq)
    plain = fastattn.rotary_tables(128, 2, base=500000.0, dtype=F64)[1][1]
    inv = 500000.0 ** (-np.arange(0, 128, 2) / 128)
    wavelen = 2 * math.pi / inv
    high, low = wavelen < 8192 / 4.0, wavelen > 8192 / 1.0
    np.testing.assert_allclose(scaled[high], plain[high], atol=1e-15)
    np.testing.assert_allclose(scaled[low], np.sin(inv[low] / 8.0), atol=1e-15)


BAD = {
    "position-past-table": (dict(positions=np.array([0, 1, 64])), ValueError,
                            r"^positions: expected values in \[0, 64\).*got 64"),
    "negative-position": (dict(positions=np.array([0, -1, 2])), ValueError, r"^positions: .*got -1"),
    "float-positions": (dict(positions=np.array([0.0, 1.0, 2.0])), TypeError, r"^positions: expected an integer"),
    "positions-shape": (dict(positions=np.zeros((3, 3), np.int64)), ValueError,
                        r"^positions: expected shape \[S\] = \(3,\) or \[B, S\] = \(2, 3\)"),
    "rotary-dim-past-d": (dict(cos=np.ones((64, 5), F32), sin=np.zeros((64, 5), F32)), ValueError,
                          r"^cos: expected 1 <= rotary_dim / 2 <= D / 2 = 4"),
    "sin-shape": (dict(sin=np.zeros((64, 3), F32)), ValueError, r"^sin: expected the shape of cos \(64, 4\)"),
    "table-dtype": (dict(cos=np.ones((64, 4), F16)), TypeError, r"^cos: expected float32 or float64, got float16"),
    "x-int": (dict(x=np.zeros((2, 1, 3, 8), np.int32)), TypeError, r"^x: expected float32"),
    "x-3d": (dict(x=np.zeros((1, 3, 8), F32)), ValueError, r"^x: expected a 4-d array"),
    "short-table-default-positions": (dict(cos=np.ones((2, 4), F32), sin=np.zeros((2, 4), F32)), ValueError,
                                      r"^cos: expected at least S = 3 rows"),
}


@pytest.mark.parametrize("name", BAD)
def test_rotary_rejects_bad_inputs(name):
    args = dict(x=np.zeros((2, 1, 3, 8), F32), cos=np.ones((64, 4), F32), sin=np.zeros((64, 4), F32))
    change, error, pattern = BAD[name]
    args.update(change)
    x = args.pop("x")
    with pytest.raises(error, match=pattern):
        fastattn.rotary(x, **args)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(rotary_dim=7, max_pos=4), r"^rotary_dim: expected an even int >= 2, got 7"),
    (dict(rotary_dim=8, max_pos=-1), r"^max_pos: "),
    (dict(rotary_dim=8, max_pos=4, base=0.0), r"^base: "),
    (dict(rotary_dim=8, max_pos=4, scaling={"type": "dynamic"}), r"^scaling: expected None or a dict"),
    (dict(rotary_dim=8, max_pos=4, scaling={"type": "yarn", "factor": 2.0}), r"^scaling: expected 'original_max"),
])
def test_tables_reject_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        fastattn.rotary_tables(**kwargs)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)], indirect=True)
@pytest.mark.parametrize("interleaved", [False, True])
def test_fused_projection_rotates_q_and_k(device, interleaved, rng):
    """fused_qkv_projection(rotary=...) is the projection followed by rotary on q and k; its backward
    turns dq and dk back before the GEMMs."""
    hq, hkv, d = 4, 2, 8
    x = random((2, 5, 16), F32, rng)
    w = random(((hq + 2 * hkv) * d, 16), F32, rng)
    b = random(((hq + 2 * hkv) * d,), F32, rng)
    cos, sin = fastattn.rotary_tables(6, 32)
    positions = rng.integers(0, 32, size=(2, 5))
    heads = dict(num_heads=hq, num_kv_heads=hkv, head_dim=d)
    rot = dict(rotary=(device.put(cos), device.put(sin)), positions=positions, interleaved=interleaved)
    got = [device.get(t) for t in fastattn.fused_qkv_projection(*map(device.put, (x, w, b)), **heads, **rot)]
    plain = fastattn.fused_qkv_projection(x, w, b, **heads)
    for name, g, p, turned in zip("qkv", got, plain, (True, True, False)):
        want = reference.rotary(p, cos, sin, positions=positions, interleaved=interleaved) if turned else p
        assert_close(g, want, F32, name)
    grads = [random(t.shape, F32, rng) for t in got]
    fused = fastattn.fused_qkv_projection_backward(*map(device.put, (*grads, x, w)), has_bias=True, **rot)
    back = [fastattn.rotary_backward(g, cos, sin, positions=positions, interleaved=interleaved) for g in grads[:2]]
    expected = fastattn.fused_qkv_projection_backward(*back, grads[2], x, w, has_bias=True)
    for name, g, e in zip(("dx", "dweight", "dbias"), fused, expected):
        assert_close(device.get(g), e, F32, name)


def test_positions_need_rotary():
    x, w = np.zeros((1, 2, 8), F32), np.zeros((24, 8), F32)
    with pytest.raises(ValueError, match=r"^positions: expected rotary=\(cos, sin\)"):
        fastattn.fused_qkv_projection(x, w, num_heads=1, num_kv_heads=1, head_dim=8, positions=[0, 1])


def _layer_forward_reference(layer, params, query, key, value, causal):
    """The layer in float64 NumPy with the reference's rotary on q and k (queries at Sk - Sq + i)."""
    from test_layers import from_heads, to_heads

    p = {n: np.asarray(a, np.float64) for n, a in params.items()}
    kx = query if key is None else key
    vx = query if value is None else value
    sq, sk = query.shape[1], kx.shape[1]
    cos, sin = fastattn.rotary_tables(layer.rotary_dim, sk, layer.rope_base, dtype=F64)

    def linear(inp, name):
        return np.asarray(inp, np.float64) @ p[f"{name}.weight"].T + p.get(f"{name}.bias", 0.0)
    q = reference.rotary(to_heads(linear(query, "q_proj"), layer.num_heads), cos, sin,
                         positions=np.arange(sk - sq, sk))
    k = reference.rotary(to_heads(linear(kx, "k_proj"), layer.num_kv_heads), cos, sin)
    v = to_heads(linear(vx, "v_proj"), layer.num_kv_heads)
    return linear(from_heads(reference.attention(q, k, v, causal=causal)), "out_proj")


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_layer_with_rotary_matches_reference_and_finite_differences(cross, rng):
    layer = fastattn.MultiheadAttention(16, 4, 2, dtype=F64, seed=0, rotary_dim=4, rope_base=100.0)
    for name, p in layer.named_parameters():
        if name.endswith(".bias"):
            p[...] = rng.standard_normal(p.shape) * 0.1
    params = {n: p.copy() for n, p in layer.named_parameters()}
    query = rng.standard_normal((2, 5, 16))
    key, value = (rng.standard_normal((2, 7, 16)) for _ in range(2)) if cross else (None, None)
    y = layer.forward(query, key, value, causal=True)
    np.testing.assert_allclose(y, _layer_forward_reference(layer, params, query, key, value, True), atol=1e-12)
    dout = rng.standard_normal(y.shape)
    grads = layer.backward(dout)
    inputs = {"query": query, "key": key, "value": value} if cross else {"input": query}
    eps = 1e-6

    def loss(p, inp):
        args = (inp["query"], inp["key"], inp["value"]) if cross else (inp["input"], None, None)
        return float((_layer_forward_reference(layer, p, *args, True) * dout).sum())

    for name, g in grads.items():
        source = params if name in params else inputs
        for flat in (0, source[name].size // 2, source[name].size - 1):
            idx = np.unravel_index(flat, source[name].shape)
            plus = {n: a.copy() for n, a in source.items()}
            minus = {n: a.copy() for n, a in source.items()}
            plus[name][idx] += eps
            minus[name][idx] -= eps
            if source is params:
                numeric = (loss(plus, inputs) - loss(minus, inputs)) / (2 * eps)
            else:
                numeric = (loss(params, plus) - loss(params, minus)) / (2 * eps)
            assert abs(numeric - g[idx]) <= 1e-6 * max(1.0, abs(numeric)), (name, idx, numeric, g[idx])


def test_layer_rejects_bad_rotary_dim():
    with pytest.raises(ValueError, match=r"^rotary_dim: expected None or an even int in \[2, head_dim=4\]"):
        fastattn.MultiheadAttention(16, 4, rotary_dim=6)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=pytest.mark.cuda)], indirect=True)
def test_layer_with_rotary_on_cuda_matches_the_cpu(rng, device):
    """The CUDA layer (a rotary kernel after each projection GEMM) against the CPU layer (fused epilogue)."""
    cpu = fastattn.MultiheadAttention(8, 2, 1, seed=0, rotary_dim=4)
    gpu = fastattn.MultiheadAttention(8, 2, 1, seed=0, rotary_dim=4).to_device()
    x = random((1, 3, 8), F32, rng)
    y_cpu, y_gpu = cpu.forward(x, causal=True), device.get(gpu.forward(device.put(x), causal=True))
    assert_close(y_gpu, y_cpu, F32, "y")
    dout = random(y_cpu.shape, F32, rng)
    g_cpu, g_gpu = cpu.backward(dout), gpu.backward(device.put(dout))
    for name, g in g_cpu.items():
        assert_close(device.get(g_gpu[name]), g, F32, name)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)], indirect=True)
@pytest.mark.parametrize("cache_dtype", ["float32", "float8_e4m3fn"])
def test_write_kv_cache_rotates_the_keys(device, cache_dtype, rng):
    """write_kv_cache(rotary=...) stores what rotary-then-write on the same device stores, bit for bit
    (float32 keys), also in fp8."""
    import ml_dtypes

    dtype = np.dtype(getattr(ml_dtypes, cache_dtype, None) or cache_dtype)
    tokens, heads, dim = 5, 2, 8
    k, v = random((tokens, heads, dim), F32, rng), random((tokens, heads, dim), F32, rng)
    cos, sin = fastattn.rotary_tables(6, 40)
    positions = rng.integers(0, 40, size=tokens)
    slots = np.array([3, 0, 7, 9, 12])
    scale = 1.0 if dtype == F32 else 0.5
    caches = {}
    for fused in (True, False):
        kc, vc = (device.put(np.zeros((4, 4, heads, dim), dtype)) for _ in range(2))
        if fused:
            fastattn.write_kv_cache(device.put(k), device.put(v), kc, vc, device.put(slots), k_scale=scale,
                                    v_scale=scale,
                                    rotary=(device.put(cos), device.put(sin)), positions=positions)
        else:
            turned = fastattn.rotary(device.put(k.reshape(tokens, heads, 1, dim)), device.put(cos), device.put(sin),
                                     positions=positions[:, None])
            fastattn.write_kv_cache(turned.reshape(tokens, heads, dim), device.put(v), kc, vc,
                                    device.put(slots), k_scale=scale, v_scale=scale)
        caches[fused] = [device.get(c) for c in (kc, vc)]
    for fused, unfused in zip(caches[True], caches[False]):
        assert np.ascontiguousarray(fused).tobytes() == np.ascontiguousarray(unfused).tobytes()
