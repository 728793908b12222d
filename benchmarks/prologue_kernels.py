"""The CCA prologue kernels alone on the GPU (`ccajax.pallas.prologue_sm90`): one piece per process.

    PYTHONPATH=. python3 benchmarks/prologue_kernels.py MODE [S=16384] [CCAConfig field=value ...]

MODE: ``fwd`` (forward kernel: max-abs error vs the jnp prologue, both timed), ``dy`` / ``du``
(one backward kernel, run and timed), ``lag`` (the lag products kernel: error vs its XLA
reference, both timed; ``blocks_per_cta=N`` and ``stages=N`` set its chunk and ring), ``bwd``
(the whole backward: errors of dp and the conv gradients vs the jnp prologue's VJP, relative
to each reference's max-abs; both timed). Default layer: CCA C=2 8:8 at E=2048, d=128, half
RoPE, bf16, B=1; ``blocks_per_cta=N`` and ``compute_wgs=N`` set a kernel's row blocks per CTA
and its warpgroups (fwd, du; the dy kernel has one warpgroup). Prints one ``RESULT {json}``
line.
One piece per process because a kernel fault (an illegal instruction) ends the CUDA context;
with ``MOSAIC_GPU_DUMP_PTXAS=1`` ptxas reports each kernel's registers and spills.
Timing: `benchmarks.timing.time_call` (ten calls per sync, median).
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import time_call
from ccajax import CCAConfig, init_cca_params
from ccajax._common import cast_tree
from ccajax.cca_fused import fused_prologue
from ccajax.pallas import prologue_sm90 as ps
from ccajax.rope import default_positions


def _max_rel(a, b):
    a, b = (np.asarray(x, np.float32) for x in (a, b))
    return round(float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)), 4)


def main(mode, seq=16384, blocks_per_cta=None, compute_wgs=None, stages=None, **overrides):
    kwargs = {**dict(num_q_heads=8, num_kv_heads=8, rope_fraction=0.5), **overrides}
    cfg = CCAConfig(d_model=2048, head_dim=128, **kwargs)
    params = cast_tree(init_cca_params(jax.random.key(0), cfg), jnp.bfloat16)
    rng = np.random.default_rng(0)
    heads = cfg.num_q_heads + cfg.num_kv_heads
    p = jnp.asarray(rng.normal(size=(1, seq, heads + cfg.num_kv_heads, 128)), jnp.bfloat16)
    pos = default_positions(None, 1, seq)
    temp = params["qk_norm"]["temp"] if cfg.use_key_temperature else None
    conv = params["conv"]
    ref = jax.jit(lambda p, conv, temp: fused_prologue(conv, temp, p[:, :, :heads], cfg, pos, pos))
    res = {"mode": mode, "S": seq, "cfg": kwargs, "device": jax.devices()[0].device_kind}
    if mode in ("fwd", "dy", "du"):
        res["blocks_per_cta"], res["compute_wgs"] = blocks_per_cta, compute_wgs
    if stages is not None and mode != "lag":
        raise ValueError(f"stages sets the lag products kernel's ring; got it for mode {mode!r}")
    cts = [jnp.asarray(rng.normal(size=(1, seq, h, 128)), jnp.bfloat16)
           for h in (cfg.num_q_heads, cfg.num_kv_heads)]
    if mode == "fwd":
        f = jax.jit(lambda p, conv, temp: ps.prologue_fwd(p, conv, temp, pos, pos, cfg,
                                                          blocks_per_cta=blocks_per_cta,
                                                          compute_wgs=compute_wgs))
        for name, got, want in zip("qk", f(p, conv, temp), ref(p, conv, temp)):
            res[f"max_abs_err_{name}"] = float(jnp.abs(got.astype(jnp.float32)
                                                       - want.astype(jnp.float32)).max())
        res["kernel_ms"] = 1e3 * time_call(f, p, conv, temp)
        res["jnp_ms"] = 1e3 * time_call(ref, p, conv, temp)
    elif mode == "dy":
        if compute_wgs is not None:
            raise ValueError(f"the dy kernel has one warpgroup; got compute_wgs={compute_wgs}")
        inputs = ps._kernel_inputs(p, conv, temp, pos, pos, cfg)
        f = jax.jit(lambda inputs, gq, gk: ps._dy_kernel(inputs, gq, gk, cfg,
                                                         blocks_per_cta=blocks_per_cta))
        res["kernel_ms"] = 1e3 * time_call(f, inputs, *cts)
    elif mode == "du":
        inputs = ps._kernel_inputs(p, conv, temp, pos, pos, cfg)
        dy = jnp.asarray(rng.normal(size=(heads, 1, seq, 128)), jnp.bfloat16)
        f = jax.jit(lambda dy, nxt, vecs, w1: ps._du_kernel(
            dy, nxt, vecs, w1, cfg, blocks_per_cta=blocks_per_cta, compute_wgs=compute_wgs))
        res["kernel_ms"] = 1e3 * time_call(f, dy, ps.next_segment_positions(inputs[2]),
                                           inputs[3], inputs[4])
    elif mode == "lag":
        if compute_wgs is not None:
            raise ValueError(f"the lag kernel has one warpgroup per lag, not compute_wgs; got "
                             f"compute_wgs={compute_wgs}")
        walk = {k: v for k, v in (("blocks_per_cta", blocks_per_cta), ("stages", stages))
                if v is not None}
        res.update(walk)
        dy = jnp.asarray(rng.normal(size=(heads, 1, seq, 128)), jnp.bfloat16)
        nxt = ps.next_segment_positions(pos)
        f = jax.jit(lambda p, dy, nxt: ps._lag_kernel(p, dy, nxt, **walk))
        xla = jax.jit(lambda p, dy: ps.lag_products_reference(p[:, :, :heads], dy, pos))
        res["rel_err"] = _max_rel(f(p, dy, nxt), xla(p, dy))
        res["kernel_ms"] = 1e3 * time_call(f, p, dy, nxt)
        res["xla_ms"] = 1e3 * time_call(xla, p, dy)
    elif mode == "bwd":
        f = jax.jit(lambda p, conv, temp, gq, gk: ps.prologue_bwd(p, conv, temp, pos, pos, gq, gk,
                                                                  cfg))
        got = f(p, conv, temp, *cts)
        _, vjp = jax.vjp(ref, p, conv, temp)
        vjp = jax.jit(vjp)
        want = vjp(tuple(cts))
        res["rel_err"] = {"dp": _max_rel(got[0], want[0]),
                          **{k: _max_rel(got[1][k], want[1][k]) for k in sorted(got[1])}}
        if temp is not None:
            res["rel_err"]["temp"] = _max_rel(got[2], want[2])
        res["kernel_ms"] = 1e3 * time_call(f, p, conv, temp, *cts)
        res["jnp_vjp_ms"] = 1e3 * time_call(lambda *c: vjp(c), *cts)
    else:
        raise ValueError(f"MODE must be fwd, dy, du, lag or bwd, got {mode!r}")
    print("RESULT", json.dumps(res), flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args:
        sys.exit(__doc__)
    seq = int(args[1]) if len(args) > 1 else 16384
    main(args[0], seq, **{k: eval(v) for k, v in (a.split("=", 1) for a in args[2:])})
