"""float32 tile GEMMs in registers, for the attention kernels' products on CPUs with AVX-512.

The attention kernels multiply small tiles (256 query rows by 256-512 keys by
D = 64 or 128), each on one core.  Through BLAS each product is a call that
packs its operands first; here the product is a loop of **micro-kernels**: a
block of ``MR x 64`` outputs held in 24 vector registers (:mod:`._simd`'s
16-lane vectors) while the loop walks the shared dimension, one broadcast
element of ``A`` and four vectors of a row of ``B`` a step, 24 fused
multiply-adds.  On a 2-core AMD EPYC (Zen 5) one core ran these tiles at
250 GFLOP/s, against 117 for SciPy's OpenBLAS as configured there (its AVX2
kernels) and 168-213 for its AVX-512 kernels.  Rows are read with any stride,
so ``A`` may be a transposed tile (``dV += Pᵀ dO``) without a copy; ``B`` must
have unit-stride rows, so the keys of ``S = Q Kᵀ`` are first packed into
column panels (:func:`pack_transposed`), once per key tile.

The 24 accumulators (plus four ``B`` vectors and a broadcast) need the 32
registers of AVX-512; with AVX2's 16 they would spill, so :func:`simd_gemm`
chooses BLAS there (``fastattn.config.cpu_gemm`` overrides).  Shapes whose
output columns are not a multiple of 16 take BLAS as well, as do float64 tiles.
The micro-kernels sum each dot product in order along the shared dimension;
results match BLAS to float32 rounding, not bit for bit.
"""
import numpy as np
import llvmlite.binding as llvm
from numba import cfunc, njit, types
from numba.extending import intrinsic, overload

from .._config import config
from ._fastmath import FASTMATH
from ._simd import LANES, vadd, vfma, vload, vsplat, vstore, vzero

MR = 6                #: output rows per micro-kernel call
PANEL = 4 * LANES     #: output columns per micro-kernel call (and per packed panel of Bᵀ)


def _micro_source(vectors):
    """Source of the micro-kernel with ``vectors`` 16-lane columns: C[mr, 16 vectors] (+)= A B."""
    acc = [[f"c{i}{j}" for j in range(vectors)] for i in range(MR)]
    lines = [f"def micro{vectors}(a, a_at, a_rs, a_cs, b, b_at, ldb, k, c, c_at, ldc, mr, accumulate):"]
    lines += [f"    r{i} = a_at + min({i}, mr - 1) * a_rs" for i in range(MR)]  # rows past mr repeat the last
    lines += [f"    {name} = vzero()" for row in acc for name in row]
    lines += ["    for kk in range(k):", "        at = b_at + kk * ldb", "        step = kk * a_cs"]
    lines += [f"        b{j} = vload(b, at + {j * LANES})" for j in range(vectors)]
    for i in range(MR):
        lines.append(f"        x = vsplat(a[r{i} + step])")
        lines += [f"        {acc[i][j]} = vfma(x, b{j}, {acc[i][j]})" for j in range(vectors)]
    for i in range(MR):
        lines.append(f"    if mr > {i}:")
        for j in range(vectors):
            at = f"c_at + {i} * ldc + {j * LANES}"
            lines.append(f"        vstore(c, {at}, vadd(vload(c, {at}), {acc[i][j]}) if accumulate else {acc[i][j]})")
    return "\n".join(lines)


def _make_micro(vectors):
    scope = dict(vzero=vzero, vload=vload, vsplat=vsplat, vfma=vfma, vadd=vadd, vstore=vstore)
    exec(compile(_micro_source(vectors), f"<fastattn micro-kernel {vectors}>", "exec"), scope)
    return njit(fastmath=FASTMATH, cache=False, nogil=True)(scope[f"micro{vectors}"])


_micro1, _micro2, _micro3, _micro4 = (_make_micro(v) for v in range(1, 5))


@intrinsic
def _first(typingctx, arr):
    """A pointer to ``arr``'s first element, whatever its layout (strides are the caller's business;
    :func:`._simd.data_of` takes C-contiguous arrays only)."""
    if not isinstance(arr, types.Array):
        return None

    def codegen(context, builder, sig, args):
        return context.make_array(sig.args[0])(context, builder, args[0]).data

    return types.CPointer(arr.dtype)(arr), codegen


_F32P = types.CPointer(types.float32)
#: ``_product``'s C signature: pointers and element offsets; ``accumulate`` 0 or 1
_PRODUCT_SIG = types.void(_F32P, types.intp, types.intp, types.intp, _F32P, types.intp, types.intp, types.intp,
                          _F32P, types.intp, types.intp, types.intp, types.intp, types.intp)


@cfunc(_PRODUCT_SIG, cache=True, fastmath=FASTMATH)
def _product_c(a, a_at, a_rs, a_cs, b, b_at, ldb, k, c, c_at, ldc, m, n, accumulate):
    """C[m, n] (+)= A[m, k] B[k, n] on pointers: ``A[i, kk] = a[a_at + i a_rs + kk a_cs]``,
    ``B[kk, j] = b[b_at + kk ldb + j]``, ``C[i, j] = c[c_at + i ldc + j]``; ``n`` a multiple of 16."""
    for j0 in range(0, n, PANEL):
        vectors = min(PANEL, n - j0) // LANES
        for i0 in range(0, m, MR):
            args = (a, a_at + i0 * a_rs, a_rs, a_cs, b, b_at + j0, ldb, k, c, c_at + i0 * ldc + j0, ldc,
                    min(MR, m - i0), accumulate != 0)
            if vectors == 4:
                _micro4(*args)
            elif vectors == 3:
                _micro3(*args)
            elif vectors == 2:
                _micro2(*args)
            else:
                _micro1(*args)


# The kernels call the product through a symbol, so that the micro-kernels are compiled once (and cached)
# instead of into every kernel that uses them, which added 4-7 s to each of those kernels' first compile.
# numba's cache of a calling kernel does not see this file: change the symbol's name with its signature,
# so that a stale cached caller fails to link instead of calling with the old arguments.
_SYMBOL = "fastattn_tile_product_v1"
llvm.add_symbol(_SYMBOL, _product_c.address)
_product = types.ExternalFunction(_SYMBOL, _PRODUCT_SIG)


def _row_stride(x):
    """Elements between rows of a 2-d array whose rows are contiguous."""


@overload(_row_stride, inline="always")
def _row_stride_impl(x):
    size = x.dtype.bitwidth // 8
    return lambda x: x.strides[0] // size


@njit(inline="always")
def _simd_ok(simd, a, b, out):
    """Whether the micro-kernels take this float32 product: asked for, output columns a multiple of 16,
    every operand's rows unit-stride."""
    return (simd and out.shape[1] % LANES == 0 and out.shape[0] > 0
            and a.strides[1] == 4 and b.strides[1] == 4 and out.strides[1] == 4)


def takes_micro(simd, a, b, out):
    """Whether ``add_matmul``/``add_matmul_tn`` of these operands runs on the micro-kernels (else BLAS)."""


def _all_float32(*arrays):
    """At typing time: whether every array is float32 (the micro-kernels' one dtype)."""
    return all(x.dtype == types.float32 for x in arrays)


@overload(takes_micro, inline="always")
def _takes_micro(simd, a, b, out):
    if not _all_float32(a, b, out):
        return lambda simd, a, b, out: False
    return lambda simd, a, b, out: _simd_ok(simd, a, b, out)


def add_matmul(a, b, out, scratch, simd):
    """``out += a @ b`` (2-d arrays with contiguous rows); ``scratch``, shaped like ``out``, holds the product
    where BLAS computes it."""


def add_matmul_tn(a, b, out, scratch, simd):
    """``out += a.T @ b`` (2-d arrays with contiguous rows): ``a`` is read transposed, in place."""


#: rows of the shared dimension per packed block of ``B`` (:func:`matmul_packed`)
KC = 256


def matmul_packed(a, b, out, buf, simd):
    """``out = a @ b`` for large operands (the projections' GEMMs; ``a`` with unit-stride rows, ``b`` in
    any layout, e.g. a weight's transpose): ``b`` is copied into contiguous blocks of ``KC`` rows by 64
    columns (``buf``: ``KC * PANEL`` elements) before the micro-kernels walk them, so that its rows, a
    whole weight row apart, do not thrash the caches."""


def matmul_packed_tn(a, b, out, buf, simd):
    """``out = a.T @ b`` as :func:`matmul_packed` (``a`` may be a block of columns of a wider array)."""


@njit(fastmath=FASTMATH, nogil=True)
def _packed_product(pa, a_rs, a_cs, b, pc, ldc, m, buf):
    """The loops of :func:`matmul_packed` on ``A[i, kk] = pa[i a_rs + kk a_cs]``, ``C = pc`` (row stride
    ``ldc``); the first block of ``B`` writes ``C``, the others add to it."""
    k, n = b.shape
    pb = _first(buf)
    for k0 in range(0, k, KC):
        kb = min(KC, k - k0)
        for j0 in range(0, n, PANEL):
            width = min(PANEL, n - j0)
            panel = buf[:kb * width].reshape(kb, width)
            if b.strides[0] >= b.strides[1]:  # rows of b contiguous: copy them
                for r in range(kb):
                    panel[r, :] = b[k0 + r, j0:j0 + width]
            else:  # columns contiguous (a weight's transpose): read them down
                for j in range(width):
                    column = b[k0:k0 + kb, j0 + j]
                    for r in range(kb):
                        panel[r, j] = column[r]
            _product(pa, k0 * a_cs, a_rs, a_cs, pb, 0, width, kb, pc, j0, ldc, m, width, 1 if k0 > 0 else 0)


# The BLAS paths take the same arguments as the products they stand in for (simd, panels unused).
@njit(fastmath=FASTMATH, nogil=True)
def _blas_add_matmul(a, b, out, scratch, simd):
    np.dot(a, b, scratch)
    out += scratch


@njit(fastmath=FASTMATH, nogil=True)
def _blas_add_matmul_tn(a, b, out, scratch, simd):
    np.dot(a.T, b, scratch)
    out += scratch


@njit(fastmath=FASTMATH, nogil=True)
def _blas_matmul_nt(a, b, panels, out, simd):
    np.dot(a, b.T, out)


@njit(fastmath=FASTMATH, nogil=True)
def _blas_matmul(a, b, out, simd):
    np.dot(a, b, out)


@njit(fastmath=FASTMATH, nogil=True)
def _blas_matmul_tn(a, b, out, simd):
    np.dot(np.ascontiguousarray(a).T, b, out)  # a block of columns: BLAS wants it contiguous


def _steps_of(transposed):
    """``A``'s element steps along a row and down a column, and its shared length, for ``A = a`` or
    ``A = a.T`` (read in place)."""
    if transposed:
        return njit(inline="always")(lambda a: (1, _row_stride(a), a.shape[0]))
    return njit(inline="always")(lambda a: (_row_stride(a), 1, a.shape[1]))


def _adding(transposed, blas):
    """The implementation of :func:`add_matmul` (``transposed``: :func:`add_matmul_tn`)."""
    steps = _steps_of(transposed)

    def typed(a, b, out, scratch, simd):
        if not _all_float32(a, b, out):
            return lambda a, b, out, scratch, simd: blas(a, b, out, scratch, simd)

        def product(a, b, out, scratch, simd):
            if not _simd_ok(simd, a, b, out):
                blas(a, b, out, scratch, simd)
                return
            a_rs, a_cs, k = steps(a)
            _product(_first(a), 0, a_rs, a_cs, _first(b), 0, _row_stride(b), k, _first(out), 0,
                     _row_stride(out), out.shape[0], out.shape[1], 1)
        return product
    return typed


def _packing(transposed, blas):
    """The implementation of :func:`matmul_packed` (``transposed``: :func:`matmul_packed_tn`)."""
    steps = _steps_of(transposed)

    def typed(a, b, out, buf, simd):
        if not _all_float32(a, b, out):
            return lambda a, b, out, buf, simd: blas(a, b, out, simd)

        def product(a, b, out, buf, simd):
            if not _simd_ok(simd, a, a, out) or b.shape[0] == 0:  # b is read only by the packing, in any layout
                blas(a, b, out, simd)
                return
            a_rs, a_cs, _ = steps(a)
            _packed_product(_first(a), a_rs, a_cs, b, _first(out), _row_stride(out), out.shape[0], buf)
        return product
    return typed


overload(add_matmul, fastmath=FASTMATH)(_adding(False, _blas_add_matmul))
overload(add_matmul_tn, fastmath=FASTMATH)(_adding(True, _blas_add_matmul_tn))
overload(matmul_packed, fastmath=FASTMATH)(_packing(False, _blas_matmul))
overload(matmul_packed_tn, fastmath=FASTMATH)(_packing(True, _blas_matmul_tn))


def pack_transposed(b, panels, simd):
    """Pack ``b [n, k]`` as the columns of ``Bᵀ`` for :func:`matmul_nt`: panels of 64 keys (the last one
    narrower), each ``[k, width]`` row-major, one after the other in the flat ``panels`` (``n k``
    elements or more).  Skipped where :func:`matmul_nt` is sure to take BLAS (no ``simd``, not float32,
    ``n`` not a multiple of 16); the panels must then be packed whenever it may take the micro-kernels."""


@overload(pack_transposed, fastmath=FASTMATH)
def _pack_transposed(b, panels, simd):
    if b.dtype != types.float32:
        return lambda b, panels, simd: None

    def pack(b, panels, simd):
        n, k = b.shape
        if not simd or n % LANES != 0:
            return
        for j0 in range(0, n, PANEL):
            width = min(PANEL, n - j0)
            panel = panels[j0 * k:(j0 + width) * k].reshape(k, width)
            for j in range(width):
                row = b[j0 + j]
                for d in range(k):
                    panel[d, j] = row[d]
    return pack


def matmul_nt(a, b, panels, out, simd):
    """``out = a @ b.T`` with ``panels`` from :func:`pack_transposed` ``(b, panels, simd)`` (``out`` is
    ``[a.shape[0], b.shape[0]]``)."""


@overload(matmul_nt, fastmath=FASTMATH)
def _matmul_nt(a, b, panels, out, simd):
    if not _all_float32(a, b, out):
        return lambda a, b, panels, out, simd: _blas_matmul_nt(a, b, panels, out, simd)

    def product(a, b, panels, out, simd):
        if not _simd_ok(simd, a, a, out):  # b is read only by the packing, in any layout
            _blas_matmul_nt(a, b, panels, out, simd)
            return
        k = a.shape[1]
        pa, pp, pc = _first(a), _first(panels), _first(out)
        lda, ldc, n = _row_stride(a), _row_stride(out), out.shape[1]
        for j0 in range(0, n, PANEL):
            width = min(PANEL, n - j0)
            _product(pa, 0, lda, 1, pp, j0 * k, width, k, pc, j0, ldc, out.shape[0], width, 0)
    return product


def target_has_avx512():
    """Whether numba compiles for a CPU with AVX-512 (its ``NUMBA_CPU_FEATURES``, else this CPU's)."""
    from numba.core import config as numba_config

    features = numba_config.CPU_FEATURES
    if features is None:
        features = llvm.get_host_cpu_features().flatten()
    return "+avx512f" in features.split(",")


def simd_gemm():
    """Whether the kernels' float32 tile products run on the micro-kernels (``fastattn.config.cpu_gemm``:
    ``"auto"``, the default, where numba's target has AVX-512; ``"simd"``; ``"blas"``)."""
    choice = config.cpu_gemm
    if choice not in ("auto", "simd", "blas"):
        raise ValueError(f"fastattn.config.cpu_gemm: expected 'auto', 'simd' or 'blas', got {choice!r}")
    if choice == "auto":
        return _auto()
    return choice == "simd"


_AUTO = []


def _auto():
    if not _AUTO:
        _AUTO.append(target_has_avx512())
    return _AUTO[0]
