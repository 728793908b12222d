"""The LM head and loss on the GPU: why `ccajax.training.lm_loss` uses `ccajax.losses.cross_entropy`.

    PYTHONPATH=. python3 benchmarks/loss.py --out=$OUT/loss.json

Times value_and_grad (wrt the final hidden state and the head's weights) and the forward alone
of head + cross-entropy + z-loss term at `small`'s shape (8 x 4096 tokens, E=512, V=50,304, bf16
compute, f32 weights), three ways:
- float32_logits: the head's bf16 logits cast to float32, then
  ``optax.softmax_cross_entropy_with_integer_labels`` and ``jax.nn.logsumexp`` (lm_loss before
  2026-11-30);
- cross_entropy: the bf16 logits into `ccajax.losses.cross_entropy` (lm_loss since);
- head_only: the head's matmul and a sum, the floor without any loss.
Timing as `../shared/ANCHORS.md` says (``time_call``: ten calls per sync, median of 7).
"""

from __future__ import annotations

import datetime
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from benchmarks.timing import device_name, time_call
from ccajax.losses import cross_entropy

flags.DEFINE_string("out", "", "JSON file to write.")
flags.DEFINE_integer("batch", 8, "Sequences.")
flags.DEFINE_integer("seq", 4096, "Tokens per sequence.")
flags.DEFINE_integer("d_model", 512, "Hidden size E.")
flags.DEFINE_integer("vocab", 50304, "Vocabulary V.")
FLAGS = flags.FLAGS


def float32_logits(logits, targets):
    logits = logits.astype(jnp.float32)
    return (optax.softmax_cross_entropy_with_integer_labels(logits, targets),
            jax.nn.logsumexp(logits, axis=-1))


def head_only(logits, targets):
    return logits.astype(jnp.float32), jnp.zeros(targets.shape, jnp.float32)


def main(_):
    rng = np.random.default_rng(0)
    shape = (FLAGS.batch, FLAGS.seq)
    x = jnp.asarray(rng.normal(size=(*shape, FLAGS.d_model)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(FLAGS.vocab, FLAGS.d_model)) / FLAGS.d_model ** 0.5,
                    jnp.float32)
    targets = jnp.asarray(rng.integers(0, FLAGS.vocab, size=shape), jnp.int32)
    result = {"device": device_name(), "date": datetime.date.today().isoformat(),
              "jax": jax.__version__, "tokens": FLAGS.batch * FLAGS.seq,
              "d_model": FLAGS.d_model, "vocab": FLAGS.vocab, "rows": []}
    for name, loss_fn in (("float32_logits", float32_logits), ("cross_entropy", cross_entropy),
                          ("head_only", head_only)):
        def loss(x, w, loss_fn=loss_fn):
            ce, log_z = loss_fn(x @ w.astype(jnp.bfloat16).T, targets)
            return jnp.mean(ce) + 1e-4 * jnp.mean(log_z ** 2)

        grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        row = {"loss": name, "value": float(grad(x, w)[0]),
               "fwdbwd_ms": 1e3 * time_call(grad, x, w),
               "fwd_ms": 1e3 * time_call(jax.jit(loss), x, w)}
        result["rows"].append(row)
        print(f"{name:<15} fwd {row['fwd_ms']:6.2f} ms  fwd+bwd {row['fwdbwd_ms']:6.2f} ms", flush=True)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    app.run(main)
