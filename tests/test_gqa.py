"""repeat_kv / repeat_kv_backward against plain NumPy, and GQAConfig's arithmetic.

The repeat is a copy, so it must match ``np.repeat`` bit for bit.  The backward
must match the float64 reshape-sum within the dtype's tolerance, and bit for
bit the sum that the contract describes: accumulated in float32 (float64 for
float64) over the group in order, rounded once into the input dtype.
"""
import dataclasses
import doctest

import ml_dtypes
import numpy as np
import pytest

import fastattn
import fastattn.gqa
from fastattn import GQAConfig
from conftest import BF16, assert_close

DTYPES = {"f32": np.dtype(np.float32), "f64": np.dtype(np.float64), "f16": np.dtype(np.float16),
          "bf16": BF16}
GROUPS = (1, 2, 4)
SEQ_LENS = (1, 17, 113)
HEAD_DIMS = (32, 64, 80, 128)
LAYOUTS = {"4d": (2,), "3d": ()}  # the leading batch dims of [B, H, S, D] and [H, S, D]
HKV = 2


def inputs(rng, layout, heads, seq, dim, dtype):
    return rng.standard_normal(LAYOUTS[layout] + (heads, seq, dim)).astype(dtype)


def bits(x):
    """The raw bits of an array, so that equal means bit-identical (ml_dtypes included)."""
    x = np.ascontiguousarray(x)
    return x.view(f"u{x.dtype.itemsize}")


def reference_repeat(kv, group_size):
    return np.repeat(kv, group_size, axis=-3)


def reference_backward(dkv, group_size):
    """The float64 reshape-sum of each group of heads."""
    x = np.asarray(dkv, dtype=np.float64)
    heads = x.shape[-3]
    return x.reshape(x.shape[:-3] + (heads // group_size, group_size) + x.shape[-2:]).sum(axis=-3)


def rounded_once_backward(dkv, group_size):
    """The contract's exact result: an in-order sum in float32 (float64), rounded once."""
    acc = np.float64 if dkv.dtype == np.float64 else np.float32
    x = np.asarray(dkv).astype(acc)
    heads = x.shape[-3]
    x = x.reshape(x.shape[:-3] + (heads // group_size, group_size) + x.shape[-2:])
    total = np.zeros(x.shape[:-3] + x.shape[-2:], acc)
    for g in range(group_size):
        total += x[..., g, :, :]
    return total.astype(dkv.dtype)


def grid():
    return [pytest.param(layout, dtype, g, s, d, id=f"{layout}-{name}-g{g}-s{s}-d{d}")
            for layout in LAYOUTS for name, dtype in DTYPES.items() for g in GROUPS
            for s in SEQ_LENS for d in HEAD_DIMS]


# --- repeat_kv and its backward against NumPy, on the CPU ------------------------------

@pytest.mark.parametrize("layout, dtype, group_size, seq, dim", grid())
def test_repeat_kv_matches_numpy(layout, dtype, group_size, seq, dim, rng):
    kv = inputs(rng, layout, HKV, seq, dim, dtype)
    out = fastattn.repeat_kv(kv, group_size)
    ref = reference_repeat(kv, group_size)
    assert isinstance(out, np.ndarray) and out.dtype == dtype and out.shape == ref.shape
    np.testing.assert_array_equal(bits(out), bits(ref))


@pytest.mark.parametrize("layout, dtype, group_size, seq, dim", grid())
def test_repeat_kv_backward_matches_numpy(layout, dtype, group_size, seq, dim, rng):
    dkv = inputs(rng, layout, HKV * group_size, seq, dim, dtype)
    out = fastattn.repeat_kv_backward(dkv, group_size)
    ref = reference_backward(dkv, group_size)
    assert isinstance(out, np.ndarray) and out.dtype == dtype and out.shape == ref.shape
    assert_close(out, ref, dtype, "dkv", magnitude=reference_backward(np.abs(dkv), group_size).max())
    np.testing.assert_array_equal(bits(out), bits(rounded_once_backward(dkv, group_size)))


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_repeat_kv_copies_special_values_bit_for_bit(dtype):
    kv = np.array([np.inf, -np.inf, np.nan, -0.0, 0.0, 1e-40, -1.5, 65504.0], dtype=np.float64)
    kv = kv.astype(dtype).reshape(1, 2, 1, 4)
    np.testing.assert_array_equal(bits(fastattn.repeat_kv(kv, 3)), bits(reference_repeat(kv, 3)))


def test_repeat_kv_backward_sums_in_float32_before_rounding():
    # 2048 + 1 + 1 in float16 step by step is 2048 (each +1 is a tie, rounded to even);
    # in float32 it is 2050, which float16 holds exactly.
    dkv = np.array([2048, 1, 1], np.float16).reshape(3, 1, 1)
    assert fastattn.repeat_kv_backward(dkv, 3).item() == 2050


@pytest.mark.parametrize("layout", LAYOUTS)
def test_strided_inputs(layout, rng):
    wide = inputs(rng, layout, 2 * HKV * 2, 9, 12, np.float32)
    kv = wide[..., ::2, :, ::3]  # every other head, every third column
    assert not kv.flags.c_contiguous
    np.testing.assert_array_equal(fastattn.repeat_kv(kv, 3), reference_repeat(kv, 3))
    np.testing.assert_array_equal(fastattn.repeat_kv_backward(kv, 2), rounded_once_backward(kv, 2))


def test_empty_arrays():
    kv = np.zeros((2, 3, 0, 8), np.float32)
    assert fastattn.repeat_kv(kv, 2).shape == (2, 6, 0, 8)
    assert fastattn.repeat_kv_backward(kv, 3).shape == (2, 1, 0, 8)
    assert fastattn.repeat_kv(np.zeros((0, 5, 8), np.float16), 4).shape == (0, 5, 8)


def test_numpy_integer_group_size_and_nested_lists():
    kv = [[[1.0, 2.0]], [[3.0, 4.0]]]  # [Hkv=2, S=1, D=2]
    out = fastattn.repeat_kv(kv, np.int64(2))
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out[:, 0], [[1, 2], [1, 2], [3, 4], [3, 4]])


def test_gqa_attention_equals_mha_attention_on_repeated_heads(rng):
    """Why the kernels never need repeat_kv: reading head h // g is the same as repeating."""
    q = rng.standard_normal((1, 8, 5, 16), dtype=np.float32)
    k, v = (rng.standard_normal((1, 2, 7, 16), dtype=np.float32) for _ in range(2))
    out, lse = fastattn.attention(q, k, v, causal=True, return_lse=True)
    k4, v4 = fastattn.repeat_kv(k, 4), fastattn.repeat_kv(v, 4)
    out4, lse4 = fastattn.attention(q, k4, v4, causal=True, return_lse=True)
    assert_close(out, out4, np.float32, "out")
    dout = rng.standard_normal(out.shape, dtype=np.float32)
    _, dk, dv = fastattn.attention_backward(dout, q, k, v, out, lse, causal=True)
    _, dk4, dv4 = fastattn.attention_backward(dout, q, k4, v4, out4, lse4, causal=True)
    assert_close(dk, fastattn.repeat_kv_backward(dk4, 4).astype(np.float64), np.float32, "dk")
    assert_close(dv, fastattn.repeat_kv_backward(dv4, 4).astype(np.float64), np.float32, "dv")


# --- on every device (tiny shapes: the CUDA simulator runs each thread in Python) -------

SMALL = [pytest.param(layout, dtype, g, id=f"{layout}-{name}-g{g}")
         for layout in LAYOUTS for name, dtype in DTYPES.items() for g in (1, 3)]


@pytest.mark.parametrize("layout, dtype, group_size", SMALL)
def test_repeat_kv_on_device(device, layout, dtype, group_size, rng):
    kv = inputs(rng, layout, HKV, 3, 5, dtype)
    out = device.get(fastattn.repeat_kv(device.put(kv), group_size))
    assert out.dtype == dtype
    np.testing.assert_array_equal(bits(out), bits(reference_repeat(kv, group_size)))


@pytest.mark.parametrize("layout, dtype, group_size", SMALL)
def test_repeat_kv_backward_on_device(device, layout, dtype, group_size, rng):
    dkv = inputs(rng, layout, HKV * group_size, 3, 5, dtype)
    out = device.get(fastattn.repeat_kv_backward(device.put(dkv), group_size))
    assert out.dtype == dtype
    assert_close(out, reference_backward(dkv, group_size), dtype, "dkv",
                 magnitude=reference_backward(np.abs(dkv), group_size).max())
    np.testing.assert_array_equal(bits(out), bits(rounded_once_backward(dkv, group_size)))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_strided_inputs_on_device(device, layout, rng):
    wide = inputs(rng, layout, 2 * HKV * 2, 3, 6, np.float32)
    every_other = (slice(None),) * (wide.ndim - 3) + (slice(None, None, 2), slice(None), slice(None, None, 2))
    kv_host = wide[every_other]  # no Ellipsis: numba's device arrays take none
    kv = device.put(wide)[every_other]
    np.testing.assert_array_equal(device.get(fastattn.repeat_kv(kv, 2)), reference_repeat(kv_host, 2))
    np.testing.assert_array_equal(device.get(fastattn.repeat_kv_backward(kv, 2)),
                                  rounded_once_backward(kv_host, 2))


@pytest.mark.parametrize("function", [fastattn.repeat_kv, fastattn.repeat_kv_backward],
                         ids=["repeat_kv", "repeat_kv_backward"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_group_size_one_returns_a_copy(device, function, layout, rng):
    host_in = inputs(rng, layout, HKV, 3, 4, np.float32)
    x = device.put(host_in)
    out = function(x, 1)
    assert out is not x
    np.testing.assert_array_equal(device.get(out), host_in)
    if device.name == "cpu":
        assert not np.shares_memory(out, x)
        out[...] = 0
    else:
        out.copy_to_device(np.zeros(out.shape, np.float32))
    np.testing.assert_array_equal(device.get(x), host_in)


@pytest.mark.parametrize("function", [fastattn.repeat_kv, fastattn.repeat_kv_backward],
                         ids=["repeat_kv", "repeat_kv_backward"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_inputs_are_not_modified(device, function, dtype, rng):
    host_in = inputs(rng, "4d", 4, 3, 4, dtype)
    before = bits(host_in).copy()
    x = device.put(host_in)
    function(x, 2)
    np.testing.assert_array_equal(bits(device.get(x)), before)
    np.testing.assert_array_equal(bits(host_in), before)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("group_size", GROUPS)
def test_backward_is_the_adjoint(device, layout, group_size, rng):
    x = inputs(rng, layout, HKV, 3, 5, np.float64)
    y = inputs(rng, layout, HKV * group_size, 3, 5, np.float64)
    forward = device.get(fastattn.repeat_kv(device.put(x), group_size))
    backward = device.get(fastattn.repeat_kv_backward(device.put(y), group_size))
    lhs, rhs = np.vdot(forward, y), np.vdot(x, backward)
    assert abs(lhs - rhs) <= 1e-12 * np.vdot(np.abs(forward), np.abs(y)), (lhs, rhs)


# --- bad inputs --------------------------------------------------------------------------

def f32(shape):
    return np.zeros(shape, np.float32)


# name: (function, array, group_size, error type, message pattern)
ERRORS = {
    "kv-rank-2": ("repeat_kv", f32((2, 8)), 2, ValueError,
                  r"^kv: expected a 4-d array \[B, Hkv, S, D\] or a 3-d array \[Hkv, S, D\], got shape \(2, 8\)"),
    "kv-rank-5": ("repeat_kv", f32((1, 2, 2, 3, 4)), 2, ValueError, r"^kv: expected a 4-d array"),
    "dkv-rank-2": ("repeat_kv_backward", f32((4, 8)), 2, ValueError,
                   r"^dkv: expected a 4-d array \[B, Hq, S, D\] or a 3-d array \[Hq, S, D\]"),
    "dkv-rank-5": ("repeat_kv_backward", f32((1, 1, 4, 3, 2)), 2, ValueError, r"^dkv: "),
    "group-size-zero": ("repeat_kv", f32((2, 3, 4)), 0, ValueError, r"^group_size: expected an int >= 1, got 0"),
    "group-size-negative": ("repeat_kv_backward", f32((2, 3, 4)), -2, ValueError,
                            r"^group_size: expected an int >= 1, got -2"),
    "group-size-float": ("repeat_kv", f32((2, 3, 4)), 2.0, TypeError,
                         r"^group_size: expected an int >= 1, got float"),
    "group-size-bool": ("repeat_kv", f32((2, 3, 4)), True, TypeError, r"^group_size: .*got bool"),
    "group-size-none": ("repeat_kv_backward", f32((2, 3, 4)), None, TypeError, r"^group_size: .*NoneType"),
    "group-size-str": ("repeat_kv", f32((2, 3, 4)), "2", TypeError, r"^group_size: .*str"),
    "hq-not-divisible": ("repeat_kv_backward", f32((2, 6, 3, 4)), 4, ValueError,
                         r"^dkv: expected a number of heads Hq divisible by group_size=4, got Hq=6 "
                         r"\(shape \(2, 6, 3, 4\)\)"),
    "hq-not-divisible-3d": ("repeat_kv_backward", f32((5, 3, 4)), 2, ValueError,
                            r"^dkv: .*group_size=2, got Hq=5"),
    "kv-int32": ("repeat_kv", np.zeros((1, 2, 3, 4), np.int32), 2, TypeError,
                 r"^kv: expected float32, float64, float16 or bfloat16, got int32"),
    "kv-bool": ("repeat_kv", np.zeros((2, 3, 4), bool), 2, TypeError, r"^kv: .*got bool"),
    "kv-fp8": ("repeat_kv", np.zeros((2, 3, 4), ml_dtypes.float8_e4m3fn), 2, TypeError,
               r"^kv: .*float8_e4m3fn"),
    "dkv-complex": ("repeat_kv_backward", np.zeros((2, 3, 4), np.complex64), 2, TypeError,
                    r"^dkv: .*complex64"),
    "dkv-int64": ("repeat_kv_backward", np.zeros((2, 3, 4), np.int64), 1, TypeError, r"^dkv: .*int64"),
}


@pytest.mark.parametrize("name", ERRORS)
def test_bad_inputs_are_rejected(device, name):
    function, x, group_size, error, pattern = ERRORS[name]
    with pytest.raises(error, match=pattern):
        getattr(fastattn, function)(device.put(x), group_size)


def test_scalars_are_rejected():
    with pytest.raises(ValueError, match=r"^kv: expected a 4-d array .*got shape \(\)$"):
        fastattn.repeat_kv(np.float32(1.0), 2)


@pytest.mark.parametrize("bad", [{"a": 1}, "kv", object(), None], ids=["dict", "str", "object", "none"])
def test_non_arrays_are_rejected(bad):
    with pytest.raises(TypeError, match=r"^kv: expected a NumPy array or a CUDA device array"):
        fastattn.repeat_kv(bad, 2)
    with pytest.raises(TypeError, match=r"^dkv: expected a NumPy array or a CUDA device array"):
        fastattn.repeat_kv_backward(bad, 2)


# --- GQAConfig ---------------------------------------------------------------------------

# name: (d_model, n_heads, n_kv_heads, head_dim, group_size, num_parameters,
#        kv_cache_bytes(batch=1, seq_len=4096) in float16, memory_savings), all worked out by hand.
PRESETS = {
    # q, out: 4096² each; k, v: 4096 x 32 x 128 = 4096² each -> 4 x 16,777,216
    # cache: 2 x 32 heads x 4096 tokens x 128 x 2 bytes = 64 MiB
    "llama2-7b": (4096, 32, 32, 128, 1, 67_108_864, 67_108_864, 0.0),
    # q, out: 8192² = 67,108,864 each; k, v: 8192 x 8 x 128 = 8,388,608 each
    # cache: 2 x 8 x 4096 x 128 x 2 = 16 MiB; saves 1 - 8/64
    "llama2-70b": (8192, 64, 8, 128, 8, 150_994_944, 16_777_216, 0.875),
    # q, out: 4096² = 16,777,216 each; k, v: 4096 x 8 x 128 = 4,194,304 each
    # cache: 2 x 8 x 4096 x 128 x 2 = 16 MiB; saves 1 - 8/32
    "mistral-7b": (4096, 32, 8, 128, 4, 41_943_040, 16_777_216, 0.75),
    # q, out: 8192² = 67,108,864 each; k, v: 8192 x 1 x 64 = 524,288 each
    # cache: 2 x 1 x 4096 x 64 x 2 = 1 MiB; saves 1 - 1/128
    "falcon-40b": (8192, 128, 1, 64, 128, 135_266_304, 1_048_576, 0.9921875),
}


def test_presets_are_listed():
    assert GQAConfig.presets() == tuple(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_numbers(name):
    d_model, n_heads, n_kv_heads, head_dim, group, params, cache, savings = PRESETS[name]
    cfg = GQAConfig.preset(name)
    assert (cfg.d_model, cfg.n_heads, cfg.n_kv_heads) == (d_model, n_heads, n_kv_heads)
    assert (cfg.causal, cfg.dropout) == (False, 0.0)
    assert cfg.head_dim == head_dim and cfg.group_size == group
    assert cfg.kv_cache_reduction == n_heads / n_kv_heads == group
    assert cfg.num_parameters() == params
    assert cfg.kv_cache_bytes(1, 4096) == cfg.kv_cache_bytes(batch=1, seq_len=4096, dtype=np.float16) == cache
    assert cfg.kv_cache_bytes(8, 4096, np.float32) == 16 * cache
    assert cfg.kv_cache_bytes(2, 4096, ml_dtypes.bfloat16) == 2 * cache
    assert cfg.kv_cache_bytes(1, 4096, ml_dtypes.float8_e4m3fn) == cache // 2
    assert cfg.kv_cache_bytes(1, 1024, "float64") == cache
    assert cfg.memory_savings(1, 4096) == savings
    mha = GQAConfig.mha(d_model, n_heads)
    assert cfg.memory_savings(4, 100) == 1 - cfg.kv_cache_bytes(4, 100) / mha.kv_cache_bytes(4, 100)
    assert cfg.is_mha == (name == "llama2-7b") and cfg.is_mqa == (name == "falcon-40b")


def test_preset_takes_causal_and_dropout():
    cfg = GQAConfig.preset("mistral-7b", causal=True, dropout=0.1)
    assert (cfg.causal, cfg.dropout, cfg.n_kv_heads) == (True, 0.1, 8)


def test_mha_and_mqa():
    mha, mqa = GQAConfig.mha(512, 8, causal=True), GQAConfig.mqa(512, 8, dropout=0.5)
    assert (mha.n_kv_heads, mha.group_size, mha.is_mha, mha.is_mqa, mha.causal) == (8, 1, True, False, True)
    assert (mqa.n_kv_heads, mqa.group_size, mqa.is_mha, mqa.is_mqa, mqa.dropout) == (1, 8, False, True, 0.5)
    assert mha.memory_savings(1, 1) == 0.0 and mqa.memory_savings(1, 1) == 0.875
    assert mqa.kv_cache_reduction == 8.0
    # q, out: 512² each; k, v: 512 x 8 x 64 (MHA) or 512 x 1 x 64 (MQA)
    assert mha.num_parameters() == 4 * 512 * 512
    assert mqa.num_parameters() == 2 * 512 * 512 + 2 * 512 * 64
    single = GQAConfig(64, 1, 1)
    assert single.is_mha and single.is_mqa and single.head_dim == 64


@pytest.mark.parametrize("cfg, kind", [
    (GQAConfig.preset("mistral-7b"), "Grouped-Query Attention"),
    (GQAConfig.preset("falcon-40b"), "Multi-Query Attention"),
    (GQAConfig.preset("llama2-7b"), "Multi-Head Attention"),
    (GQAConfig(64, 1, 1), "Multi-Head Attention"),
], ids=["gqa", "mqa", "mha", "one-head"])
def test_summary_names_the_kind_and_shows_the_numbers(cfg, kind):
    text = cfg.summary()
    assert text.splitlines()[0].startswith(kind), text
    assert len(text.splitlines()) >= 5
    for number in (cfg.d_model, cfg.head_dim, cfg.n_heads, cfg.group_size, f"{cfg.num_parameters():,}"):
        assert str(number) in text, (number, text)
    others = {"Grouped-Query Attention", "Multi-Query Attention", "Multi-Head Attention"} - {kind}
    assert not any(other in text for other in others), text


def test_summary_shows_the_cache_saving():
    text = GQAConfig.preset("llama2-70b").summary()
    assert "8x smaller" in text and "87.5%" in text and "4 KiB" in text and "32 KiB" in text, text
    assert "256 B" in GQAConfig.preset("falcon-40b").summary()


def test_repr_equality_and_immutability():
    cfg = GQAConfig(4096, 32, 8, causal=True)
    assert repr(cfg) == "GQAConfig(d_model=4096, n_heads=32, n_kv_heads=8, causal=True, dropout=0.0)"
    assert eval(repr(cfg), {"GQAConfig": GQAConfig}) == cfg
    assert cfg == GQAConfig.preset("mistral-7b", causal=True) and hash(cfg) == hash(GQAConfig(4096, 32, 8, causal=True))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n_kv_heads = 4
    with pytest.raises(TypeError):
        GQAConfig(4096, 32, 8, True)  # causal and dropout are keyword-only


def test_numpy_numbers_are_stored_as_python_numbers():
    cfg = GQAConfig(np.int64(64), np.int32(4), np.uint8(2), causal=np.bool_(True), dropout=np.float32(0.25))
    assert [type(x) for x in (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.causal, cfg.dropout)] == \
        [int, int, int, bool, float]
    assert repr(cfg) == "GQAConfig(d_model=64, n_heads=4, n_kv_heads=2, causal=True, dropout=0.25)"


# name: (args, keywords, error type, message pattern)
BAD_CONFIGS = {
    "d_model-zero": ((0, 8, 8), {}, ValueError, r"^d_model: expected a positive int, got 0$"),
    "d_model-negative": ((-64, 8, 8), {}, ValueError, r"^d_model: expected a positive int, got -64$"),
    "n_heads-zero": ((64, 0, 1), {}, ValueError, r"^n_heads: expected a positive int, got 0$"),
    "n_heads-negative": ((64, -4, 1), {}, ValueError, r"^n_heads: "),
    "n_kv_heads-zero": ((64, 4, 0), {}, ValueError, r"^n_kv_heads: expected a positive int, got 0$"),
    "d_model-float": ((64.0, 4, 2), {}, TypeError, r"^d_model: expected a positive int, got float$"),
    "n_heads-str": ((64, "4", 2), {}, TypeError, r"^n_heads: .*got str$"),
    "n_kv_heads-bool": ((64, 4, True), {}, TypeError, r"^n_kv_heads: .*got bool$"),
    "n_kv_heads-none": ((64, 4, None), {}, TypeError, r"^n_kv_heads: .*got NoneType$"),
    "d_model-not-multiple": ((100, 8, 8), {}, ValueError, r"^d_model: expected a multiple of n_heads=8, got 100$"),
    "n_kv_heads-not-divisor": ((4096, 32, 5), {}, ValueError,
                               r"^n_kv_heads: expected a divisor of n_heads=32, got 5$"),
    "n_kv_heads-above-n_heads": ((64, 4, 8), {}, ValueError, r"^n_kv_heads: expected at most n_heads=4, got 8$"),
    "dropout-one": ((64, 4, 2), {"dropout": 1.0}, ValueError, r"^dropout: expected a float in \[0, 1\), got 1.0$"),
    "dropout-negative": ((64, 4, 2), {"dropout": -0.1}, ValueError, r"^dropout: .*got -0.1$"),
    "dropout-nan": ((64, 4, 2), {"dropout": float("nan")}, ValueError, r"^dropout: .*got nan$"),
    "dropout-str": ((64, 4, 2), {"dropout": "0.1"}, TypeError, r"^dropout: .*got str$"),
    "dropout-bool": ((64, 4, 2), {"dropout": False}, TypeError, r"^dropout: .*got bool$"),
    "causal-int": ((64, 4, 2), {"causal": 1}, TypeError, r"^causal: expected a bool, got int$"),
}


@pytest.mark.parametrize("name", BAD_CONFIGS)
def test_invalid_configs_are_rejected(name):
    args, keywords, error, pattern = BAD_CONFIGS[name]
    with pytest.raises(error, match=pattern):
        GQAConfig(*args, **keywords)


def test_mha_and_mqa_check_their_sizes():
    with pytest.raises(ValueError, match=r"^d_model: expected a multiple of n_heads=3"):
        GQAConfig.mha(64, 3)
    with pytest.raises(ValueError, match=r"^n_heads: "):
        GQAConfig.mqa(64, 0)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"^name: expected one of 'llama2-7b', 'llama2-70b', 'mistral-7b', "
                                         r"'falcon-40b', got 'gpt-2'$"):
        GQAConfig.preset("gpt-2")
    with pytest.raises(TypeError, match=r"^name: "):
        GQAConfig.preset(7)


@pytest.mark.parametrize("call, error, pattern", [
    (lambda c: c.kv_cache_bytes(-1, 10), ValueError, r"^batch: expected an int >= 0, got -1$"),
    (lambda c: c.kv_cache_bytes(1, 10.0), TypeError, r"^seq_len: expected an int >= 0, got float$"),
    (lambda c: c.kv_cache_bytes(1, -5), ValueError, r"^seq_len: "),
    (lambda c: c.kv_cache_bytes(1, 10, "not-a-dtype"), TypeError, r"^dtype: expected a NumPy or ml_dtypes"),
    (lambda c: c.kv_cache_bytes(1, 10, None), TypeError, r"^dtype: .*got None$"),
    (lambda c: c.kv_cache_bytes(1, 10, object), TypeError, r"^dtype: .*got object$"),
    (lambda c: c.memory_savings(True, 10), TypeError, r"^batch: "),
    (lambda c: c.memory_savings(1, -1), ValueError, r"^seq_len: "),
], ids=["batch-negative", "seq-float", "seq-negative", "dtype-unknown", "dtype-none", "dtype-object",
        "savings-batch-bool", "savings-seq-negative"])
def test_planning_arguments_are_checked(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call(GQAConfig.preset("mistral-7b"))


def test_empty_cache_is_zero_bytes():
    cfg = GQAConfig.preset("llama2-70b")
    assert cfg.kv_cache_bytes(0, 4096) == cfg.kv_cache_bytes(4, 0) == 0
    assert cfg.memory_savings(0, 0) == 0.875


def test_docstring_examples_run():
    result = doctest.testmod(fastattn.gqa, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 10 and result.failed == 0, result


def test_attention_layer_has_the_config_heads_and_parameters(rng):
    from fastattn.layers import MultiheadAttention

    cfg = GQAConfig(32, 4, 2)
    layer = cfg.attention_layer(seed=0, bias=False)
    assert isinstance(layer, MultiheadAttention)
    params = dict(layer.named_parameters())
    assert sum(np.size(p) for p in params.values()) == cfg.num_parameters()
    x = rng.standard_normal((2, 5, 32)).astype(np.float32)
    assert layer.forward(x, causal=True).shape == (2, 5, 32)
    again = dict(cfg.attention_layer(seed=0, bias=False).named_parameters())
    assert all(np.array_equal(params[n], again[n]) for n in params)
