"""Overhead of :func:`fastattn.dask.attention` on a 2-worker LocalCluster against the single call.

Run ``python -m fastattn._bench_dask`` (defaults: B=1, H=8, S=32768, D=64,
causal, keys and queries in chunks of 4096).  Both sides use the same two
cores: the single call runs numba's threads in this process, the cluster runs
two single-threaded worker processes (``NUMBA_NUM_THREADS=1`` each).  The
ratio is wall time of ``dask.compute`` (graph, transfers, merges included)
over the single call's; the single call and the chunked one are timed in turn.
"""
import argparse
import time

import numpy as np

import fastattn


def local_cluster(n_workers=2):
    """A loopback LocalCluster of single-threaded worker processes, and its client."""
    import dask
    from distributed import Client, LocalCluster

    # before the worker processes start: distributed imports numba early, so a later env is too late
    environ = {**dask.config.get("distributed.nanny.pre-spawn-environ"), "NUMBA_NUM_THREADS": "1"}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address=None)
    return cluster, Client(cluster)


def inputs(client, shape, chunk):
    """q, k, v made on the workers in chunks of ``chunk`` along the sequence (as a distributed
    array would be), and the same numbers as NumPy arrays for the single call."""
    import dask.array as da

    rng = da.random.default_rng(0)
    chunks = shape[:2] + (chunk,) + shape[3:]
    chunked = client.persist([rng.standard_normal(shape, dtype=np.float32, chunks=chunks) for _ in range(3)])
    return chunked, client.compute(chunked, sync=True)


def run(seq=32768, heads=8, head_dim=64, chunk=4096, causal=True, repeats=3, stream=print):
    """Time the single call and the key- and query-chunked Dask call; return a dict of results."""
    import fastattn.dask

    cluster, client = local_cluster()
    try:
        chunked, (q, k, v) = inputs(client, (1, heads, seq, head_dim), chunk)
        out = fastattn.dask.attention(*chunked, causal=causal)
        single = fastattn.attention(q, k, v, causal=causal)  # compile / load the kernels
        out.compute()
        single_s, dask_s = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fastattn.attention(q, k, v, causal=causal)
            single_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            got = out.compute()
            dask_s.append(time.perf_counter() - t0)
        error = float(np.abs(got - single).max())
        n_tasks = len(out.__dask_graph__())
    finally:
        client.close()
        cluster.close()
    result = dict(seq=seq, heads=heads, head_dim=head_dim, chunk=chunk, causal=causal,
                  single_s=min(single_s), dask_s=min(dask_s), ratio=min(dask_s) / min(single_s),
                  max_abs_diff=error, tasks=n_tasks)
    stream(f"B=1 H={heads} S={seq} D={head_dim} {'causal' if causal else 'full'}, chunks of {chunk}: "
           f"single call {result['single_s']:.2f} s, 2-worker LocalCluster {result['dask_s']:.2f} s "
           f"(ratio {result['ratio']:.2f}, {n_tasks} tasks, max |diff| {error:.1e})")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=32768)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--full", action="store_true", help="no causal mask")
    args = parser.parse_args(argv)
    run(seq=args.seq, chunk=args.chunk, causal=not args.full, repeats=args.repeats)


if __name__ == "__main__":
    main()
