"""PyTorch side by side on the CPU: the section ``python -m fastattn bench --peers`` adds.

Each row runs fastattn and the way a PyTorch user computes the same thing,
in turn in the same process, on the same values (PyTorch's tensors are views
of the NumPy inputs where the dtype allows):

- dense forward, causal forward, causal forward+backward, GQA forward and a
  decode step (Sq = 1): ``torch.nn.functional.scaled_dot_product_attention``
  (``enable_gqa=True`` where Hkv < Hq; ``torch.autograd.grad`` for the
  backward);
- paged decode and chunked prefill: the pages gathered into dense K/V by the
  block table (``index_select`` on the block axis), then SDPA;
- ``fused_qkv_projection``: ``torch.nn.functional.linear`` and the split and
  head reshapes, made contiguous; ``fused_output_projection_residual``:
  ``linear`` plus the residual;
- the attention layer's forward+backward: ``torch.nn.MultiheadAttention``
  (``batch_first=True``, causal mask), both with as many KV heads as query
  heads (``MultiheadAttention`` has no GQA).

PyTorch is never a dependency (the ``compare`` extra installs it): without it
the section prints why it is skipped.  ``fastattn/torch`` is fastattn's time
over PyTorch's (below 1: fastattn is faster); PyTorch runs on its default
thread count, fastattn on numba's.
"""
from dataclasses import asdict

import numpy as np

from . import dense, paged, projection
from .core import align, interleaved, say
from .dense import Case
from .paged import PagedCase
from .projection import ProjectionCase

#: Sizes of the section (dense rows use the CLI table's sequence length, heads and head dim).
SIZES = {
    "full": dict(repeats=10),
    "quick": dict(repeats=5),
    "tiny": dict(repeats=2),
}


def torch_status():
    """``(torch, "")`` when PyTorch imports, else ``(None, why the PyTorch rows are skipped)``."""
    try:
        import torch
    except ImportError as exc:
        return None, (f"PyTorch rows skipped: torch is not installed ({exc}); "
                      "pip install \"fastattn[compare]\" adds it")
    except Exception as exc:  # a broken install must not stop the fastattn rows
        return None, f"PyTorch rows skipped: import torch failed ({type(exc).__name__}: {exc})"
    return torch, ""


def cases(size="full"):
    """``(label, case)`` pairs of the section, in print order."""
    s = dense.SIZES[size]
    shape = dict(seq=s["seq"], heads_q=s["heads"], heads_kv=s["heads"], head_dim=s["head_dim"])
    sizes = paged.SIZES[size]
    base = dict(batch=sizes["batch"], context=sizes["context"], heads_q=sizes["heads_q"],
                heads_kv=sizes["heads_kv"], head_dim=sizes["head_dim"])
    proj = {k: projection.SIZES[size][k] for k in ("batch", "seq", "hidden", "heads_q", "heads_kv",
                                                          "head_dim")}
    return [
        ("forward", Case("forward", **shape)),
        ("forward causal", Case("forward", causal=True, **shape)),
        ("forward+backward causal", Case("forward+backward", causal=True, **shape)),
        ("forward GQA", Case("forward", **{**shape, "heads_kv": max(1, s["heads"] // 4)})),
        ("dense decode", PagedCase("dense decode", "float32", **base)),
        ("paged decode", PagedCase("decode", "float32", **base)),
        ("paged decode", PagedCase("decode", "float16", **base)),
        ("paged prefill", PagedCase("prefill", "float16", seq_q=sizes["chunk"], **dict(base, batch=1))),
        ("qkv projection", ProjectionCase("qkv", "float32", **proj)),
        ("output projection", ProjectionCase("output", "float32", **proj)),
        ("layer forward+backward", ProjectionCase("layer", "float32", **{**proj, "heads_kv": proj["heads_q"]})),
    ]


# --- PyTorch's side ---------------------------------------------------------------------

def tensor(torch, a):
    """A CPU tensor sharing ``a``'s memory (bfloat16 through its int16 bits)."""
    a = np.ascontiguousarray(a)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _sdpa(torch, q, k, v, causal):
    kwargs = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, **kwargs)


def dense_peer(torch, case, host):
    """PyTorch's SDPA on a dense case (``torch.autograd.grad`` for forward+backward)."""
    q, k, v = (tensor(torch, host[n]) for n in ("q", "k", "v"))
    if case.op == "forward":
        def forward():
            with torch.no_grad():
                return _sdpa(torch, q, k, v, case.causal)
        return forward
    dout = tensor(torch, host["dout"])
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    return lambda: torch.autograd.grad(_sdpa(torch, *leaves, case.causal), leaves, dout)


def paged_peer(torch, case, host):
    """Gather the pages by the block table, then SDPA (bottom-right causal for a prefill chunk)."""
    q = tensor(torch, host["q"])
    if case.op == "dense decode":
        k, v = tensor(torch, host["k"]), tensor(torch, host["v"])

        def dense():
            with torch.no_grad():
                return _sdpa(torch, q, k, v, False)
        return dense
    k_cache, v_cache = tensor(torch, host["k_cache"]), tensor(torch, host["v_cache"])
    table = torch.from_numpy(np.ascontiguousarray(host["block_table"], np.int64))
    b, per_seq = table.shape
    mask = None
    if case.seq_q > 1:  # the chunk's rows are the last seq_q positions of the context
        rows = np.arange(case.context - case.seq_q, case.context)[:, None]
        mask = torch.from_numpy(np.arange(case.context)[None, :] <= rows)

    def gathered(cache):
        blocks = cache.index_select(0, table.reshape(-1))          # [B * per_seq, bs, Hkv, D]
        dense = blocks.reshape(b, per_seq * cache.shape[1], *cache.shape[2:])[:, :case.context]
        return dense.transpose(1, 2)                               # [B, Hkv, context, D]

    def paged():
        with torch.no_grad():
            kwargs = {"enable_gqa": True} if case.heads_kv != case.heads_q else {}
            return torch.nn.functional.scaled_dot_product_attention(
                q, gathered(k_cache), gathered(v_cache), attn_mask=mask, **kwargs)
    return paged


def projection_peer(torch, case, x):
    """``linear`` and the head reshapes (qkv), ``linear`` plus the residual (output), or
    ``nn.MultiheadAttention`` forward+backward (layer)."""
    linear = torch.nn.functional.linear
    b, s, d = case.batch, case.seq, case.head_dim
    if case.op == "qkv":
        xs, w, bias = (tensor(torch, x[n]) for n in ("x", "weight", "bias"))
        sizes = [case.heads_q * d, case.heads_kv * d, case.heads_kv * d]

        def qkv():
            with torch.no_grad():
                parts = linear(xs, w, bias).split(sizes, dim=-1)
                return [t.reshape(b, s, -1, d).transpose(1, 2).contiguous() for t in parts]
        return qkv
    if case.op == "output":
        a, w, bias, residual = (tensor(torch, x[n]) for n in ("attn_out", "out_weight", "out_bias", "residual"))

        def output():
            with torch.no_grad():
                return linear(a, w, bias) + residual
        return output
    torch.manual_seed(0)
    layer = torch.nn.MultiheadAttention(case.hidden, case.heads_q, batch_first=True)
    xs, dout = tensor(torch, x["x"]).detach().requires_grad_(), tensor(torch, x["dout"])
    mask = torch.nn.Transformer.generate_square_subsequent_mask(s)

    def layer_forward_backward():
        out = layer(xs, xs, xs, attn_mask=mask, is_causal=True, need_weights=False)[0]
        return torch.autograd.grad(out, [xs, *layer.parameters()], dout)
    return layer_forward_backward


def pair(torch, case):
    """(fastattn's callable, PyTorch's callable) on shared inputs."""
    if isinstance(case, Case):
        x = dense.make_inputs(case)
        return dense.kernel(case, x), dense_peer(torch, case, x["host"])
    if isinstance(case, PagedCase):
        x = paged.make_inputs(case)
        return paged.kernel(case, x), paged_peer(torch, case, x)
    x = projection.make_inputs(case)
    return projection.kernel(case, x), projection_peer(torch, case, x)


# --- the section ------------------------------------------------------------------------

def measure(torch, label, case, repeats, stream):
    """Time fastattn and PyTorch in turn on one case; return its row."""
    say(stream, f"  {label} {case.dtype} {case.shape}:")
    ours, theirs = pair(torch, case)
    ours()  # compile (or load the cache) and warm up, both sides
    theirs()
    ours_s, theirs_s = interleaved([ours, theirs], repeats)
    say(stream, f" fastattn {ours_s * 1e3:.2f} ms, torch {theirs_s * 1e3:.2f} ms", end="\n")
    return dict(name=label, dtype=case.dtype, shape=case.shape, case=asdict(case), time_ms=ours_s * 1e3,
                torch_ms=theirs_s * 1e3, ratio=ours_s / theirs_s)


def format_table(rows):
    """The rows as an aligned plain-text table."""
    head = ("op", "dtype", "shape", "fastattn ms", "torch ms", "fastattn/torch")
    body = [(r["name"], r["dtype"], r["shape"], f"{r['time_ms']:.2f}", f"{r['torch_ms']:.2f}",
             f"{r['ratio']:.2f}") for r in rows]
    return align(head, body, 3)


def run(size, stream):
    """Print the PyTorch section and return ``{"torch": version or None, "rows": [...], "note": ...}``."""
    torch, why = torch_status()
    if torch is None:
        say(stream, why, end="\n")
        return dict(torch=None, rows=[], note=why)
    repeats = SIZES[size]["repeats"]
    say(stream, f"PyTorch {torch.__version__} side by side (cpu, {torch.get_num_threads()} torch threads; "
                 f"best of {repeats}, timed in turn):", end="\n")
    rows = [measure(torch, label, case, repeats, stream) for label, case in cases(size)]
    say(stream, "\n" + format_table(rows), end="\n")
    note = ("fastattn/torch: fastattn's best time over PyTorch's (below 1: fastattn is faster); PyTorch: "
            "scaled_dot_product_attention (dense, GQA with enable_gqa), pages gathered by the block table "
            "then SDPA (paged), linear + reshapes (projections), nn.MultiheadAttention (layer)")
    say(stream, note, end="\n")
    return dict(torch=torch.__version__, rows=rows, note=note)
