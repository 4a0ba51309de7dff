"""The oracle itself: fastattn.reference against the contract's definitions.

The forward is checked against a row-by-row loop written straight from
DESIGN.md, the backward against central finite differences of the forward.
"""
import math

import numpy as np
import pytest

from cases import F64, OPTIONS, Case, Shape, inputs
from conftest import assert_close
from fastattn import reference

SHAPE = Shape(2, 4, 2, 5, 7, 3)
SHAPE_SQ_GT_SK = Shape(1, 2, 1, 6, 3, 2)   # causal rows that see no key


def loop_attention(q, k, v, *, causal=False, scale=None, window=(-1, -1), softcap=0.0, alibi_slopes=None):
    """The definitions of DESIGN.md, one query row and one key at a time."""
    b_, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    scale = 1 / math.sqrt(d) if scale is None else scale
    left, right = window
    if causal:
        right = 0
    slopes = None if alibi_slopes is None else np.broadcast_to(np.asarray(alibi_slopes, np.float64), (b_, hq))
    out = np.zeros(q.shape)
    lse = np.full(q.shape[:3], -np.inf)
    for b in range(b_):
        for h in range(hq):
            hk = h // (hq // hkv)
            for i in range(sq):
                diag = i + sk - sq
                scores = {}
                for j in range(sk):
                    if (left >= 0 and j < diag - left) or (right >= 0 and j > diag + right):
                        continue
                    s = scale * float(q[b, h, i] @ k[b, hk, j])
                    if softcap:
                        s = softcap * math.tanh(s / softcap)
                    if slopes is not None:
                        s -= slopes[b, h] * abs(diag - j)
                    scores[j] = s
                if scores:
                    m = max(scores.values())
                    total = sum(math.exp(s - m) for s in scores.values())
                    out[b, h, i] = sum(math.exp(s - m) / total * v[b, hk, j] for j, s in scores.items())
                    lse[b, h, i] = m + math.log(total)
    return out, lse


@pytest.mark.parametrize("shape", [SHAPE, SHAPE_SQ_GT_SK], ids=lambda s: s.id)
@pytest.mark.parametrize("option", OPTIONS)
def test_reference_forward_follows_the_definitions(option, shape, rng):
    q, k, v, options = inputs(Case(shape, option, F64), rng)
    out, lse = reference.attention(q, k, v, return_lse=True, **options)
    want_out, want_lse = loop_attention(q, k, v, **options)
    assert_close(out, want_out, F64, "out")
    assert_close(lse, want_lse, F64, "lse")


@pytest.mark.parametrize("shape", [SHAPE, SHAPE_SQ_GT_SK], ids=lambda s: s.id)
@pytest.mark.parametrize("option", OPTIONS)
def test_reference_backward_is_the_gradient_of_the_forward(option, shape, rng):
    """Central differences of sum(out * dout) with respect to every element of q, k and v."""
    q, k, v, options = inputs(Case(shape, option, F64), rng)
    dout = rng.standard_normal(q.shape)
    grads = reference.attention_backward(dout, q, k, v, **options)
    args = {"q": q, "k": k, "v": v}
    h = 1e-6
    for (name, x), grad in zip(args.items(), grads):
        numeric = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            plus, minus = x.copy(), x.copy()
            plus[idx] += h
            minus[idx] -= h
            f_plus = np.sum(reference.attention(**{**args, name: plus}, **options) * dout)
            f_minus = np.sum(reference.attention(**{**args, name: minus}, **options) * dout)
            numeric[idx] = (f_plus - f_minus) / (2 * h)
        # central differences are good to ~h**2 and ~eps/h: compare at 1e-7 of the largest entry
        err = np.abs(grad - numeric).max() / max(np.abs(numeric).max(), 1.0)
        assert err < 1e-7, f"d{name}: finite differences disagree by {err:.3g}"
