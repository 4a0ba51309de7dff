"""airspeed velocity benchmarks of the fused projections and the MultiheadAttention layer.

Cases, inputs and peers come from :mod:`fastattn.bench.projection` (the
module behind the projection table of ``python -m fastattn bench``): B=4,
S=512, H=1024, 16 query heads, 4 KV heads, D=64.  Each fused op sits next to
the bare matmul of the same shape and the unfused NumPy path it replaces.
"""
from fastattn.bench import projection as bp

_FULL = {k: bp.SIZES["full"][k] for k in ("batch", "seq", "hidden", "heads_q", "heads_kv", "head_dim")}


class TimeQKVProjection:
    """fused_qkv_projection vs x @ weight.T vs matmul + bias + split + transpose + copy."""

    params = (["float32", "bfloat16"],)
    param_names = ["dtype"]

    def setup(self, dtype):
        self.case = bp.ProjectionCase("qkv", dtype, **_FULL)
        self.x = bp.make_inputs(self.case)
        self.fused, self.bare, self.unfused = (f(self.case, self.x) for f in (bp.kernel, bp.bare, bp.unfused))
        self.fused()

    def time_fused(self, dtype):
        self.fused()

    def time_bare_matmul(self, dtype):
        self.bare()

    def time_unfused_numpy(self, dtype):
        self.unfused()

    def peakmem_fused(self, dtype):
        self.fused()


class TimeOutputProjection:
    """fused_output_projection_residual vs its bare matmul vs matmul + bias + residual."""

    def setup(self):
        self.case = bp.ProjectionCase("output", "float32", **_FULL)
        self.x = bp.make_inputs(self.case)
        self.fused, self.bare, self.unfused = (f(self.case, self.x) for f in (bp.kernel, bp.bare, bp.unfused))
        self.fused()

    def time_fused(self):
        self.fused()

    def time_bare_matmul(self):
        self.bare()

    def time_unfused_numpy(self):
        self.unfused()

    def peakmem_fused(self):
        self.fused()


class TimeProjectionBackward:
    """The two projection backwards (input, weight and bias gradients)."""

    def setup(self):
        import numpy as np

        import fastattn

        case = bp.ProjectionCase("qkv", "float32", **_FULL)
        x = bp.make_inputs(case)
        heads = dict(num_heads=case.heads_q, num_kv_heads=case.heads_kv, head_dim=case.head_dim)
        q, k, v = fastattn.fused_qkv_projection(x["x"], x["weight"], x["bias"], **heads)
        self.qkv = lambda: fastattn.fused_qkv_projection_backward(q, k, v, x["x"], x["weight"], has_bias=True)
        dy = np.ones_like(x["residual"])
        self.out = lambda: fastattn.fused_output_projection_residual_backward(dy, x["attn_out"], x["out_weight"],
                                                                            has_bias=True)
        self.qkv()
        self.out()

    def time_qkv_backward(self):
        self.qkv()

    def time_output_backward(self):
        self.out()


class TimeAttentionLayer:
    """MultiheadAttention forward+backward (causal self-attention) and the sum of its parts."""

    timeout = 300

    def setup(self):
        self.case = bp.ProjectionCase("layer", "float32", **_FULL)
        self.x = bp.make_inputs(self.case)
        self.layer = bp.kernel(self.case, self.x)
        self.layer()
        self.parts = bp.layer_parts(self.case, self.x)
        for part in self.parts.values():
            part()

    def time_forward_backward(self):
        self.layer()

    def time_sum_of_parts(self):
        for part in self.parts.values():
            part()

    def peakmem_forward_backward(self):
        self.layer()


class TimeRotary:
    """Rotary embeddings (:mod:`fastattn.bench.rotary`, full size): ``rotary`` alone and against NumPy, and
    the fused QKV projection, its backward and the layer's forward+backward with and without rotary."""

    params = (["rotary (q)", "qkv projection + rotary", "qkv backward + rotary", "layer fwd+bwd + rotary"],
              ["fastattn", "peer"])
    param_names = ["op", "side"]
    timeout = 300

    def setup(self, op, side):
        from fastattn.bench import rotary

        row = {c[0]: c for c in rotary.cases("full")}[op]
        self.run = row[2] if side == "fastattn" else row[3]
        self.run()

    def time_rotary(self, op, side):
        self.run()
