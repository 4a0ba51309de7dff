"""Dense (flash) attention: public functions."""
from . import _dispatch, _validate


def attention(q, k, v, *, causal=False, scale=None, window=(-1, -1), softcap=0.0,
              alibi_slopes=None, return_lse=False):
    q, k, v, slopes, spec = _validate.attention_args(
        q, k, v, causal=causal, scale=scale, window=window, softcap=softcap,
        alibi_slopes=alibi_slopes)
    backend = _dispatch.backend_of(q=q, k=k, v=v, alibi_slopes=slopes)
    out, lse = backend.attention.forward(q, k, v, slopes, spec)
    return (out, lse) if return_lse else out


def attention_backward(dout, q, k, v, out, lse, *, causal=False, scale=None, window=(-1, -1),
                       softcap=0.0, alibi_slopes=None):
    dout, q, k, v, out, lse, slopes, spec = _validate.attention_backward_args(
        dout, q, k, v, out, lse, causal=causal, scale=scale, window=window, softcap=softcap,
        alibi_slopes=alibi_slopes)
    backend = _dispatch.backend_of(dout=dout, q=q, k=k, v=v, out=out, lse=lse, alibi_slopes=slopes)
    return backend.attention.backward(dout, q, k, v, out, lse, slopes, spec)
