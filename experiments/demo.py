"""Demo: build CCA, CCGQA and the baseline layers, run them jitted, print the cost table.

    python experiments/demo.py --d_model=2048 --seq_len=16384   # the cost table at the paper's size
    python experiments/demo.py --run_d_model=256                # size of the layers actually run

The layers run at a small width (``--run_d_model``) so the demo takes seconds on a CPU; the cost
table is computed (not run) at ``--d_model`` / ``--seq_len``.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from ccajax import costs
from ccajax.modules import attention_module

flags.DEFINE_integer("d_model", 2048, "Model width of the cost table.")
flags.DEFINE_integer("head_dim", 128, "Head dim of the cost table.")
flags.DEFINE_integer("seq_len", 16384, "Sequence length of the cost table.")
flags.DEFINE_integer("batch", 1, "Batch of the cost table.")
flags.DEFINE_integer("run_d_model", 256, "Model width of the layers that are run.")
flags.DEFINE_integer("run_seq_len", 128, "Sequence length of the layers that are run.")
flags.DEFINE_integer("seed", 0, "PRNG seed.")
FLAGS = flags.FLAGS


def run_layers(d_model: int, seq_len: int, seed: int) -> None:
    """Initialises every standard layer at ``d_model`` (head_dim 16), runs forward and backward jitted."""
    configs = costs.standard_configs(d_model=d_model, head_dim=d_model // 16)
    x = jax.random.normal(jax.random.key(seed), (2, seq_len, d_model), jnp.float32)
    print(f"Running each layer jitted on {jax.default_backend()}: x {x.shape}, forward + grad")

    @nnx.jit
    def loss_and_grad(layer, x):
        return nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(layer)

    for name, cfg in configs.items():
        layer = attention_module(cfg, rngs=nnx.Rngs(seed))
        start = time.perf_counter()
        loss, grads = jax.block_until_ready(loss_and_grad(layer, x))
        grad_norm = float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads))))
        print(f"  {name:<16} params {costs.param_count(cfg):>9,}  mean y^2 {float(loss):.4f}  "
              f"|grad| {grad_norm:.4f}  compiled and ran in {time.perf_counter() - start:4.1f} s")


def main(argv):
    del argv
    f = FLAGS
    run_layers(f.run_d_model, f.run_seq_len, f.seed)
    print(f"\nPer-layer costs at d_model={f.d_model}, head_dim={f.head_dim}, batch={f.batch}, "
          f"seq_len={f.seq_len}, causal:")
    table = costs.cost_table(costs.standard_configs(f.d_model, f.head_dim), f.batch, f.seq_len)
    print(costs.format_cost_table(table))


if __name__ == "__main__":
    app.run(main)
