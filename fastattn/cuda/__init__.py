"""CUDA kernels (numba.cuda), one module per family, mirroring fastattn.cpu."""
from . import attention, gqa, paged, projection, rotary, varlen  # noqa: F401
