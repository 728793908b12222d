"""Sweep the backward kernels' tile configurations on the GPU, next to cuDNN's backward.

    PYTHONPATH=. python3 benchmarks/tune_attention_bwd.py --out=$OUT/tune_bwd.json

Times ``attention_bwd`` alone (q, k, v, out, lse, d_out precomputed by our forward) for every
configuration in ``CONFIGS`` and every cell (Hq:Hkv x causal at one S), and cuDNN's backward as
its fwd+bwd minus its fwd, all of a cell's in interleaved rounds (`time_interleaved`). TF/s counts
the backward's matmul FLOPs: 2.5 x 4*B*S^2*Hq*d (halved when causal). Prints one line per cell with
ours/cuDNN per configuration; the best configuration per cell is what ``attention_bwd``'s defaults
should be.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks.timing import (WINDOW_HELP, format_vs_cudnn, time_interleaved, with_tflops,
                               write_sweep)
from ccajax.pallas.attention_bwd_sm90 import attention_bwd
from ccajax.pallas.attention_fwd_sm90 import attention_fwd

flags.DEFINE_string("out", "benchmarks/results/tune_attention_bwd.json", "JSON output path.")
flags.DEFINE_integer("seq", 16384, "Sequence length (batch = max(1, tokens // seq)).")
flags.DEFINE_integer("tokens", 16384, "Tokens per batch.")
flags.DEFINE_list("heads", ["16:16", "8:2", "4:4"], "Hq:Hkv pairs.")
flags.DEFINE_list("configs", None, "Names from CONFIGS (default: all).")
flags.DEFINE_list("masks", ["causal", "full"], "Masks to time: causal, full.")
flags.register_validator("masks", lambda masks: set(masks) <= {"causal", "full"},
                         "--masks takes causal and/or full")
flags.DEFINE_integer("repeats", 5, "Median of this many interleaved rounds of ten calls per "
                     "sync.")
flags.DEFINE_float("window_s", 0.0, WINDOW_HELP)
FLAGS = flags.FLAGS
HEAD_DIM = 128

CONFIGS = {
    "default": {},
    "stages3": dict(stages=3),
    "dq_bkv128": dict(dq_block_kv=128),
    "dkv_bq128": dict(dkv_block_q=128),
    "one_wg": dict(dq_block_q=64, dkv_block_kv=64),
    "smem_operands": dict(register_operands=False),
    "fused_dq": dict(fused_dq=True),
    "fused_dq_1wg": dict(fused_dq=True, dkv_block_kv=64),
    # The separate dQ kernel (bit-reproducible; the GPU default before the fused dQ).
    "separate_dq": dict(fused_dq=False),
    # Pallas' warpgroup syncs around shared-memory accesses (the default before 2026-12-02).
    "auto_barriers": dict(auto_barriers=True),
    # Each producer on its whole warpgroup (the default before 2026-12-02, session 18).
    "warpgroup_producer": dict(single_warp_producer=False),
    # GQA: each kv head's group of query heads over 1, 2, 4 or 8 dK/dV CTAs per kv block
    # (an error where the count does not divide Hq / Hkv).
    **{f"group_splits{n}": dict(group_splits=n) for n in (1, 2, 4, 8)},
    # Non-causal: the dK/dV CTA of kv block j starts its q walk j % n blocks along.
    **{f"q_stagger{n}": dict(q_stagger=n) for n in (1, 4, 16, 64, 256)},
}


def cudnn_fwd_and_grad(causal):
    """cuDNN's jitted forward and its gradient w.r.t. q, k, v: its backward is their difference."""
    def attn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attn(q, k, v).astype(jnp.float32)), (0, 1, 2)))
    return jax.jit(attn), grad


def main(argv):
    del argv
    names = FLAGS.configs or list(CONFIGS)
    seq = FLAGS.seq
    batch = max(1, FLAGS.tokens // seq)
    rows = []
    # The JSON is rewritten after every cell (a run cut short keeps what it finished).
    save = functools.partial(write_sweep, FLAGS.out, rows, repeats=FLAGS.repeats,
                             window_s=FLAGS.window_s, configs={n: CONFIGS[n] for n in names})
    for heads in FLAGS.heads:
        hq, hkv = map(int, heads.split(":"))
        keys = jax.random.split(jax.random.key(hq * 7 + hkv), 4)
        q = jax.random.normal(keys[0], (batch, seq, hq, HEAD_DIM), jnp.bfloat16)
        k, v = (jax.random.normal(key, (batch, seq, hkv, HEAD_DIM), jnp.bfloat16)
                for key in keys[1:3])
        d_out = jax.random.normal(keys[3], q.shape, jnp.bfloat16)
        for causal in [mask == "causal" for mask in FLAGS.masks]:
            flops = 2.5 * 4 * batch * seq**2 * hq * HEAD_DIM * (0.5 if causal else 1.0)
            out, lse = jax.jit(lambda q, k, v: attention_fwd(q, k, v, is_causal=causal,
                                                             scale=None))(q, k, v)
            row = dict(seq=seq, batch=batch, hq=hq, hkv=hkv, causal=causal, results={})
            jobs = [(fn, (q, k, v), 10) for fn in cudnn_fwd_and_grad(causal)]
            jobs += [(jax.jit(lambda *a, cfg=CONFIGS[name]: attention_bwd(
                *a, is_causal=causal, scale=None, **cfg)), (q, k, v, out, lse, d_out), 10)
                     for name in names]
            cell = f"S={seq} {hq}:{hkv} {'causal' if causal else 'full'}"
            cudnn_fwd, cudnn_grad, *timings = time_interleaved(
                jobs, repeats=FLAGS.repeats, window_s=FLAGS.window_s,
                labels=[f"{cell} {name}" for name in ("cudnn fwd", "cudnn fwd+bwd", *names)])
            cudnn = (dict(ms=cudnn_grad["ms"] - cudnn_fwd["ms"])
                     if "ms" in cudnn_fwd and "ms" in cudnn_grad else
                     dict(error=cudnn_fwd.get("error") or cudnn_grad.get("error")))
            row["results"]["cudnn"] = with_tflops(cudnn, flops)
            for name, res in zip(names, timings):
                row["results"][name] = with_tflops(res, flops)
            rows.append(row)
            save(complete=False)
            print(format_vs_cudnn(row), flush=True)
    save()


if __name__ == "__main__":
    app.run(main)
