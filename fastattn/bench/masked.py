"""Packed variable-length batches and biases/masks: what they cost over plain dense attention.

Two tables, each case timed in turn with its peers (ratios, not absolute times):

- **varlen**: one long and many short causal sequences, packed
  (:func:`fastattn.attention_varlen`), against the same sequences as separate
  :func:`fastattn.attention` calls (the target: within 1.1x) and against
  padding every sequence to the longest;
- **bias**: :func:`fastattn.attention` with a ``[Sq, Sk]`` bias shared by all
  heads, a ``[B, Hq, Sq, Sk]`` bias, a key-padding mask ``[B, 1, 1, Sk]`` or
  dropout (``p = 0.1``), and the backward (with ``return_dbias`` for a bias),
  each against the same call without them.
"""
from dataclasses import dataclass

import numpy as np

import fastattn

from .core import align, interleaved, say

#: Sizes of the CLI tables: the varlen batch (one long, ``short_count`` short sequences) and the bias shape.
SIZES = {
    "full": dict(long=2048, short=128, short_count=15, seq=2048, heads=8, head_dim=64, repeats=7),
    "quick": dict(long=1024, short=64, short_count=15, seq=1024, heads=8, head_dim=64, repeats=5),
    "tiny": dict(long=64, short=8, short_count=3, seq=64, heads=2, head_dim=16, repeats=2),
}
VARLEN_LAYOUTS = ("packed", "separate", "padded")
BIAS_KINDS = ("none", "bias [Sq, Sk]", "bias [B, Hq, Sq, Sk]", "mask [B, 1, 1, Sk]", "dropout 0.1")


@dataclass(frozen=True)
class VarlenCase:
    """A packed causal batch: one sequence of ``long`` tokens and ``short_count`` of ``short``."""

    op: str = "forward"     #: "forward" or "forward+backward"
    long: int = 2048
    short: int = 128
    short_count: int = 15
    heads: int = 8
    head_dim: int = 64

    @property
    def lengths(self):
        return [self.long] + [self.short] * self.short_count

    @property
    def shape(self):
        return f"{self.long} + {self.short_count}×{self.short} tokens, H={self.heads}, D={self.head_dim}"


def varlen_calls(case, seed=0):
    """``{layout: callable}`` for the packed, separate and padded forms of a case (float32, causal)."""
    rng = np.random.default_rng(seed)
    lens = case.lengths
    cu = np.cumsum([0] + lens).astype(np.int32)
    q, k, v, dout = (rng.standard_normal((cu[-1], case.heads, case.head_dim), dtype=np.float32)
                     for _ in range(4))
    seqs = [[np.ascontiguousarray(x[a:b].transpose(1, 0, 2)[None]) for x in (q, k, v, dout)]
            for a, b in zip(cu[:-1], cu[1:])]
    padded = [np.zeros((len(lens), case.heads, max(lens), case.head_dim), np.float32) for _ in range(4)]
    for i, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        for dst, src in zip(padded, (q, k, v, dout)):
            dst[i, :, :b - a] = src[a:b].transpose(1, 0, 2)

    def dense(q_, k_, v_, dout_):
        out, lse = fastattn.attention(q_, k_, v_, causal=True, return_lse=True)
        if case.op == "forward":
            return out
        return fastattn.attention_backward(dout_, q_, k_, v_, out, lse, causal=True)

    def packed():
        out, lse = fastattn.attention_varlen(q, k, v, cu, cu, causal=True, return_lse=True)
        if case.op == "forward":
            return out
        return fastattn.attention_varlen_backward(dout, q, k, v, out, lse, cu, cu, causal=True)

    return {"packed": packed, "separate": lambda: [dense(*s) for s in seqs], "padded": lambda: dense(*padded)}


@dataclass(frozen=True)
class BiasCase:
    """Dense float32 attention ``B=1, Hq=Hkv=heads, Sq=Sk=seq`` with one kind of bias or mask."""

    op: str = "forward"     #: "forward" or "backward" (with ``return_dbias`` when there is a bias)
    kind: str = "none"      #: one of :data:`BIAS_KINDS`
    causal: bool = False
    seq: int = 2048
    heads: int = 8
    head_dim: int = 64

    @property
    def shape(self):
        return f"1×{self.heads}×{self.seq}×{self.head_dim}"


def bias_options(case, rng):
    """The ``bias``/``mask`` keyword arguments of a case."""
    b, h, n = 1, case.heads, case.seq
    if case.kind == "bias [Sq, Sk]":
        return {"bias": rng.standard_normal((n, n), dtype=np.float32)}
    if case.kind == "bias [B, Hq, Sq, Sk]":
        return {"bias": rng.standard_normal((b, h, n, n), dtype=np.float32)}
    if case.kind == "mask [B, 1, 1, Sk]":
        return {"mask": np.arange(n)[None, None, None, :] < n - n // 8}
    if case.kind == "dropout 0.1":
        return {"dropout_p": 0.1, "seed": 1234}
    return {}


def bias_call(case, seed=0):
    """A zero-argument callable running a case."""
    rng = np.random.default_rng(seed)
    q, k, v, dout = (rng.standard_normal((1, case.heads, case.seq, case.head_dim), dtype=np.float32)
                     for _ in range(4))
    options = dict(bias_options(case, rng), causal=case.causal)
    if case.op == "forward":
        return lambda: fastattn.attention(q, k, v, **options)
    out, lse = fastattn.attention(q, k, v, return_lse=True, **options)
    want = "bias" in options
    return lambda: fastattn.attention_backward(dout, q, k, v, out, lse, return_dbias=want, **options)


def run(size, stream):
    """Print both tables; return their rows (dicts) for the JSON report."""
    s = SIZES[size]
    say(stream, "packed variable-length batches (float32, causal; each layout timed in turn):", end="\n")
    varlen_rows = []
    for op in ("forward", "forward+backward"):
        case = VarlenCase(op, s["long"], s["short"], s["short_count"], s["heads"], s["head_dim"])
        calls = varlen_calls(case)
        for fn in calls.values():
            fn()  # compile and warm
        # packed and separate in turn; padding (ten times slower, and its arrays evict the caches) after
        times = dict(zip(("packed", "separate"), interleaved([calls["packed"], calls["separate"]], s["repeats"])))
        times["padded"] = interleaved([calls["padded"]], max(1, s["repeats"] // 3))[0]
        varlen_rows.append(dict(op=op, shape=case.shape, **{f"{k}_ms": t * 1e3 for k, t in times.items()},
                                packed_over_separate=times["packed"] / times["separate"],
                                packed_over_padded=times["packed"] / times["padded"]))
    say(stream, align(("op", "batch", "packed ms", "separate ms", "padded ms", "packed ÷ separate",
                       "packed ÷ padded"),
                      [(r["op"], r["shape"], f"{r['packed_ms']:.2f}", f"{r['separate_ms']:.2f}",
                        f"{r['padded_ms']:.2f}", f"{r['packed_over_separate']:.2f}",
                        f"{r['packed_over_padded']:.2f}") for r in varlen_rows], 2), end="\n")
    say(stream, "separate: one fastattn.attention call per sequence; padded: one call on every sequence "
                "padded to the longest", end="\n\n")

    say(stream, "bias, mask and dropout (float32, B=1; each kind timed in turn with the plain call):", end="\n")
    bias_rows = []
    for op, causal in (("forward", False), ("forward", True), ("backward", True)):
        cases = [BiasCase(op, kind, causal, s["seq"], s["heads"], s["head_dim"]) for kind in BIAS_KINDS]
        calls = [bias_call(c) for c in cases]
        for fn in calls:
            fn()
        times = interleaved(calls, s["repeats"])
        for c, t in zip(cases[1:], times[1:]):
            bias_rows.append(dict(op=op + (" causal" if causal else ""), kind=c.kind, shape=c.shape,
                                  ms=t * 1e3, plain_ms=times[0] * 1e3, over_plain=t / times[0]))
    say(stream, align(("op", "extra", "shape", "ms", "plain ms", "÷ plain"),
                      [(r["op"], r["kind"], r["shape"], f"{r['ms']:.2f}", f"{r['plain_ms']:.2f}",
                        f"{r['over_plain']:.2f}") for r in bias_rows], 3), end="\n")
    say(stream, "plain: the same call without bias, mask or dropout; the backward with a bias returns dbias "
                "(return_dbias=True)", end="\n")
    return dict(varlen=varlen_rows, bias=bias_rows)
