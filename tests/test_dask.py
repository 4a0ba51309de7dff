"""fastattn.dask: chunked attention equals the single call; decode spread over workers.

Runs on dask's threaded scheduler and on a 2-worker ``LocalCluster`` with
processes (loopback only, shut down by its fixture).
"""
import ml_dtypes
import numpy as np
import pytest

import dask
import dask.array as da
from distributed import Client, LocalCluster

import fastattn
import fastattn.dask
from fastattn import reference
from fastattn.dask import DecodeWorker, paged_decode

from conftest import assert_close

F32 = np.dtype(np.float32)
B, HQ, HKV, SQ, SK, D = 2, 6, 2, 37, 53, 16

#: name -> (q chunks, k/v chunks) over [B, H, S, D]
CHUNKINGS = {
    "keys": ((B, HQ, SQ, D), (B, HKV, 11, D)),
    "queries": ((B, HQ, 10, D), (B, HKV, SK, D)),
    "heads": ((B, 3, SQ, D), (B, 1, SK, D)),
    "heads-split-groups": ((B, (2, 2, 2), SQ, D), (B, HKV, SK, D)),  # 3 query heads per KV head
    "batch": ((1, HQ, SQ, D), (1, HKV, SK, D)),
    "mixed": ((1, (4, 2), (20, 17), D), (2, 1, (7, 30, 16), D)),
}
OPTIONS = {
    "plain": {},
    "causal": dict(causal=True),
    "window": dict(window=(6, 2)),
    "window-left": dict(window=(9, -1)),
    "causal-alibi-softcap": dict(causal=True, alibi_slopes=np.linspace(0.05, 0.6, HQ), softcap=4.0),
}


def inputs(rng, dtype=F32, sq=SQ, sk=SK):
    q = rng.standard_normal((B, HQ, sq, D)).astype(dtype)
    k = rng.standard_normal((B, HKV, sk, D)).astype(dtype)
    v = rng.standard_normal((B, HKV, sk, D)).astype(dtype)
    return q, k, v


def chunked(q, k, v, chunking):
    q_chunks, kv_chunks = CHUNKINGS[chunking]
    return (da.from_array(q, chunks=q_chunks), da.from_array(k, chunks=kv_chunks),
            da.from_array(v, chunks=kv_chunks))


def check_against_single_call(q, k, v, dq, dk, dv, options, dtype=F32, **compute):
    out, lse = fastattn.dask.attention(dq, dk, dv, return_lse=True, **options)
    assert out.chunks == dq.chunks and lse.chunks == dq.chunks[:3]
    got_out, got_lse = dask.compute(out, lse, **compute)
    single_out, single_lse = fastattn.attention(q, k, v, return_lse=True, **options)
    assert_close(got_out, single_out.astype(np.float64), dtype, "out vs single call")
    assert_close(got_lse, single_lse.astype(np.float64), dtype, "lse vs single call")
    ref_out, ref_lse = reference.attention(q, k, v, return_lse=True, **options)
    assert_close(got_out, ref_out, dtype, "out")
    assert_close(got_lse, ref_lse, dtype, "lse")


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("chunking", CHUNKINGS)
def test_chunked_attention_equals_the_single_call(chunking, options, rng):
    q, k, v = inputs(rng)
    check_against_single_call(q, k, v, *chunked(q, k, v, chunking), options, scheduler="threads")


@pytest.mark.parametrize("dtype", [np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)], ids=str)
def test_half_precision_key_chunks(dtype, rng):
    q, k, v = inputs(rng, dtype)
    check_against_single_call(q, k, v, *chunked(q, k, v, "mixed"), dict(causal=True), dtype, scheduler="threads")


def test_rows_that_see_no_key_are_zero_with_minus_inf_lse(rng):
    # Sq > Sk, causal: rows 0 .. Sq - Sk - 1 see nothing; the first query chunk is entirely masked.
    q, k, v = inputs(rng, sq=40, sk=12)
    dq, dk, dv = da.from_array(q, chunks=(B, HQ, 8, D)), da.from_array(k, chunks=(B, HKV, 5, D)), \
        da.from_array(v, chunks=(B, HKV, 5, D))
    out, lse = dask.compute(*fastattn.dask.attention(dq, dk, dv, causal=True, return_lse=True))
    assert np.all(out[:, :, :28] == 0) and np.all(lse[:, :, :28] == -np.inf)
    ref_out, ref_lse = reference.attention(q, k, v, causal=True, return_lse=True)
    assert_close(out, ref_out, F32, "out")
    assert_close(lse, ref_lse, F32, "lse")


def _block_tasks(array):
    return [key for key in dict(array.__dask_graph__()) if str(key[0]).startswith("fastattn-block-")]


def test_masked_chunk_pairs_get_no_task(rng):
    q, k, v = inputs(rng, sq=64, sk=64)
    parts = [da.from_array(x, chunks=(B, x.shape[1], 16, D)) for x in (q, k, v)]
    assert len(_block_tasks(fastattn.dask.attention(*parts))) == 16       # 4 x 4 pairs
    assert len(_block_tasks(fastattn.dask.attention(*parts, causal=True))) == 10  # the lower triangle
    assert len(_block_tasks(fastattn.dask.attention(*parts, window=(3, 0)))) == 7  # diagonal + first below


def test_numpy_inputs_are_one_chunk(rng):
    q, k, v = inputs(rng)
    out = fastattn.dask.attention(q, k, v, causal=True)
    assert isinstance(out, da.Array) and out.numblocks == (1, 1, 1, 1)
    assert_close(out.compute(scheduler="threads"), reference.attention(q, k, v, causal=True), F32)


@pytest.mark.parametrize("call, error, match", [
    (lambda q, k, v: fastattn.dask.attention(q, k[:, :, :, :8], v), ValueError, "^k: "),
    (lambda q, k, v: fastattn.dask.attention(q, k, v.astype(np.float64)), TypeError, "^v: "),
    (lambda q, k, v: fastattn.dask.attention(q, k, v, window=(1, 2, 3)), TypeError, "^window: "),
    (lambda q, k, v: fastattn.dask.attention(q, k, v, split_every=1), ValueError, "^split_every: "),
    (lambda q, k, v: fastattn.dask.attention([[0.0]], k, v), TypeError, "^q: "),
    (lambda q, k, v: fastattn.dask.attention(q[q[:, 0, 0, 0] > 0], k, v), ValueError, "^q: .*unknown"),
], ids=["k-head-dim", "v-dtype", "window", "split-every", "q-list", "q-unknown-chunks"])
def test_bad_input_raises_before_any_task(call, error, match, rng):
    q, k, v = (da.from_array(x, chunks=x.shape) for x in inputs(rng))
    with pytest.raises(error, match=match):
        call(q, k, v)


# --- decode spread over workers ---------------------------------------------------------

def _decode_reference(prompts, q, k_new, v_new):
    """Dense attention of each row's query over its prompt plus its new token."""
    outs = []
    for r, (pk, pv) in enumerate(prompts):
        keys = np.concatenate([pk, k_new[r:r + 1]]).transpose(1, 0, 2)[None]
        values = np.concatenate([pv, v_new[r:r + 1]]).transpose(1, 0, 2)[None]
        outs.append(reference.attention(q[r:r + 1], keys, values))
    return np.concatenate(outs)


def _decode_case(rng, lengths=(5, 9, 3, 17)):
    prompts = [(rng.standard_normal((n, HKV, D)).astype(np.float32),
                rng.standard_normal((n, HKV, D)).astype(np.float32)) for n in lengths]
    q = rng.standard_normal((len(lengths), HQ, 1, D)).astype(np.float32)
    k_new = rng.standard_normal((len(lengths), HKV, D)).astype(np.float32)
    v_new = rng.standard_normal((len(lengths), HKV, D)).astype(np.float32)
    return prompts, q, k_new, v_new


def _place(workers, prompts, result=lambda x: x):
    """Row r's sequence goes to worker r % 2 (rows interleave across workers)."""
    return [(r % 2, result(workers[r % 2].add_sequence(pk, pv))) for r, (pk, pv) in enumerate(prompts)]


def test_paged_decode_over_local_workers(rng):
    prompts, q, k_new, v_new = _decode_case(rng)
    workers = [DecodeWorker(16, 4, HKV, D, np.float32) for _ in range(2)]
    placement = _place(workers, prompts)
    out = paged_decode(workers, placement, q, k_new, v_new)
    assert_close(out, _decode_reference(prompts, q, k_new, v_new), F32)
    assert [int(workers[w].seq_lens([s])[0]) for w, s in placement] == [6, 10, 4, 18]


def test_paged_decode_with_fp8_workers(rng):
    prompts, q, k_new, v_new = _decode_case(rng, lengths=(4, 7))
    workers = [DecodeWorker(8, 4, HKV, D, ml_dtypes.float8_e4m3fn, k_scale=0.5, v_scale=0.25)
               for _ in range(2)]
    out = paged_decode(workers, _place(workers, prompts), q, k_new, v_new)
    # the reference sees the keys and values as stored: rounded to fp8 at their scales
    stored = [tuple((x / s).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * s for x, s in zip(p, (0.5, 0.25)))
              for p in prompts]
    k_stored = (k_new / 0.5).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * 0.5
    v_stored = (v_new / 0.25).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * 0.25
    assert out.dtype == np.float32
    assert_close(out, _decode_reference(stored, q, k_stored, v_stored), F32)


def test_paged_decode_rejects_bad_placement(rng):
    prompts, q, k_new, v_new = _decode_case(rng, lengths=(3, 3))
    workers = [DecodeWorker(8, 4, HKV, D, np.float32)]
    seq = workers[0].add_sequence(*prompts[0])
    with pytest.raises(ValueError, match="^placement: expected one"):
        paged_decode(workers, [(0, seq)], q, k_new, v_new)
    with pytest.raises(ValueError, match=r"^placement\[1\]: expected a worker index"):
        paged_decode(workers, [(0, seq), (1, seq)], q, k_new, v_new)
    with pytest.raises(ValueError, match="^placement: expected each"):
        paged_decode(workers, [(0, seq), (0, seq)], q, k_new, v_new)


def test_decode_worker_leaves_no_sequence_behind_when_blocks_run_out():
    worker = DecodeWorker(2, 4, HKV, D, np.float32)
    prompt = np.zeros((9, HKV, D), np.float32)  # needs 3 blocks
    with pytest.raises(fastattn.OutOfBlocksError):
        worker.add_sequence(prompt, prompt)
    assert worker.num_free_blocks == 2 and len(worker.cache) == 0


# --- a 2-worker LocalCluster with processes -------------------------------------------------

@pytest.fixture(scope="module")
def client():
    """Two single-threaded worker processes on loopback, 1 GiB each, closed after the module's tests."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, memory_limit="1GiB") as cluster, Client(cluster) as client:
        yield client


def test_key_chunked_attention_on_a_local_cluster(client, rng):
    q, k, v = inputs(rng)
    check_against_single_call(q, k, v, *chunked(q, k, v, "mixed"), OPTIONS["causal-alibi-softcap"])
    check_against_single_call(q, k, v, *chunked(q, k, v, "keys"), OPTIONS["window"])


def test_paged_decode_with_actors_on_a_local_cluster(client, rng):
    addresses = sorted(client.scheduler_info()["workers"])
    workers = [client.submit(DecodeWorker, 16, 4, HKV, D, np.float32, actor=True, workers=[a]).result()
               for a in addresses]
    prompts, q, k_new, v_new = _decode_case(rng)
    placement = _place(workers, prompts, result=lambda future: future.result())
    out = paged_decode(workers, placement, q, k_new, v_new)
    assert_close(out, _decode_reference(prompts, q, k_new, v_new), F32)
    # a second step appends again: each worker's cache holds its sequences
    q2 = rng.standard_normal(q.shape).astype(np.float32)
    paged_decode(workers, placement, q2, k_new, v_new)
    assert [int(workers[w].seq_lens([s]).result()[0]) for w, s in placement] == [7, 11, 5, 19]
