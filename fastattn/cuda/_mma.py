"""Tensor cores from numba: ``mma.sync.m16n8k16`` (float16/bfloat16 in, float32 out) and its helpers.

numba has no MMA API, so the instructions are emitted as inline PTX from
``numba.cuda.extending.intrinsic`` functions: NVVM passes them through, they
land in the kernel's own PTX (where ``cuda-report`` counts them) and their
operands are ordinary registers, so the fragments never touch memory.

A warp computes ``D [16x8] = A [16x16] @ B [16x8] + C [16x8]``.  Each of the 32
lanes holds a piece of each matrix (PTX ISA, "Matrix Fragments for mma.m16n8k16
with floating point type"); with ``g = lane >> 2`` and ``t = lane % 4``:

- A (row-major): four 32-bit registers of two 16-bit values each (low half:
  the lower column).  Register 0 holds row ``g``, columns ``2t, 2t + 1``;
  register 1 row ``g + 8``, the same columns; registers 2 and 3 the same rows at
  columns ``2t + 8, 2t + 9``;
- B (column-major, ``k x n``): two registers; register 0 holds rows (k)
  ``2t, 2t + 1`` of column ``g``, register 1 rows ``2t + 8, 2t + 9``;
- C and D: four float32; ``c0, c1`` are row ``g``, columns ``2t, 2t + 1``, and
  ``c2, c3`` row ``g + 8``, the same columns.

:func:`a_position`, :func:`b_position` and :func:`c_position` say the same in
code, element by element.  A row-major ``[rows, D]`` float16 array viewed as
``uint32`` ``[rows, D / 2]`` already holds A's register pairs (word ``w`` =
columns ``2w, 2w + 1``), and so does a ``[keys, D]`` key array for B = Kᵀ.

Kernels call :func:`mma_f16`, :func:`mma_bf16`, :func:`pack_f16`,
:func:`pack_bf16` and :func:`shfl_xor` through this module.  Under numba's CUDA
simulator (which runs each thread as a Python thread and cannot run PTX) they
are an exact emulation: the 32 lanes of a warp meet at a barrier, each deposits
its fragments, every lane rebuilds A, B and C from the fragment layout above,
and takes its own part of ``A @ B + C`` (products of 16-bit values are exact in
float32; the sum is taken in float64 and rounded once).
"""
import threading

import numpy as np
from numba import config, float32, uint32

from ._device import inline

#: The instruction this module wraps, and the first compute capability that has it.
SHAPE = (16, 8, 16)
MIN_CC = (8, 0)


def a_position(lane, i):
    """``(row, col)`` in the 16x16 A of element ``i`` (0-7; register ``i // 2``, half ``i % 2``) of ``lane``."""
    g, t = lane >> 2, lane % 4
    row = g if (i < 2 or 4 <= i < 6) else g + 8
    col = t * 2 + (i & 1) + (8 if i >= 4 else 0)
    return row, col


def b_position(lane, i):
    """``(k, n)`` in the 16x8 B of element ``i`` (0-3; register ``i // 2``, half ``i % 2``) of ``lane``."""
    g, t = lane >> 2, lane % 4
    return t * 2 + (i & 1) + (8 if i >= 2 else 0), g


def c_position(lane, i):
    """``(row, col)`` in the 16x8 C/D of accumulator ``i`` (0-3) of ``lane``."""
    g, t = lane >> 2, lane % 4
    return (g if i < 2 else g + 8), t * 2 + (i & 1)


# --- 16-bit conversions on the host (the emulation and the tests) ----------------------------------

def f16_bits(x):
    """IEEE half bits of float32 ``x``, rounded to nearest even (``cvt.rn.f16.f32``)."""
    with np.errstate(over="ignore"):  # past 65504 rounds to inf, as the hardware does
        return int(np.float32(x).astype(np.float16).view(np.uint16))


def bf16_bits(x):
    """bfloat16 bits of float32 ``x``, rounded to nearest even (``cvt.rn.bf16.f32``; NaN stays NaN)."""
    u = int(np.float32(x).view(np.uint32))
    if (u & 0x7FFFFFFF) > 0x7F800000:
        return (u >> 16) | 0x40
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF


def f16_value(bits):
    """The float32 value of IEEE half bits."""
    return np.float32(np.uint16(bits).view(np.float16))


def bf16_value(bits):
    """The float32 value of bfloat16 bits."""
    return np.uint32(int(bits) << 16).view(np.float32)


# --- the simulator's warp ------------------------------------------------------------------------------

_warps_lock = threading.Lock()
#: Seconds a lane waits for the rest of its warp before the emulation gives up (a deadlock, not a result).
TIMEOUT = 600.0


class _Warp:
    """Where the 32 simulated lanes of one warp meet: each deposits a value, the last to arrive runs the
    round's function once on all 32 (the barrier's action), and each lane takes its own result."""

    def __init__(self):
        self.barrier = threading.Barrier(32, action=self._run)
        self.slots = [None] * 32
        self.fn = None
        self.results = None

    def _run(self):
        self.results = self.fn(self.slots)


def _this_warp():
    """``(warp, lane)`` of the calling simulated thread."""
    thread = threading.current_thread()
    manager = thread._manager  # the simulator's BlockManager: one per block being run
    with _warps_lock:
        warps = manager.__dict__.setdefault("_fastattn_warps", {})
        key = (tuple(thread.blockIdx), thread.thread_id // 32)
        warp = warps.get(key)
        if warp is None:
            warp = warps[key] = _Warp()
    return warp, thread.thread_id % 32


def collective(value, fn):
    """``fn(values)[lane]``: ``fn`` run once on every lane's ``value`` (a list indexed by lane)."""
    warp, lane = _this_warp()
    warp.slots[lane] = value
    warp.fn = fn  # every lane of a round passes the same function
    warp.barrier.wait(TIMEOUT)
    result = warp.results[lane]
    warp.barrier.wait(TIMEOUT)  # nobody starts the next round before everyone has its result
    return result


def _positions(position, count):
    lanes = np.repeat(np.arange(32), count)
    elements = np.tile(np.arange(count), 32)
    return tuple(np.array([position(ln, i) for ln, i in zip(lanes, elements)]).T.reshape(2, 32, count))


_A_AT, _B_AT, _C_AT = _positions(a_position, 8), _positions(b_position, 4), _positions(c_position, 4)


def _halves(words):
    """``[32, 2n]`` 16-bit values (low half first) of ``[32, n]`` 32-bit registers."""
    words = np.asarray(words, np.uint32)
    return np.stack([words & 0xFFFF, words >> 16], axis=-1).reshape(32, -1)


def _f16_values(bits):
    return bits.astype(np.uint16).view(np.float16).astype(np.float64)


def _bf16_values(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def _warp_mma(value_of):
    def run(slots):
        A, B, C = np.zeros((16, 16)), np.zeros((16, 8)), np.zeros((16, 8))
        A[_A_AT] = value_of(_halves([f[0] for f in slots]))
        B[_B_AT] = value_of(_halves([f[1] for f in slots]))
        C[_C_AT] = np.array([f[2] for f in slots], np.float64)
        D = (A @ B + C).astype(np.float32)
        return [tuple(row) for row in D[_C_AT]]
    return run


_RUN_F16, _RUN_BF16 = _warp_mma(_f16_values), _warp_mma(_bf16_values)


def emulate_mma(a, b, c, kind):
    """One lane's ``D`` of ``mma.m16n8k16`` with ``kind`` ("f16"/"bf16") operands, from every lane's fragments."""
    frags = (tuple(int(x) for x in a), tuple(int(x) for x in b), tuple(float(x) for x in c))
    return collective(frags, _RUN_F16 if kind == "f16" else _RUN_BF16)


def _butterfly(mask):
    def run(values):
        return [values[lane ^ mask] for lane in range(32)]
    return run


_BUTTERFLY = {m: _butterfly(m) for m in (1, 2, 4, 8, 16)}


if config.ENABLE_CUDASIM:
    def mma_f16(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        """``(d0, d1, d2, d3)`` of ``mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32`` (emulated)."""
        return emulate_mma((a0, a1, a2, a3), (b0, b1), (c0, c1, c2, c3), "f16")

    def mma_bf16(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        """``(d0, d1, d2, d3)`` of ``mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32`` (emulated)."""
        return emulate_mma((a0, a1, a2, a3), (b0, b1), (c0, c1, c2, c3), "bf16")

    def pack_f16(lo, hi):
        """Two float32 as one register of two halves (``lo`` in the low 16 bits), rounded to nearest even."""
        return np.uint32(f16_bits(lo) | (f16_bits(hi) << 16))

    def pack_bf16(lo, hi):
        """Two float32 as one register of two bfloat16 (``lo`` in the low 16 bits), rounded to nearest even."""
        return np.uint32(bf16_bits(lo) | (bf16_bits(hi) << 16))

    def shfl_xor(value, lane_mask):
        """``value`` of lane ``lane ^ lane_mask`` (``shfl.sync.bfly`` over the full warp)."""
        return collective(value, _BUTTERFLY[int(lane_mask)])

else:
    from llvmlite import ir
    from numba import cuda, types
    from numba.cuda.extending import intrinsic

    def _mma_intrinsic(kind):
        asm = (f"mma.sync.aligned.m16n8k16.row.col.f32.{kind}.{kind}.f32 "
               "{$0,$1,$2,$3}, {$4,$5,$6,$7}, {$8,$9}, {$10,$11,$12,$13};")

        @intrinsic
        def mma(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
            sig = types.UniTuple(types.float32, 4)(*([types.uint32] * 6 + [types.float32] * 4))

            def codegen(context, builder, signature, args):
                f32, i32 = ir.FloatType(), ir.IntType(32)
                fnty = ir.FunctionType(ir.LiteralStructType([f32] * 4), [i32] * 6 + [f32] * 4)
                call = builder.call(ir.InlineAsm(fnty, asm, "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f"), args)
                return context.make_tuple(builder, signature.return_type,
                                          [builder.extract_value(call, k) for k in range(4)])

            return sig, codegen

        return mma

    def _pack_intrinsic(kind):
        asm = f"cvt.rn.{kind}x2.f32 $0, $1, $2;"  # $1 goes to the upper half

        @intrinsic
        def pack(typingctx, lo, hi):
            sig = types.uint32(types.float32, types.float32)

            def codegen(context, builder, signature, args):
                f32, i32 = ir.FloatType(), ir.IntType(32)
                fnty = ir.FunctionType(i32, [f32, f32])
                return builder.call(ir.InlineAsm(fnty, asm, "=r,f,f"), [args[1], args[0]])

            return sig, codegen

        return pack

    _mma_f16, _mma_bf16 = _mma_intrinsic("f16"), _mma_intrinsic("bf16")
    _pack_f16, _pack_bf16 = _pack_intrinsic("f16"), _pack_intrinsic("bf16")

    @inline
    def mma_f16(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        """``(d0, d1, d2, d3)`` of ``mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32``."""
        return _mma_f16(uint32(a0), uint32(a1), uint32(a2), uint32(a3), uint32(b0), uint32(b1),
                        float32(c0), float32(c1), float32(c2), float32(c3))

    @inline
    def mma_bf16(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        """``(d0, d1, d2, d3)`` of ``mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32``."""
        return _mma_bf16(uint32(a0), uint32(a1), uint32(a2), uint32(a3), uint32(b0), uint32(b1),
                         float32(c0), float32(c1), float32(c2), float32(c3))

    @inline
    def pack_f16(lo, hi):
        """Two float32 as one register of two halves (``lo`` in the low 16 bits): ``cvt.rn.f16x2.f32``."""
        return _pack_f16(float32(lo), float32(hi))

    @inline
    def pack_bf16(lo, hi):
        """Two float32 as one register of two bfloat16 (``lo`` low): ``cvt.rn.bf16x2.f32``."""
        return _pack_bf16(float32(lo), float32(hi))

    @inline
    def shfl_xor(value, lane_mask):
        """``value`` of lane ``lane ^ lane_mask`` (``shfl.sync.bfly`` over the full warp)."""
        return cuda.shfl_xor_sync(0xFFFFFFFF, value, lane_mask)


def ops(kind):
    """``(mma, pack)`` for ``"f16"`` or ``"bf16"`` operands."""
    return (mma_f16, pack_f16) if kind == "f16" else (mma_bf16, pack_bf16)
