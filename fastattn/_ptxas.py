"""What ptxas and the PTX say about a kernel, and what the occupancy calculator makes of it.

The pieces of ``python -m fastattn cuda-report`` (:mod:`fastattn._cuda_report`)
that need no compiler: the parsers of ``ptxas -v`` reports and of PTX text,
the per-SM limits by compute capability and the theoretical occupancy, plus
finding ``ptxas`` itself.
"""
import os
import re
import shutil
from collections import namedtuple
from pathlib import Path

#: Per-SM limits of the CUDA occupancy calculator, by compute capability:
#: threads, blocks, 32-bit registers, shared memory per SM and per block, the
#: shared memory the driver reserves per block, and its allocation unit (bytes).
SMLimits = namedtuple("SMLimits", "threads blocks registers smem smem_block smem_reserved smem_unit")
KIB = 1024
SM_LIMITS = {
    (7, 0): SMLimits(2048, 32, 65536, 96 * KIB, 96 * KIB, 0, 256),
    (7, 5): SMLimits(1024, 16, 65536, 64 * KIB, 64 * KIB, 0, 256),
    (8, 0): SMLimits(2048, 32, 65536, 164 * KIB, 163 * KIB, KIB, 128),
    (8, 6): SMLimits(1536, 16, 65536, 100 * KIB, 99 * KIB, KIB, 128),
    (8, 7): SMLimits(2048, 16, 65536, 164 * KIB, 163 * KIB, KIB, 128),
    (8, 9): SMLimits(1536, 24, 65536, 100 * KIB, 99 * KIB, KIB, 128),
    (9, 0): SMLimits(2048, 32, 65536, 228 * KIB, 227 * KIB, KIB, 128),
}
_WARP = 32
_REG_UNIT = 256        # registers are allocated per warp in units of 256
_SUB_PARTITIONS = 4    # ... and in each of the SM's four quarters (cuda_occupancy.h)
_MAX_BLOCK_THREADS = 1024


# --- the toolchain --------------------------------------------------------------------------------

def find_ptxas():
    """The path of a ``ptxas`` executable, or None.

    Looks where numba-cuda's NVVM comes from first (the ``nvidia-cuda-nvcc``
    wheel, through ``cuda.pathfinder``), then ``CUDA_HOME``/``CUDA_PATH``, then
    ``PATH``.

    Examples
    --------
    >>> path = find_ptxas()
    >>> path is None or os.path.basename(path).startswith("ptxas")
    True
    """
    try:
        from cuda.pathfinder import find_nvidia_binary_utility

        found = find_nvidia_binary_utility("ptxas")
        if found:
            return found
    except Exception:  # an older cuda-pathfinder without binary look-up, or none at all
        pass
    exe = "ptxas.exe" if os.name == "nt" else "ptxas"
    try:
        import nvidia.cuda_nvcc

        dirs = [Path(base, "bin") for base in nvidia.cuda_nvcc.__path__]
    except ImportError:
        dirs = []
    dirs += [Path(os.environ[var], "bin") for var in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(var)]
    for folder in dirs:
        if (folder / exe).is_file():
            return str(folder / exe)
    return shutil.which("ptxas")


# --- reading the compiler's output ----------------------------------------------------------------

def parse_ptxas(text):
    """Resource usage from the ``ptxas -v`` report of one kernel.

    Parameters
    ----------
    text : str
        What ``ptxas -v`` printed for a PTX file holding one kernel entry and
        the device functions it calls.

    Returns
    -------
    dict
        ``registers`` (of the entry), ``spill_bytes`` (spill stores plus spill
        loads) and ``stack_frame`` (bytes), both summed over the entry and the
        functions it calls, and ``smem_static`` (bytes; 0 when ptxas names none).

    Examples
    --------
    >>> parse_ptxas('''ptxas info    : Function properties for kernel
    ...     16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
    ... ptxas info    : Used 40 registers, used 1 barriers, 2048 bytes smem, 400 bytes cmem[0]''')
    {'registers': 40, 'spill_bytes': 12, 'stack_frame': 16, 'smem_static': 2048}
    """
    registers = [int(n) for n in re.findall(r"Used (\d+) registers", text)]
    smem = [int(n) for n in re.findall(r"(\d+) bytes smem", text)]
    stack = [int(n) for n in re.findall(r"(\d+) bytes stack frame", text)]
    spills = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)]
    return {"registers": max(registers, default=0), "spill_bytes": sum(spills), "stack_frame": sum(stack),
            "smem_static": max(smem, default=0)}


def _opcodes(ptx):
    """The opcode of every instruction line of a PTX text (no directives, labels or comments)."""
    for line in ptx.splitlines():
        code = line.split("//", 1)[0].strip()
        code = re.sub(r"^@!?%\w+\s+", "", code)  # a guard predicate
        if not code or code[0] in ".{}()$" or code.endswith(":"):
            continue
        yield code.split(None, 1)[0].rstrip(";")


def count_f64(ptx):
    """How many PTX instructions have a ``.f64`` type (arithmetic, conversions, loads, stores, moves).

    Examples
    --------
    >>> count_f64('''.reg .f64 %fd<4>;
    ...     cvt.f64.f32   %fd1, %f1;   // widen
    ...     fma.rn.f64    %fd2, %fd1, %fd1, %fd1;
    ...     @%p1 cvt.rn.f32.f64 %f2, %fd2;
    ...     add.f32       %f3, %f2, %f2;''')
    3
    """
    return sum("f64" in opcode.split(".")[1:] for opcode in _opcodes(ptx))


def count_mma(ptx):
    """How many PTX instructions are tensor-core matrix multiply-adds (``mma``/``wmma``).

    Examples
    --------
    >>> count_mma('''mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%f1, %f2, %f3, %f4}, {%r1}, {%r2}, {%f5};
    ...     wmma.mma.sync.aligned.row.col.m16n16k16.f32.f32 {%f1}, {%r1}, {%r2}, {%f2};
    ...     fma.rn.f32 %f1, %f2, %f3, %f4;''')
    2
    """
    return sum(opcode.startswith(("mma", "wmma")) for opcode in _opcodes(ptx))


# --- occupancy ------------------------------------------------------------------------------------

def occupancy(cc, block_threads, registers, smem_static):
    """Theoretical occupancy: resident warps over the SM's maximum, as the CUDA occupancy calculator.

    Parameters
    ----------
    cc : tuple of int
        Compute capability ``(major, minor)``, one of :data:`SM_LIMITS`.
    block_threads : int
        Threads per block.
    registers : int
        Registers per thread (allocated per warp in units of 256).
    smem_static : int
        Static shared memory per block, in bytes (the driver adds its own
        reserve per block on sm_80 and later).

    Returns
    -------
    float
        A fraction in ``[0, 1]``; 0 when one block does not fit on an SM.

    Raises
    ------
    ValueError
        For a compute capability outside the table.

    Examples
    --------
    >>> occupancy((9, 0), 256, 32, 0), occupancy((9, 0), 256, 64, 0), occupancy((9, 0), 256, 128, 0)
    (1.0, 0.5, 0.25)
    >>> occupancy((9, 0), 64, 32, 48 * 1024)   # 4 blocks of 2 warps fit in 228 KiB
    0.125
    """
    limits = sm_limits(cc)
    max_warps = limits.threads // _WARP
    warps = -(-block_threads // _WARP)
    if not 0 < block_threads <= min(_MAX_BLOCK_THREADS, limits.threads) or smem_static > limits.smem_block:
        return 0.0
    blocks = min(limits.blocks, max_warps // warps)
    if registers > 0:
        per_warp = -(-registers * _WARP // _REG_UNIT) * _REG_UNIT
        if per_warp * -(-warps // _SUB_PARTITIONS) * _SUB_PARTITIONS > limits.registers:
            return 0.0
        warps_by_regs = limits.registers // _SUB_PARTITIONS // per_warp * _SUB_PARTITIONS
        blocks = min(blocks, warps_by_regs // warps)
    per_block = -(-(smem_static + limits.smem_reserved) // limits.smem_unit) * limits.smem_unit
    if per_block > 0:
        blocks = min(blocks, limits.smem // per_block)
    return blocks * warps / max_warps


def sm_limits(cc):
    """The :class:`SMLimits` of a compute capability ``(major, minor)``; ValueError outside the table.

    Examples
    --------
    >>> sm_limits((9, 0)).smem // KIB
    228
    """
    try:
        return SM_LIMITS[tuple(cc)]
    except (KeyError, TypeError):
        known = ", ".join(f"{a}.{b}" for a, b in SM_LIMITS)
        raise ValueError(f"cc: expected a compute capability (major, minor), one of {known}, got {cc!r}") from None


def parse_cc(text):
    """``"9.0"`` -> ``(9, 0)``, for a compute capability of :data:`SM_LIMITS`.

    Examples
    --------
    >>> parse_cc("8.6")
    (8, 6)
    """
    match = re.fullmatch(r"\s*(\d+)\.(\d)\s*", str(text))
    cc = (int(match.group(1)), int(match.group(2))) if match else None
    if cc not in SM_LIMITS:
        known = ", ".join(f"{a}.{b}" for a, b in SM_LIMITS)
        raise ValueError(f"--cc: expected a compute capability X.Y, one of {known}, got {text!r}")
    return cc


