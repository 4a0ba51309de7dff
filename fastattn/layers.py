"""MultiheadAttention: q/k/v/out projections around fastattn.attention, with an explicit backward.

The layer keeps the q, k and v projections in one fused weight (and bias), so
self-attention is one :func:`fastattn.fused_qkv_projection`; the named
parameters are views into it, so in-place updates (``p -= lr * g``) reach the
fused arrays.  See ``docs/layer.md``.
"""
import numpy as np

from . import _dispatch, _validate
from ._dtypes import bits_view
from .attention import attention, attention_backward


#: The layer's projection GEMMs run on numba's threads, like its attention kernels: a NumPy GEMM between
#: them would leave OpenBLAS's threads spinning into the next numba kernel (:mod:`fastattn.cpu.projection`;
#: the CUDA twin ignores it).
_POOL = "numba"


def _xavier_uniform(rng, fan_out, fan_in):
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=(fan_out, fan_in))


class MultiheadAttention:
    """Multi-head (grouped-query, multi-query) attention with q/k/v/out projections.

    Parameters
    ----------
    embed_dim : int
        Model width ``E``; ``head_dim = E // num_heads``.
    num_heads : int
        Query heads; divides ``embed_dim``.
    num_kv_heads : int, optional
        Key/value heads (default ``num_heads``); divides ``num_heads``.  The k
        and v projections have ``num_kv_heads * head_dim`` outputs.
    bias : bool
        Whether the four projections have biases (initialised to zero).
    dtype : dtype
        float32, float64, float16 or ``ml_dtypes.bfloat16`` (half formats
        compute in float32).
    seed : int, optional
        Seed of ``np.random.default_rng`` for the Xavier-uniform weights.
    rotary_dim : int, optional
        Rotate the first ``rotary_dim`` features of every query and key head
        (RoPE, GPT-NeoX layout, :func:`fastattn.rotary`) inside the fused QKV
        projection; ``head_dim`` for full rotary, None (default) for none.
        Queries sit at positions ``Sk - Sq + i`` and keys at ``j`` (the
        bottom-right alignment of ``causal``).
    rope_base : float
        The rotary frequency base (:func:`fastattn.rotary_tables`).
    dropout : float in [0, 1)
        Attention dropout (:func:`fastattn.attention`'s ``dropout_p``), applied
        only in training mode: :meth:`train` turns it on, :meth:`eval` (the
        initial mode) off.  Each training forward draws a seed from NumPy's
        default generator and its backward replays the same mask.

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> layer = fastattn.MultiheadAttention(32, 4, num_kv_heads=2, seed=0)
    >>> x = np.random.default_rng(1).standard_normal((2, 5, 32)).astype(np.float32)
    >>> y = layer.forward(x, causal=True)
    >>> grads = layer.backward(np.ones_like(y))
    >>> y.shape, sorted(grads)[:3], grads["input"].shape
    ((2, 5, 32), ['input', 'k_proj.bias', 'k_proj.weight'], (2, 5, 32))
    """

    def __init__(self, embed_dim, num_heads, num_kv_heads=None, *, bias=True, dtype=np.float32, seed=None,
                 rotary_dim=None, rope_base=10000.0, dropout=0.0):
        e, hq, hkv, dtype = _validate.layer_args(embed_dim, num_heads, num_kv_heads, dtype)
        if not isinstance(bias, (bool, np.bool_)):
            raise TypeError(f"bias: expected a bool, got {type(bias).__name__}")
        if rotary_dim is not None:
            if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, (int, np.integer)) or rotary_dim < 2 \
                    or rotary_dim % 2 or rotary_dim > e // hq:
                raise ValueError(f"rotary_dim: expected None or an even int in [2, head_dim={e // hq}], "
                                 f"got {rotary_dim!r}")
            if not isinstance(rope_base, (int, float, np.integer, np.floating)) or not rope_base > 0:
                raise ValueError(f"rope_base: expected a positive float, got {rope_base!r}")
        _validate.dropout_values(dropout, 0, forward=True, name="dropout")
        self.dropout = float(dropout)
        self.training = False
        self.rotary_dim = None if rotary_dim is None else int(rotary_dim)
        self.rope_base = float(rope_base)
        self._tables = None
        self.embed_dim, self.num_heads, self.num_kv_heads = e, hq, hkv
        self.head_dim = e // hq
        self.dtype = dtype
        self.bias = bool(bias)
        self.device = "cpu"
        kv = hkv * self.head_dim
        rng = np.random.default_rng(seed)
        self._qkv_weight = np.concatenate([_xavier_uniform(rng, e, e), _xavier_uniform(rng, kv, e),
                                           _xavier_uniform(rng, kv, e)]).astype(dtype)
        self._out_weight = _xavier_uniform(rng, e, e).astype(dtype)
        self._qkv_bias = np.zeros(e + 2 * kv, dtype) if bias else None
        self._out_bias = np.zeros(e, dtype) if bias else None
        self._saved = None

    def train(self, mode=True):
        """Training mode (dropout on) or, with ``mode=False``, evaluation mode; returns the layer."""
        if not isinstance(mode, (bool, np.bool_)):
            raise TypeError(f"mode: expected a bool, got {type(mode).__name__}")
        self.training = bool(mode)
        return self

    def eval(self):
        """Evaluation mode (no dropout), the initial one; returns the layer."""
        return self.train(False)

    def _rotary(self, seq_q, seq_k):
        """``(plan for q, plan for k)`` of the rotary option (None, None without it); tables grown on demand."""
        if self.rotary_dim is None:
            return None, None
        length = max(seq_q, seq_k, 1)
        if self._tables is None or int(self._tables[0].shape[0]) < length:
            from .rotary import rotary_tables

            rows = 1 << (length - 1).bit_length()  # powers of two: a few table builds, not one per length
            tables = rotary_tables(self.rotary_dim, rows, self.rope_base,
                                   dtype=np.float64 if self.dtype == np.float64 else np.float32)
            if self.device == "cuda":
                from numba import cuda

                tables = tuple(cuda.to_device(t) for t in tables)
            self._tables = tables
        d = self.head_dim
        plan_q = _validate.rotary_plan(self._tables, np.arange(seq_k - seq_q, seq_k), False, 1, seq_q, d)
        plan_k = _validate.rotary_plan(self._tables, np.arange(seq_k), False, 1, seq_k, d)
        return plan_q, plan_k

    # --- parameters ----------------------------------------------------------------

    def _sections(self):
        e, kv = self.embed_dim, self.num_kv_heads * self.head_dim
        return {"q_proj": slice(0, e), "k_proj": slice(e, e + kv), "v_proj": slice(e + kv, e + 2 * kv)}

    def named_parameters(self):
        """Yield ``(name, array)``: ``q_proj.weight``, ``q_proj.bias``, ``k_proj.*``, ``v_proj.*``, ``out_proj.*``.

        Biases only with ``bias=True``.  The q/k/v arrays are views into the fused
        weight and bias, so updating them in place updates the layer.
        """
        for name, rows in self._sections().items():
            yield f"{name}.weight", self._qkv_weight[rows]
            if self.bias:
                yield f"{name}.bias", self._qkv_bias[rows]
        yield "out_proj.weight", self._out_weight
        if self.bias:
            yield "out_proj.bias", self._out_bias

    def parameters(self):
        """The parameter arrays, in the order of :meth:`named_parameters`."""
        return [p for _, p in self.named_parameters()]

    def num_parameters(self):
        """Total number of scalar parameters."""
        return int(sum(int(np.prod(p.shape)) for p in self.parameters()))

    def _move(self, convert, device):
        for name in ("_qkv_weight", "_out_weight", "_qkv_bias", "_out_bias"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, convert(value))
        self.device = device
        self._saved = None
        self._tables = None
        return self

    def to_device(self):
        """Move the parameters to the GPU (numba device arrays); returns the layer."""
        if self.device == "cuda":
            return self
        from numba import cuda

        def convert(x):
            bits = bits_view(np.ascontiguousarray(x))
            dev = cuda.to_device(bits)
            return dev if bits.dtype == x.dtype else dev.view(x.dtype)
        return self._move(convert, "cuda")

    def to_host(self):
        """Move the parameters back to NumPy arrays; returns the layer."""
        if self.device == "cpu":
            return self
        return self._move(lambda x: x.copy_to_host(), "cpu")

    def __repr__(self):
        kind = "" if self.num_kv_heads == self.num_heads else f", num_kv_heads={self.num_kv_heads}"
        extra = "".join(f", {n}={getattr(self, n)!r}" for n, off in (("rotary_dim", None), ("dropout", 0.0))
                        if getattr(self, n) != off)
        return (f"MultiheadAttention(embed_dim={self.embed_dim}, num_heads={self.num_heads}{kind}, "
                f"bias={self.bias}, dtype={self.dtype}, device={self.device!r}{extra})")

    # --- forward and backward -----------------------------------------------------------

    def _backend(self, **arrays):
        backend = _dispatch.backend_of(**arrays)
        if backend.__name__.rsplit(".", 1)[-1] != self.device:
            raise TypeError(f"{next(iter(arrays))}: expected an array on the layer's device ({self.device}); "
                            f"use to_device() / to_host()")
        return backend

    def _weights(self, name):
        rows = self._sections()[name]
        return self._qkv_weight[rows], (self._qkv_bias[rows] if self.bias else None)

    def forward(self, query, key=None, value=None, *, causal=False):
        """Attention output ``[B, Sq, E]``: self-attention, or cross-attention with key and value.

        Parameters
        ----------
        query : array, shape [B, Sq, E]
        key, value : arrays, shape [B, Sk, E], optional
            Both or neither.  Without them this is self-attention (one fused
            QKV projection of ``query``).
        causal : bool
            Bottom-right aligned causal mask (as :func:`fastattn.attention`).

        Returns
        -------
        array, shape [B, Sq, E]
            In the layer's dtype, on the layer's device.
        """
        e, hq, hkv, d = self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim
        query = _validate.layer_input("query", query, e, self.dtype)
        if (key is None) != (value is None):
            missing = "value" if value is None else "key"
            raise ValueError(f"{missing}: expected both key and value (cross-attention) or neither (self-attention)")
        if key is None:
            backend = self._backend(query=query)
            rot_q, rot_k = self._rotary(int(query.shape[1]), int(query.shape[1]))
            q, k, v = backend.projection.project_heads(query, self._qkv_weight, self._qkv_bias, (hq, hkv, hkv), d,
                                                       pool=_POOL, rotary=rot_q, rotated=(True, True, False))
            inputs = (query,)
        else:
            batch = int(query.shape[0])
            key = _validate.layer_input("key", key, e, self.dtype, batch)
            value = _validate.layer_input("value", value, e, self.dtype, batch)
            if tuple(value.shape) != tuple(key.shape):
                raise ValueError(f"value: expected the shape of key {tuple(key.shape)}, got {tuple(value.shape)}")
            backend = self._backend(query=query, key=key, value=value)
            rot_q, rot_k = self._rotary(int(query.shape[1]), int(key.shape[1]))
            (q,) = backend.projection.project_heads(query, *self._weights("q_proj"), (hq,), d, pool=_POOL,
                                                    rotary=rot_q, rotated=(True,))
            (k,) = backend.projection.project_heads(key, *self._weights("k_proj"), (hkv,), d, pool=_POOL,
                                                    rotary=rot_k, rotated=(True,))
            (v,) = backend.projection.project_heads(value, *self._weights("v_proj"), (hkv,), d, pool=_POOL)
            inputs = (query, key, value)
        p = self.dropout if self.training else 0.0
        out, lse, seed = attention(q, k, v, causal=causal, dropout_p=p, return_lse=True, return_seed=True)
        b, sq = int(query.shape[0]), int(query.shape[1])
        # decode fast path: with one query, the head layout [B, Hq, 1, D] is already [B, 1, Hq*D]
        attn = out.reshape(b, 1, hq * d) if sq == 1 else out
        y = backend.projection.output_projection(attn, self._out_weight, self._out_bias, None, pool=_POOL)
        self._saved = dict(inputs=inputs, q=q, k=k, v=v, out=out, lse=lse, causal=causal, backend=backend,
                           rotary=(rot_q, rot_k), dropout=(p, seed))
        return y

    def backward(self, dout):
        """Gradients after a :meth:`forward`: a dict with every named parameter and the inputs.

        Parameters
        ----------
        dout : array, shape [B, Sq, E]
            Gradient of the loss with respect to the forward's output.

        Returns
        -------
        dict
            ``"q_proj.weight"`` ... ``"out_proj.bias"`` (as :meth:`named_parameters`),
            plus ``"input"`` after self-attention, or ``"query"``, ``"key"`` and
            ``"value"`` after cross-attention.  Uses the explicit backward kernels
            (no autograd, no repeated K/V).

        Raises
        ------
        RuntimeError
            If no forward came first (or the layer moved device since).
        """
        if self._saved is None:
            raise RuntimeError("backward: no saved forward; call forward() first (after any to_device/to_host)")
        saved = self._saved
        query = saved["inputs"][0]
        b, sq = int(query.shape[0]), int(query.shape[1])
        dout = _validate.layer_input("dout", dout, self.embed_dim, self.dtype, b)
        if int(dout.shape[1]) != sq:
            raise ValueError(f"dout: expected shape {(b, sq, self.embed_dim)} (the forward's output), "
                             f"got {tuple(dout.shape)}")
        backend = self._backend(dout=dout)
        hq = self.num_heads
        out = saved["out"]
        attn = out.reshape(b, 1, hq * self.head_dim) if sq == 1 else out
        dattn, dwo, dbo, _ = backend.projection.output_backward(dout, attn, self._out_weight, self.bias, heads=hq,
                                                                pool=_POOL)
        p, seed = saved["dropout"]
        dq, dk, dv = attention_backward(dattn, saved["q"], saved["k"], saved["v"], out, saved["lse"],
                                        causal=saved["causal"], dropout_p=p, seed=seed)
        grads = {}
        rot_q, rot_k = saved["rotary"]
        if len(saved["inputs"]) == 1:
            dx, dw, db = backend.projection.qkv_backward((dq, dk, dv), query, self._qkv_weight, self.bias,
                                                         pool=_POOL, rotary=rot_q, rotated=(True, True, False))
            for name, rows in self._sections().items():
                grads[f"{name}.weight"] = dw[rows]
                if self.bias:
                    grads[f"{name}.bias"] = db[rows]
            grads["input"] = dx
        else:
            for name, x, g, rot in zip(("q_proj", "k_proj", "v_proj"), saved["inputs"], (dq, dk, dv),
                                       (rot_q, rot_k, None)):
                dx, dw, db = backend.projection.qkv_backward((g,), x, self._weights(name)[0], self.bias,
                                                             pool=_POOL, rotary=rot, rotated=(True,))
                grads[f"{name}.weight"] = dw
                if self.bias:
                    grads[f"{name}.bias"] = db
                grads[{"q_proj": "query", "k_proj": "key", "v_proj": "value"}[name]] = dx
        grads["out_proj.weight"] = dwo
        if self.bias:
            grads["out_proj.bias"] = dbo
        return grads
