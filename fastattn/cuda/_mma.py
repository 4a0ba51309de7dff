"""Tensor cores from numba: ``mma.sync.m16n8k16`` (float16/bfloat16 in, float32 out) and its helpers.

numba has no MMA API, so the instructions live in a small CUDA C++ source,
``_mma.cu`` (:data:`SOURCE`): ``extern "C"`` device functions over
``mma.sync``, ``ldmatrix`` and the ``cvt`` that packs two float32 into one
16-bit pair.  They are declared here with ``numba.cuda.declare_device`` and
linked into every tensor-core kernel with link-time optimisation
(``cuda.jit(..., lto=True)``; NVRTC and nvJitLink from pip): the calls inline,
so the fragments stay in registers.  ``cuda-report`` links the same way
(:func:`fastattn._cuda_report.compile_variant`) and counts the instructions in
the linked PTX.

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

``ldmatrix .x4 .trans`` (:func:`ldmatrix_x4_trans`) reads the B fragments of
a row-major ``[k, n]`` tile in shared memory (the values in ``P V``, the keys
in ``dS K``): lane ``i`` names the 16 bytes of row ``i % 16``, and the
instruction hands each lane the column pairs it needs, transposed.

Kernels call :func:`mma_f16`, :func:`mma_bf16`, :func:`pack_f16`,
:func:`pack_bf16`, :func:`ldmatrix_x4_trans` and :func:`shfl_xor` through this
module.  Under numba's CUDA simulator (which runs each thread as a Python
thread and cannot run foreign code) they are an exact emulation: the 32 lanes
of a warp meet at a barrier, each deposits its fragments (or the 16 bytes it
addresses), the last to arrive rebuilds A, B and C from the fragment layout
above, and each lane takes its own part of ``A @ B + C`` (products of 16-bit
values are exact in float32; the sum is taken in float64 and rounded once).
"""
import functools
import pathlib
import threading

import numpy as np
from numba import config, float32, int32, uint32

from ._device import inline

#: The instruction this module wraps, and the first compute capability that has it.
SHAPE = (16, 8, 16)
MIN_CC = (8, 0)
#: The CUDA C++ source of the instructions, linked into each tensor-core kernel with LTO.
SOURCE = str(pathlib.Path(__file__).with_name("_mma.cu"))


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


def _transposed_tiles(rows):
    """Each lane's four registers of ``ldmatrix .x4 .trans`` from the 16 bytes each lane addressed: tile
    ``m`` is the rows of lanes ``8 m ... 8 m + 7``; register ``m`` of lane ``(g, t)`` holds its rows ``2 t``
    and ``2 t + 1`` at column ``g`` (PTX ISA, "ldmatrix")."""
    halves = _halves(rows)  # [32 lanes, 8 columns]: lane i's row
    return [tuple(int(halves[8 * m + 2 * (lane % 4), lane >> 2])
                  | (int(halves[8 * m + 2 * (lane % 4) + 1, lane >> 2]) << 16) for m in range(4))
            for lane in range(32)]


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

    def ldmatrix_x4_trans(words, row, col):
        """B fragments of two 8-column tiles of a row-major 16-bit matrix in shared memory (emulated
        ``ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16``; see the hardware version)."""
        return collective(tuple(int(x) for x in words[row, col:col + 4]), _transposed_tiles)

else:
    from numba import cuda, types
    from numba.cuda.extending import intrinsic

    _f32x4, _u32 = types.UniTuple(types.float32, 4), types.uint32
    _mma_sig = _f32x4(*([_u32] * 6 + [types.float32] * 4))
    _mma_f16 = cuda.declare_device("fastattn_mma_f16", _mma_sig, link=SOURCE)
    _mma_bf16 = cuda.declare_device("fastattn_mma_bf16", _mma_sig, link=SOURCE)
    _pack_f16 = cuda.declare_device("fastattn_pack_f16", _u32(types.float32, types.float32), link=SOURCE)
    _pack_bf16 = cuda.declare_device("fastattn_pack_bf16", _u32(types.float32, types.float32), link=SOURCE)
    _ldmatrix_x4_trans = cuda.declare_device(
        "fastattn_ldmatrix_x4_trans", types.UniTuple(_u32, 4)(types.CPointer(_u32), types.int32), link=SOURCE)

    @intrinsic
    def _data(typingctx, array):
        """The address of ``array``'s first element, as the pointer a foreign function takes."""
        def codegen(context, builder, signature, args):
            return context.make_array(signature.args[0])(context, builder, args[0]).data

        return types.CPointer(array.dtype)(array), codegen

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
    def ldmatrix_x4_trans(words, row, col):
        """B fragments of two 8-column tiles of a row-major 16-bit matrix in shared memory
        (``ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16``): ``words`` is its ``uint32`` view; lane ``i``
        names row ``row`` (``i % 16`` of the 16 rows) and word column ``col`` (``i // 16`` selects the tile).
        Returns ``(b0, b1)`` of the first tile and ``(b0, b1)`` of the second."""
        return _ldmatrix_x4_trans(_data(words), int32(row * words.shape[1] + col))

    @inline
    def shfl_xor(value, lane_mask):
        """``value`` of lane ``lane ^ lane_mask`` (``shfl.sync.bfly`` over the full warp)."""
        return cuda.shfl_xor_sync(0xFFFFFFFF, value, lane_mask)


@functools.lru_cache(maxsize=None)
def linkable():
    """Whether the tensor-core kernels can be built here: NVRTC and nvJitLink load (they compile and link
    :data:`SOURCE` into each kernel), or the simulator stands in.  Without them the SIMT kernels run."""
    if config.ENABLE_CUDASIM:
        return True
    try:
        from cuda.bindings import nvjitlink, nvrtc

        nvjitlink.version()
        return nvrtc.nvrtcVersion()[0] == nvrtc.nvrtcResult.NVRTC_SUCCESS
    except Exception:
        return False


def ops(kind):
    """``(mma, pack)`` for ``"f16"`` or ``"bf16"`` operands."""
    return (mma_f16, pack_f16) if kind == "f16" else (mma_bf16, pack_bf16)
