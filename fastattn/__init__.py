"""fastattn: FlashAttention-class attention kernels for NumPy and CUDA device arrays.

>>> import numpy as np, fastattn
>>> q = np.ones((1, 2, 3, 8), np.float32); k = v = np.ones((1, 1, 5, 8), np.float32)
>>> fastattn.attention(q, k, v, causal=True).shape
(1, 2, 3, 8)
"""
from . import reference
from ._config import config
from .attention import attention, attention_backward, merge_attention_states
from .gqa import GQAConfig, repeat_kv, repeat_kv_backward
from .kv_cache import OutOfBlocksError, PagedKVCache
from .layers import MultiheadAttention
from .paged import paged_attention, paged_attention_backward, paged_attention_fp8, write_kv_cache
from .projection import (fused_output_projection_residual, fused_output_projection_residual_backward,
                         fused_qkv_projection, fused_qkv_projection_backward)
from .rotary import rotary, rotary_backward, rotary_tables
from .varlen import attention_varlen, attention_varlen_backward

__version__ = "0.1.0"

__all__ = ["attention", "attention_backward", "merge_attention_states", "attention_varlen",
           "attention_varlen_backward", "paged_attention",
           "paged_attention_fp8", "paged_attention_backward", "write_kv_cache", "PagedKVCache",
           "OutOfBlocksError", "repeat_kv", "repeat_kv_backward", "GQAConfig", "fused_qkv_projection",
           "fused_qkv_projection_backward", "fused_output_projection_residual",
           "fused_output_projection_residual_backward", "MultiheadAttention", "rotary", "rotary_backward",
           "rotary_tables", "config", "reference",
           "__version__"]
