"""CUDA kernels (numba.cuda), one module per family, mirroring fastattn.cpu."""
from . import attention, gqa, paged, projection, varlen  # noqa: F401
