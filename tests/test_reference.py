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


# --- bias, mask and packed variable-length batches ----------------------------------

def _central_differences(f, x, h=1e-6):
    numeric = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        plus, minus = x.copy(), x.copy()
        plus[idx] += h
        minus[idx] -= h
        numeric[idx] = (f(plus) - f(minus)) / (2 * h)
    return numeric


@pytest.mark.parametrize("bias_shape", [(1, 4, 5, 7), (2, 1, 1, 7), (5, 1), (7,)], ids=str)
def test_reference_bias_and_mask_gradients_follow_finite_differences(bias_shape, rng):
    """dbias is the score gradient summed over the bias's broadcast axes; dq too follows the forward."""
    q, k, v = rng.standard_normal((2, 4, 5, 3)), rng.standard_normal((2, 2, 7, 3)), rng.standard_normal((2, 2, 7, 3))
    bias = rng.standard_normal(bias_shape)
    mask = rng.uniform(size=(2, 1, 5, 7)) > 0.3
    mask[0, 0, 2] = False  # a row that sees no key: zeros, lse -inf, no gradient
    options = dict(causal=False, softcap=3.0, mask=mask)
    dout = rng.standard_normal(q.shape)
    out, lse = reference.attention(q, k, v, bias=bias, return_lse=True, **options)
    assert np.all(out[0, :, 2] == 0) and np.all(lse[0, :, 2] == -np.inf)
    dq, dk, dv, dbias = reference.attention_backward(dout, q, k, v, bias=bias, return_dbias=True, **options)
    assert dbias.shape == bias.shape
    numeric = _central_differences(lambda b: np.sum(reference.attention(q, k, v, bias=b, **options) * dout), bias)
    assert np.abs(dbias - numeric).max() <= 1e-7 * max(np.abs(numeric).max(), 1.0)
    numeric = _central_differences(lambda x: np.sum(reference.attention(x, k, v, bias=bias, **options) * dout), q)
    assert np.abs(dq - numeric).max() <= 1e-7 * max(np.abs(numeric).max(), 1.0)


def test_reference_mask_means_the_key_takes_part(rng):
    q, k, v = (rng.standard_normal((1, 2, 3, 4)) for _ in range(3))
    mask = np.array([[True, False, True]] * 3)
    got = reference.attention(q, k, v, mask=mask)
    assert np.allclose(got, reference.attention(q, k[:, :, [0, 2]], v[:, :, [0, 2]], scale=0.5))
    bias = np.where(mask, 0.0, -np.inf)
    assert np.allclose(got, reference.attention(q, k, v, bias=bias))


def test_reference_varlen_is_each_sequence_on_its_own(rng):
    """Packed sequences (one empty) give what the dense reference gives each one; lse is [Hq, total_q]."""
    lens_q, lens_k = [3, 0, 5, 1], [4, 2, 5, 6]
    cu_q, cu_k = np.cumsum([0] + lens_q), np.cumsum([0] + lens_k)
    q = rng.standard_normal((cu_q[-1], 4, 8))
    k, v = rng.standard_normal((cu_k[-1], 2, 8)), rng.standard_normal((cu_k[-1], 2, 8))
    dout = rng.standard_normal(q.shape)
    options = dict(causal=True, softcap=2.0)
    out, lse = reference.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **options)
    assert out.shape == q.shape and lse.shape == (4, cu_q[-1])
    grads = reference.attention_varlen_backward(dout, q, k, v, cu_q, cu_k, **options)
    for i in range(len(lens_q)):
        qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        if lens_q[i] == 0:
            assert np.all(grads[1][ks] == 0) and np.all(grads[2][ks] == 0)
            continue
        heads = [x[None].transpose(0, 2, 1, 3) for x in (dout[qs], q[qs], k[ks], v[ks])]
        o, l = reference.attention(*heads[1:], return_lse=True, **options)
        assert np.array_equal(out[qs], o[0].transpose(1, 0, 2)) and np.array_equal(lse[:, qs], l[0])
        for got, want in zip(grads, reference.attention_backward(*heads, **options)):
            part = got[qs] if got.shape[0] == q.shape[0] else got[ks]
            assert np.array_equal(part, want[0].transpose(1, 0, 2))
    numeric = _central_differences(
        lambda x: np.sum(reference.attention_varlen(q, x, v, cu_q, cu_k, **options) * dout), k)
    assert np.abs(grads[1] - numeric).max() <= 1e-7 * max(np.abs(numeric).max(), 1.0)
