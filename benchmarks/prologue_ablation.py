"""Where the prologue forward kernel's time goes, without hardware counters: time the kernel with
one stage left out (each variant patches one in-kernel helper of `ccajax.pallas.prologue_sm90`),
one variant per process, and take differences (METHOD.md's way to place time inside a kernel).
The variants compute wrong values: timing only.

    PYTHONPATH=. python3 benchmarks/prologue_ablation.py KIND VARIANT [HEADS=4]

KIND: ``fwd`` (the forward kernel; VARIANT as below), ``dy`` or ``du`` (VARIANT ``base``).
VARIANT: ``base``; ``no_mean`` / ``no_rope`` (config without the q-k mean / RoPE); ``one_lag``
(one lag buffer loaded instead of three); ``no_wgmma`` (conv1 replaced by zeros); ``no_norm``;
``bare`` (all of these at once). CCA HEADS:HEADS at E=2048, d=128, bf16, B=1, S=16k, the
forward at its default warpgroups and row blocks. Prints one ``RESULT {json}`` line.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import time_call
from ccajax import CCAConfig, init_cca_params
from ccajax._common import cast_tree
from ccajax.pallas import prologue_sm90 as ps
from ccajax.rope import default_positions

F32 = jnp.float32


def _one_lag(sc, shape):
    u = ps.plgpu.load(sc["lag_smem"].at[0], layout=ps._WGMMA).astype(F32)
    return [u, u * 0.5, u * 0.25]


def _no_wgmma(a0, b0, a1, b1, shape):
    return jnp.zeros(shape, F32)


def _no_norm(y):
    return jnp.ones(y.shape[:1], F32)


def patch(variant: str, overrides: dict) -> None:
    """Applies ``variant`` to the kernel module (or to the config ``overrides``)."""
    if variant in ("no_mean", "bare"):
        overrides["use_qk_mean"] = False
    if variant in ("no_rope", "bare"):
        overrides["rope_fraction"] = 0.0
    if variant in ("one_lag", "bare"):
        ps._lags = _one_lag
    if variant in ("no_wgmma", "bare"):
        ps._matmul2 = _no_wgmma
    if variant in ("no_norm", "bare"):
        ps._inv_norm = _no_norm
    if variant not in ("base", "no_mean", "no_rope", "one_lag", "no_wgmma", "no_norm", "bare"):
        raise ValueError(f"unknown VARIANT {variant!r}; see the module docstring")


def main(kind: str, variant: str, heads: int = 4):
    overrides = dict(num_q_heads=heads, num_kv_heads=heads, rope_fraction=0.5)
    if kind != "fwd" and variant != "base":
        raise ValueError(f"KIND {kind!r} takes VARIANT base only; got {variant!r}")
    patch(variant, overrides)
    cfg = CCAConfig(d_model=2048, head_dim=128, **overrides)
    seq, rng = 16384, np.random.default_rng(0)
    params = cast_tree(init_cca_params(jax.random.key(0), cfg), jnp.bfloat16)
    num_heads = cfg.num_q_heads + cfg.num_kv_heads
    p = jnp.asarray(rng.normal(size=(1, seq, num_heads + cfg.num_kv_heads, 128)), jnp.bfloat16)
    pos = default_positions(None, 1, seq)
    temp = params["qk_norm"]["temp"] if cfg.use_key_temperature else None
    conv = params["conv"]
    inputs = ps._kernel_inputs(p, conv, temp, pos, pos, cfg)
    if kind == "fwd":
        f = jax.jit(lambda p, conv, temp: ps.prologue_fwd(p, conv, temp, pos, pos, cfg))
        args = (p, conv, temp)
    elif kind == "dy":
        f = jax.jit(lambda inputs, gq, gk: ps._dy_kernel(inputs, gq, gk, cfg))
        args = (inputs, *[jnp.asarray(rng.normal(size=(1, seq, h, 128)), jnp.bfloat16)
                          for h in (cfg.num_q_heads, cfg.num_kv_heads)])
    elif kind == "du":
        dy = jnp.asarray(rng.normal(size=(num_heads, 1, seq, 128)), jnp.bfloat16)
        f = jax.jit(lambda dy, nxt, vecs, w1: ps._du_kernel(dy, nxt, vecs, w1, cfg))
        args = (dy, ps.next_segment_positions(inputs[2]), inputs[3], inputs[4])
    else:
        raise ValueError(f"KIND must be fwd, dy or du; got {kind!r}")
    ms = 1e3 * time_call(f, *args, repeats=9)
    print("RESULT", json.dumps({"kind": kind, "variant": variant, "heads": f"{heads}:{heads}",
                                "device": jax.devices()[0].device_kind, "ms": round(ms, 4)}),
          flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:4]))
