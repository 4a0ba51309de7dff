"""CUDA kernels (numba.cuda), one module per family, mirroring fastattn.cpu."""
from . import attention, paged  # noqa: F401
