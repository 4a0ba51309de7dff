"""airspeed velocity benchmarks of fastattn.dask: chunked attention against the single call."""
import dask.array as da

import fastattn
import fastattn.dask
from fastattn.bench import scaleout as bench_scaleout


class TimeDaskAttention:
    """Causal attention B=1, H=8, S=8192, D=64 in query and key chunks of 2048.

    ``time_single`` is the one-process call; ``time_threads`` the chunked graph
    on dask's threaded scheduler; ``time_local_cluster`` on a 2-worker
    LocalCluster (one numba thread per worker process, inputs already on the workers).
    """

    timeout = 300

    def setup(self):
        shape, chunk = (1, 8, 8192, 64), 2048
        self.cluster, self.client = bench_scaleout.local_cluster()
        inputs, self.qkv = bench_scaleout.inputs(self.client, shape, chunk)
        self.distributed = fastattn.dask.attention(*inputs, causal=True)
        self.threaded = fastattn.dask.attention(*(da.from_array(x, chunks=(1, 8, chunk, 64)) for x in self.qkv),
                                                causal=True)
        fastattn.attention(*self.qkv, causal=True)
        self.distributed.compute()

    def teardown(self):
        self.client.close()
        self.cluster.close()

    def time_single(self):
        fastattn.attention(*self.qkv, causal=True)

    def time_threads(self):
        self.threaded.compute(scheduler="threads")

    def time_local_cluster(self):
        self.distributed.compute()
