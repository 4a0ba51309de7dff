"""PagedKVCache: block bookkeeping, the rows it writes, copy-on-write and its errors.

Tests that take the ``device`` fixture run on a CPU cache and, marked ``cuda``,
on a CUDA cache (tiny shapes, for the simulator).  The expected block numbers
follow from the documented allocation order: lowest free block first.
"""
import ml_dtypes
import numpy as np
import pytest

from conftest import BF16, CUDA, Device, assert_close, cuda_unavailable_reason, host
from fastattn import kv_cache, reference
from fastattn.kv_cache import OutOfBlocksError, PagedKVCache

F32, F64, F16 = np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16)
E4M3, E5M2 = np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2)
DTYPE_ID = {F32: "f32", F64: "f64", F16: "f16", BF16: "bf16", E4M3: "e4m3", E5M2: "e5m2"}


def make_cache(device, dtype=F32, num_blocks=8, block_size=4, heads=2, dim=4, **scales):
    return PagedKVCache(num_blocks, block_size, heads, dim, dtype, device.name, **scales)


def tokens(rng, cache, count, dtype=F32):
    """Random k, v [count, Hkv, D] as NumPy arrays."""
    shape = (count, cache.num_kv_heads, cache.head_dim)
    return (rng.standard_normal(shape).astype(dtype), rng.standard_normal(shape).astype(dtype))


def append(device, cache, seq_id, k, v):
    cache.append(seq_id, device.put(k), device.put(v))


def gathered(cache, seq_id):
    """(K, V) of one sequence, [seq_len, Hkv, D] in the cache's dtype, read through its blocks."""
    rows = np.arange(cache.seq_len(seq_id))
    blocks = np.array(cache.seq_blocks(seq_id), np.int64)
    k_cache, v_cache = host(cache.k_cache), host(cache.v_cache)
    where = (blocks[rows // cache.block_size], rows % cache.block_size)
    return k_cache[where], v_cache[where]


def state(cache):
    """Everything a failed call must leave as it was."""
    return (cache.num_free_blocks, {s: (cache.seq_len(s), cache.seq_blocks(s)) for s in cache.seq_ids},
            [cache.ref_count(b) for b in range(cache.num_blocks)],
            host(cache.k_cache).tobytes(), host(cache.v_cache).tobytes())


# ------------------------------------------------------------------ construction

@pytest.mark.parametrize("dtype", list(DTYPE_ID), ids=DTYPE_ID.get)
def test_caches_start_as_zeros(device, dtype, monkeypatch):
    monkeypatch.setattr(kv_cache, "_ZERO_CHUNK", 40)  # a CUDA cache is cleared in several chunks
    cache = make_cache(device, dtype, num_blocks=3, block_size=2, heads=2, dim=4)
    for name in ("k_cache", "v_cache"):
        array = getattr(cache, name)
        assert isinstance(array, np.ndarray) == (device.name == "cpu"), name
        array = host(array)
        assert array.shape == (3, 2, 2, 4) and array.dtype == dtype, name
        assert not array.view(np.uint8).any(), f"{name}: expected zeros"
    assert cache.num_free_blocks == 3 and len(cache) == 0 and cache.seq_ids == []


BAD_ARGS = [
    (dict(num_blocks=0), ValueError, "^num_blocks: expected an int >= 1, got 0"),
    (dict(block_size=-1), ValueError, "^block_size: expected an int >= 1, got -1"),
    (dict(num_kv_heads=0), ValueError, "^num_kv_heads: "),
    (dict(head_dim=0), ValueError, "^head_dim: "),
    (dict(num_blocks=2.0), TypeError, "^num_blocks: expected an int, got float"),
    (dict(block_size=True), TypeError, "^block_size: "),
    (dict(dtype=np.int32), TypeError, "^dtype: expected float32, .*, got int32"),
    (dict(dtype="not a dtype"), TypeError, "^dtype: "),
    (dict(device="gpu"), ValueError, "^device: expected 'cpu' or 'cuda', got 'gpu'"),
    (dict(device=None), ValueError, "^device: "),
    (dict(dtype=E4M3, k_scale=0.0), ValueError, "^k_scale: expected a finite float > 0"),
    (dict(dtype=E4M3, v_scale=float("nan")), ValueError, "^v_scale: "),
    (dict(dtype=E4M3, k_scale=[1.0, 2.0, 3.0]), ValueError, r"^k_scale: .*\(2,\)"),
    (dict(dtype=E4M3, k_scale="big"), TypeError, "^k_scale: "),
    (dict(dtype=F16, k_scale=0.5), ValueError, "^k_scale: only fp8 caches are scaled"),
]


@pytest.mark.parametrize("changes, error, match", BAD_ARGS, ids=[m.split(":")[0][1:] + "-" + str(i)
                                                                  for i, (_, _, m) in enumerate(BAD_ARGS)])
def test_constructor_rejects_bad_arguments(changes, error, match):
    args = dict(num_blocks=4, block_size=2, num_kv_heads=2, head_dim=4, dtype=F32, device="cpu")
    args.update(changes)
    with pytest.raises(error, match=match):
        PagedKVCache(**args)


def test_scales_are_kept_as_floats_or_per_head_arrays():
    cache = PagedKVCache(2, 2, 2, 4, E4M3, k_scale=0.5, v_scale=[1.0, 2.0])
    assert cache.k_scale == 0.5
    np.testing.assert_array_equal(cache.v_scale, np.array([1.0, 2.0], np.float32))
    assert not cache.v_scale.flags.writeable


# ------------------------------------------------------------------ sequence ids

def test_sequence_ids_are_assigned_and_checked():
    cache = PagedKVCache(4, 2, 1, 4, F32)
    assert [cache.add_sequence(), cache.add_sequence(2), cache.add_sequence(), cache.add_sequence()] == [0, 2, 1, 3]
    assert cache.seq_ids == [0, 2, 1, 3] and len(cache) == 4 and 2 in cache and 5 not in cache
    with pytest.raises(ValueError, match="^seq_id: expected an id that is not in use, got 2"):
        cache.add_sequence(2)
    with pytest.raises(TypeError, match="^seq_id: expected an int"):
        cache.add_sequence("a")
    cache.free(0)
    assert cache.add_sequence() == 4, "freed ids are not reused by the counter"
    assert cache.add_sequence(0) == 0, "a freed id may be given explicitly"
    assert cache.add_sequence(np.int64(9)) == 9
    assert cache.fork(9, new_id=20) == 20
    with pytest.raises(ValueError, match="^new_id: "):
        cache.fork(9, new_id=20)


@pytest.mark.parametrize("call", ["seq_len", "seq_blocks", "free", "fork", "append", "block_table",
                                  "seq_lens", "blocks_needed"])
def test_unknown_sequence_ids_are_rejected(call):
    cache = PagedKVCache(4, 2, 1, 4, F32)
    cache.add_sequence()
    k = np.zeros((1, 1, 4), np.float32)
    calls = {"seq_len": lambda: cache.seq_len(5), "seq_blocks": lambda: cache.seq_blocks(5),
             "free": lambda: cache.free(5), "fork": lambda: cache.fork(5),
             "append": lambda: cache.append(5, k, k), "block_table": lambda: cache.block_table([0, 5]),
             "seq_lens": lambda: cache.seq_lens([5]), "blocks_needed": lambda: cache.blocks_needed(5, 1)}
    with pytest.raises(KeyError, match="seq_ids?: expected a live sequence id, got 5"):
        calls[call]()
    assert cache.seq_ids == [0] and cache.num_free_blocks == 4


def test_tables_of_empty_sequences():
    cache = PagedKVCache(4, 2, 1, 4, F32)
    a, b = cache.add_sequence(), cache.add_sequence()
    table = cache.block_table([a, b])
    assert table.dtype == np.int32 and table.shape == (2, 1) and not table.any()
    np.testing.assert_array_equal(cache.seq_lens(), np.array([0, 0], np.int32))
    assert cache.block_table([]).shape == (0, 1) and cache.seq_lens([]).shape == (0,)
    with pytest.raises(TypeError, match=r"^seq_ids: expected a sequence of ints, got a single int 0; use \[0\]"):
        cache.block_table(0)


# ------------------------------------------------------------------ appending

def test_append_fills_blocks_across_boundaries(device, rng):
    cache = make_cache(device, num_blocks=8, block_size=4)
    a, b = cache.add_sequence(), cache.add_sequence()
    steps = [(a, 3, (0,)), (a, 1, (0,)), (b, 1, (1,)), (a, 6, (0, 2, 3)), (a, 3, (0, 2, 3, 4)),
             (b, 4, (1, 5)), (a, 0, (0, 2, 3, 4))]
    written = {a: [], b: []}
    for seq, count, blocks in steps:
        k, v = tokens(rng, cache, count)
        append(device, cache, seq, k, v)
        written[seq].append((k, v))
        assert cache.seq_blocks(seq) == blocks
    assert (cache.seq_len(a), cache.seq_len(b)) == (13, 5)
    assert cache.num_free_blocks == 8 - 6
    assert [cache.ref_count(i) for i in range(8)] == [1, 1, 1, 1, 1, 1, 0, 0]
    for seq in (a, b):
        k_got, v_got = gathered(cache, seq)
        np.testing.assert_array_equal(k_got, np.concatenate([k for k, _ in written[seq]]))
        np.testing.assert_array_equal(v_got, np.concatenate([v for _, v in written[seq]]))


def test_block_table_and_seq_lens(device, rng):
    cache = make_cache(device, num_blocks=8, block_size=2, heads=1)
    a, b, c = (cache.add_sequence() for _ in range(3))
    for seq, count in ((a, 5), (b, 1), (a, 1)):
        append(device, cache, seq, *tokens(rng, cache, count))
    table, lens = cache.block_table([b, a, c]), cache.seq_lens([b, a, c])
    table, lens = device.get(table), device.get(lens)  # checks that they live on the cache's device
    assert table.dtype == np.int32 and lens.dtype == np.int32
    np.testing.assert_array_equal(table, [[3, 0, 0], [0, 1, 2], [0, 0, 0]])
    np.testing.assert_array_equal(lens, [1, 6, 0])
    np.testing.assert_array_equal(device.get(cache.block_table()), [[0, 1, 2], [3, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(device.get(cache.seq_lens(np.array([a]))), [6])


CONVERTED = [pytest.param(dtype, id=DTYPE_ID[dtype]) for dtype in (F64, F16, BF16)]


@pytest.mark.parametrize("dtype", CONVERTED)
def test_appended_rows_round_to_the_cache_dtype(device, dtype, rng):
    cache = make_cache(device, dtype, num_blocks=3, block_size=2)
    seq = cache.add_sequence()
    k, v = tokens(rng, cache, 5)
    append(device, cache, seq, k, v)
    k_got, v_got = gathered(cache, seq)
    np.testing.assert_array_equal(k_got.view(np.uint8), k.astype(dtype).view(np.uint8))
    np.testing.assert_array_equal(v_got.view(np.uint8), v.astype(dtype).view(np.uint8))


def fp8_expected(x, scale, dtype):
    """saturate(x / scale), rounded to nearest even, as ml_dtypes casts it."""
    scale = np.asarray(scale, np.float64)[..., None] if np.ndim(scale) else scale
    big = float(ml_dtypes.finfo(dtype).max)
    return np.clip(x.astype(np.float64) / scale, -big, big).astype(dtype)


# powers of two, so x / scale is exact in any precision and only the fp8 rounding is tested
FP8_CASES = [pytest.param(dtype, k_scale, v_scale, id=f"{DTYPE_ID[dtype]}-{name}")
             for dtype in (E4M3, E5M2)
             for name, k_scale, v_scale in (("unscaled", 1.0, 1.0), ("scalar", 0.25, 4.0),
                                            ("per-head", [0.5, 2.0], [1.0, 0.125]))]


@pytest.mark.parametrize("dtype, k_scale, v_scale", FP8_CASES)
def test_fp8_rows_are_scaled_rounded_and_saturated(device, dtype, k_scale, v_scale, rng):
    cache = make_cache(device, dtype, num_blocks=3, block_size=2, heads=2, k_scale=k_scale, v_scale=v_scale)
    seq = cache.add_sequence()
    k, v = tokens(rng, cache, 5)
    k[0, 0, :2] = [1e6, -1e6]  # beyond every fp8 range: saturates
    k[1, 1, :2] = [1e-9, -0.0]
    append(device, cache, seq, k, v)
    k_got, v_got = gathered(cache, seq)
    np.testing.assert_array_equal(k_got.view(np.uint8), fp8_expected(k, k_scale, dtype).view(np.uint8))
    np.testing.assert_array_equal(v_got.view(np.uint8), fp8_expected(v, v_scale, dtype).view(np.uint8))


# ------------------------------------------------------------------ fork, copy-on-write, free

def test_fork_shares_blocks(device, rng):
    cache = make_cache(device, num_blocks=6, block_size=4)
    a = cache.add_sequence()
    append(device, cache, a, *tokens(rng, cache, 6))
    b = cache.fork(a)
    assert cache.seq_blocks(b) == cache.seq_blocks(a) == (0, 1)
    assert cache.seq_len(b) == 6 and cache.num_free_blocks == 4
    assert (cache.ref_count(0), cache.ref_count(1), cache.ref_count(2)) == (2, 2, 0)
    c = cache.fork(b)
    assert (cache.ref_count(0), cache.ref_count(1)) == (3, 3) and cache.num_free_blocks == 4
    np.testing.assert_array_equal(device.get(cache.block_table([a, b, c])), [[0, 1]] * 3)
    empty = cache.fork(cache.add_sequence())
    assert cache.seq_blocks(empty) == () and cache.seq_len(empty) == 0


def test_append_to_a_fork_copies_a_shared_partial_block(device, rng):
    cache = make_cache(device, num_blocks=6, block_size=4)
    parent = cache.add_sequence()
    k0, v0 = tokens(rng, cache, 6)  # block 0 full, block 1 holds 2 of 4 rows
    append(device, cache, parent, k0, v0)
    child = cache.fork(parent)
    before = host(cache.k_cache).copy(), host(cache.v_cache).copy()
    assert cache.blocks_needed(child, 1) == 1

    k1, v1 = tokens(rng, cache, 1)
    append(device, cache, child, k1, v1)
    assert cache.seq_blocks(parent) == (0, 1) and cache.seq_blocks(child) == (0, 2)
    assert [cache.ref_count(i) for i in range(3)] == [2, 1, 1] and cache.num_free_blocks == 3
    for got, old, new, name in ((host(cache.k_cache), before[0], k1, "k"), (host(cache.v_cache), before[1], v1, "v")):
        np.testing.assert_array_equal(got[:2], old[:2], err_msg=f"{name}: the parent's blocks changed")
        np.testing.assert_array_equal(got[2, :2], old[1, :2], err_msg=f"{name}: the filled rows were not copied")
        np.testing.assert_array_equal(got[2, 2], new[0], err_msg=f"{name}: the new row")
    np.testing.assert_array_equal(gathered(cache, parent)[0], k0)
    np.testing.assert_array_equal(gathered(cache, child)[0], np.concatenate([k0, k1]))

    # the parent now holds block 1 alone: it appends in place, no copy
    k2, v2 = tokens(rng, cache, 3)
    append(device, cache, parent, k2, v2)
    assert cache.seq_blocks(parent) == (0, 1, 3) and cache.num_free_blocks == 2
    np.testing.assert_array_equal(gathered(cache, parent)[1], np.concatenate([v0, v2]))
    np.testing.assert_array_equal(gathered(cache, child)[1], np.concatenate([v0, v1]))


def test_full_shared_blocks_are_not_copied(device, rng):
    cache = make_cache(device, num_blocks=4, block_size=2)
    parent = cache.add_sequence()
    k0, v0 = tokens(rng, cache, 4)
    append(device, cache, parent, k0, v0)
    child = cache.fork(parent)
    k1, v1 = tokens(rng, cache, 1)
    append(device, cache, child, k1, v1)
    assert cache.seq_blocks(child) == (0, 1, 2) and cache.num_free_blocks == 1
    assert (cache.ref_count(0), cache.ref_count(1), cache.ref_count(2)) == (2, 2, 1)
    np.testing.assert_array_equal(gathered(cache, child)[0], np.concatenate([k0, k1]))
    np.testing.assert_array_equal(gathered(cache, parent)[1], v0)


def test_free_returns_blocks_lowest_first(device, rng):
    cache = make_cache(device, num_blocks=6, block_size=2)
    a, b = cache.add_sequence(), cache.add_sequence()
    append(device, cache, a, *tokens(rng, cache, 3))  # blocks 0, 1
    append(device, cache, b, *tokens(rng, cache, 2))  # block 2
    c = cache.fork(a)
    cache.free(a)
    assert a not in cache and cache.num_free_blocks == 3, "the fork still holds a's blocks"
    assert (cache.ref_count(0), cache.ref_count(1)) == (1, 1)
    cache.free(c)
    assert cache.num_free_blocks == 5 and cache.seq_ids == [b]
    d = cache.add_sequence()
    append(device, cache, d, *tokens(rng, cache, 5))
    assert cache.seq_blocks(d) == (0, 1, 3)
    with pytest.raises(KeyError):
        cache.free(a)


# ------------------------------------------------------------------ failures leave no trace

def test_out_of_blocks_changes_nothing(device, rng):
    cache = make_cache(device, num_blocks=4, block_size=2)
    a = cache.add_sequence()
    append(device, cache, a, *tokens(rng, cache, 5))  # blocks 0, 1, 2 (half full)
    before = state(cache)
    with pytest.raises(OutOfBlocksError, match=r"needs 2 free blocks \(2 new\), but only 1 of 4 are free"):
        append(device, cache, a, *tokens(rng, cache, 4))
    assert state(cache) == before
    assert cache.blocks_needed(a, 3) == 1
    append(device, cache, a, *tokens(rng, cache, 3))  # exactly fills the cache
    assert cache.num_free_blocks == 0 and cache.seq_len(a) == 8


def test_out_of_blocks_counts_the_copy_on_write_block(device, rng):
    cache = make_cache(device, num_blocks=3, block_size=2)
    a = cache.add_sequence()
    append(device, cache, a, *tokens(rng, cache, 3))  # blocks 0, 1 (half full)
    b = cache.fork(a)
    append(device, cache, cache.add_sequence(), *tokens(rng, cache, 1))  # takes the last block
    before = state(cache)
    with pytest.raises(OutOfBlocksError, match=r"needs 1 free block \(0 new, 1 copy-on-write\), but only 0"):
        append(device, cache, b, *tokens(rng, cache, 1))
    assert state(cache) == before
    assert issubclass(OutOfBlocksError, RuntimeError)


def test_a_rejected_write_changes_nothing(rng):
    cache = PagedKVCache(4, 2, 2, 4, F32)
    a = cache.add_sequence()
    cache.append(a, *tokens(rng, cache, 3))
    b = cache.fork(a)  # the next append to b would copy block 1 and take a new block
    before = state(cache)
    k, v = tokens(rng, cache, 2)
    with pytest.raises(TypeError, match="^k: "):  # raised by write_kv_cache, after allocation
        cache.append(b, k.astype(np.int32), v.astype(np.int32))
    assert state(cache) == before


BAD_TOKENS = [
    ("k-rank", lambda k, v: (k[0], v), r"^k: expected shape \[T, Hkv, D\] with Hkv=2 and D=4, got \(2, 4\)"),
    ("k-heads", lambda k, v: (k[:, :1], v), r"^k: .*got \(3, 1, 4\)"),
    ("k-dim", lambda k, v: (k[..., :3], v), r"^k: .*got \(3, 2, 3\)"),
    ("v-rank", lambda k, v: (k, v[None]), r"^v: .*got \(1, 3, 2, 4\)"),
    ("v-length", lambda k, v: (k, v[:2]), r"^v: expected the shape of k \(3, 2, 4\), got \(2, 2, 4\)"),
]


@pytest.mark.parametrize("name, change, match", BAD_TOKENS, ids=[c[0] for c in BAD_TOKENS])
def test_bad_tokens_are_rejected(device, name, change, match, rng):
    cache = make_cache(device, num_blocks=4, block_size=2)
    a = cache.add_sequence()
    before = state(cache)
    k, v = map(np.ascontiguousarray, change(*tokens(rng, cache, 3)))
    with pytest.raises(ValueError, match=match):
        append(device, cache, a, k, v)
    assert state(cache) == before


@CUDA
def test_tokens_on_another_device_are_rejected(rng):
    reason = cuda_unavailable_reason()
    if reason:
        pytest.skip(reason)
    device = Device("cuda")
    cache = make_cache(device, num_blocks=2, block_size=2)
    a = cache.add_sequence()
    k, v = tokens(rng, cache, 1)
    with pytest.raises(TypeError, match=r"^k: expected an array on the cache's device \(cuda\), got one on cpu"):
        cache.append(a, k, device.put(v))
    cpu = PagedKVCache(2, 2, 2, 4, F32)
    with pytest.raises(TypeError, match=r"^v: expected an array on the cache's device \(cpu\), got one on cuda"):
        cpu.append(cpu.add_sequence(), k, device.put(v))


# ------------------------------------------------------------------ paged attention on the tables

def dense_reference(cache, ids, q, scale=(1.0, 1.0), **options):
    """reference.attention per sequence on its gathered (decoded) K/V; [B, Hq, Sq, D] float64."""
    out = []
    for b, seq in enumerate(ids):
        k, v = gathered(cache, seq)
        k = k.astype(np.float64) * (np.asarray(scale[0], np.float64)[:, None] if np.ndim(scale[0]) else scale[0])
        v = v.astype(np.float64) * (np.asarray(scale[1], np.float64)[:, None] if np.ndim(scale[1]) else scale[1])
        out.append(reference.attention(q[b:b + 1], k.transpose(1, 0, 2)[None], v.transpose(1, 0, 2)[None],
                                       **options)[0])
    return np.stack(out)


def forked_batch(device, cache, rng, dtype):
    """Four sequences: a prompt, two forks that grew apart (one through copy-on-write), another prompt."""
    a, c = cache.add_sequence(), cache.add_sequence()
    append(device, cache, a, *tokens(rng, cache, 7, dtype))
    b = cache.fork(a)
    append(device, cache, b, *tokens(rng, cache, 3, dtype))
    append(device, cache, a, *tokens(rng, cache, 2, dtype))
    d = cache.fork(b)
    append(device, cache, c, *tokens(rng, cache, 4, dtype))
    return [b, a, c, d]


@pytest.mark.parametrize("dtype", [pytest.param(d, id=DTYPE_ID[d]) for d in (F32, F16, BF16)])
@pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal"])
def test_paged_attention_on_the_tables_matches_reference(device, dtype, causal, rng):
    cache = make_cache(device, dtype, num_blocks=8, block_size=4, heads=2, dim=8)
    ids = forked_batch(device, cache, rng, dtype)
    q = rng.standard_normal((len(ids), 4, 2, 8)).astype(dtype)
    from fastattn.paged import paged_attention

    out = paged_attention(device.put(q), cache.k_cache, cache.v_cache, cache.block_table(ids),
                                   cache.seq_lens(ids), causal=causal)
    assert_close(device.get(out), dense_reference(cache, ids, q, causal=causal), dtype)


@pytest.mark.parametrize("dtype", [pytest.param(d, id=DTYPE_ID[d]) for d in (E4M3, E5M2)])
def test_fp8_paged_attention_on_the_tables_matches_reference(device, dtype, rng):
    scales = ([0.5, 0.25], 0.125)
    cache = make_cache(device, dtype, num_blocks=8, block_size=4, heads=2, dim=8, k_scale=scales[0],
                       v_scale=scales[1])
    ids = forked_batch(device, cache, rng, F32)
    q = rng.standard_normal((len(ids), 4, 1, 8)).astype(F32)
    from fastattn.paged import paged_attention_fp8

    out = paged_attention_fp8(device.put(q), cache.k_cache, cache.v_cache, cache.block_table(ids),
                              cache.seq_lens(ids), k_scale=device.put(cache.k_scale), v_scale=cache.v_scale)
    assert_close(device.get(out), dense_reference(cache, ids, q, scales), F32)
