"""Attention kernels side by side on the GPU: ours (mosaic) against cuDNN, ANCHORS' cells.

    PYTHONPATH=. python3 benchmarks/attention.py --out=benchmarks/results/attention.json

TF/s counts attention matmul FLOPs only: 4*B*S^2*Hq*d, halved when causal; fwd+bwd is 3.5x that.
Each cell also checks ours against cuDNN (max |diff| of the outputs). Peers that need carried
wheels (tokamax, FlashAttention-3) are not in this run.
"""

from __future__ import annotations

import datetime
import json

import jax
import jax.numpy as jnp
from absl import app, flags

from ccajax.attention import dot_product_attention
from benchmarks.timing import device_name, time_call

flags.DEFINE_string("out", "benchmarks/results/attention.json", "Where to write the JSON results.")
flags.DEFINE_integer("head_dim", 128, "Head dim d.")
FLAGS = flags.FLAGS

# (S, B, Hq, Hkv): ANCHORS.md's cells.
CELLS = [(16384, 1, 16, 16), (16384, 1, 8, 2), (16384, 1, 4, 4), (4096, 4, 8, 2), (32768, 1, 8, 2)]


def forward(impl, causal):
    return jax.jit(lambda q, k, v: dot_product_attention(q, k, v, is_causal=causal, implementation=impl))


def forward_backward(impl, causal):
    def loss(q, k, v):
        return jnp.sum(dot_product_attention(q, k, v, is_causal=causal, implementation=impl)
                       .astype(jnp.float32))
    return jax.jit(jax.grad(loss, (0, 1, 2)))


def main(argv):
    del argv
    d, rows = FLAGS.head_dim, []
    for seq, batch, hq, hkv in CELLS:
        keys = jax.random.split(jax.random.key(seq + hq), 3)
        q = jax.random.normal(keys[0], (batch, seq, hq, d), jnp.bfloat16)
        k, v = (jax.random.normal(key, (batch, seq, hkv, d), jnp.bfloat16) for key in keys[1:])
        for causal in (True, False):
            flops = 4 * batch * seq**2 * hq * d * (0.5 if causal else 1.0)
            row = dict(seq=seq, batch=batch, hq=hq, hkv=hkv, d=d, causal=causal)
            ours, theirs = forward("mosaic", causal)(q, k, v), forward("cudnn", causal)(q, k, v)
            row["max_abs_diff_vs_cudnn"] = float(jnp.max(jnp.abs(
                ours.astype(jnp.float32) - theirs.astype(jnp.float32))))
            for impl in ("mosaic", "cudnn"):
                row[f"{impl}_fwd_ms"] = 1e3 * time_call(forward(impl, causal), q, k, v)
                row[f"{impl}_fwd_tflops"] = flops / row[f"{impl}_fwd_ms"] / 1e9
            row["cudnn_fwdbwd_ms"] = 1e3 * time_call(forward_backward("cudnn", causal), q, k, v)
            row["cudnn_fwdbwd_tflops"] = 3.5 * flops / row["cudnn_fwdbwd_ms"] / 1e9
            rows.append(row)
            print(f"S={seq:>5} B={batch} {hq:>2}:{hkv:<2} {'causal' if causal else 'full  '}  fwd TF/s "
                  f"ours {row['mosaic_fwd_tflops']:5.0f}  cuDNN {row['cudnn_fwd_tflops']:5.0f}  "
                  f"ratio {row['mosaic_fwd_tflops'] / row['cudnn_fwd_tflops']:.2f}   cuDNN fwd+bwd "
                  f"{row['cudnn_fwdbwd_tflops']:5.0f}   |ours-cuDNN| {row['max_abs_diff_vs_cudnn']:.1e}",
                  flush=True)
    result = dict(device=device_name(), date=datetime.date.today().isoformat(),
                  jax=jax.__version__, method="median of 7 repeats of 10 calls per sync",
                  note="ours fwd+bwd not timed: its backward is still the jnp reference", rows=rows)
    with open(FLAGS.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    app.run(main)
