"""What ``python -m fastattn info`` reports: versions, threads, CUDA, cache, CPU.

Everything here is cheap and never raises: a probe that fails reports why
instead, so ``info`` stays useful on a broken install.
"""
import os
import platform
import sys
from importlib import metadata

_PACKAGES = ("fastattn", "numba", "numba-cuda", "llvmlite", "numpy", "scipy", "ml_dtypes",
             "threadpoolctl", "dask", "distributed")  # the last two: the optional dask extra
# CPU features that matter to the kernels (SIMD width, fused multiply-add, half/bf16 support).
_CPU_FLAGS = ("sse4.2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
              "avx512fp16", "avx512bf16", "amx-bf16", "amx-fp16", "neon", "sve")


def versions():
    """{distribution: version or 'not installed'} for fastattn and its dependencies."""
    found = {}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    if found["fastattn"] == "not installed":
        import fastattn

        found["fastattn"] = f"{fastattn.__version__} (source tree, not installed)"
    return found


def threading():
    """Numba's threading layer (after a tiny parallel call) and thread count."""
    import numba
    import numpy as np

    import fastattn.cpu  # noqa: F401  (sets the layer that the kernels use)

    @numba.njit(parallel=True)
    def _touch(x):
        total = 0.0
        for i in numba.prange(x.size):
            total += x[i]
        return total

    try:
        _touch(np.ones(4 * numba.get_num_threads()))
        layer = numba.threading_layer()
    except Exception as exc:  # e.g. no tbb/omp and the layer was forced
        layer = f"unavailable ({type(exc).__name__}: {exc})"
    return {"threading_layer": layer, "threads": numba.get_num_threads(),
            "NUMBA_NUM_THREADS": numba.config.NUMBA_NUM_THREADS}


def cuda():
    """{'status': ..., 'devices': [...]} as numba.cuda sees it."""
    import numba
    from numba import cuda as nbcuda

    if numba.config.ENABLE_CUDASIM:
        return {"status": "CUDA simulator enabled (NUMBA_ENABLE_CUDASIM=1)", "devices": []}
    try:
        if not nbcuda.is_available():
            return {"status": "none found", "devices": []}
        devices = []
        for gpu in nbcuda.gpus:
            with gpu:
                cc = ".".join(map(str, gpu.compute_capability))
                devices.append(f"{gpu.id}: {gpu.name.decode() if isinstance(gpu.name, bytes) else gpu.name}"
                               f" (compute capability {cc})")
        return {"status": f"{len(devices)} device(s)", "devices": devices}
    except Exception as exc:
        return {"status": f"none found ({type(exc).__name__}: {exc})", "devices": []}


def tensor_cores():
    """Whether float16/bfloat16 CUDA attention can run on tensor cores here, in a sentence."""
    import numba

    from ._config import config

    if numba.config.ENABLE_CUDASIM:
        return "emulated (CUDA simulator)"
    if not config.cuda_mma:
        return "off (fastattn.config.cuda_mma / FASTATTN_CUDA_MMA=0)"
    from .cuda._mma import linkable

    if not linkable():
        return 'unavailable: NVRTC/nvJitLink not found (pip install "numba-cuda[cu12]")'
    return "ready: float16/bfloat16 on sm_80+ GPUs (mma.sync from fastattn/cuda/_mma.cu, linked by nvJitLink)"


def cache_dir():
    """Where ``cache=True`` kernels are stored, found the way numba finds it."""
    import numba

    if numba.config.CACHE_DIR:
        return f"{numba.config.CACHE_DIR} (NUMBA_CACHE_DIR)"
    try:
        from numba.core.caching import CacheImpl

        from fastattn.cpu import attention as kernels

        func = kernels._forward.py_func
        source = kernels.__file__
        for locator in CacheImpl._locator_classes:
            found = locator.from_function(func, source)
            if found is not None:
                return f"{found.get_cache_path()} ({locator.__name__})"
    except Exception:  # private numba API: fall back to its documented default
        pass
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu", "__pycache__")


def cpu():
    """CPU model, LLVM's name for it and the SIMD features that matter here."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model")):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import llvmlite.binding as llvm

        target = llvm.get_host_cpu_name()
        features = {f[1:] for f in llvm.get_host_cpu_features().flatten().split(",") if f.startswith("+")}
        flags = [f for f in _CPU_FLAGS if f.replace(".", "") in {x.replace(".", "") for x in features}]
    except Exception:
        target, flags = "unknown", []
    return {"model": model, "llvm_target": target, "flags": flags, "cores": os.cpu_count()}


def blas():
    """BLAS libraries loaded by NumPy and SciPy, with their thread counts."""
    try:
        import scipy.linalg  # noqa: F401  (loads SciPy's BLAS, the one numba calls)
        from threadpoolctl import threadpool_info

        return [f"{lib['internal_api']} {lib.get('version') or ''} ({lib['num_threads']} threads"
                f"{', ' + lib['architecture'] + ' kernels' if lib.get('architecture') else ''}) "
                f"for {'numpy' if 'numpy' in lib['filepath'] else 'scipy/numba'}"
                for lib in threadpool_info() if lib["user_api"] == "blas"]
    except Exception as exc:
        return [f"unknown ({type(exc).__name__})"]


def tile_products():
    """Who runs the CPU kernels' float32 tile products (``fastattn.config.cpu_gemm``, see cpu/_gemm.py)."""
    from ._config import config
    from .cpu._gemm import simd_gemm

    if simd_gemm():
        return "fastattn's micro-kernels (16-lane FMA)"
    if config.cpu_gemm != "auto":
        return f"BLAS (fastattn.config.cpu_gemm = {config.cpu_gemm!r})"
    return "BLAS (no AVX-512 in numba's target)"


def machine_info():
    """Everything ``info`` prints, as a JSON-ready dict."""
    return {
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "versions": versions(),
        **threading(),
        "blas": blas(),
        "tile_products": tile_products(),
        "cuda": cuda(),
        "tensor_cores": tensor_cores(),
        "cache_dir": cache_dir(),
        "cpu": cpu(),
    }


def format_info(info):
    """The dict of :func:`machine_info` as aligned ``name: value`` lines."""
    rows = [("python", info["python"]), ("platform", info["platform"])]
    rows += list(info["versions"].items())
    rows += [("threading layer", info["threading_layer"]), ("threads", str(info["threads"]))]
    rows += [("blas", line) for line in info["blas"]]
    rows += [("cpu tile products", info["tile_products"])]
    rows += [("cuda", info["cuda"]["status"])] + [("cuda device", d) for d in info["cuda"]["devices"]]
    rows += [("tensor cores", info["tensor_cores"])]
    rows += [("numba cache", info["cache_dir"])]
    c = info["cpu"]
    rows += [("cpu", f"{c['model']} ({c['cores']} cores, LLVM target {c['llvm_target']})"),
             ("cpu flags", " ".join(c["flags"]) or "none of note")]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
