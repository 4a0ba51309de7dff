"""Dropout: the Philox generator against its published answers, keep rates, the float64 reference, finite
differences, and the same mask on the CPU and under the CUDA simulator."""
import math

import numpy as np
import pytest

import fastattn
from cases import BF16, F16, F32, F64, random
from conftest import assert_close, on_devices
from fastattn import _philox, reference

# Random123's known-answer vectors of philox4x32_10 (kat_vectors): counter, key, result
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, want", KAT)
def test_philox_matches_the_known_answers(counter, key, want):
    from numba import njit

    args = [np.uint64(x) for x in (*counter, *key)]
    assert tuple(int(w) for w in njit(lambda *a: _philox.philox(*a))(*args)) == want   # compiled
    assert tuple(int(w) for w in _philox.build(decorate=lambda f: f).philox(*args)) == want  # plain Python


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_is_one_minus_p(p):
    """Over 1.6e5 keys the kept fraction lies within 5 standard deviations of 1 - p."""
    keep = reference.dropout_scale((2, 4, 100, 200), p, seed=12345) > 0
    n = keep.size
    assert abs(keep.mean() - (1 - p)) <= 5 * math.sqrt(p * (1 - p) / n)


# (q shape, kv heads, Sk, options, dtype)
CPU_CASES = {
    "gqa-113-203-d40-causal-f32": ((2, 8, 113, 40), 2, 203, {"causal": True}, F32),
    "mqa-d59-window-f16": ((1, 4, 31, 59), 1, 70, {"window": (8, 2)}, F16),
    "mha-d96-softcap-alibi-bf16": ((2, 2, 17, 96), 2, 33, {"softcap": 2.0}, BF16),
    "gqa-d64-bias-f64": ((1, 4, 9, 64), 2, 12, {"bias": "rows-keys"}, F64),
}
CUDA_CASES = {
    "gqa-d8-causal-f32": ((1, 4, 5, 8), 2, 7, {"causal": True}, F32),
    "mha-d8-softcap-f16": ((2, 2, 4, 8), 2, 6, {"softcap": 2.0}, F16),
    "mqa-d16-bias-bf16": ((1, 2, 3, 16), 1, 5, {"bias": "rows-keys"}, BF16),
}


def make(name, rng):
    shape, hkv, sk, options, dtype = {**CPU_CASES, **CUDA_CASES}[name]
    b, _, sq, d = shape
    q, k, v = random(shape, dtype, rng), random((b, hkv, sk, d), dtype, rng), random((b, hkv, sk, d), dtype, rng)
    options = dict(options)
    if options.get("bias") == "rows-keys":
        options["bias"] = random((sq, sk), F32, rng)
    return q, k, v, options, dtype


@pytest.mark.parametrize("device, name", on_devices(list(CPU_CASES), list(CUDA_CASES)), indirect=["device"])
def test_dropout_matches_the_reference(device, name, rng):
    q, k, v, options, dtype = make(name, rng)
    dev = {n: device.put(x) if isinstance(x, np.ndarray) else x for n, x in options.items()}
    out, lse, seed = fastattn.attention(device.put(q), device.put(k), device.put(v), dropout_p=0.3, seed=2024,
                                        return_lse=True, return_seed=True, **dev)
    assert seed == 2024
    ref_out, ref_lse = reference.attention(q, k, v, dropout_p=0.3, seed=2024, return_lse=True, **options)
    # rounding errors scale with the sum of absolute terms, sum_j p_ij m_ij |v_j| (m = keep / (1 - p))
    out_mag = np.abs(reference.attention(q, k, np.abs(v), dropout_p=0.3, seed=2024, **options)).max()
    assert_close(device.get(out), ref_out, dtype, "out", magnitude=out_mag)
    assert_close(device.get(lse), ref_lse, dtype, "lse")
    dout = random(q.shape, dtype, rng)
    grads = fastattn.attention_backward(*map(device.put, (dout, q, k, v)), out, lse, dropout_p=0.3, seed=seed,
                                        **dev)
    expected = reference.attention_backward(dout, q, k, v, dropout_p=0.3, seed=seed, **options)
    magnitudes = reference.attention_backward(np.abs(dout), np.abs(q), np.abs(k), np.abs(v), dropout_p=0.3,
                                              seed=seed, **{**options, "softcap": 0.0})
    for gname, got, ref, mag in zip(("dq", "dk", "dv"), grads, expected, magnitudes):
        assert_close(device.get(got), ref, dtype, gname, magnitude=np.abs(mag).max())


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=pytest.mark.cuda)], indirect=True)
def test_cpu_and_cuda_drop_the_same_keys(device, rng):
    """With v = identity rows, out shows which keys survived: the CPU's and the simulator's masks agree."""
    sk = 8
    q = random((2, 2, 5, 8), F32, rng)
    k = random((2, 1, sk, 8), F32, rng)
    v = np.tile(np.eye(sk, 8, dtype=np.float32), (2, 1, 1, 1))
    cpu = fastattn.attention(q, k, v, dropout_p=0.5, seed=7)
    gpu = device.get(fastattn.attention(device.put(q), device.put(k), device.put(v), dropout_p=0.5, seed=7))
    assert ((cpu == 0) == (gpu == 0)).all()
    assert_close(gpu, cpu, F32, "out")


def test_p_zero_is_no_dropout_and_p_one_is_rejected(rng):
    q, k, v = (random((1, 2, 4, 8), F32, rng) for _ in range(3))
    assert np.array_equal(fastattn.attention(q, k, v, dropout_p=0.0, seed=1), fastattn.attention(q, k, v))
    assert fastattn.attention(q, k, v, return_seed=True)[1] is None
    for bad in (1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"^dropout_p: expected a float in \[0, 1\)"):
            fastattn.attention(q, k, v, dropout_p=bad)
    with pytest.raises(TypeError, match=r"^dropout_p: "):
        fastattn.attention(q, k, v, dropout_p="0.1")
    with pytest.raises(ValueError, match=r"^seed: expected None or an int in \[0, 2\*\*64\)"):
        fastattn.attention(q, k, v, dropout_p=0.1, seed=-1)


def test_seed_none_draws_a_seed_that_replays(rng):
    q, k, v = (random((1, 2, 6, 8), F32, rng) for _ in range(3))
    out, lse, seed = fastattn.attention(q, k, v, dropout_p=0.2, return_lse=True, return_seed=True)
    assert isinstance(seed, int) and np.array_equal(out, fastattn.attention(q, k, v, dropout_p=0.2, seed=seed))
    with pytest.raises(ValueError, match=r"^seed: expected the seed of the forward"):
        fastattn.attention_backward(np.ones_like(out), q, k, v, out, lse, dropout_p=0.2)


def test_dropout_gradient_matches_finite_differences(rng):
    q, k, v = (rng.standard_normal((1, 2, 4, 8)) for _ in range(3))
    dout = rng.standard_normal(q.shape)
    out, lse = fastattn.attention(q, k, v, causal=True, dropout_p=0.25, seed=5, return_lse=True)
    grads = fastattn.attention_backward(dout, q, k, v, out, lse, causal=True, dropout_p=0.25, seed=5)
    step = 1e-6
    for x, g in zip((q, k, v), grads):
        for flat in range(0, x.size, 7):
            idx = np.unravel_index(flat, x.shape)
            up, down = x.copy(), x.copy()
            up[idx] += step
            down[idx] -= step
            args = [(up if y is x else y) for y in (q, k, v)], [(down if y is x else y) for y in (q, k, v)]
            loss = [float((fastattn.attention(*a, causal=True, dropout_p=0.25, seed=5) * dout).sum()) for a in args]
            assert abs((loss[0] - loss[1]) / (2 * step) - g[idx]) <= 1e-7 * max(1.0, abs(g[idx]))


def test_layer_drops_only_in_training_and_its_gradients_replay_the_mask(rng, monkeypatch):
    layer = fastattn.GQAConfig(16, 4, 2, dropout=0.3).attention_layer(seed=0, dtype=np.float64)
    plain = fastattn.MultiheadAttention(16, 4, 2, seed=0, dtype=np.float64)
    x = rng.standard_normal((2, 5, 16))
    assert not layer.training and np.array_equal(layer.forward(x, causal=True), plain.forward(x, causal=True))
    assert layer.train() is layer and layer.training
    # every training forward draws its seed from NumPy's default generator: pin it for finite differences
    monkeypatch.setattr(np.random, "default_rng", lambda *a: np.random.Generator(np.random.PCG64(11)))
    y = layer.forward(x, causal=True)
    assert not np.array_equal(y, plain.forward(x, causal=True))
    dout = rng.standard_normal(y.shape)
    grads = layer.backward(dout)
    step = 1e-6
    for name in ("input", "q_proj.weight", "out_proj.bias"):
        target = x if name == "input" else dict(layer.named_parameters())[name]
        for flat in (0, target.size // 2, target.size - 1):
            idx = np.unravel_index(flat, target.shape)
            saved = target[idx]
            target[idx] = saved + step
            up = float((layer.forward(x, causal=True) * dout).sum())
            target[idx] = saved - step
            down = float((layer.forward(x, causal=True) * dout).sum())
            target[idx] = saved
            assert abs((up - down) / (2 * step) - grads[name][idx]) <= 1e-6 * max(1.0, abs(grads[name][idx])), name
    assert layer.eval() is layer and not layer.training


def test_layer_rejects_bad_dropout():
    with pytest.raises(ValueError, match=r"^dropout: expected a float in \[0, 1\)"):
        fastattn.MultiheadAttention(16, 4, dropout=1.0)
