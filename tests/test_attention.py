"""fastattn.attention and attention_backward against the float64 reference.

Every numeric test runs on the CPU kernels and, through the ``device`` fixture,
on the CUDA kernels (tiny shapes, for the simulator).
"""
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import fastattn
from cases import BF16, CPU_CASES, CUDA_CASES, DTYPES, F32, F64, Case, Shape, accum, backward_reference, inputs, random
from conftest import assert_close, host, on_devices
from fastattn import reference

GRID = on_devices(CPU_CASES, CUDA_CASES)


def assert_grads_close(grads, dout, q, k, v, options, dtype, label=""):
    """(dq, dk, dv) from any device against the reference, each in dtype."""
    expected, magnitudes = backward_reference(dout, q, k, v, **options)
    for name, got, ref, mag in zip(("dq", "dk", "dv"), grads, expected, magnitudes):
        got = host(got)
        assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
        assert_close(got, ref, dtype, f"{label}{name}", magnitude=mag)


def put_options(device, options):
    return {name: device.put(x) if name == "alibi_slopes" else x for name, x in options.items()}


def reference_backward_inputs(q, k, v, options, rng):
    """(dout, out, lse) for a backward test: out and lse from the reference, as the kernels return them."""
    out, lse = reference.attention(q, k, v, return_lse=True, **options)
    return random(q.shape, q.dtype, rng), out.astype(q.dtype), lse.astype(accum(q.dtype))


@pytest.mark.parametrize("device, case", GRID, indirect=["device"])
def test_forward_matches_reference(device, case, rng):
    q, k, v, options = inputs(case, rng)
    out, lse = fastattn.attention(device.put(q), device.put(k), device.put(v), return_lse=True,
                                  **put_options(device, options))
    out, lse = device.get(out), device.get(lse)
    assert out.dtype == case.dtype and lse.dtype == accum(case.dtype)
    ref_out, ref_lse = reference.attention(q, k, v, return_lse=True, **options)
    assert_close(out, ref_out, case.dtype, "out")
    assert_close(lse, ref_lse, case.dtype, "lse")


@pytest.mark.parametrize("device, case", GRID, indirect=["device"])
def test_backward_matches_reference(device, case, rng):
    q, k, v, options = inputs(case, rng)
    dout, out, lse = reference_backward_inputs(q, k, v, options, rng)
    grads = fastattn.attention_backward(*map(device.put, (dout, q, k, v, out, lse)),
                                        **put_options(device, options))
    assert_grads_close([device.get(g) for g in grads], dout, q, k, v, options, case.dtype)


SMALL_TILE_CASES = ([Case(Shape(2, 8, 2, 113, 203, 40), option, F32)
                     for option in ("plain", "causal", "window-32-8", "all")]
                    + [Case(Shape(2, 8, 2, 113, 203, 40), "all", dtype) for dtype in DTYPES if dtype != F32])


@pytest.mark.parametrize("case", SMALL_TILE_CASES, ids=lambda c: c.id)
def test_small_cpu_tiles_match_reference(case, rng, monkeypatch):
    """Many query and key tiles per row: the online softmax rescales across tiles.

    (The CUDA grid already runs with tiles of 8 queries and 4 keys.)
    """
    for name, value in dict(cpu_block_q=16, cpu_block_k=24, cpu_bwd_block_q=8, cpu_bwd_block_k=32).items():
        monkeypatch.setattr(fastattn.config, name, value)
    q, k, v, options = inputs(case, rng)
    out, lse = fastattn.attention(q, k, v, return_lse=True, **options)
    ref_out, ref_lse = reference.attention(q, k, v, return_lse=True, **options)
    assert_close(out, ref_out, case.dtype, "out")
    assert_close(lse, ref_lse, case.dtype, "lse")
    dout = random(q.shape, q.dtype, rng)
    assert_grads_close(fastattn.attention_backward(dout, q, k, v, out, lse, **options),
                       dout, q, k, v, options, case.dtype)


def test_return_lse_false_returns_out_only(device, rng):
    q, k, v, _ = inputs(Case(Shape(1, 2, 1, 5, 7, 8), "plain", F32), rng)
    args = [device.put(x) for x in (q, k, v)]
    out = device.get(fastattn.attention(*args, causal=True))
    out_lse = fastattn.attention(*args, causal=True, return_lse=True)
    assert isinstance(out_lse, tuple) and len(out_lse) == 2
    np.testing.assert_array_equal(out, device.get(out_lse[0]))


def test_default_scale_is_inverse_sqrt_head_dim(device, rng):
    q, k, v, _ = inputs(Case(Shape(1, 2, 2, 6, 9, 16), "plain", F64), rng)
    args = [device.put(x) for x in (q, k, v)]
    got = device.get(fastattn.attention(*args))
    assert_close(got, reference.attention(q, k, v, scale=0.25), F64, "out")
    np.testing.assert_array_equal(got, device.get(fastattn.attention(*args, scale=0.25)))


# --- rows that see no key --------------------------------------------------------

MASKED = {
    # name: (Sq, Sk, options); the first rows of each see no key
    "causal-sq7-sk3": (7, 3, {"causal": True}),
    "window-0-0-sq6-sk3": (6, 3, {"window": (0, 0)}),
    "window-1-1-sq9-sk4": (9, 4, {"window": (1, 1)}),
    "causal-softcap-alibi-sq8-sk2": (8, 2, {"causal": True, "softcap": 1.0,
                                            "alibi_slopes": np.array([0.5, 0.25])}),
    "sk0": (5, 0, {}),
    "sk0-causal": (3, 0, {"causal": True}),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(np.dtype(d)))
@pytest.mark.parametrize("name", MASKED)
def test_fully_masked_rows_give_zeros_and_minus_inf(device, name, dtype, rng):
    sq, sk, options = MASKED[name]
    shape = Shape(1, 2, 1, sq, sk, 8)
    q, k, v = (random(s, dtype, rng) for s in (shape.q, shape.kv, shape.kv))
    dout = random(shape.q, dtype, rng)
    dev = [device.put(x) for x in (q, k, v)]
    dev_options = put_options(device, options)
    out, lse = fastattn.attention(*dev, return_lse=True, **dev_options)
    dq, dk, dv = (device.get(g) for g in fastattn.attention_backward(device.put(dout), *dev, out, lse,
                                                                    **dev_options))
    out, lse = device.get(out), device.get(lse)

    mask = reference.visible_mask(sq, sk, causal=options.get("causal", False),
                                  window=options.get("window", (-1, -1)))
    blind = ~mask.any(axis=1)
    assert blind.any(), "the case must have rows that see no key"
    for name_, x in (("out", out), ("lse", lse), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert not np.isnan(x.astype(np.float64)).any(), f"{name_} has NaN"
    assert np.all(out[:, :, blind].astype(np.float64) == 0.0)
    assert np.all(lse[:, :, blind] == -np.inf)
    assert np.all(dq[:, :, blind].astype(np.float64) == 0.0)
    unseen = ~mask.any(axis=0)
    assert np.all(dk[:, :, unseen].astype(np.float64) == 0.0)
    assert np.all(dv[:, :, unseen].astype(np.float64) == 0.0)

    ref_out, ref_lse = reference.attention(q, k, v, return_lse=True, **options)
    assert_close(out, ref_out, dtype, "out")
    assert_close(lse, ref_lse, dtype, "lse")
    assert_grads_close((dq, dk, dv), dout, q, k, v, options, dtype)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("q_shape, kv_shape", [
    ((2, 2, 0, 8), (2, 1, 5, 8)),
    ((2, 2, 4, 8), (2, 1, 0, 8)),
    ((2, 2, 0, 8), (2, 1, 0, 8)),
    ((0, 2, 4, 8), (0, 1, 5, 8)),
], ids=["sq0", "sk0", "sq0-sk0", "b0"])
def test_empty_sequences(device, q_shape, kv_shape, dtype, rng):
    q, k, v, dout = (random(s, dtype, rng) for s in (q_shape, kv_shape, kv_shape, q_shape))
    dev = [device.put(x) for x in (q, k, v)]
    out, lse = fastattn.attention(*dev, causal=True, return_lse=True)
    dq, dk, dv = (device.get(g) for g in
                  fastattn.attention_backward(device.put(dout), *dev, out, lse, causal=True))
    out, lse = device.get(out), device.get(lse)
    assert out.shape == q_shape and out.dtype == dtype
    assert lse.shape == q_shape[:3] and lse.dtype == np.float32
    assert np.all(out.astype(np.float64) == 0.0) and np.all(lse == -np.inf)
    assert dq.shape == q_shape and dk.shape == kv_shape and dv.shape == kv_shape
    for g in (dq, dk, dv):
        assert g.dtype == dtype and np.all(g.astype(np.float64) == 0.0)


# --- properties --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inputs_are_not_modified(device, dtype, rng):
    case = Case(Shape(2, 4, 2, 9, 11, 8), "all", dtype)
    q, k, v, options = inputs(case, rng)
    dout = random(q.shape, dtype, rng)
    out, lse = fastattn.attention(q, k, v, return_lse=True, **options)
    arrays = {"q": q, "k": k, "v": v, "dout": dout, "out": out, "lse": lse,
              "alibi_slopes": options["alibi_slopes"]}
    before = {n: x.copy() for n, x in arrays.items()}
    dev = {n: device.put(x) for n, x in arrays.items()}
    opts = dict(options, alibi_slopes=dev["alibi_slopes"])
    fastattn.attention(dev["q"], dev["k"], dev["v"], return_lse=True, **opts)
    fastattn.attention_backward(dev["dout"], dev["q"], dev["k"], dev["v"], dev["out"], dev["lse"], **opts)
    for n, x in dev.items():
        after = device.get(x) if device.name == "cuda" else x
        assert after.tobytes() == before[n].tobytes(), f"{n} was modified"


def test_cpu_backward_gives_the_same_bits_at_any_thread_count(rng, monkeypatch):
    """The key splits follow the shape, not numba's thread count: 1 and 2 threads agree bit for bit."""
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:  # a one-core machine: numba may still start two threads
        env = dict(os.environ, NUMBA_NUM_THREADS="2")
        test = f"{__file__}::test_cpu_backward_gives_the_same_bits_at_any_thread_count"
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        return
    monkeypatch.setattr(fastattn.config, "cpu_bwd_block_k", 16)
    shape = Shape(1, 8, 2, 57, 200, 32)
    q, k, v, options = inputs(Case(shape, "all", F32), rng)
    dout = random(q.shape, F32, rng)
    out, lse = fastattn.attention(q, k, v, return_lse=True, **options)
    before = numba.get_num_threads()
    grads = {}
    try:
        for threads in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            numba.set_num_threads(threads)
            grads[threads] = fastattn.attention_backward(dout, q, k, v, out, lse, **options)
    finally:
        numba.set_num_threads(before)
    for name, one, two in zip(("dq", "dk", "dv"), grads[1], grads[2]):
        assert one.tobytes() == two.tobytes(), f"{name} differs between 1 and 2 threads"


def test_backward_is_deterministic_with_gqa_and_key_splits(device, rng, monkeypatch):
    if device.name == "cpu":
        monkeypatch.setattr(fastattn.config, "cpu_bwd_block_k", 16)
        monkeypatch.setattr(fastattn.config, "cpu_bwd_block_q", 16)
        shape = Shape(1, 8, 2, 57, 200, 32)
    else:
        shape = Shape(1, 4, 2, 9, 11, 8)
    case = Case(shape, "all", F32)
    q, k, v, options = inputs(case, rng)
    dout = random(q.shape, F32, rng)
    if device.name == "cpu":
        # white box: the point is that dq is summed over several key splits
        from fastattn import _validate
        from fastattn.cpu.attention import _num_splits

        spec = _validate.attention_args(q, k, v, **{"causal": False, "scale": None, "window": (-1, -1),
                                                    "softcap": 0.0, "alibi_slopes": None, **options})[-1]
        assert _num_splits(spec) > 1
    dev = [device.put(x) for x in (dout, q, k, v)]
    opts = put_options(device, options)
    runs = []
    for _ in range(2):
        out, lse = fastattn.attention(*dev[1:], return_lse=True, **opts)
        grads = fastattn.attention_backward(dev[0], *dev[1:], out, lse, **opts)
        runs.append([device.get(x) for x in (out, lse, *grads)])
    for name, first, second in zip(("out", "lse", "dq", "dk", "dv"), *runs):
        assert first.tobytes() == second.tobytes(), f"{name} differs between two identical calls"
    assert_grads_close(runs[0][2:], dout, q, k, v, options, F32)


def _forward_backward(q, k, v, dout, options):
    out, lse = fastattn.attention(q, k, v, return_lse=True, **options)
    return (out, lse, *fastattn.attention_backward(dout, q, k, v, out, lse, **options))


def _in_thread(fn, *args):
    """fn(*args) run in a new Python thread (not the main one)."""
    result = []
    thread = threading.Thread(target=lambda: result.append(fn(*args)))
    thread.start()
    thread.join()
    assert result, "the call raised in its thread"
    return result[0]


def test_concurrent_calls_from_threads_are_correct():
    """Four Python threads run forward and backward at once on different inputs.

    Each thread's results must be the bits of the same call made alone (in a
    thread of its own) and close to the reference.
    """
    rng = np.random.default_rng(7)
    cases = [Case(Shape(1, 8, 2, 113, 203, 40), "causal", F32), Case(Shape(1, 4, 4, 127, 156, 64), "all", BF16),
             Case(Shape(1, 6, 1, 200, 100, 16), "alibi-h", F64), Case(Shape(1, 4, 2, 239, 150, 40), "softcap", F32)]
    work = []
    for case in cases:
        q, k, v, options = inputs(case, rng)
        work.append((q, k, v, random(q.shape, case.dtype, rng), options))
    alone = [_in_thread(_forward_backward, *w) for w in work]

    barrier = threading.Barrier(len(work))
    results, errors = [None] * len(work), []

    def worker(n):
        try:
            barrier.wait()
            results[n] = [_forward_backward(*work[n]) for _ in range(2)]
        except BaseException as e:  # reported below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(len(work))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for case, (q, k, v, dout, options), single, repeats in zip(cases, work, alone, results):
        for repeat in repeats:
            for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), single, repeat):
                assert a.tobytes() == b.tobytes(), f"{case.id}: {name} differs when run concurrently"
        assert_close(single[0], reference.attention(q, k, v, **options), case.dtype, f"{case.id} out")
        assert_grads_close(single[2:], dout, q, k, v, options, case.dtype, f"{case.id} ")


def test_results_in_another_thread_are_repeatable_and_correct(rng):
    """Another Python thread gets correct results, and the same bits on every repeat there.

    Bits may differ from the main thread's by float32 rounding: OpenBLAS, limited
    to one thread at run time (not by OPENBLAS_NUM_THREADS at load), takes another
    GEMM path for calls made from a non-main thread.  See docs/design.md.
    """
    case = Case(Shape(2, 8, 2, 113, 203, 40), "causal", F32)
    q, k, v, options = inputs(case, rng)
    dout = random(q.shape, F32, rng)
    first = _in_thread(_forward_backward, q, k, v, dout, options)
    again = _in_thread(_forward_backward, q, k, v, dout, options)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), first, again):
        assert a.tobytes() == b.tobytes(), f"{name} differs between two runs in a thread"
    assert_close(first[0], reference.attention(q, k, v, **options), case.dtype, f"{case.id} out")
    assert_grads_close(first[2:], dout, q, k, v, options, case.dtype, f"{case.id} ")


def test_strided_views_are_accepted(device, rng):
    """Every-other-element views along the sequence (works for device arrays too)."""
    dtype = F32
    shape = Shape(1, 4, 2, 7, 9, 8)
    big_q = random((1, 4, 14, 8), dtype, rng)
    big_kv = random((1, 2, 18, 16), dtype, rng)
    big_dout = random((1, 4, 7, 16), dtype, rng)
    slopes = random((8,), np.float64, rng) ** 2
    q, k, v, dout = big_q[:, :, ::2], big_kv[:, :, ::2, :8], big_kv[:, :, 1::2, 8:], big_dout[:, :, :, ::2]
    assert q.shape == shape.q and k.shape == v.shape == shape.kv and dout.shape == shape.q
    options = {"causal": True, "softcap": 2.0}
    dev_q, dev_kv, dev_dout = device.put(big_q), device.put(big_kv), device.put(big_dout)
    dq_, dk_, dv_, ddout = dev_q[:, :, ::2], dev_kv[:, :, ::2, :8], dev_kv[:, :, 1::2, 8:], dev_dout[:, :, :, ::2]
    dslopes = device.put(slopes)[::2]
    out, lse = fastattn.attention(dq_, dk_, dv_, return_lse=True, alibi_slopes=dslopes, **options)
    grads = fastattn.attention_backward(ddout, dq_, dk_, dv_, out, lse, alibi_slopes=dslopes, **options)
    ref_out, ref_lse = reference.attention(q, k, v, return_lse=True, alibi_slopes=slopes[::2], **options)
    assert_close(device.get(out), ref_out, dtype, "out")
    assert_close(device.get(lse), ref_lse, dtype, "lse")
    assert_grads_close([device.get(g) for g in grads], dout, q, k, v, dict(options, alibi_slopes=slopes[::2]),
                       dtype)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_transposed_and_fortran_order_inputs(dtype, rng):
    b, h, s, d = 2, 4, 37, 24
    q = random((b, s, h, d), dtype, rng).transpose(0, 2, 1, 3)          # [B, S, H, D] storage
    k = np.asfortranarray(random((b, 2, 51, d), dtype, rng))
    v = random((d, 51, 2, b), dtype, rng).T                              # fully reversed strides
    dout = random((b, s, h, d), dtype, rng).transpose(0, 2, 1, 3)
    assert not any(x.flags.c_contiguous for x in (q, k, v, dout))
    out, lse = fastattn.attention(q, k, v, window=(9, 2), return_lse=True)
    assert_close(out, reference.attention(q, k, v, window=(9, 2)), dtype, "out")
    out_t = np.asfortranarray(out)
    lse_t = np.asfortranarray(lse)
    grads = fastattn.attention_backward(dout, q, k, v, out_t, lse_t, window=(9, 2))
    assert_grads_close(grads, dout, q, k, v, {"window": (9, 2)}, dtype)


def test_lists_are_accepted(rng):
    q, k, v = (random(s, F64, rng) for s in ((1, 2, 3, 4), (1, 1, 5, 4), (1, 1, 5, 4)))
    slopes = [0.5, 0.125]
    out, lse = fastattn.attention(q.tolist(), k.tolist(), v.tolist(), window=[2, 0], alibi_slopes=slopes,
                                  return_lse=True)
    assert isinstance(out, np.ndarray) and out.dtype == F64
    ref_out, ref_lse = reference.attention(q, k, v, window=(2, 0), alibi_slopes=np.array(slopes), return_lse=True)
    assert_close(out, ref_out, F64, "out")
    assert_close(lse, ref_lse, F64, "lse")
    dout = random(q.shape, F64, rng)
    grads = fastattn.attention_backward(dout.tolist(), q.tolist(), k.tolist(), v.tolist(), out.tolist(),
                                        lse.tolist(), window=[2, 0], alibi_slopes=slopes)
    assert_grads_close(grads, dout, q, k, v, {"window": (2, 0), "alibi_slopes": np.array(slopes)}, F64)


# --- long sequences ---------------------------------------------------------------

N_LONG = 4096


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_long_sequence_forward(causal, rng):
    q, k, v = (random((1, 1, N_LONG, 64), F32, rng) for _ in range(3))
    out, lse = fastattn.attention(q, k, v, causal=causal, return_lse=True)
    # bottom-right alignment: the last rows of q see the same keys as the whole of q
    rows = slice(N_LONG - 48, N_LONG)
    ref_out, ref_lse = reference.attention(q[:, :, rows], k, v, causal=causal, return_lse=True)
    assert_close(out[:, :, rows], ref_out, F32, "out")
    assert_close(lse[:, :, rows], ref_lse, F32, "lse")
    first = reference.attention(q[:, :, :48], k[:, :, :48] if causal else k, v[:, :, :48] if causal else v,
                                causal=causal)
    assert_close(out[:, :, :48], first, F32, "out of the first rows")


_MEMORY_PROBE = """
import json, sys, tracemalloc
import numpy as np
import fastattn

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

n = int(sys.argv[1])
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((1, 1, n, 64)).astype(np.float32) for _ in range(3))
fastattn.attention(q[:, :, :256], k[:, :, :256], v[:, :, :256], return_lse=True)   # load the kernels
with open("/proc/self/clear_refs", "w") as f:   # reset the peak (VmHWM) to the current resident set
    f.write("5")
before = status("VmRSS")
assert status("VmHWM") - before < 2 ** 20, "the peak was not reset"
fastattn.attention(q, k, v, return_lse=True)
rss_growth = status("VmHWM") - before
tracemalloc.start()
fastattn.attention(q, k, v, return_lse=True)
traced = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
print(json.dumps({"traced": traced, "rss_growth": rss_growth}))
"""


def _can_reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _can_reset_peak_rss(),
                    reason="needs Linux /proc/self/status and a writable /proc/self/clear_refs to measure peak memory")
def test_long_sequence_memory_is_linear():
    """No Sq x Sk buffer: a 1x1x4096x64 call allocates far less than 4096 * 4096 * 4 bytes.

    tracemalloc sees NumPy's allocations; numba's runtime allocates with malloc,
    which tracemalloc does not see, so the growth of the peak resident set is
    checked too, in a fresh interpreter so that earlier tests' memory does not count.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastattn.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    done = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(N_LONG)], capture_output=True, text=True,
                          env=env, cwd=root, timeout=300)
    assert done.returncode == 0, done.stderr
    used = json.loads(done.stdout.strip().splitlines()[-1])
    matrix = N_LONG * N_LONG * 4
    # q, k, v and out are 1 MiB each; the score tiles are a few hundred KiB per thread
    assert used["traced"] < matrix / 8, used
    assert used["rss_growth"] < matrix / 4, used


# --- the tolerances themselves --------------------------------------------------------


def _buggy_forward(bug, q, k, v, options):
    """What a kernel with a typical bug would return, modelled with the reference."""
    d, hq, hkv = q.shape[3], q.shape[1], k.shape[1]
    if bug == "scale-1-over-d":
        return reference.attention(q, k, v, return_lse=True, **dict(options, scale=1.0 / d))
    if bug == "scale-10-percent":
        return reference.attention(q, k, v, return_lse=True, **dict(options, scale=1.1 / np.sqrt(d)))
    if bug == "dropped-first-key":      # key 0 lost (a tile bound off by one); alignment stays bottom-right
        return reference.attention(q, k[:, :, 1:], v[:, :, 1:], return_lse=True, **options)
    if bug == "causal-off-by-one":      # j <= i + Sk - Sq + 1
        return reference.attention(q, k, v, return_lse=True, **dict(options, causal=False, window=(-1, 1)))
    if bug == "gqa-head-map":           # query head h reads KV head h % Hkv instead of h // (Hq // Hkv)
        heads = np.arange(hq) % hkv
        return reference.attention(q, k[:, heads], v[:, heads], return_lse=True, **options)
    raise ValueError(bug)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bug", ["scale-1-over-d", "scale-10-percent", "dropped-first-key",
                                 "causal-off-by-one", "gqa-head-map"])
def test_tolerances_catch_bugs(bug, dtype, rng):
    """The output of a kernel with a typical bug, rounded to dtype, must fail assert_close."""
    case = Case(Shape(2, 4, 2, 60, 90, 32), "causal", dtype)
    q, k, v, options = inputs(case, rng)
    ref_out = reference.attention(q, k, v, **options)
    bad_out, _ = _buggy_forward(bug, q, k, v, options)
    with pytest.raises(AssertionError, match="max error"):
        assert_close(bad_out.astype(dtype), ref_out, dtype, "out")


def _buggy_backward(bug, dout, q, k, v, options):
    """What a backward kernel with a typical bug would return, modelled with the reference."""
    if bug == "scale-10-percent":
        return reference.attention_backward(dout, q, k, v, **dict(options, scale=1.1 / np.sqrt(q.shape[3])))
    if bug == "dropped-first-key":
        dq, dk, dv = reference.attention_backward(dout, q, k[:, :, 1:], v[:, :, 1:], **options)
        pad = ((0, 0), (0, 0), (1, 0), (0, 0))
        return dq, np.pad(dk, pad), np.pad(dv, pad)
    if bug == "gqa-head-map":
        heads = np.arange(q.shape[1]) % k.shape[1]
        dq, _, _ = reference.attention_backward(dout, q, k[:, heads], v[:, heads], **options)
        return (dq,) + reference.attention_backward(dout, q, k, v, **options)[1:]
    raise ValueError(bug)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bug", ["scale-10-percent", "dropped-first-key", "gqa-head-map"])
def test_gradient_tolerances_catch_bugs(bug, dtype, rng):
    """Gradients are compared against max(max|ref|, magnitude): a bug must still fail."""
    case = Case(Shape(2, 4, 2, 60, 90, 32), "softcap", dtype)
    q, k, v, options = inputs(case, rng)
    dout = random(q.shape, dtype, rng)
    expected, magnitudes = backward_reference(dout, q, k, v, **options)
    buggy = _buggy_backward(bug, dout, q, k, v, options)
    # dv = P^T dout feels the scale only through P: a 10% scale error moves it too little
    must_fail = {"gqa-head-map": ("dq",), "scale-10-percent": ("dq", "dk")}.get(bug, ("dq", "dk", "dv"))
    for name, bad, ref, mag in zip(("dq", "dk", "dv"), buggy, expected, magnitudes):
        if name in must_fail:
            with pytest.raises(AssertionError, match="max error"):
                assert_close(bad.astype(dtype), ref, dtype, name, magnitude=mag)


# --- blocks of a bigger problem (the private diagonal shift fastattn.dask relies on) ---------

BLOCK_OPTIONS = {
    "causal": dict(causal=True),
    "window": dict(window=(4, 2)),
    "causal-alibi-softcap": dict(causal=True, alibi_slopes=np.array([0.3, 0.1, 0.7, 0.2]), softcap=3.0),
}


@pytest.mark.parametrize("options", BLOCK_OPTIONS.values(), ids=BLOCK_OPTIONS.keys())
def test_blocks_merge_to_the_whole(device, options, rng):
    """Every (query block, key block) pair with its global offsets, merged over the key blocks, is the whole."""
    from fastattn.attention import _attention_block

    sq, sk = 11, 14
    q, k, v = random((1, 4, sq, 8), F32, rng), random((1, 2, sk, 8), F32, rng), random((1, 2, sk, 8), F32, rng)
    ref_out, ref_lse = reference.attention(q, k, v, return_lse=True, **options)
    for q0, q1 in ((0, 5), (5, 11)):
        parts = [_attention_block(*(device.put(np.ascontiguousarray(x)) for x in (q[:, :, q0:q1], k[:, :, j0:j1],
                                                                                 v[:, :, j0:j1])),
                                  q_start=q0, k_start=j0, seq_q=sq, seq_k=sk, **put_options(device, options))
                 for j0, j1 in ((0, 3), (3, 9), (9, 14))]
        out, lse = fastattn.merge_attention_states([p[0] for p in parts], [p[1] for p in parts])
        assert_close(device.get(out), ref_out[:, :, q0:q1], F32, "out")
        assert_close(device.get(lse), ref_lse[:, :, q0:q1], F32, "lse")


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("seq_q, options", [
    (1, {}),
    (3, dict(causal=True)),
    (2, dict(window=(5, 0), softcap=3.0)),
    (1, dict(alibi="per-batch")),
    (4, dict(causal=True, alibi="per-head", scale=0.2)),
], ids=["decode", "causal-chunk", "window-softcap", "alibi-batch", "causal-alibi-scale"])
def test_decode_sized_calls_read_each_kv_row_once_per_group(seq_q, options, dtype, rng):
    """Few query rows (Sq x group <= 16) take the paged decode kernel, one task per KV head's group."""
    from fastattn._validate import attention_args
    from fastattn.cpu import attention as cpu_attention

    b, hq, hkv, sk, d = 2, 8, 2, 37, 64
    q, k, v = (random(s, dtype, rng) for s in ((b, hq, seq_q, d), (b, hkv, sk, d), (b, hkv, sk, d)))
    options = dict(options)
    alibi = options.pop("alibi", None)
    if alibi is not None:
        shape = (b, hq) if alibi == "per-batch" else (hq,)
        options["alibi_slopes"] = rng.uniform(0.01, 0.5, shape)
    defaults = dict(causal=False, scale=None, window=(-1, -1), softcap=0.0, alibi_slopes=None)
    spec = attention_args(q, k, v, **dict(defaults, **options))[-1]
    assert cpu_attention._few_rows(k, v, spec), "the case should take the decode path"
    out, lse = fastattn.attention(q, k, v, return_lse=True, **options)
    ref_out, ref_lse = fastattn.reference.attention(q, k, v, return_lse=True, **options)
    assert_close(out, ref_out, dtype, "out")
    assert_close(lse, ref_lse, dtype, "lse")
