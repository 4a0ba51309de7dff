"""fastattn on Dask: chunked attention and decode spread over workers.

:func:`attention` takes ``dask.array`` inputs and builds a task graph of
ordinary kernel calls: chunks over batch, heads and queries are independent
calls, and chunks over keys become partial ``(out, lse)`` pairs combined with
:func:`fastattn.merge_attention_states` in a tree.  :class:`DecodeWorker` and
:func:`paged_decode` spread a batch of decode requests over workers that each
hold their own :class:`~fastattn.kv_cache.PagedKVCache`.

Needs the ``dask`` extra: ``pip install "fastattn[dask]"``.
"""
import math
import operator
from functools import partial

import numpy as np

from . import _dtypes, _validate
from ._tile import key_range
from .attention import _attention_block, merge_attention_states
from .kv_cache import PagedKVCache
from .paged import paged_attention, paged_attention_fp8

try:
    import dask.array as da
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError('fastattn.dask needs dask: pip install "fastattn[dask]"') from error

__all__ = ["attention", "DecodeWorker", "paged_decode"]


def attention(q, k, v, *, causal=False, scale=None, window=(-1, -1), softcap=0.0,
              alibi_slopes=None, return_lse=False, split_every=4):
    """:func:`fastattn.attention` on Dask arrays, chunk by chunk.

    Parameters
    ----------
    q : dask.array.Array, shape [B, Hq, Sq, D]
        Queries, chunked in any way along B, Hq and Sq (D is made one chunk).
        NumPy chunks run the CPU kernels, CuPy chunks the CUDA kernels.
    k, v : dask.array.Array, shape [B, Hkv, Sk, D]
        Keys and values, chunked in any way along Sk; their batch and head
        chunks are made to match those of ``q`` (query-head chunk ``[h0, h1)``
        pairs with KV heads ``[h0 // g, h1 // g)``, ``g = Hq // Hkv``).
    causal, scale, window, softcap, alibi_slopes
        As for :func:`fastattn.attention`; the masks and ALiBi distances are
        those of the whole problem, whatever the chunks.  ``alibi_slopes`` is a
        small NumPy array ``[Hq]`` or ``[B, Hq]``.
    return_lse : bool
        Also return the log-sum-exp ``[B, Hq, Sq]``.
    split_every : int
        How many partial results one merge task combines (the tree's fan-in).

    Returns
    -------
    out : dask.array.Array, shape [B, Hq, Sq, D]
        Chunked like ``q`` along B, Hq and Sq; dtype of ``q``.
    lse : dask.array.Array, shape [B, Hq, Sq]
        Only with ``return_lse=True``.

    Raises
    ------
    ValueError, TypeError
        As :func:`fastattn.attention` (checked on the arrays' shapes and dtypes
        before any task runs), for unknown chunk sizes, or ``split_every < 2``.

    Notes
    -----
    A (query chunk, key chunk) pair whose keys no row of the query chunk can
    see (causal or window masks) gets no task.  Query rows that see no key at
    all get ``out = 0`` and ``lse = -inf``, as in :func:`fastattn.attention`.
    Each key chunk's partial output is rounded to the dtype of ``q`` before the
    merge, so float16/bfloat16 results differ from the single call by a few
    units in the last place; float32 agrees to float32 rounding.

    Examples
    --------
    >>> import numpy as np, dask.array as da, fastattn, fastattn.dask
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((1, 4, 64, 32), dtype=np.float32)
    >>> k = rng.standard_normal((1, 2, 96, 32), dtype=np.float32)
    >>> v = rng.standard_normal((1, 2, 96, 32), dtype=np.float32)
    >>> out = fastattn.dask.attention(da.from_array(q, chunks=(1, 2, 32, 32)),
    ...                               da.from_array(k, chunks=(1, 1, 24, 32)),
    ...                               da.from_array(v, chunks=(1, 1, 24, 32)), causal=True)
    >>> bool(np.allclose(out.compute(), fastattn.attention(q, k, v, causal=True), atol=1e-5))
    True
    """
    q, k, v = (_as_dask(name, x) for name, x in (("q", q), ("k", k), ("v", v)))
    _, _, _, slopes, spec = _validate.attention_args(
        _stand_in(q), _stand_in(k), _stand_in(v), causal=causal, scale=scale, window=window,
        softcap=softcap, alibi_slopes=alibi_slopes)
    if isinstance(split_every, bool) or not isinstance(split_every, (int, np.integer)) or split_every < 2:
        raise ValueError(f"split_every: expected an int >= 2, got {split_every!r}")
    if slopes is not None:
        slopes = np.broadcast_to(np.asarray(slopes, spec.accum_dtype), (spec.batch, spec.heads_q))

    head_chunks = _group_aligned(q.chunks[1], spec.group)
    given = q.chunks
    q = q.rechunk((given[0], head_chunks, given[2], spec.head_dim))
    kv_chunks = (given[0], tuple(c // spec.group for c in head_chunks), k.chunks[2], spec.head_dim)
    k, v = k.rechunk(kv_chunks), v.rechunk(kv_chunks)

    token = tokenize(q, k, v, slopes, spec, split_every)
    tasks, finals = _block_tasks(q, k, v, slopes, spec, split_every, token)
    out_name, lse_name = f"fastattn-out-{token}", f"fastattn-lse-{token}"
    out_tasks = {(out_name,) + index + (0,): (operator.getitem, key, 0) for index, key in finals.items()}
    lse_tasks = {(lse_name,) + index: (operator.getitem, key, 1) for index, key in finals.items()}
    out = da.Array(HighLevelGraph.from_collections(out_name, {**tasks, **out_tasks}, dependencies=[q, k, v]),
                   out_name, q.chunks, meta=_empty_like(q._meta, 4, spec.dtype))
    lse = da.Array(HighLevelGraph.from_collections(lse_name, {**tasks, **lse_tasks}, dependencies=[q, k, v]),
                   lse_name, q.chunks[:3], meta=_empty_like(q._meta, 3, spec.accum_dtype))
    if head_chunks != given[1]:  # heads were regrouped by whole KV groups: give back q's chunks
        out, lse = out.rechunk(given[:3] + (spec.head_dim,)), lse.rechunk(given[:3])
    return (out, lse) if return_lse else out


def _block_tasks(q, k, v, slopes, spec, split_every, token):
    """Tasks of the partial blocks and their merge trees; the final key of each output chunk."""
    block = partial(_block, seq_q=spec.seq_q, seq_k=spec.seq_k, scale=spec.scale,
                    window=(spec.window_left, spec.window_right), softcap=spec.softcap)
    part_name, merge_name, empty_name = (f"fastattn-{kind}-{token}" for kind in ("block", "merge", "empty"))
    b_starts, h_starts, q_starts, k_starts = (_starts(c) for c in (q.chunks[0], q.chunks[1], q.chunks[2],
                                                                    k.chunks[2]))
    tasks, finals = {}, {}
    for bi, (b0, b1) in enumerate(b_starts):
        for hi, (h0, h1) in enumerate(h_starts):
            block_slopes = None if slopes is None else np.ascontiguousarray(slopes[b0:b1, h0:h1])
            for qi, (i0, i1) in enumerate(q_starts):
                # the keys that some row of this query chunk sees (each row sees an interval, and the
                # intervals move right with the row)
                first = key_range(i0, spec.seq_q, spec.seq_k, spec.window_left, spec.window_right)[0]
                end = key_range(i1 - 1, spec.seq_q, spec.seq_k, spec.window_left, spec.window_right)[1]
                parts = []
                for kj, (j0, j1) in enumerate(k_starts):
                    if max(first, j0) < min(end, j1):
                        key = (part_name, bi, hi, qi, kj)
                        tasks[key] = (block, (q.name, bi, hi, qi, 0), (k.name, bi, hi, kj, 0),
                                      (v.name, bi, hi, kj, 0), i0, j0, block_slopes)
                        parts.append(key)
                if not parts:  # every row is fully masked
                    key = (empty_name, bi, hi, qi)
                    tasks[key] = (_masked, (q.name, bi, hi, qi, 0), spec.accum_dtype)
                    parts.append(key)
                level = 0
                while len(parts) > 1:
                    merged = []
                    for n, start in enumerate(range(0, len(parts), split_every)):
                        key = (merge_name, bi, hi, qi, level, n)
                        tasks[key] = (_merge, parts[start:start + split_every])
                        merged.append(key)
                    parts, level = merged, level + 1
                finals[(bi, hi, qi)] = parts[0]
    return tasks, finals


def _block(q, k, v, q_start, k_start, slopes, **options):
    """One partial (out, lse): rows of ``q`` against the keys of one chunk."""
    if slopes is not None:
        slopes = _like(q, slopes)  # on the device of the chunks
    out, lse = _attention_block(q, k, v, q_start=q_start, k_start=k_start, alibi_slopes=slopes, **options)
    return _like(q, out), _like(q, lse)


def _merge(parts):
    out, lse = merge_attention_states([p[0] for p in parts], [p[1] for p in parts])
    return _like(parts[0][0], out), _like(parts[0][0], lse)


def _masked(q, lse_dtype):
    """(zeros, -inf) for a chunk of query rows that see no key."""
    return np.zeros_like(q), np.full_like(q, -np.inf, shape=q.shape[:3], dtype=lse_dtype)


def _like(template, x):
    """``x`` in the array type of the chunk ``template``: CuPy chunks in, CuPy chunks out.

    The kernels take CuPy arrays through ``__cuda_array_interface__`` and return
    numba device arrays; NumPy chunks give NumPy results.
    """
    if type(template).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy.asarray(x)
    return x


def _empty_like(meta, ndim, dtype):
    return np.empty_like(meta, shape=(0,) * ndim, dtype=dtype)


def _starts(chunks):
    bounds = np.cumsum((0,) + tuple(chunks)).tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def _group_aligned(chunks, group):
    """Head chunks with every boundary moved down to a multiple of ``group`` (no empty chunk)."""
    bounds = sorted({b - b % group for b in np.cumsum(chunks).tolist()} | {sum(chunks)})
    edges = [0] + [b for b in bounds if b > 0]
    return tuple(b - a for a, b in zip(edges[:-1], edges[1:]))


def _as_dask(name, x):
    if isinstance(x, np.ndarray):
        return da.from_array(x, chunks=x.shape)
    if not isinstance(x, da.Array):
        raise TypeError(f"{name}: expected a dask array (or a NumPy array), got {type(x).__name__}")
    if any(math.isnan(c) for chunks in x.chunks for c in chunks):
        raise ValueError(f"{name}: expected known chunk sizes, got unknown ones (call compute_chunk_sizes())")
    return x


def _stand_in(x):
    """A zero-memory NumPy array with the shape and dtype of a dask array, for validation."""
    return np.broadcast_to(np.zeros((), x.dtype), x.shape)


class DecodeWorker:
    """One worker's share of a decode batch: a :class:`~fastattn.kv_cache.PagedKVCache`
    and the sequences it holds.

    Create one per Dask worker as an actor (``client.submit(DecodeWorker, ...,
    actor=True, workers=[address])``) so that each cache lives, and each decode
    step runs, on its own worker; or use it directly in one process.  The
    constructor takes the arguments of :class:`~fastattn.kv_cache.PagedKVCache`.

    Examples
    --------
    >>> import numpy as np
    >>> from fastattn.dask import DecodeWorker
    >>> worker = DecodeWorker(num_blocks=8, block_size=4, num_kv_heads=2, head_dim=16,
    ...                       dtype=np.float32)
    >>> prompt = np.ones((5, 2, 16), np.float32)  # [T, Hkv, D]
    >>> seq = worker.add_sequence(prompt, prompt)
    >>> q = np.ones((1, 4, 1, 16), np.float32)    # [n, Hq, 1, D]
    >>> token = np.ones((1, 2, 16), np.float32)   # [n, Hkv, D]
    >>> worker.step([seq], q, token, token).shape
    (1, 4, 1, 16)
    >>> worker.seq_lens([seq])
    array([6], dtype=int32)
    """

    def __init__(self, num_blocks, block_size, num_kv_heads, head_dim, dtype=np.float16, device="cpu", *,
                 k_scale=1.0, v_scale=1.0):
        self.cache = PagedKVCache(num_blocks, block_size, num_kv_heads, head_dim, dtype, device,
                                  k_scale=k_scale, v_scale=v_scale)

    def add_sequence(self, k=None, v=None):
        """Start a sequence, optionally with its prompt's keys and values ``[T, Hkv, D]``; return its id."""
        seq_id = self.cache.add_sequence()
        if k is not None or v is not None:
            try:
                self.cache.append(seq_id, k, v)
            except Exception:
                self.cache.free(seq_id)
                raise
        return seq_id

    def fork(self, seq_id):
        """Share ``seq_id``'s blocks with a new sequence (copy-on-write); return the new id."""
        return self.cache.fork(seq_id)

    def free(self, seq_id):
        """Release a sequence's blocks."""
        self.cache.free(seq_id)

    def seq_lens(self, seq_ids):
        """Lengths of the given sequences, int32 ``[n]``."""
        return self.cache.seq_lens(seq_ids)

    @property
    def num_free_blocks(self):
        return self.cache.num_free_blocks

    def step(self, seq_ids, q, k, v, **options):
        """Append one token per sequence, then attend with its query.

        Parameters
        ----------
        seq_ids : sequence of int, length n
            Sequences held by this worker, all different.
        q : array, shape [n, Hq, 1, D]
            The new tokens' queries.
        k, v : array, shape [n, Hkv, D]
            The new tokens' keys and values, appended before attending.
        **options
            ``scale``, ``window``, ``softcap``, ``alibi_slopes`` for
            :func:`fastattn.paged_attention` (fp8 caches:
            :func:`fastattn.paged_attention_fp8` with the cache's scales).

        Returns
        -------
        out : array, shape [n, Hq, 1, D]
        """
        seq_ids = list(seq_ids)
        for row, seq_id in enumerate(seq_ids):
            self.cache.append(seq_id, k[row:row + 1], v[row:row + 1])
        cache = self.cache
        table, lens = cache.block_table(seq_ids), cache.seq_lens(seq_ids)
        if _dtypes.is_fp8(cache.dtype):
            return paged_attention_fp8(q, cache.k_cache, cache.v_cache, table, lens,
                                       k_scale=cache.k_scale, v_scale=cache.v_scale, **options)
        return paged_attention(q, cache.k_cache, cache.v_cache, table, lens, **options)


def paged_decode(workers, placement, q, k, v, **options):
    """One decode step for a batch of sequences spread over :class:`DecodeWorker` s.

    Row ``r`` of the batch is sequence ``placement[r] = (w, seq_id)`` held by
    ``workers[w]``.  Each worker appends its rows' new keys and values to its
    own cache and attends; the outputs come back in batch order.

    Parameters
    ----------
    workers : sequence of DecodeWorker or Dask actors of DecodeWorker
        With actors, every worker's step is sent before any result is awaited,
        so the steps run at the same time, each on its own worker.
    placement : sequence of (int, int), length B
        ``(worker index, sequence id)`` of each row.
    q : ndarray, shape [B, Hq, 1, D]
    k, v : ndarray, shape [B, Hkv, D]
        The new tokens' keys and values.
    **options
        Passed to :meth:`DecodeWorker.step`.

    Returns
    -------
    out : ndarray, shape [B, Hq, 1, D]
        On the host (float32 for fp8 caches, else the dtype of ``q``).

    Raises
    ------
    ValueError
        ``placement`` of the wrong length, with repeats, or naming a worker
        that does not exist.

    Examples
    --------
    >>> import numpy as np
    >>> from fastattn.dask import DecodeWorker, paged_decode
    >>> workers = [DecodeWorker(8, 4, 2, 16, np.float32) for _ in range(2)]
    >>> prompt = np.ones((3, 2, 16), np.float32)
    >>> placement = [(0, workers[0].add_sequence(prompt, prompt)),
    ...              (1, workers[1].add_sequence(prompt, prompt))]
    >>> q = np.ones((2, 4, 1, 16), np.float32)
    >>> token = np.ones((2, 2, 16), np.float32)
    >>> paged_decode(workers, placement, q, token, token).shape
    (2, 4, 1, 16)
    """
    placement = [(int(w), int(s)) for w, s in placement]
    if len(placement) != len(q):
        raise ValueError(f"placement: expected one (worker, seq_id) per row of q ({len(q)}), "
                         f"got {len(placement)}")
    if len(set(placement)) != len(placement):
        raise ValueError("placement: expected each (worker, seq_id) at most once, got repeats")
    rows = {}
    for r, (w, seq_id) in enumerate(placement):
        if not 0 <= w < len(workers):
            raise ValueError(f"placement[{r}]: expected a worker index in [0, {len(workers)}), got {w}")
        rows.setdefault(w, []).append(r)
    if not rows:
        return np.empty(q.shape, q.dtype)
    pending = {w: workers[w].step([placement[r][1] for r in rs], q[rs], k[rs], v[rs], **options)
               for w, rs in rows.items()}
    out = None
    for w, rs in rows.items():
        part = pending[w]
        part = part.result() if hasattr(part, "result") else part  # an actor's future
        part = part.copy_to_host() if hasattr(part, "copy_to_host") else part
        if out is None:
            out = np.empty((len(q),) + part.shape[1:], part.dtype)
        out[rs] = part
    return out
