"""CUDA kernels (numba.cuda), one module per family, mirroring fastattn.cpu."""
from . import attention  # noqa: F401
