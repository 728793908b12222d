"""Gradient of a token-embedding lookup on the GPU: why `TransformerLM.embed_tokens` gathers in f32.

    PYTHONPATH=. python3 benchmarks/embedding_grad.py --out=$OUT/embedding_grad.json

Times d(sum(lookup(table, ids) * g)) / d(table) for one 32 x 1024 batch of ids, four ways:
- take_bf16: gather from a bf16 copy of the f32 table (what `flax.nnx.Embed` does with
  dtype=bf16): the backward is a bf16 scatter-add;
- take_f32: gather from the f32 table, then cast (ours): an f32 scatter-add;
- onehot_bwd: the bf16 gather, with a backward that is a one-hot matmul;
- sorted_segsum: the bf16 gather, with a backward that sorts the ids and sums segments.
Ids: uniform, byte-level text (the quality corpus, `--corpus_dir`, when present) for the 320-token
byte vocabulary, and Zipf(1.1) for a 50,304-token vocabulary. Timing as `../shared/ANCHORS.md`
says (``time_call``: ten calls per sync, median of 7).
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.timing import device_name, time_call

flags.DEFINE_string("out", "", "JSON file to write.")
flags.DEFINE_string("corpus_dir", ".data", "Cache dir holding the quality corpus (byte ids).")
FLAGS = flags.FLAGS
SHAPE = (32, 1024)


def _with_backward(backward):
    """A bf16-table gather whose VJP wrt the table is ``backward(ids, vocab, g)``."""
    @jax.custom_vjp
    def take(table, ids):
        return jnp.take(table, ids, axis=0)

    def fwd(table, ids):
        return take(table, ids), (ids, table.shape[0])

    def bwd(res, g):
        ids, vocab = res
        return backward(ids.reshape(-1), vocab, g.reshape(-1, g.shape[-1])).astype(g.dtype), None

    take.defvjp(fwd, bwd)
    return lambda table, ids: take(table.astype(jnp.bfloat16), ids)


def _onehot(ids, vocab, g):
    return jnp.einsum("nv,ne->ve", jax.nn.one_hot(ids, vocab, dtype=g.dtype), g,
                      preferred_element_type=jnp.float32)


def _sorted_segsum(ids, vocab, g):
    order = jnp.argsort(ids)
    return jax.ops.segment_sum(g.astype(jnp.float32)[order], ids[order], num_segments=vocab,
                               indices_are_sorted=True)


METHODS = {
    "take_bf16": lambda table, ids: jnp.take(table.astype(jnp.bfloat16), ids, axis=0),
    "take_f32": lambda table, ids: jnp.take(table, ids, axis=0).astype(jnp.bfloat16),
    "onehot_bwd": _with_backward(_onehot),
    "sorted_segsum": _with_backward(_sorted_segsum),
}


def _id_sets(vocab: int, rng) -> dict:
    ids = {"uniform": rng.integers(0, vocab, SHAPE)}
    if vocab == 320:
        from experiments import data
        from experiments.configs import quality

        if Path(FLAGS.corpus_dir).exists():
            corpus = data.prepare_corpus(sources=quality.SOURCES, cache_dir=FLAGS.corpus_dir,
                                         tokenizer="byte")
            ids["bytes"] = next(data.PackedBatches(corpus, "train", batch_size=SHAPE[0],
                                                   seq_len=SHAPE[1]))["inputs"]
    else:
        ids["zipf"] = np.minimum(rng.zipf(1.1, SHAPE) - 1, vocab - 1)
    return {k: jnp.asarray(v, jnp.int32) for k, v in ids.items()}


def main(argv):
    del argv
    rows = []
    for vocab, width in ((320, 512), (50304, 768)):
        rng = np.random.default_rng(0)
        table = jnp.asarray(rng.normal(size=(vocab, width)), jnp.float32)
        g = jnp.asarray(rng.normal(size=SHAPE + (width,)), jnp.bfloat16)
        for dist, ids in _id_sets(vocab, rng).items():
            for name, lookup in METHODS.items():
                loss = lambda t, i, lookup=lookup: jnp.sum((lookup(t, i) * g).astype(jnp.float32))
                ms = 1e3 * time_call(jax.jit(jax.grad(loss)), table, ids)
                rows.append(dict(vocab=vocab, width=width, ids=dist, method=name, ms=ms))
                print(f"V={vocab:>6} E={width} {dist:8s} {name:14s} {ms:9.3f} ms", flush=True)
    result = dict(device=device_name(), date=datetime.date.today().isoformat(),
                  jax=jax.__version__, batch=list(SHAPE), rows=rows)
    if FLAGS.out:
        Path(FLAGS.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    app.run(main)
