"""``python -m fastattn cuda-report``: what each CUDA kernel compiles to, without a GPU.

Every CUDA kernel module (:mod:`fastattn.cuda.attention`, ``paged``, ``gqa``,
``projection``) lists its specialisations with ``variants(head_dims=None)``
(:class:`fastattn.cuda._launch.Variant`).  For each one this module compiles
the kernel to PTX with NVVM (``numba.cuda.compile_ptx``; a tensor-core kernel
to LTO-IR, linked with its CUDA C++ helpers by nvJitLink into PTX, the code a
GPU would load), assembles it with
``ptxas -v`` for a compute capability, and reads back what DESIGN.md holds the
kernels to: registers, spilled bytes, stack frame, static shared memory, the
theoretical occupancy, and the float64 and ``mma`` instructions in the PTX.
``tests/test_cuda_report.py`` enforces the rules (:data:`RULES`) on the rows.

NVVM and ptxas come from pip (``pip install "fastattn[cuda-check]"``); no GPU
and no driver are needed, but numba's CUDA simulator must be off.
"""
import functools
import importlib
import re
import subprocess
import tempfile
import warnings
from collections import namedtuple
from pathlib import Path

from ._ptxas import (KIB, SM_LIMITS, count_f64, count_mma, find_ptxas, occupancy, parse_cc,  # noqa: F401
                     parse_ptxas, sm_limits)

#: The modules whose ``variants(head_dims=None)`` the report collects.
KERNEL_MODULES = ("fastattn.cuda.attention", "fastattn.cuda.paged", "fastattn.cuda.gqa",
                  "fastattn.cuda.projection", "fastattn.cuda.rotary")

#: The keys of every row, in table order (``error`` is None for a kernel that compiles).
KEYS = ("kernel", "role", "dtype", "head_dim", "block_threads", "registers", "spill_bytes", "stack_frame",
        "smem_static", "occupancy", "f64_ops", "mma_ops", "compiles", "ptx_file", "error")

INSTALL_HINT = 'pip install "fastattn[cuda-check]" (or pip install "numba-cuda[cu12]")'


# --- the toolchain --------------------------------------------------------------------------------

def missing_toolchain():
    """Why the report cannot be built here (a sentence), or None when it can.

    Examples
    --------
    >>> reason = missing_toolchain()
    >>> reason is None or "NUMBA_ENABLE_CUDASIM" in reason or "pip install" in reason
    True
    """
    import numba

    if numba.config.ENABLE_CUDASIM:
        return ("cuda-report compiles the kernels with NVVM and ptxas, which numba's CUDA simulator "
                "replaces: run it with the simulator off (unset NUMBA_ENABLE_CUDASIM)")
    try:
        from numba.cuda.cudadrv import nvvm

        has_nvvm = nvvm.is_available()
    except Exception:
        has_nvvm = False
    try:  # NVRTC and nvJitLink, for the tensor-core kernels' linked CUDA C++
        from cuda.core import Linker, Program  # noqa: F401

        has_linker = True
    except Exception:
        has_linker = False
    missing = [name for name, ok in (("NVVM (libnvvm)", has_nvvm), ("ptxas", find_ptxas() is not None),
                                     ("NVRTC/nvJitLink (cuda.core)", has_linker)) if not ok]
    if missing:
        return (f"cuda-report needs NVVM, ptxas, NVRTC and nvJitLink; {' and '.join(missing)} not found: "
                f"{INSTALL_HINT}")
    return None


# --- the report -----------------------------------------------------------------------------------

def collect_variants(head_dims=None):
    """Every kernel variant of :data:`KERNEL_MODULES`; a module without ``variants`` adds none.

    Parameters
    ----------
    head_dims : sequence of int, optional
        The head-dimension buckets to list; None lists every bucket.

    Returns
    -------
    list of fastattn.cuda._launch.Variant

    Examples
    --------
    >>> all(v.role in ("forward", "decode", "backward", "other") for v in collect_variants((64,)))
    True
    """
    found = []
    for name in KERNEL_MODULES:
        variants = getattr(importlib.import_module(name), "variants", None)
        if variants is not None:
            found += variants(head_dims=None if head_dims is None else tuple(head_dims))
    return found


@functools.lru_cache(maxsize=512)
def _compile(py_func, signature, cc, fastmath, launch_bounds, link=()):
    from numba import cuda

    options = {} if launch_bounds is None else {"launch_bounds": launch_bounds}
    with warnings.catch_warnings():
        # the report reads the code; compile-time advice is the kernels' own tests' business
        warnings.simplefilter("ignore")
        if not link:
            return cuda.compile_ptx(py_func, signature, cc=cc, fastmath=fastmath, **options)[0]
        ltoir = cuda.compile(py_func, signature, device=False, abi="numba", output="ltoir", cc=cc,
                             fastmath=fastmath, **options)[0]
    return link_ptx(ltoir, link, cc)


@functools.lru_cache(maxsize=16)
def _source_ltoir(path, cc):
    """LTO-IR of a CUDA C++ source for ``cc`` (NVRTC, as numba-cuda compiles a ``link`` source)."""
    from cuda.core import Program, ProgramOptions

    options = ProgramOptions(arch=f"sm_{cc[0]}{cc[1]}", link_time_optimization=True,
                             relocatable_device_code=True)
    return Program(Path(path).read_text(), "c++", options).compile("ltoir")


def link_ptx(ltoir, sources, cc):
    """The PTX of a kernel's LTO-IR linked with CUDA C++ ``sources`` by nvJitLink with link-time
    optimisation (what ``cuda.jit(..., lto=True)`` loads on a GPU, here as PTX for ptxas): the
    sources' device functions are inlined into the kernel."""
    from cuda.core import Linker, LinkerOptions, ObjectCode

    objects = [_source_ltoir(str(path), tuple(cc)) for path in sources]
    options = LinkerOptions(arch=f"sm_{cc[0]}{cc[1]}", link_time_optimization=True, ptx=True)
    code = Linker(*objects, ObjectCode.from_ltoir(ltoir), options=options).link("ptx").code
    return bytes(code).rstrip(b"\0").decode()


def compile_variant(variant, cc):
    """The PTX of one variant for a compute capability (cached per function, signature and options).

    ``fastmath`` and ``launch_bounds`` come from the variant where it has those
    attributes, else from the ``cuda.jit`` options of a ``py_func`` that is a
    dispatcher (compiled from its Python function), else are off.

    Examples
    --------
    >>> from numba import float32, cuda
    >>> from fastattn.cuda._launch import Variant
    >>> def twice(x):
    ...     x[cuda.grid(1)] *= float32(2)
    >>> ptx = compile_variant(Variant("twice", "other", "float32", 0, 32, twice, (float32[::1],)), (8, 0))
    >>> ".target sm_80" in ptx and count_f64(ptx)
    0
    """
    if _ptx_key(variant, cc) in _from_workers:
        return _from_workers[_ptx_key(variant, cc)]
    func = variant.py_func
    jit_options = getattr(func, "targetoptions", {})

    def option(name, default):
        value = getattr(variant, name, None)
        return jit_options.get(name, default) if value is None else value

    launch_bounds = option("launch_bounds", None)
    return _compile(getattr(func, "py_func", func), tuple(variant.signature), tuple(cc),
                    bool(option("fastmath", False)),
                    tuple(launch_bounds) if isinstance(launch_bounds, list) else launch_bounds,
                    tuple(getattr(variant, "link", ())))


def row_id(row):
    """A short readable name of a row or variant: ``forward-float16-d64``.

    Examples
    --------
    >>> row_id({"kernel": "forward", "dtype": "float16", "head_dim": 64})
    'forward-float16-d64'
    """
    get = row.get if isinstance(row, dict) else lambda key: getattr(row, key)
    return f"{get('kernel')}-{get('dtype')}-d{get('head_dim')}"


#: PTX that worker processes compiled, by :func:`_ptx_key`, for :func:`compile_variant` to reuse.
_from_workers = {}


def _ptx_key(variant, cc):
    return (row_id(variant), repr(tuple(variant.signature)), variant.launch_bounds, tuple(cc))


def _compile_listed(head_dims, ptx_cc, indices):
    """Worker of :func:`report`: ``{index: (key, PTX or the exception)}`` for some collected variants."""
    variants = collect_variants(head_dims)
    out = {}
    for i in indices:
        if i >= len(variants):
            continue
        try:
            ptx = compile_variant(variants[i], ptx_cc)
        except Exception as err:  # reported in the row, like a compile in the parent
            ptx = err
        out[i] = (_ptx_key(variants[i], ptx_cc), ptx)
    return out


def _compile_in_parallel(head_dims, ptx_cc, indices, jobs):
    """NVVM compiles of some collected variants in ``jobs`` fresh processes (spawned: each imports
    fastattn and lists the variants itself, so nothing unpicklable crosses)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    head_dims = None if head_dims is None else tuple(head_dims)
    shares = [indices[k::jobs] for k in range(jobs)]
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        done = {}
        for part in pool.map(_compile_listed, [head_dims] * jobs, [ptx_cc] * jobs, shares):
            done.update(part)
    return done


def report(cc=(9, 0), head_dims=None, ptx_dir=None, *, variants=None, ptx_cc=None, jobs=1):
    """Compile every CUDA kernel variant for ``cc`` and report what ptxas made of it.

    Parameters
    ----------
    cc : tuple of int, default (9, 0)
        Compute capability that ptxas assembles for (one of :data:`SM_LIMITS`).
    head_dims : sequence of int, optional
        Head-dimension buckets, passed to each module's ``variants``; None: all.
    ptx_dir : str or path, optional
        Keep each kernel's PTX there as ``<kernel>-<dtype>-d<head_dim>.ptx``
        (``ptx_file`` in the rows); by default it goes to a temporary folder.
    variants : list of Variant, optional
        Report these instead of :func:`collect_variants`.
    ptx_cc : tuple of int, optional
        Compute capability NVVM targets (default ``cc``).  PTX for an older
        target assembles for a newer one, so reports for several ``cc`` can
        share one NVVM compile (the f64/mma counts then come from that PTX).
    jobs : int, default 1
        Processes that run the NVVM compiles of the collected variants (the slow
        part); ignored with ``variants``, which may not be picklable.

    Returns
    -------
    list of dict
        One row per variant built for ``ptx_cc`` (tensor-core kernels from 8.0), with the keys :data:`KEYS`.  ``occupancy`` is a
        fraction; a variant that NVVM or ptxas rejects has ``compiles=False``,
        the compiler's message in ``error`` and None for what it could not measure.

    Raises
    ------
    RuntimeError
        Without NVVM or ptxas, or under the CUDA simulator (:func:`missing_toolchain`).

    Examples
    --------
    >>> from numba import float32, cuda
    >>> from fastattn.cuda._launch import Variant
    >>> def twice(x):
    ...     x[cuda.grid(1)] *= float32(2)
    >>> [row] = report((8, 0), variants=[Variant("twice", "other", "float32", 0, 256, twice, (float32[::1],))])
    >>> row["compiles"], row["f64_ops"], row["spill_bytes"], row["occupancy"]
    (True, 0, 0, 1.0)
    """
    reason = missing_toolchain()
    if reason:
        raise RuntimeError(reason)
    sm_limits(cc)
    cc = tuple(cc)
    ptx_cc = cc if ptx_cc is None else tuple(ptx_cc)
    compiled = {}
    if variants is None:
        variants = collect_variants(head_dims)
        todo = [i for i, v in enumerate(variants)
                if _supported(v, ptx_cc) and _ptx_key(v, ptx_cc) not in _from_workers]
        if jobs > 1 and len(todo) > 1:
            try:
                done = _compile_in_parallel(head_dims, ptx_cc, todo, min(jobs, len(todo)))
            except (OSError, RuntimeError) as err:  # e.g. a __main__ that spawned workers cannot import
                warnings.warn(f"cuda-report: compiling in one process ({type(err).__name__}: {err})")
                done = {}
            # a worker's variant list may differ from this one (a patched or configured list): match keys
            compiled = {i: ptx for i, (key, ptx) in done.items() if key == _ptx_key(variants[i], ptx_cc)}
            _from_workers.update((_ptx_key(variants[i], ptx_cc), ptx) for i, ptx in compiled.items()
                                 if isinstance(ptx, str))
    variants = list(variants)
    ptxas = find_ptxas()
    with tempfile.TemporaryDirectory(prefix="fastattn-cuda-report-") as scratch:
        folder = Path(scratch) if ptx_dir is None else Path(ptx_dir)
        folder.mkdir(parents=True, exist_ok=True)
        rows, used = [], set()
        for i, v in enumerate(variants):
            if not _supported(v, ptx_cc):
                continue
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", row_id(v))  # merge->float16: no '>' in a file name
            path = folder / f"{name}.ptx"
            n = 2
            while path.name in used:
                path, n = folder / f"{name}-{n}.ptx", n + 1
            used.add(path.name)
            rows.append(_measure(v, cc, ptx_cc, path, Path(scratch), ptxas, keep=ptx_dir is not None,
                                 ptx=compiled.get(i)))
    return rows


def _supported(variant, cc):
    """Whether ``variant`` is built for compute capability ``cc`` (tensor-core kernels need 8.0)."""
    return variant.min_cc is None or tuple(cc) >= tuple(variant.min_cc)


def _measure(variant, cc, ptx_cc, path, scratch, ptxas, keep, ptx=None):
    row = dict.fromkeys(KEYS)
    row.update(kernel=variant.kernel, role=variant.role, dtype=variant.dtype, head_dim=variant.head_dim,
               block_threads=variant.block_threads, compiles=False)
    try:
        if isinstance(ptx, Exception):
            raise ptx
        if ptx is None:
            ptx = compile_variant(variant, ptx_cc)
    except Exception as err:
        row["error"] = f"compile_ptx: {type(err).__name__}: {err}".strip()
        return row
    path.write_text(ptx, encoding="utf-8")
    row.update(f64_ops=count_f64(ptx), mma_ops=count_mma(ptx), ptx_file=str(path) if keep else None)
    # a kernel that calls a linked (extern) helper assembles as relocatable code: its own usage
    relocatable = ["-c"] if re.search(r"^\s*\.extern\s+\.func", ptx, re.M) else []
    cmd = [ptxas, "-v", *relocatable, f"-arch=sm_{cc[0]}{cc[1]}", str(path), "-o", str(scratch / "out.cubin")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    text = f"{done.stdout}\n{done.stderr}".strip()
    if done.returncode != 0:
        errors = [line for line in text.splitlines() if "error" in line.lower()]
        row["error"] = "ptxas: " + "\n".join(errors or text.splitlines()[-5:])
        return row
    row.update(parse_ptxas(text), compiles=True)
    row["occupancy"] = occupancy(cc, variant.block_threads, row["registers"], row["smem_static"])
    return row


# --- the rules (tests/test_cuda_report.py enforces them; the command summarises) ------------------

Rule = namedtuple("Rule", "name applies holds")
RULES = (
    Rule("compiles", lambda r: True, lambda r: r["compiles"]),
    Rule("no float64 instructions", lambda r: r["dtype"] != "float64", lambda r: r["f64_ops"] == 0),
    Rule("no spills", lambda r: True, lambda r: r["spill_bytes"] == 0),
    Rule("no stack frame", lambda r: r["role"] in ("forward", "decode"), lambda r: r["stack_frame"] == 0),
    Rule("static smem <= 48 KiB", lambda r: True, lambda r: r["smem_static"] <= 48 * KIB),
    Rule("occupancy >= 25%", lambda r: r["role"] == "forward", lambda r: r["occupancy"] >= 0.25),
    Rule("occupancy >= 50%", lambda r: r["role"] == "decode", lambda r: r["occupancy"] >= 0.5),
    Rule("mma in tensor-core kernels", lambda r: r["kernel"].endswith("-mma"), lambda r: r["mma_ops"] > 0),
)
#: (role or None for any, dtype) pairs that must have a row.
REQUIRED = tuple((role, dtype) for role in ("forward", "backward")
                 for dtype in ("float32", "float64", "float16", "bfloat16")) + (
    (None, "float8_e4m3fn"), (None, "float8_e5m2"))


def violations(rows):
    """``{rule name: [row ids]}`` of the rules that some row breaks, and ``missing`` required rows.

    A row that does not compile breaks ``compiles`` only.

    Examples
    --------
    >>> row = dict(kernel="decode", role="decode", dtype="float16", head_dim=64, compiles=True, f64_ops=0,
    ...            spill_bytes=8, stack_frame=0, smem_static=0, occupancy=0.75)
    >>> violations([row])["no spills"]
    ['decode-float16-d64']
    """
    broken = {}
    for rule in RULES:
        ids = [row_id(r) for r in rows if rule.applies(r) and (r["compiles"] or rule.name == "compiles")
               and not rule.holds(r)]
        if ids:
            broken[rule.name] = ids
    have = {(r["role"], r["dtype"]) for r in rows} | {(None, r["dtype"]) for r in rows}
    missing = [f"{role or 'any'}-{dtype}" for role, dtype in REQUIRED if (role, dtype) not in have]
    if missing:
        broken["missing"] = missing
    return broken


# --- printing -------------------------------------------------------------------------------------

def format_table(rows):
    """The rows as an aligned plain-text table (``—`` where a kernel did not compile).

    Examples
    --------
    >>> row = dict(kernel="forward", role="forward", dtype="float16", head_dim=64, block_threads=128,
    ...            registers=72, spill_bytes=0, stack_frame=0, smem_static=16384, occupancy=0.375,
    ...            f64_ops=0, mma_ops=0, compiles=True)
    >>> print(format_table([row]))
    kernel   role     dtype    head dim  threads  registers  spill bytes  stack frame  static smem  occupancy  f64 ops  mma ops
    -------  -------  -------  --------  -------  ---------  -----------  -----------  -----------  ---------  -------  -------
    forward  forward  float16        64      128         72            0            0        16384        38%        0        0
    """
    head = ("kernel", "role", "dtype", "head dim", "threads", "registers", "spill bytes", "stack frame",
            "static smem", "occupancy", "f64 ops", "mma ops")

    def cell(row, key):
        value = row.get(key)
        if value is None:
            return "—"
        return f"{100 * value:.0f}%" if key == "occupancy" else str(value)

    keys = ("kernel", "role", "dtype", "head_dim", "block_threads", "registers", "spill_bytes", "stack_frame",
            "smem_static", "occupancy", "f64_ops", "mma_ops")
    body = [tuple(cell(r, k) for k in keys) for r in rows]
    widths = [max(len(line[c]) for line in (head, *body)) for c in range(len(head))]

    def line(cells):
        return "  ".join(text.ljust(w) if c < 3 else text.rjust(w)
                         for c, (text, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(head), "  ".join("-" * w for w in widths), *map(line, body)])


_ERROR_LINES = 6


def summary(rows):
    """The lines printed under the table: compile errors, then one line of rule violations (or none).

    Examples
    --------
    >>> summary([])
    ['rule violations: missing (10 rows)']
    """
    lines = []
    for r in (r for r in rows if not r["compiles"]):
        error = r["error"].splitlines()
        if len(error) > _ERROR_LINES:
            error = error[:_ERROR_LINES] + [f"... {len(error) - _ERROR_LINES} more lines (--json keeps them)"]
        lines.append(f"{row_id(r)} does not compile: " + "\n    ".join(error))
    broken = violations(rows)
    if broken:
        lines.append("rule violations: " + "; ".join(
            f"{name} ({len(ids)} row{'s' if len(ids) > 1 else ''})" for name, ids in broken.items()))
    return lines
