"""MultiheadAttention: forward and every gradient against a float64 NumPy layer, finite differences too."""
import numpy as np
import pytest

import fastattn
from cases import BF16, DTYPE_ID, F16, F32, F64, backward_reference, random
from conftest import CUDA, use_test_cuda_config, Device, assert_close, cuda_unavailable_reason, on_devices
from fastattn import reference


def f64(x):
    return np.asarray(x).astype(np.float64)


def to_heads(y, heads):
    b, s, n = y.shape
    return y.reshape(b, s, heads, n // heads).transpose(0, 2, 1, 3)


def from_heads(y):
    b, h, s, d = y.shape
    return y.transpose(0, 2, 1, 3).reshape(b, s, h * d)


def reference_layer(params, layer, query, key=None, value=None, causal=False, dout=None):
    """Float64 forward (and, with dout, gradients) of the layer with the given parameters."""
    p = {n: f64(a) for n, a in params.items()}
    hq, hkv = layer.num_heads, layer.num_kv_heads
    x = f64(query)
    kx = x if key is None else f64(key)
    vx = x if value is None else f64(value)

    def linear(inp, name):
        return inp @ p[f"{name}.weight"].T + p.get(f"{name}.bias", 0.0)
    q, k, v = to_heads(linear(x, "q_proj"), hq), to_heads(linear(kx, "k_proj"), hkv), to_heads(linear(vx, "v_proj"), hkv)
    attn = from_heads(reference.attention(q, k, v, causal=causal))
    y = linear(attn, "out_proj")
    if dout is None:
        return y
    dy = f64(dout)
    grads = {"out_proj.weight": np.einsum("bsh,bsp->hp", dy, attn)}
    if layer.bias:
        grads["out_proj.bias"] = dy.sum(axis=(0, 1))
    dattn = to_heads(dy @ p["out_proj.weight"], hq)
    (dq, dk, dv), attn_mags = backward_reference(dattn, q, k, v, causal=causal)
    dx = {}
    mags = {n: np.abs(g).max() for n, g in grads.items()}
    for name, inp, g, mag in zip(("q_proj", "k_proj", "v_proj"), (x, kx, vx), (dq, dk, dv), attn_mags):
        g = from_heads(g)
        # the attention gradients cancel (one visible key, a key bias that shifts a whole row):
        # scale errors by the sums of absolute terms, as the attention tests do
        mag = max(mag, np.abs(g).max())
        grads[f"{name}.weight"] = np.einsum("bsn,bsh->nh", g, inp)
        mags[f"{name}.weight"] = mag * np.abs(inp).sum(axis=(0, 1)).max()
        if layer.bias:
            grads[f"{name}.bias"] = g.sum(axis=(0, 1))
            mags[f"{name}.bias"] = mag * g.shape[0] * g.shape[1]
        dx[name] = g @ p[f"{name}.weight"]
        mags[name] = mag * np.abs(p[f"{name}.weight"]).sum(axis=0).max()
    if key is None:
        grads["input"] = dx["q_proj"] + dx["k_proj"] + dx["v_proj"]
        mags["input"] = mags["q_proj"] + mags["k_proj"] + mags["v_proj"]
    else:
        grads.update(query=dx["q_proj"], key=dx["k_proj"], value=dx["v_proj"])
        mags.update(query=mags["q_proj"], key=mags["k_proj"], value=mags["v_proj"])
    return y, grads, mags


# (embed_dim, heads, kv heads, bias, dtype, batch, Sq, Sk or None for self-attention, causal)
CASES = [
    (32, 4, 4, True, F32, 2, 7, None, False),
    (32, 8, 2, False, F64, 1, 1, None, True),
    (48, 6, 1, True, F16, 2, 17, None, True),
    (32, 8, 2, True, BF16, 1, 5, None, False),
    (32, 4, 4, False, F32, 2, 1, 9, False),
    (48, 6, 1, True, F64, 1, 13, 5, True),
    (32, 8, 2, True, F32, 2, 113, None, True),
    (64, 8, 2, True, F32, 1, 6, 11, True),
]


def case_id(case):
    e, h, kv, bias, dtype, b, sq, sk, causal = case
    kind = "self" if sk is None else f"cross-sk{sk}"
    return (f"e{e}-{h}-{kv}-{'bias' if bias else 'nobias'}-{DTYPE_ID[np.dtype(dtype)]}-b{b}-sq{sq}-{kind}"
            f"{'-causal' if causal else ''}")


def make(case, rng, device):
    e, h, kv, bias, dtype, b, sq, sk, causal = case
    layer = fastattn.MultiheadAttention(e, h, kv, bias=bias, dtype=dtype, seed=3)
    for name, p in layer.named_parameters():
        if name.endswith(".bias"):  # zero at init: give them values so that their gradients matter
            p[...] = random(p.shape, dtype, rng) * 0.1
    params = {n: p.copy() for n, p in layer.named_parameters()}
    query = random((b, sq, e), dtype, rng)
    kv_in = (None, None) if sk is None else (random((b, sk, e), dtype, rng), random((b, sk, e), dtype, rng))
    if device.name == "cuda":
        layer.to_device()
    return layer, params, query, kv_in, causal


# The simulator runs each GPU thread as a Python thread: tiny layers only.
CUDA_CASES = [
    (8, 2, 1, True, F32, 1, 3, None, True),
    (8, 2, 2, False, BF16, 1, 1, None, False),
    (12, 3, 1, True, F64, 1, 2, 3, True),
]


class _Case(tuple):
    @property
    def id(self):
        return case_id(self)


@pytest.mark.parametrize("device, case", on_devices([_Case(c) for c in CASES], [_Case(c) for c in CUDA_CASES]),
                         indirect=["device"])
def test_forward_and_gradients_match_reference(device, case, rng):
    layer, params, query, (key, value), causal = make(case, rng, device)
    dtype = case[4]
    y = layer.forward(device.put(query), device.put(key), device.put(value), causal=causal)
    dout = random(tuple(y.shape), dtype, rng)
    grads = layer.backward(device.put(dout))
    ref_y, ref_grads, mags = reference_layer(params, layer, query, key, value, causal, dout)
    y = device.get(y)
    assert y.dtype == dtype
    # the dtype's tolerance (a few epsilons) covers the roundings of q, k, v and the attention output
    # between the steps; gradients are scaled by their sums of absolute terms (reference_layer)
    assert_close(y, ref_y, dtype, "y")
    expected_names = {n for n in params} | ({"input"} if key is None else {"query", "key", "value"})
    assert set(grads) == expected_names
    for name, ref in ref_grads.items():
        got = device.get(grads[name])
        assert got.dtype == dtype and got.shape == ref.shape, name
        assert_close(got, ref, dtype, name, magnitude=mags[name])


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_gradients_agree_with_finite_differences(cross, rng):
    """A second opinion on a few entries of every gradient, in float64."""
    case = (16, 4, 2, True, F64, 2, 5, 6 if cross else None, True)
    layer, params, query, (key, value), causal = make(case, rng, Device("cpu"))
    y = layer.forward(query, key, value, causal=causal)
    dout = random(y.shape, F64, rng)
    grads = layer.backward(dout)
    inputs = {"query": query, "key": key, "value": value} if cross else {"input": query}
    eps = 1e-6

    def loss(p, inp):
        args = (inp["query"], inp["key"], inp["value"]) if cross else (inp["input"],)
        return float((reference_layer(p, layer, *args, causal=causal) * dout).sum())

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


def test_parameters_names_shapes_and_init():
    layer = fastattn.MultiheadAttention(64, 8, 2, seed=0)
    names = [n for n, _ in layer.named_parameters()]
    assert names == ["q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "v_proj.weight",
                     "v_proj.bias", "out_proj.weight", "out_proj.bias"]
    shapes = {n: p.shape for n, p in layer.named_parameters()}
    assert shapes["q_proj.weight"] == (64, 64) and shapes["k_proj.weight"] == (16, 64)
    assert shapes["v_proj.bias"] == (16,) and shapes["out_proj.weight"] == (64, 64)
    assert layer.num_parameters() == 64 * 64 * 2 + 16 * 64 * 2 + 64 * 2 + 16 * 2
    assert len(layer.parameters()) == 8
    for name, p in layer.named_parameters():
        if name.endswith("bias"):
            assert not p.any()
        else:
            limit = np.sqrt(6.0 / sum(p.shape))
            assert np.abs(p).max() <= limit and np.abs(p).max() > 0.8 * limit  # Xavier-uniform
    no_bias = fastattn.MultiheadAttention(64, 8, bias=False)
    assert [n for n, _ in no_bias.named_parameters()] == ["q_proj.weight", "k_proj.weight", "v_proj.weight",
                                                         "out_proj.weight"]
    same = fastattn.MultiheadAttention(64, 8, 2, seed=0)
    for (_, a), (_, b) in zip(layer.named_parameters(), same.named_parameters()):
        assert a.tobytes() == b.tobytes()
    assert "num_kv_heads=2" in repr(layer)


def test_sgd_step_through_named_parameters_changes_the_output(rng):
    layer = fastattn.MultiheadAttention(32, 4, 2, seed=1)
    x = random((2, 6, 32), F32, rng)
    y = layer.forward(x, causal=True)
    grads = layer.backward(np.ones_like(y))
    before = float((layer.forward(x, causal=True)).sum())
    for name, p in layer.named_parameters():
        p -= 0.01 * grads[name]  # in place: the q/k/v views reach the fused weight
    after = float(layer.forward(x, causal=True).sum())
    assert after < before  # a descent step on sum(y)


def test_backward_without_forward_raises():
    layer = fastattn.MultiheadAttention(16, 2)
    with pytest.raises(RuntimeError, match="call forward"):
        layer.backward(np.zeros((1, 2, 16), np.float32))


LAYER_ERRORS = {
    "embed-not-divisible": (dict(embed_dim=30, num_heads=4), ValueError, r"^num_heads: expected a divisor of embed_dim=30"),
    "kv-not-divisor": (dict(embed_dim=32, num_heads=4, num_kv_heads=3), ValueError, r"^num_kv_heads: "),
    "zero-heads": (dict(embed_dim=32, num_heads=0), ValueError, r"^num_heads: "),
    "int-dtype": (dict(embed_dim=32, num_heads=4, dtype=np.int32), TypeError, r"^dtype: "),
    "float-embed": (dict(embed_dim=32.0, num_heads=4), TypeError, r"^embed_dim: "),
}


@pytest.mark.parametrize("name", LAYER_ERRORS)
def test_constructor_rejects(name):
    kwargs, error, pattern = LAYER_ERRORS[name]
    with pytest.raises(error, match=pattern):
        fastattn.MultiheadAttention(**kwargs)


def test_forward_rejects_bad_inputs():
    layer = fastattn.MultiheadAttention(16, 2)
    x = np.zeros((2, 3, 16), np.float32)
    with pytest.raises(ValueError, match=r"^query: expected a 3-d array \[B, S, E\]"):
        layer.forward(x[0])
    with pytest.raises(ValueError, match=r"^query: .*E=16"):
        layer.forward(np.zeros((2, 3, 8), np.float32))
    with pytest.raises(TypeError, match=r"^query: expected dtype float32"):
        layer.forward(x.astype(np.float64))
    with pytest.raises(ValueError, match=r"^value: expected both key and value"):
        layer.forward(x, x)
    with pytest.raises(ValueError, match=r"^key: .*B=2"):
        layer.forward(x, np.zeros((3, 4, 16), np.float32), np.zeros((3, 4, 16), np.float32))
    with pytest.raises(ValueError, match=r"^value: expected the shape of key"):
        layer.forward(x, np.zeros((2, 4, 16), np.float32), np.zeros((2, 5, 16), np.float32))
    layer.forward(x)
    with pytest.raises(ValueError, match=r"^dout: "):
        layer.backward(np.zeros((2, 4, 16), np.float32))


@CUDA
def test_layer_and_inputs_on_different_devices_are_rejected(monkeypatch):
    reason = cuda_unavailable_reason()
    if reason:
        pytest.skip(reason)
    use_test_cuda_config(monkeypatch)
    device = Device("cuda")
    layer = fastattn.MultiheadAttention(8, 2, seed=0)
    with pytest.raises(TypeError, match=r"^query: expected an array on the layer's device \(cpu\)"):
        layer.forward(device.put(np.zeros((1, 2, 8), np.float32)))
    layer.to_device()
    assert layer.device == "cuda"
    y = layer.forward(device.put(np.ones((1, 2, 8), np.float32)))
    layer.to_host()
    np.testing.assert_allclose(layer.forward(np.ones((1, 2, 8), np.float32)), device.get(y), atol=1e-6)


def test_gqa_config_builds_the_matching_layer():
    config = fastattn.GQAConfig(64, 8, 2)
    layer = config.attention_layer(seed=0)
    assert (layer.embed_dim, layer.num_heads, layer.num_kv_heads) == (64, 8, 2)
    assert config.attention_layer(seed=0, bias=False).num_parameters() == config.num_parameters()
