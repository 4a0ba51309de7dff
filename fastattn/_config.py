"""Tile sizes and launch parameters: the one place kernels read them from.

Change them for tuning (``fastattn.config.cpu_block_q = 64``); tests use
small CUDA blocks so the simulator stays quick.  Values are read at each call.
"""
import os
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Config:
    """Kernel tiling.  CPU tiles are rows of q / keys per GEMM block."""

    cpu_block_q: int = 256          #: query rows per forward task
    cpu_block_k: int = 512          #: keys per forward GEMM tile
    cpu_bwd_block_q: int = 256      #: query rows per backward GEMM tile
    cpu_bwd_block_k: int = 256      #: keys per backward task tile
    cpu_paged_block_k: int = 256    #: keys gathered from the paged cache per GEMM tile
    cpu_decode_block_k: int = 64    #: keys per tile of the register-blocked paged decode kernel
    cpu_split_min_keys: int = 1024  #: shortest key range worth a split of its own (split-KV decode)
    #: float32 tile products of the attention kernels: "auto" (fastattn's micro-kernels where numba's
    #: target has AVX-512, else BLAS), "simd" or "blas" (see fastattn/cpu/_gemm.py)
    cpu_gemm: str = "auto"
    #: whose threads run the projection GEMMs: "numpy" (its BLAS), "numba" (split over numba's threads, on
    #: the tile products' micro-kernels where there are any) or "auto": "numba" where the tile products run on
    #: the micro-kernels (see cpu_gemm), else "numpy"
    cpu_proj_pool: str = "auto"
    cuda_threads: int = 128         #: threads per block of the element-wise CUDA kernels (delta, merge, ...)
    cuda_tiles: Optional[tuple] = None        #: (tm, tn, ny, nx) for every dense CUDA kernel; None: the tuned table
    cuda_max_head_dim: int = 256    #: the largest head dimension the CUDA kernels take
    cuda_paged_rows: int = 8        #: stacked query rows (heads x positions) per paged block
    cuda_paged_block_k: int = 32    #: keys staged per step by the paged kernels
    cuda_paged_threads: int = 128   #: threads per paged block
    cuda_proj_tile: int = 16        #: projection GEMM: T x T threads, 2T x 2T outputs per block
    cuda_split_min_keys: int = 256  #: shortest key range per CUDA split (split-KV decode)
    #: float16/bfloat16 dense forward on tensor cores (``mma.sync``) on GPUs of compute capability 8.0 or
    #: more; False (or ``FASTATTN_CUDA_MMA=0`` in the environment at import) selects the SIMT kernels
    cuda_mma: bool = field(default_factory=lambda: os.environ.get("FASTATTN_CUDA_MMA", "1") != "0")
    cuda_mma_warps: int = 4         #: warps per block of the tensor-core forward (16 query rows each)


config = Config()
