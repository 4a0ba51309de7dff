"""Tensor cores: the ``mma.m16n8k16`` fragment layouts, their simulator emulation, and the kernels on them.

The layouts are checked against the PTX ISA's own words (section "Matrix
Fragments for mma.m16n8k16 with floating point type"); the emulation
(:mod:`fastattn.cuda._mma`, what the simulator runs in place of the
instruction) against a plain matrix product at every fragment position, loading
the fragments the way the attention kernel does, and the emulated ``ldmatrix``
against the B fragments it must deliver; then the tensor-core forward,
dQ and dK/dV kernels (:mod:`fastattn.cuda._tensor_core`) run the float16/bfloat16
cases of the dense, bias/mask, dropout and varlen tests, and the paged prefill
kernel paged cases of its own, with
``config.cuda_mma`` on (the rest of the simulator suite keeps it off, see
``CUDA_TEST_CONFIG``).
"""
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from numba import cuda

import fastattn
import test_attention
import test_bias_mask
import test_dropout
import test_paged
import test_varlen
from cases import BF16, F16, F32, Shape, random
from paged_cases import PagedCase
from conftest import CUDA, assert_close, cuda_unavailable_reason
from fastattn.cuda import _mma


# --- the layouts, against the PTX ISA's text -------------------------------------------------------

@pytest.mark.parametrize("position, count, shape", [(_mma.a_position, 8, (16, 16)), (_mma.b_position, 4, (16, 8)),
                                                    (_mma.c_position, 4, (16, 8))], ids=["A", "B", "C"])
def test_each_fragment_layout_covers_its_matrix_once(position, count, shape):
    seen = [position(lane, i) for lane in range(32) for i in range(count)]
    assert sorted(seen) == [(r, c) for r in range(shape[0]) for c in range(shape[1])]


def test_fragment_layouts_match_the_ptx_isa():
    # lane 6: groupID 1, threadID_in_group 2
    assert [_mma.a_position(6, i) for i in range(8)] == [(1, 4), (1, 5), (9, 4), (9, 5), (1, 12), (1, 13),
                                                         (9, 12), (9, 13)]
    assert [_mma.b_position(6, i) for i in range(4)] == [(4, 1), (5, 1), (12, 1), (13, 1)]
    assert [_mma.c_position(6, i) for i in range(4)] == [(1, 4), (1, 5), (9, 4), (9, 5)]
    assert [_mma.a_position(31, i) for i in range(8)][-1] == (15, 15)
    assert _mma.b_position(31, 3) == (15, 7) and _mma.c_position(31, 3) == (15, 7)


def test_16_bit_rounding_is_to_nearest_even(rng=np.random.default_rng(5)):
    x = np.concatenate([rng.standard_normal(2000).astype(np.float32) * 100,
                        np.array([0.0, -0.0, np.inf, -np.inf, 65504.0, 65520.0, 1e-8, 1 + 2.0 ** -11,
                                  1 + 3 * 2.0 ** -11, 1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8], np.float32)])
    with np.errstate(over="ignore"):
        assert [_mma.f16_bits(v) for v in x] == x.astype(np.float16).view(np.uint16).tolist()
    assert [_mma.bf16_bits(v) for v in x] == x.astype(ml_dtypes.bfloat16).view(np.uint16).tolist()
    assert np.isnan(_mma.bf16_value(_mma.bf16_bits(np.float32(np.nan))))


# --- the emulation, in simulated kernels -----------------------------------------------------------

def _kernel(kind):
    """``d = a @ b + c`` by one warp: a ``[16, 16]`` and bᵀ ``[8, 16]`` row-major as uint32 words (two
    16-bit values each), fragments loaded as the attention kernel loads them (q rows, key rows)."""
    mma, pack = _mma.ops(kind)

    def kernel(a, bt, c, d, packed):
        lane = cuda.threadIdx.x
        g, t = lane >> 2, lane & 3
        r = mma(a[g, t], a[g + 8, t], a[g, t + 4], a[g + 8, t + 4], bt[g, t], bt[g, t + 4],
                c[g, 2 * t], c[g, 2 * t + 1], c[g + 8, 2 * t], c[g + 8, 2 * t + 1])
        d[g, 2 * t], d[g, 2 * t + 1], d[g + 8, 2 * t], d[g + 8, 2 * t + 1] = r[0], r[1], r[2], r[3]
        packed[lane] = pack(r[0], r[1])
        d[16 + g, 2 * t] = _mma.shfl_xor(r[0], 1)  # the value of lane ^ 1

    return cuda.jit(kernel)


def _patterns(dtype, rng):
    ints = np.arange(256, dtype=np.float32).reshape(16, 16)  # exact in float16 and bfloat16
    eye = np.eye(16, dtype=np.float32)
    return {
        "random": (rng.standard_normal((16, 16)), rng.standard_normal((16, 8)), rng.standard_normal((16, 8))),
        "every A position, columns 0-7": (ints, eye[:, :8], np.zeros((16, 8))),
        "every A position, columns 8-15": (ints, eye[:, 8:], np.zeros((16, 8))),
        "every B position": (eye, ints[:, :8], rng.standard_normal((16, 8))),
    }


@CUDA
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["f16", "bf16"])
@pytest.mark.parametrize("pattern", ["random", "every A position, columns 0-7", "every A position, columns 8-15",
                                     "every B position"])
def test_emulated_mma_is_the_matrix_product(dtype, pattern, rng):
    reason = cuda_unavailable_reason()
    if reason:
        pytest.skip(reason)
    a, b, c = (np.asarray(x) for x in _patterns(dtype, rng)[pattern])
    a16, b16 = a.astype(dtype), b.astype(dtype)
    c = c.astype(np.float32)
    d = np.zeros((24, 8), np.float32)
    packed = np.zeros(32, np.uint32)
    _kernel("f16" if dtype == F16 else "bf16")[1, 32](a16.view(np.uint32), np.ascontiguousarray(b16.T).view(np.uint32),
                                                     c, d, packed)
    want = a16.astype(np.float64) @ b16.astype(np.float64) + c
    np.testing.assert_allclose(d[:16], want.astype(np.float32), rtol=2 * np.finfo(np.float32).eps, atol=0)
    if pattern != "random":  # exact: integers picked out by ones, plus c rounded once
        assert np.array_equal(d[:16], want.astype(np.float32))
    lanes = np.arange(32)
    g, t = lanes >> 2, lanes & 3
    assert np.array_equal(d[16 + g, 2 * t], d[(lanes ^ 1) >> 2, 2 * ((lanes ^ 1) & 3)])
    lo = d[g, 2 * t].astype(dtype).view(np.uint16).astype(np.uint32)
    hi = d[g, 2 * t + 1].astype(dtype).view(np.uint16).astype(np.uint32)
    assert np.array_equal(packed, lo | (hi << 16))


def _ldmatrix_kernel():
    """Each lane's four registers of ``ldmatrix .x4 .trans`` from a ``[16, 16]`` 16-bit matrix staged in
    shared memory as words with the kernels' padded row stride, addressed as the kernels address it."""
    words, stride = 8, 12

    def kernel(b, regs):
        lane = cuda.threadIdx.x
        tile = cuda.shared.array((16, stride), np.uint32)
        for r in range(16):
            if lane < stride:
                tile[r, lane] = b[r, lane] if lane < words else 0
        cuda.syncthreads()
        r0, r1, r2, r3 = _mma.ldmatrix_x4_trans(tile, lane & 15, (lane >> 4) * 4)
        regs[lane, 0], regs[lane, 1], regs[lane, 2], regs[lane, 3] = r0, r1, r2, r3

    return cuda.jit(kernel)


@CUDA
def test_emulated_ldmatrix_gives_the_b_fragments(rng):
    reason = cuda_unavailable_reason()
    if reason:
        pytest.skip(reason)
    bits = rng.integers(0, 2 ** 16, (16, 16)).astype(np.uint16)  # every element distinct in practice
    regs = np.zeros((32, 4), np.uint32)
    _ldmatrix_kernel()[1, 32](bits.view(np.uint32), regs)
    for lane in range(32):
        for tile in range(2):  # columns 0-7, then 8-15: each as the B operand of one mma
            for r in range(2):
                (k0, n0), (k1, n1) = _mma.b_position(lane, 2 * r), _mma.b_position(lane, 2 * r + 1)
                want = int(bits[k0, 8 * tile + n0]) | (int(bits[k1, 8 * tile + n1]) << 16)
                assert regs[lane, 2 * tile + r] == want, (lane, tile, r)


# --- the tensor-core forward, on the suite's float16/bfloat16 cases --------------------------------

@pytest.fixture
def mma_device(request, monkeypatch):
    """The ``device`` fixture's CUDA side with the tensor-core forward on (and a shorter thread switch
    interval: the emulation's barriers wait on it)."""
    reason = cuda_unavailable_reason()
    if reason:
        pytest.skip(reason)
    from conftest import Device, use_test_cuda_config

    use_test_cuda_config(monkeypatch)
    monkeypatch.setattr(fastattn.config, "cuda_mma", True)
    monkeypatch.setattr(fastattn.config, "cuda_max_head_dim", 256)
    old = sys.getswitchinterval()
    sys.setswitchinterval(5e-4)
    yield Device("cuda")
    sys.setswitchinterval(old)


def _sixteen_bit(cases):
    return [pytest.param(c, id=getattr(c, "id", c), marks=CUDA) for c in cases
            if (c.dtype if hasattr(c, "dtype") else None) in (F16, BF16)]


@pytest.mark.parametrize("case", _sixteen_bit(test_attention.CUDA_CASES)
                         + [pytest.param(c, id=c.id, marks=CUDA) for c in [
                             # several blocks of rows and of keys, GQA, a head dim the tiles pad
                             test_attention.Case(Shape(1, 4, 2, 20, 81, 40), "causal", F16),
                             test_attention.Case(Shape(1, 2, 1, 65, 40, 96), "all", BF16),
                         ]])
def test_tensor_core_forward_matches_reference(mma_device, case, rng, monkeypatch):
    from fastattn.cuda import attention as cuda_attention

    if case.shape.seq_q > 64:  # the GPU's four warps a block (the suite's blocks have one)
        monkeypatch.setattr(fastattn.config, "cuda_mma_warps", 4)

    launched = []
    monkeypatch.setattr(cuda_attention, "_mma_kernel", _recording(cuda_attention._mma_kernel, launched))
    test_attention.test_forward_matches_reference(mma_device, case, rng)
    assert launched == ([True] if case.shape.head_dim % 2 == 0 else []), "the tensor-core kernel ran"


@pytest.mark.parametrize("case", _sixteen_bit(test_attention.CUDA_CASES)
                         + [pytest.param(test_attention.Case(Shape(1, 2, 1, 20, 41, 40), "causal", BF16),
                                         id="b1-mqa-2-1-sq20-sk41-d40-causal-bf16", marks=CUDA)])
def test_tensor_core_backward_matches_reference(mma_device, case, rng, monkeypatch):
    from fastattn.cuda import attention as cuda_attention

    launched = []
    monkeypatch.setattr(cuda_attention, "_mma_kernel", _recording(cuda_attention._mma_kernel, launched))
    test_attention.test_backward_matches_reference(mma_device, case, rng)
    assert launched == ([True, True] if case.shape.head_dim % 2 == 0 else []), "the dQ and dK/dV kernels ran"


@pytest.mark.parametrize("case", _sixteen_bit(test_bias_mask.CUDA_CASES))
def test_tensor_core_backward_with_bias_mask_and_dbias(mma_device, case, rng):
    test_bias_mask.test_backward_with_bias_and_mask_matches_reference(mma_device, case, rng)


def _recording(make, launched):
    def wrapped(*args):
        launched.append(True)
        return make(*args)
    return wrapped


@pytest.mark.parametrize("case", _sixteen_bit(test_bias_mask.CUDA_CASES))
def test_tensor_core_forward_with_bias_and_mask(mma_device, case, rng):
    test_bias_mask.test_forward_with_bias_and_mask_matches_reference(mma_device, case, rng)


@CUDA
def test_tensor_core_forward_with_dropout_drops_the_cpu_keys(mma_device, rng):
    """The keep bits are the CPU's (v = identity rows shows which keys survived)."""
    sk = 8
    q = random((2, 2, 5, 8), F16, rng)
    k = random((2, 1, sk, 8), F16, rng)
    v = np.tile(np.eye(sk, 8, dtype=np.float16), (2, 1, 1, 1))
    cpu = fastattn.attention(q, k, v, dropout_p=0.5, seed=7)
    gpu = mma_device.get(fastattn.attention(mma_device.put(q), mma_device.put(k), mma_device.put(v), dropout_p=0.5,
                                            seed=7))
    assert ((cpu == 0) == (gpu == 0)).all()
    assert_close(gpu, cpu.astype(np.float64), F16, "out")


@pytest.mark.parametrize("name", [pytest.param(n, marks=CUDA) for n, c in test_dropout.CUDA_CASES.items()
                                  if c[-1] in (F16, BF16)])
def test_tensor_core_forward_with_dropout_matches_reference(mma_device, name, rng):
    test_dropout.test_dropout_matches_the_reference(mma_device, name, rng)


@pytest.mark.parametrize("name", [pytest.param(n, marks=CUDA) for n, c in test_varlen.CUDA_CASES.items()
                                  if c[-1] in (F16, BF16)])
def test_tensor_core_varlen_matches_reference(mma_device, name, rng):
    test_varlen.test_varlen_matches_the_reference(mma_device, name, rng)


PAGED_PREFILL = [
    PagedCase((7, 5, 12), 4, 2, 16, 4, seq_q=3, option="causal", dtype=F16, shared=1),
    PagedCase((13, 6), 4, 1, 40, 8, seq_q=5, option="alibi", dtype=BF16),  # 20 stacked rows: two tiles
    PagedCase((10, 9), 4, 2, 8, 4, seq_q=4, option="window", dtype=BF16, shared=2),
    PagedCase((9,), 2, 2, 8, 4, seq_q=6, option="softcap", dtype=F16),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=f"{c.option}-{np.dtype(c.dtype).name}-sq{c.seq_q}-d{c.head_dim}",
                                               marks=CUDA) for c in PAGED_PREFILL])
def test_tensor_core_paged_prefill_matches_reference(mma_device, case, rng, monkeypatch):
    from fastattn.cuda import paged as cuda_paged

    launched = []
    monkeypatch.setattr(cuda_paged, "_mma_prefill", _recording(cuda_paged._mma_prefill, launched))
    test_paged.test_forward_matches_reference(mma_device, case, rng)
    assert launched == [True], "the tensor-core prefill kernel ran"


@CUDA
def test_a_view_at_an_odd_offset_takes_the_simt_kernels(mma_device, rng, monkeypatch):
    """Word loads need 4-byte alignment: a float16 view starting one element in runs the SIMT forward."""
    from fastattn import reference
    from fastattn.cuda import attention as cuda_attention

    launched = []
    monkeypatch.setattr(cuda_attention, "_mma_kernel", _recording(cuda_attention._mma_kernel, launched))
    q, k, v = (random((1, 2, 5, 8), F16, rng) for _ in range(3))
    shifted = cuda.to_device(np.concatenate([np.zeros(1, F16), q.ravel()]))[1:].reshape(q.shape)
    out = fastattn.attention(shifted, mma_device.put(k), mma_device.put(v), causal=True)
    assert launched == []
    assert_close(mma_device.get(out), reference.attention(q, k, v, causal=True), F16, "out")
    fastattn.attention(mma_device.put(q), mma_device.put(k), mma_device.put(v), causal=True)
    assert launched == [True]


# --- the switch --------------------------------------------------------------------------------------

def test_use_mma_follows_dtype_head_dim_and_config(monkeypatch):
    from fastattn._validate import attention_args
    from fastattn.cuda import attention as cuda_attention

    monkeypatch.setattr(cuda_attention._device, "simulated", lambda: False)
    monkeypatch.setattr(cuda_attention._device, "compute_capability", lambda: (9, 0))
    monkeypatch.setattr(fastattn.config, "cuda_mma", True)

    def spec(dtype, d):
        x = np.zeros((1, 2, 3, d), dtype)
        return attention_args(x, x, x, causal=False, scale=None, window=(-1, -1), softcap=0.0,
                              alibi_slopes=None)[-1]

    assert cuda_attention.use_mma(spec(F16, 64)) and cuda_attention.use_mma(spec(BF16, 40))
    assert not cuda_attention.use_mma(spec(F32, 64)) and not cuda_attention.use_mma(spec(F16, 59))
    monkeypatch.setattr(cuda_attention._device, "compute_capability", lambda: (7, 5))
    assert not cuda_attention.use_mma(spec(F16, 64)), "below sm_80 the SIMT kernels run"
    monkeypatch.setattr(cuda_attention._device, "compute_capability", lambda: (8, 0))
    assert cuda_attention.use_mma(spec(F16, 64)) == _mma.linkable()  # NVRTC and nvJitLink from pip here
    monkeypatch.setattr(_mma, "linkable", lambda: False)
    assert not cuda_attention.use_mma(spec(F16, 64)), "without NVRTC/nvJitLink the SIMT kernels run"
    monkeypatch.setattr(_mma, "linkable", lambda: True)
    monkeypatch.setattr(fastattn.config, "cuda_mma", False)
    assert not cuda_attention.use_mma(spec(F16, 64))


def test_the_linked_helpers_can_be_built_here():
    """The test extra installs NVRTC and nvJitLink (numba-cuda[cu12]): the hardware path can link _mma.cu."""
    assert _mma.linkable()


@pytest.mark.parametrize("value, expected", [("0", False), ("1", True)])
def test_fastattn_cuda_mma_environment_variable(value, expected):
    env = {**os.environ, "FASTATTN_CUDA_MMA": value}
    out = subprocess.run([sys.executable, "-c", "import fastattn; print(fastattn.config.cuda_mma)"], env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == str(expected)
