"""Named paged-attention cases: sequence lengths, heads, head dim, block size, options, dtype.

A case reads like its id, ``gqa-8-2-d64-bs16-lens37.0.129-sq1-causal-f16``.
Inputs are random caches with a random block table in which the sequences
share their first ``shared`` blocks (a common prompt prefix); unused table
entries hold -1 and unused physical blocks hold noise, so a kernel that reads
outside a sequence's blocks gets a wrong answer.
"""
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from cases import BF16, DTYPE_ID, F16, F32, F64, random

E4M3, E5M2 = np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2)
DTYPE_ID = {**DTYPE_ID, E4M3: "e4m3", E5M2: "e5m2"}

OPTIONS = {
    "plain": lambda hq, rng: {},
    "causal": lambda hq, rng: {"causal": True},
    "window": lambda hq, rng: {"window": (6, 0)},
    "softcap": lambda hq, rng: {"softcap": 2.0, "causal": True},
    "alibi": lambda hq, rng: {"alibi_slopes": rng.uniform(0.0, 0.3, hq).astype(np.float32)},
    "scale": lambda hq, rng: {"scale": 0.3, "causal": True},
}


@dataclass(frozen=True)
class PagedCase:
    lens: tuple
    heads_q: int
    heads_kv: int
    head_dim: int
    block_size: int
    seq_q: int = 1
    option: str = "plain"
    dtype: np.dtype = F32
    shared: int = 0         #: leading blocks shared by every sequence (a common prefix)

    @property
    def id(self):
        kind = "mha" if self.heads_q == self.heads_kv else "mqa" if self.heads_kv == 1 else "gqa"
        shared = f"-shared{self.shared}" if self.shared else ""
        return (f"{kind}-{self.heads_q}-{self.heads_kv}-d{self.head_dim}-bs{self.block_size}"
                f"-lens{'.'.join(map(str, self.lens))}-sq{self.seq_q}{shared}-{self.option}"
                f"-{DTYPE_ID[np.dtype(self.dtype)]}")

    def options(self, rng):
        return OPTIONS[self.option](self.heads_q, rng)


def block_table(lens, block_size, shared, rng, spare=3):
    """(table [B, max_blocks] int32 with -1 padding, num_blocks): sequences share `shared` leading blocks."""
    used = [-(-n // block_size) for n in lens]
    if shared:
        assert all(n >= shared * block_size for n in lens if n), "shared blocks must be full in every sequence"
    own = [max(u - shared, 0) for u in used]
    num_blocks = shared + sum(own) + spare
    physical = rng.permutation(num_blocks)
    prefix, rest = physical[:shared], iter(physical[shared:])
    width = max(used + [1]) + 1
    table = np.full((len(lens), width), -1, np.int32)
    for b, u in enumerate(used):
        if u:
            table[b, :u] = np.concatenate([prefix[:min(shared, u)], [next(rest) for _ in range(own[b])]])
    return table, num_blocks


def paged_inputs(case, rng, cache_dtype=None):
    """(q, k_cache, v_cache, table, lens, options) of a case as NumPy arrays."""
    table, num_blocks = block_table(case.lens, case.block_size, case.shared, rng)
    cache_shape = (num_blocks, case.block_size, case.heads_kv, case.head_dim)
    dtype = case.dtype if cache_dtype is None else cache_dtype
    k_cache, v_cache = random(cache_shape, dtype, rng), random(cache_shape, dtype, rng)
    q = random((len(case.lens), case.heads_q, case.seq_q, case.head_dim), case.dtype, rng)
    return q, k_cache, v_cache, table, np.array(case.lens, np.int32), case.options(rng)


# vLLM's kernel-test grid as a covering set: every block size, head layout,
# head dim, option and dtype meets odd lengths and a zero-length sequence.
HEADS = [(8, 8), (8, 2), (4, 1), (40, 40)]
HEAD_DIMS = [32, 64, 80, 128]
LENS = [(1, 5, 37), (129, 0, 200), (37, 129), (5, 200, 1, 0)]
DTYPES = [F32, F16, BF16, F64]

CPU_CASES = [
    PagedCase(LENS[i % 4], *HEADS[(i + j) % 4], HEAD_DIMS[(i + 2 * j) % 4], (16, 32)[(i + j) % 2],
              option=option, dtype=DTYPES[(i + j + i // 4) % 4])
    for i in range(4) for j, option in enumerate(OPTIONS)
] + [
    # chunked prefill: Sq > 1 queries are each sequence's last Sq tokens
    PagedCase((37, 129, 0, 5), 8, 2, 64, 16, seq_q=5, option="causal", dtype=F32, shared=0),
    PagedCase((200, 129), 8, 2, 80, 32, seq_q=17, option="causal", dtype=BF16, shared=2),
    PagedCase((64, 70), 4, 1, 32, 16, seq_q=33, option="window", dtype=F16, shared=2),
    PagedCase((40, 41), 4, 4, 32, 8, seq_q=40, option="alibi", dtype=F64, shared=1),
    PagedCase((129,), 8, 8, 128, 16, seq_q=113, option="plain", dtype=F32),
    # decode-sized query tiles (the register-blocked decode kernel): 4-row passes and their remainders,
    # several queries per sequence, and a head dim it does not take (the general kernel instead)
    PagedCase((37, 129, 0), 10, 2, 48, 16, seq_q=2, option="causal", dtype=F16, shared=1),
    PagedCase((9, 200), 9, 3, 16, 16, seq_q=3, option="window", dtype=BF16),
    PagedCase((35, 70), 9, 3, 32, 32, seq_q=3, option="alibi", dtype=F32, shared=1),
    PagedCase((5, 37), 4, 2, 40, 16, option="softcap", dtype=F32),
    # shared prefixes in decode
    PagedCase((64, 100, 37), 8, 2, 64, 16, option="plain", dtype=F16, shared=2),
    PagedCase((33, 96), 4, 1, 128, 32, option="causal", dtype=BF16, shared=1),
]

# The simulator runs each GPU thread as a Python thread: tiny shapes only.
CUDA_CASES = [
    PagedCase((1, 9), 2, 2, 8, 4, option="plain", dtype=F32),
    PagedCase((7, 0, 12), 4, 2, 16, 4, option="causal", dtype=F16, shared=1),
    PagedCase((13,), 4, 1, 5, 8, option="alibi", dtype=BF16),
    PagedCase((6, 11), 2, 1, 8, 4, seq_q=3, option="softcap", dtype=F64, shared=1),
    PagedCase((10, 9), 4, 2, 8, 4, seq_q=4, option="window", dtype=F32, shared=2),
    PagedCase((12, 1), 2, 2, 8, 8, option="scale", dtype=F32),
]
