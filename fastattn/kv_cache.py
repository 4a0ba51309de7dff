"""A paged KV cache and the block manager that drives it: :class:`PagedKVCache`.

The cache owns two arrays ``k_cache`` and ``v_cache`` of shape
``[num_blocks, block_size, Hkv, D]`` and hands their blocks out to sequences.
Each sequence is a list of physical blocks: logical token ``t`` lives in block
``blocks[t // block_size]``, row ``t % block_size`` (the layout that
:func:`fastattn.paged_attention` reads through a block table).  Blocks are
reference counted, so :meth:`PagedKVCache.fork` shares a prefix without copying
it; the first append into a shared, partly filled block copies that block first
(copy-on-write).  See ``docs/paged_cache.md``.
"""
import heapq
import math

import numpy as np

from . import _dtypes
from ._dispatch import as_array, device_of

__all__ = ["OutOfBlocksError", "PagedKVCache"]

_DTYPE_NAMES = "float32, float64, float16, ml_dtypes.bfloat16, float8_e4m3fn or float8_e5m2"

#: Largest host buffer of zeros used to clear a CUDA cache (bytes).
_ZERO_CHUNK = 64 << 20


class OutOfBlocksError(RuntimeError):
    """Raised when an append needs more free blocks than the cache has.

    Nothing is modified when it is raised: allocation is all-or-nothing.
    """


def _int(name, value, minimum=None):
    """``value`` as an int (NumPy integers too, bools not), at least ``minimum``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return int(value)


def _cache_dtype(dtype):
    try:
        dtype = _dtypes.as_dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype: expected {_DTYPE_NAMES}, got {dtype!r}") from None
    if not (_dtypes.is_float(dtype) or _dtypes.is_fp8(dtype)):
        raise TypeError(f"dtype: expected {_DTYPE_NAMES}, got {dtype}")
    return dtype


def _scale_value(name, scale, dtype, num_kv_heads):
    """A float or a read-only float32 array [Hkv]: finite, > 0, and 1 unless the cache is fp8."""
    if hasattr(scale, "copy_to_host"):
        scale = scale.copy_to_host()
    try:
        if isinstance(scale, (bool, np.bool_, str, bytes)):
            raise TypeError
        values = np.array(scale, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a float or an array [Hkv], got {type(scale).__name__}") from None
    if values.shape not in ((), (num_kv_heads,)):
        raise ValueError(f"{name}: expected a float or an array [Hkv] = ({num_kv_heads},), "
                         f"got shape {values.shape}")
    if not (np.isfinite(values).all() and (values > 0).all()):
        raise ValueError(f"{name}: expected a finite float > 0 (or an array [Hkv] of them), got {scale}")
    if not _dtypes.is_fp8(dtype) and (values != 1.0).any():
        raise ValueError(f"{name}: only fp8 caches are scaled; expected 1.0 for a {dtype} cache, "
                         f"got {scale}")
    if values.ndim == 0:
        return float(values)
    values = values.astype(np.float32)
    values.flags.writeable = False
    return values


def _zeros_on_cuda(shape, dtype):
    """A zeroed numba device array; bf16/fp8 allocated as their uint bits, then viewed."""
    from numba import cuda

    bits = _dtypes.bits_view(np.empty(0, dtype)).dtype
    out = cuda.device_array(shape, bits)
    # clear in chunks of whole blocks so a large cache never needs a host copy of its size
    per_block = max(1, math.prod(shape[1:]) * bits.itemsize)
    step = max(1, _ZERO_CHUNK // per_block)
    zeros = np.zeros((min(step, shape[0]),) + tuple(shape[1:]), bits)
    for start in range(0, shape[0], step):
        stop = min(start + step, shape[0])
        out[start:stop].copy_to_device(zeros[:stop - start])
    return out, (out if bits == dtype else out.view(dtype))


class PagedKVCache:
    """A paged K/V cache with a reference-counted block manager.

    The cache owns ``k_cache`` and ``v_cache``, both
    ``[num_blocks, block_size, num_kv_heads, head_dim]`` arrays of ``dtype``
    filled with zeros, and hands their blocks out to sequences as tokens are
    appended.  Its tables feed :func:`fastattn.paged_attention` directly::

        fastattn.paged_attention(q, cache.k_cache, cache.v_cache,
                                 cache.block_table(ids), cache.seq_lens(ids))

    Parameters
    ----------
    num_blocks : int
        Number of physical blocks; > 0.
    block_size : int
        Tokens per block; > 0.
    num_kv_heads : int
        ``Hkv``, the number of key/value heads; > 0.
    head_dim : int
        ``D``; > 0.
    dtype : dtype
        float32, float64, float16, ``ml_dtypes.bfloat16``, or fp8
        ``ml_dtypes.float8_e4m3fn`` / ``ml_dtypes.float8_e5m2``.
    device : {"cpu", "cuda"}
        ``"cpu"``: the caches and tables are NumPy arrays.  ``"cuda"``: numba
        device arrays (bf16/fp8 caches are allocated as their uint bits and
        viewed as ``dtype``).
    k_scale, v_scale : float or array [Hkv]
        fp8 caches only (else 1.0): a stored value ``raw`` means ``raw * scale``,
        and an appended ``x`` is stored as ``saturate(x / scale)`` rounded to
        nearest even.  Pass the same scales to :func:`fastattn.paged_attention_fp8`.

    Attributes
    ----------
    k_cache, v_cache : array, shape [num_blocks, block_size, Hkv, D]
        The caches, on ``device``.
    num_blocks, block_size, num_kv_heads, head_dim : int
    dtype : numpy.dtype
    device : str
    k_scale, v_scale : float or read-only float32 ndarray [Hkv]

    Raises
    ------
    ValueError
        A size <= 0, an unknown ``device``, or a bad scale.
    TypeError
        An unsupported ``dtype`` or a non-int size.

    Notes
    -----
    Blocks are allocated lowest free index first, so allocation is
    deterministic.  A sequence holds ``ceil(seq_len / block_size)`` blocks.
    Several sequences may hold the same block after :meth:`fork`; a shared block
    that is full is never written again, and a shared block that is partly
    filled is copied (copy-on-write) before a sequence appends into it, so
    appending to one sequence never changes what another one reads.

    Examples
    --------
    >>> import numpy as np
    >>> from fastattn.kv_cache import PagedKVCache
    >>> cache = PagedKVCache(num_blocks=8, block_size=4, num_kv_heads=2, head_dim=16,
    ...                      dtype=np.float32)
    >>> cache.k_cache.shape
    (8, 4, 2, 16)
    >>> a = cache.add_sequence()
    >>> k = np.ones((6, 2, 16), np.float32)
    >>> cache.append(a, k, k)
    >>> cache.seq_len(a), cache.num_free_blocks
    (6, 6)
    >>> b = cache.fork(a)
    >>> cache.block_table([a, b])
    array([[0, 1],
           [0, 1]], dtype=int32)
    """

    def __init__(self, num_blocks, block_size, num_kv_heads, head_dim, dtype=np.float16,
                 device="cpu", *, k_scale=1.0, v_scale=1.0):
        self.num_blocks = _int("num_blocks", num_blocks, 1)
        self.block_size = _int("block_size", block_size, 1)
        self.num_kv_heads = _int("num_kv_heads", num_kv_heads, 1)
        self.head_dim = _int("head_dim", head_dim, 1)
        self.dtype = _cache_dtype(dtype)
        if not isinstance(device, str) or device not in ("cpu", "cuda"):
            raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")
        self.device = device
        self.k_scale = _scale_value("k_scale", k_scale, self.dtype, self.num_kv_heads)
        self.v_scale = _scale_value("v_scale", v_scale, self.dtype, self.num_kv_heads)

        shape = (self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        if device == "cpu":
            self.k_cache = np.zeros(shape, self.dtype)
            self.v_cache = np.zeros(shape, self.dtype)
            self._k_bits, self._v_bits = self.k_cache, self.v_cache
        else:
            self._k_bits, self.k_cache = _zeros_on_cuda(shape, self.dtype)
            self._v_bits, self.v_cache = _zeros_on_cuda(shape, self.dtype)

        self._free = list(range(self.num_blocks))  # a heap: the lowest free block comes first
        self._refcount = [0] * self.num_blocks
        self._blocks = {}  # seq_id -> list of physical blocks, in token order
        self._lens = {}    # seq_id -> number of tokens
        self._next_id = 0

    # ------------------------------------------------------------------ queries

    def __repr__(self):
        return (f"PagedKVCache(num_blocks={self.num_blocks}, block_size={self.block_size}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"dtype={self.dtype.name}, device={self.device!r}; {len(self)} sequences, "
                f"{self.num_free_blocks} free blocks)")

    def __len__(self):
        """Number of live sequences."""
        return len(self._blocks)

    def __contains__(self, seq_id):
        return seq_id in self._blocks

    @property
    def seq_ids(self):
        """The live sequence ids, in the order they were added (a new list)."""
        return list(self._blocks)

    @property
    def num_free_blocks(self):
        """Number of blocks that no sequence holds."""
        return len(self._free)

    def seq_len(self, seq_id):
        """Number of tokens appended to ``seq_id`` (including those it was forked with).

        Examples
        --------
        >>> from fastattn.kv_cache import PagedKVCache
        >>> cache = PagedKVCache(4, 16, 1, 8)
        >>> cache.seq_len(cache.add_sequence())
        0
        """
        return self._lens[self._known("seq_id", seq_id)]

    def seq_blocks(self, seq_id):
        """The physical blocks of ``seq_id`` in token order, as a tuple of ints.

        Examples
        --------
        >>> import numpy as np
        >>> from fastattn.kv_cache import PagedKVCache
        >>> cache = PagedKVCache(4, 2, 1, 8, np.float32)
        >>> s = cache.add_sequence()
        >>> cache.append(s, np.zeros((3, 1, 8), np.float32), np.zeros((3, 1, 8), np.float32))
        >>> cache.seq_blocks(s)
        (0, 1)
        """
        return tuple(self._blocks[self._known("seq_id", seq_id)])

    def ref_count(self, block):
        """Number of sequences holding physical block ``block`` (0 for a free block).

        Examples
        --------
        >>> import numpy as np
        >>> from fastattn.kv_cache import PagedKVCache
        >>> cache = PagedKVCache(4, 2, 1, 8, np.float32)
        >>> s = cache.add_sequence()
        >>> cache.append(s, np.zeros((1, 1, 8), np.float32), np.zeros((1, 1, 8), np.float32))
        >>> t = cache.fork(s)
        >>> cache.ref_count(0), cache.ref_count(1)
        (2, 0)
        """
        block = _int("block", block)
        if not 0 <= block < self.num_blocks:
            raise ValueError(f"block: expected 0 <= block < {self.num_blocks}, got {block}")
        return self._refcount[block]

    def blocks_needed(self, seq_id, num_tokens):
        """Free blocks that appending ``num_tokens`` tokens to ``seq_id`` would take.

        Counts the new blocks and, when the last block is partly filled and
        shared, the copy-on-write block.  :meth:`append` raises
        :class:`OutOfBlocksError` exactly when this exceeds
        :attr:`num_free_blocks`.

        Examples
        --------
        >>> import numpy as np
        >>> from fastattn.kv_cache import PagedKVCache
        >>> cache = PagedKVCache(8, 4, 1, 8, np.float32)
        >>> s = cache.add_sequence()
        >>> cache.append(s, np.zeros((3, 1, 8), np.float32), np.zeros((3, 1, 8), np.float32))
        >>> cache.blocks_needed(s, 1), cache.blocks_needed(s, 2)
        (0, 1)
        >>> t = cache.fork(s)
        >>> cache.blocks_needed(s, 1)  # the shared, partly filled block is copied first
        1
        """
        seq_id = self._known("seq_id", seq_id)
        return sum(self._plan(seq_id, _int("num_tokens", num_tokens, 0)))

    def block_table(self, seq_ids=None):
        """The block table of ``seq_ids``: int32 ``[len(seq_ids), max_blocks]``.

        Row ``i`` lists the physical blocks of ``seq_ids[i]`` in token order;
        ``max_blocks`` is the most blocks any of them holds (at least 1), and
        the unused entries of shorter rows are 0 (never read: the kernels stop
        at :meth:`seq_lens`).

        Parameters
        ----------
        seq_ids : sequence of int, optional
            Defaults to :attr:`seq_ids`, every live sequence.

        Returns
        -------
        array of int32
            A NumPy array for a CPU cache, a numba device array for CUDA.

        Examples
        --------
        >>> import numpy as np
        >>> from fastattn.kv_cache import PagedKVCache
        >>> cache = PagedKVCache(8, 2, 1, 4, np.float32)
        >>> a, b = cache.add_sequence(), cache.add_sequence()
        >>> cache.append(a, np.zeros((5, 1, 4), np.float32), np.zeros((5, 1, 4), np.float32))
        >>> cache.append(b, np.zeros((1, 1, 4), np.float32), np.zeros((1, 1, 4), np.float32))
        >>> cache.block_table([a, b])
        array([[0, 1, 2],
               [3, 0, 0]], dtype=int32)
        """
        ids = self._id_list(seq_ids)
        width = max([1] + [len(self._blocks[s]) for s in ids])
        table = np.zeros((len(ids), width), np.int32)
        for row, s in enumerate(ids):
            blocks = self._blocks[s]
            table[row, :len(blocks)] = blocks
        return self._on_device(table)

    def seq_lens(self, seq_ids=None):
        """The lengths of ``seq_ids``: int32 ``[len(seq_ids)]``, on the cache's device.

        Examples
        --------
        >>> import numpy as np
        >>> from fastattn.kv_cache import PagedKVCache
        >>> cache = PagedKVCache(8, 2, 1, 4, np.float32)
        >>> a, b = cache.add_sequence(), cache.add_sequence()
        >>> cache.append(a, np.zeros((5, 1, 4), np.float32), np.zeros((5, 1, 4), np.float32))
        >>> cache.seq_lens([b, a])
        array([0, 5], dtype=int32)
        """
        ids = self._id_list(seq_ids)
        return self._on_device(np.array([self._lens[s] for s in ids], np.int32))

    # ---------------------------------------------------------------- mutations

    def add_sequence(self, seq_id=None):
        """Start an empty sequence and return its id.

        Parameters
        ----------
        seq_id : int, optional
            The id to use.  By default the next value of a counter 0, 1, 2, ...
            that skips ids in use (ids of freed sequences are not reused).

        Returns
        -------
        int

        Raises
        ------
        ValueError
            ``seq_id`` is already a live sequence.

        Examples
        --------
        >>> from fastattn.kv_cache import PagedKVCache
        >>> cache = PagedKVCache(4, 16, 1, 8)
        >>> cache.add_sequence(), cache.add_sequence(7), cache.add_sequence()
        (0, 7, 1)
        """
        seq_id = self._new_id("seq_id", seq_id)
        self._blocks[seq_id] = []
        self._lens[seq_id] = 0
        return seq_id

    def append(self, seq_id, k, v, *, rotary=None, interleaved=False):
        """Append ``T`` tokens of keys and values to sequence ``seq_id``.

        Takes free blocks as needed (copying a shared, partly filled last block
        first), then writes the rows with :func:`fastattn.paged.write_kv_cache`
        using the cache's ``k_scale`` and ``v_scale``.

        Parameters
        ----------
        seq_id : int
        k, v : array, shape [T, Hkv, D]
            On the cache's device; a dtype that ``write_kv_cache`` accepts.
            ``T = 0`` appends nothing.
        rotary : (cos, sin), optional
            Rotary tables (:func:`fastattn.rotary_tables`): each key is rotated
            by its position in the sequence on its way into the cache.
        interleaved : bool
            GPT-J's pairing for ``rotary``.

        Raises
        ------
        OutOfBlocksError
            Fewer free blocks than needed; nothing was modified.
        KeyError
            ``seq_id`` is not a live sequence.
        ValueError
            ``k`` or ``v`` has the wrong shape.
        TypeError
            ``k`` or ``v`` is on another device than the cache, or has a bad
            dtype.  Nothing was modified.

        Examples
        --------
        >>> import numpy as np
        >>> from fastattn.kv_cache import PagedKVCache
        >>> cache = PagedKVCache(4, 2, 1, 4, np.float32)
        >>> s = cache.add_sequence()
        >>> k = np.arange(12, dtype=np.float32).reshape(3, 1, 4)
        >>> cache.append(s, k, -k)
        >>> cache.k_cache[1, 0, 0]
        array([ 8.,  9., 10., 11.], dtype=float32)
        """
        from .paged import write_kv_cache

        seq_id = self._known("seq_id", seq_id)
        k, v = self._tokens("k", k), self._tokens("v", v)
        if tuple(v.shape) != tuple(k.shape):
            raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
        count = int(k.shape[0])
        if count == 0:
            return
        cow, fresh = self._plan(seq_id, count)
        if cow + fresh > len(self._free):
            raise OutOfBlocksError(
                f"sequence {seq_id}: appending {count} tokens needs {cow + fresh} free "
                f"block{'s' if cow + fresh != 1 else ''} "
                f"({fresh} new" + (", 1 copy-on-write" if cow else "") +
                f"), but only {len(self._free)} of {self.num_blocks} are free")

        old = self._blocks[seq_id]
        length = self._lens[seq_id]
        taken = [heapq.heappop(self._free) for _ in range(cow + fresh)]
        blocks = list(old)
        if cow:
            # another sequence reads the filled rows of the last block: append into a copy
            blocks[-1] = taken[0]
        blocks += taken[cow:]
        positions = np.arange(length, length + count)
        slots = (np.array(blocks, np.int64)[positions // self.block_size] * self.block_size
                 + positions % self.block_size)
        try:
            # write_kv_cache checks everything before it writes, so a rejected call leaves the
            # caches as they were; the copied rows and the new rows are disjoint, so copy after
            rope = {} if rotary is None else dict(rotary=rotary, positions=positions, interleaved=interleaved)
            write_kv_cache(k, v, self.k_cache, self.v_cache, self._on_device(slots),
                           k_scale=self.k_scale, v_scale=self.v_scale, **rope)
            if cow:
                self._copy_rows(old[-1], taken[0], length % self.block_size)
        except BaseException:
            # the taken blocks were free and no sequence reads them: hand them back untouched
            for block in taken:
                heapq.heappush(self._free, block)
            raise
        for block in taken:
            self._refcount[block] = 1
        if cow:
            self._refcount[old[-1]] -= 1
        self._blocks[seq_id] = blocks
        self._lens[seq_id] = length + count

    def fork(self, seq_id, new_id=None):
        """Start a sequence that shares every block (and the length) of ``seq_id``.

        Parameters
        ----------
        seq_id : int
            A live sequence.
        new_id : int, optional
            The id of the new sequence; chosen as in :meth:`add_sequence` by default.

        Returns
        -------
        int
            The new sequence's id.

        Examples
        --------
        >>> import numpy as np
        >>> from fastattn.kv_cache import PagedKVCache
        >>> cache = PagedKVCache(4, 2, 1, 4, np.float32)
        >>> s = cache.add_sequence()
        >>> cache.append(s, np.ones((3, 1, 4), np.float32), np.ones((3, 1, 4), np.float32))
        >>> t = cache.fork(s)
        >>> cache.seq_blocks(t), cache.seq_len(t), cache.num_free_blocks
        ((0, 1), 3, 2)
        """
        seq_id = self._known("seq_id", seq_id)
        new_id = self._new_id("new_id", new_id)
        blocks = list(self._blocks[seq_id])
        for block in blocks:
            self._refcount[block] += 1
        self._blocks[new_id] = blocks
        self._lens[new_id] = self._lens[seq_id]
        return new_id

    def free(self, seq_id):
        """End sequence ``seq_id``; blocks that no other sequence holds become free.

        Examples
        --------
        >>> import numpy as np
        >>> from fastattn.kv_cache import PagedKVCache
        >>> cache = PagedKVCache(4, 2, 1, 4, np.float32)
        >>> s = cache.add_sequence()
        >>> cache.append(s, np.ones((3, 1, 4), np.float32), np.ones((3, 1, 4), np.float32))
        >>> t = cache.fork(s)
        >>> cache.free(s); cache.num_free_blocks
        2
        >>> cache.free(t); cache.num_free_blocks
        4
        """
        seq_id = self._known("seq_id", seq_id)
        for block in self._blocks.pop(seq_id):
            self._refcount[block] -= 1
            if self._refcount[block] == 0:
                heapq.heappush(self._free, block)
        del self._lens[seq_id]

    # ------------------------------------------------------------------ helpers

    def _known(self, name, seq_id):
        seq_id = _int(name, seq_id)
        if seq_id not in self._blocks:
            raise KeyError(f"{name}: expected a live sequence id, got {seq_id}")
        return seq_id

    def _new_id(self, name, seq_id):
        if seq_id is None:
            while self._next_id in self._blocks:
                self._next_id += 1
            seq_id = self._next_id
            self._next_id += 1
            return seq_id
        seq_id = _int(name, seq_id)
        if seq_id in self._blocks:
            raise ValueError(f"{name}: expected an id that is not in use, got {seq_id} (a live sequence)")
        return seq_id

    def _id_list(self, seq_ids):
        if seq_ids is None:
            return list(self._blocks)
        if isinstance(seq_ids, (int, np.integer)) and not isinstance(seq_ids, (bool, np.bool_)):
            raise TypeError(f"seq_ids: expected a sequence of ints, got a single int {seq_ids}; "
                            f"use [{seq_ids}]")
        try:
            ids = list(seq_ids)
        except TypeError:
            raise TypeError(f"seq_ids: expected a sequence of ints, got {type(seq_ids).__name__}") from None
        return [self._known("seq_ids", s) for s in ids]

    def _tokens(self, name, x):
        x = as_array(name, x)
        if device_of(x) != self.device:
            raise TypeError(f"{name}: expected an array on the cache's device ({self.device}), "
                            f"got one on {device_of(x)}")
        shape = tuple(int(s) for s in x.shape)
        if len(shape) != 3 or shape[1:] != (self.num_kv_heads, self.head_dim):
            raise ValueError(f"{name}: expected shape [T, Hkv, D] with Hkv={self.num_kv_heads} and "
                             f"D={self.head_dim}, got {shape}")
        return x

    def _plan(self, seq_id, count):
        """(copy-on-write blocks, new blocks) that appending ``count`` tokens takes."""
        if count == 0:
            return 0, 0
        length, bs = self._lens[seq_id], self.block_size
        blocks = self._blocks[seq_id]
        cow = int(length % bs != 0 and self._refcount[blocks[-1]] > 1)
        fresh = -(-(length + count) // bs) - -(-length // bs)
        return cow, fresh

    def _copy_rows(self, src, dst, rows):
        """Copy the first ``rows`` rows of block ``src`` into block ``dst`` in both caches."""
        for bits in (self._k_bits, self._v_bits):
            if self.device == "cpu":
                bits[dst, :rows] = bits[src, :rows]
            else:
                bits[dst, :rows].copy_to_device(bits[src, :rows])  # device to device

    def _on_device(self, array):
        if self.device == "cpu":
            return array
        from numba import cuda

        return cuda.to_device(array)
