"""Decode-step latency on the GPU: MHA 16:16, GQA 16:4, MLA and CCGQA 8:2 (E=2048, d=128), bf16.

    PYTHONPATH=. python3 benchmarks/decode.py --out=$OUT/decode.json

One process, in this order (the JSON is rewritten after each part, so a run cut short keeps what
it measured; parts are skipped once ``--budget_s`` is spent):
1. the device's copy bandwidth (x + 1 on 2 GiB: bytes read + written);
2. the Mosaic GPU decode kernel against the jnp reference at realistic, ragged shapes;
3. the acceptance cell (context 32k, batch 16): the attention step of every method with the XLA
   path and our kernel, and a sweep of the kernel's options (tile, stages, splits) on CCGQA;
4. the attention step over contexts x batches (our kernel at batch 1 and at the acceptance cell
   also timed as ten calls in one program, which leaves out the host's per-call dispatch);
5. the whole layer's decode step (projections, conv/RoPE, cache append, attention, output) and
   a small model's (embedding, 4 layers with residuals, 32k-vocabulary head) at that cell;
6. cache bytes per token and the longest context that fits this GPU, per method.
Timing as `../shared/ANCHORS.md` says: ten back-to-back calls per sync (``time_call``; the layer
and model steps run ten steps in one jitted loop, carrying the cache in place), median of 7.
Bandwidth counts the cache bytes a step must read (all of k and v up to the context).
``--smoke`` runs the same code on tiny shapes with the kernel interpreted (CPU check of this file).
"""

from __future__ import annotations

import datetime
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.experimental.pallas import mosaic_gpu as plgpu

from benchmarks.timing import device_name, failure, time_call
from ccajax import decode
from ccajax.cca import init_cca_params
from ccajax.config import CCAConfig, MHAConfig, MLAConfig
from ccajax.mha import init_mha_params
from ccajax.mla import init_mla_params
from ccajax.pallas.decode import decode_attention, decode_attention_reference
from ccajax.pallas.decode_sm90 import decode_attention_sm90, default_splits

flags.DEFINE_string("out", "benchmarks/results/decode.json", "Where to write the JSON results.")
flags.DEFINE_list("contexts", ["4096", "32768", "131072"], "Context lengths of the grid.")
flags.DEFINE_list("batches", ["1", "16", "64"], "Batch sizes of the grid.")
flags.DEFINE_integer("accept_context", 32768, "Context of the acceptance cell.")
flags.DEFINE_integer("accept_batch", 16, "Batch of the acceptance cell.")
flags.DEFINE_float("max_cache_gb", 36.0, "Skip grid cells whose cache is larger.")
flags.DEFINE_float("budget_s", 170.0, "Skip the remaining parts after this many seconds.")
flags.DEFINE_boolean("smoke", False, "Tiny shapes, kernel in interpret mode: a CPU check of this file.")
FLAGS = flags.FLAGS

E, D = 2048, 128
METHODS = {
    "MHA 16:16": MHAConfig(E, 16, 16, D),
    "GQA 16:4": MHAConfig(E, 16, 4, D),
    "MLA r=512": MLAConfig.deepseek_v2_lite(),
    "CCGQA 8:2": CCAConfig(E, 8, 2, D, rope_fraction=0.5, rope_theta=5e6),  # ZAYA1's layer
}
INIT = {CCAConfig: init_cca_params, MHAConfig: init_mha_params, MLAConfig: init_mla_params}
START = time.perf_counter()


def over_budget() -> bool:
    return time.perf_counter() - START > FLAGS.budget_s


def kernel_context():
    """Interpret mode for --smoke (CPU), else nothing."""
    return plgpu.force_gpu_interpret_mode() if FLAGS.smoke else _Null()


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def timing() -> dict:
    """time_call's repeats: the method's 7, or one untimed-quality call for --smoke."""
    return dict(calls_per_sync=1, repeats=1, warmup=0) if FLAGS.smoke else dict(repeats=7)


def impls() -> tuple:
    """Attention paths of the layer steps and the grid; --smoke leaves the interpreted kernel
    (minutes per cell on a CPU) to the check and the acceptance cell."""
    return ("xla",) if FLAGS.smoke else ("xla", "mosaic")


def cache_shapes(cfg, batch, context):
    """(q shape, [cache shapes]) of the attention step; MLA attends over its latent (absorbed)."""
    if isinstance(cfg, MLAConfig):
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        return (batch, cfg.num_heads, width), [(batch, context, 1, width)]
    kv = (batch, context, cfg.num_kv_heads, cfg.head_dim)
    return (batch, cfg.num_q_heads, cfg.head_dim), [kv, kv]


def attention_fn(cfg, impl, **kernel_options):
    """The attention step (q, *caches, lengths) -> out, jitted."""
    if isinstance(cfg, MLAConfig):
        scale = cfg.qk_head_dim ** -0.5
        return jax.jit(lambda q, kv, n: decode_attention(q, kv, kv, n, scale=scale,
                                                         implementation=impl)[..., :cfg.kv_lora_rank])
    if kernel_options:
        return jax.jit(lambda q, k, v, n: decode_attention_sm90(q, k, v, n, **kernel_options))
    return jax.jit(lambda q, k, v, n: decode_attention(q, k, v, n, implementation=impl))


def random_inputs(cfg, batch, context, seed=0, lengths=None):
    q_shape, cache = cache_shapes(cfg, batch, context)
    keys = jax.random.split(jax.random.key(seed), 1 + len(cache))
    arrays = [jax.random.normal(k, s, jnp.bfloat16) for k, s in zip(keys, [q_shape, *cache])]
    n = jnp.full((batch,), context, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
    return (*arrays, n), sum(int(np.prod(s)) * 2 for s in cache)


def time_attention(cfg, impl, batch, context, in_graph=False, **kernel_options):
    """The ANCHORS timing (10 dispatched calls per sync); with ``in_graph`` also 10 calls chained
    inside one jitted loop, which leaves out the host's per-call dispatch (``us_in_graph``)."""
    args, cache_bytes = random_inputs(cfg, batch, context)
    fn = attention_fn(cfg, impl, **kernel_options)
    row = {"cache_gb": cache_bytes / 1e9}
    try:
        with kernel_context():
            seconds = time_call(fn, *args, **timing())
            row.update(us=seconds * 1e6, tb_s=cache_bytes / seconds / 1e12)
            if in_graph:
                row["us_in_graph"] = 1e6 * time_call(_chained(fn), *args, **timing()) / 10
    except Exception as e:  # noqa: BLE001 - record why a variant could not run
        row["error"] = failure(e)
    return row


def _chained(fn):
    """Ten calls of ``fn`` in one program, each query nudged by the previous output so that
    XLA can neither hoist nor merge them."""
    @jax.jit
    def ten(q, *rest):
        def body(_, q):
            return q + (1e-6 * fn(q, *rest).astype(jnp.float32).mean()).astype(q.dtype)
        return jax.lax.fori_loop(0, 10, body, q)
    return ten


def copy_bandwidth():
    n = (1 << 20) if FLAGS.smoke else (1 << 30)  # bf16 elements: 2 GiB on the GPU
    x = jax.random.normal(jax.random.key(0), (n,), jnp.bfloat16)
    seconds = time_call(jax.jit(lambda x: x + 1), x)
    return 2 * 2 * n / seconds / 1e12


def check_kernel():
    """Compiled kernel vs the float32 reference at realistic ragged shapes: rel. max-abs error."""
    cases = [("CCGQA 8:2", 16, 8192, {}), ("GQA 16:4", 3, 4096, dict(block_kv=64, stages=4)),
             ("MHA 16:16", 2, 2048, dict(block_kv=128, splits=16)),
             ("CCGQA 8:2", 5, 1024, dict(block_kv=64, stages=3, splits=4))]
    if FLAGS.smoke:
        cases = [("CCGQA 8:2", 2, 256, dict(block_kv=64, splits=2))]
    rng = np.random.default_rng(0)
    rows = []
    for name, batch, context, options in cases:
        lengths = rng.integers(0, context + 1, batch)
        lengths[0], lengths[-1] = context, 1 + rng.integers(context)  # a full and a ragged one
        (q, k, v, n), _ = random_inputs(METHODS[name], batch, context, seed=len(rows), lengths=lengths)
        row = dict(method=name, batch=batch, context=context, options=options,
                   lengths=lengths.tolist())
        try:
            with kernel_context():
                out = decode_attention_sm90(q, k, v, n, **options).astype(jnp.float32)
            ref = decode_attention_reference(*(a.astype(jnp.float32) for a in (q, k, v)), n)
            row["rel_err"] = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
            row["ok"] = bool(row["rel_err"] < 2e-2 and jnp.isfinite(out).all())
        except Exception as e:  # noqa: BLE001
            row.update(ok=False, error=failure(e))
        rows.append(row)
        print("check", row, flush=True)
    return rows


def acceptance_cell():
    batch, context = FLAGS.accept_batch, FLAGS.accept_context
    rows = []
    for name, cfg in METHODS.items():
        for impl in ("xla", "mosaic"):
            if impl == "mosaic" and isinstance(cfg, MLAConfig):
                continue  # d = 576: the kernel takes d in {64, 128}
            rows.append(dict(method=name, impl=impl, batch=batch, context=context,
                             **time_attention(cfg, impl, batch, context, in_graph=impl == "mosaic")))
            print("cell", rows[-1], flush=True)
    cfg = METHODS["CCGQA 8:2"]
    sweep = []
    # The cell above ran the defaults (block_kv 128, 2 stages, `default_splits`: 4 here). A first
    # run swept splits 8/16/32 and 64-row tiles with 3 and 4 stages: all within -2%..+5%.
    variants = [dict(block_kv=128, stages=2, splits=16), dict(block_kv=64, stages=4)]
    if FLAGS.smoke:
        variants = [dict(block_kv=64, stages=2, splits=2)]
    for options in variants:
        if over_budget():
            break
        options.setdefault("splits", default_splits(batch, cfg.num_kv_heads, context,
                                                    options["block_kv"]))
        sweep.append(dict(options=options, **time_attention(cfg, "mosaic", batch, context, **options)))
        print("sweep", sweep[-1], flush=True)
    return rows, sweep


def time_steps(step, state, *args, repeats=7, warmup=2):
    """Median seconds per step of a jitted ``step(state, *args) -> state`` that runs 10 steps."""
    for _ in range(warmup):
        state = jax.block_until_ready(step(state, *args))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        state = jax.block_until_ready(step(state, *args))
        samples.append((time.perf_counter() - start) / 10)
    return statistics.median(samples)


def layer_and_model_steps(batch, context, num_layers=4, vocab=32000):
    """Decode-step time of one layer (both attention paths) and of a small model (embedding,
    ``num_layers`` layers with residuals, head; our kernel where it applies), every sequence at
    ``context - 16`` cached tokens."""
    runs = [(name, impl, 1) for name in METHODS for impl in impls()]
    runs += [(name, impls()[-1], num_layers) for name in METHODS]
    rows = []
    for name, impl, layers in runs:
        cfg = METHODS[name]
        if isinstance(cfg, MLAConfig) and impl == "mosaic":
            if layers == 1:
                continue
            impl = "xla"  # d = 576: the kernel takes d in {64, 128}
        if over_budget():
            break
        row = dict(method=name, impl=impl, layers=layers, batch=batch, context=context)
        try:
            row["us"] = 1e6 * _time_model(cfg, impl, batch, context, layers, vocab)
        except Exception as e:  # noqa: BLE001
            row["error"] = failure(e)
        rows.append(row)
        print("step", row, flush=True)
    return rows


def _time_model(cfg, impl, batch, context, layers, vocab):
    """layers == 1: the bare layer (x -> x + 1e-3 y, no embedding/head); else the small model."""
    keys = jax.random.split(jax.random.key(1), layers + 2)
    params = [jax.tree.map(lambda p: p.astype(jnp.bfloat16), INIT[type(cfg)](k, cfg))
              for k in keys[:layers]]
    embed = jax.random.normal(keys[-2], (vocab, cfg.d_model), jnp.bfloat16)
    head = jax.random.normal(keys[-1], (cfg.d_model, vocab), jnp.bfloat16) * cfg.d_model ** -0.5
    states = [decode.init_decode_state(cfg, batch, context, jnp.bfloat16) for _ in range(layers)]
    start = jnp.full((batch,), context - 16, jnp.int32)

    @functools.partial(jax.jit, donate_argnums=0)
    def ten_steps(states, params, embed, head):
        states = [s._replace(lengths=start) for s in states]

        def body(_, carry):
            states, token, x = carry
            h = embed[token] if layers > 1 else x
            new_states = []
            for p, s in zip(params, states):
                y, s = decode.decode_step(p, h, cfg, s, implementation=impl)
                h = h + (y if layers > 1 else 1e-3 * y)
                new_states.append(s)
            token = jnp.argmax(h @ head, axis=-1).astype(jnp.int32) if layers > 1 else token
            return new_states, token, h

        x0 = jnp.ones((batch, cfg.d_model), jnp.bfloat16)
        carry = (states, jnp.zeros((batch,), jnp.int32), x0)
        return jax.lax.fori_loop(0, 10, body, carry)[0]

    with kernel_context():
        return time_steps(ten_steps, states, params, embed, head,
                          **(dict(repeats=1, warmup=0) if FLAGS.smoke else {}))


def grid(measured):
    """Every (context, batch) cell not in ``measured`` (the acceptance cell's rows)."""
    rows = list(measured)
    done = {(r["context"], r["batch"]) for r in measured}
    for context in map(int, FLAGS.contexts):
        for batch in map(int, FLAGS.batches):
            if (context, batch) in done:
                continue
            for name, cfg in METHODS.items():
                cache_gb = decode.cache_bytes_per_token(cfg) * batch * context / 1e9
                for impl in impls():
                    if impl == "mosaic" and isinstance(cfg, MLAConfig):
                        continue
                    if cache_gb > FLAGS.max_cache_gb or over_budget():
                        rows.append(dict(method=name, impl=impl, batch=batch, context=context,
                                         skipped=("cache too large" if cache_gb > FLAGS.max_cache_gb
                                                  else "time budget")))
                        continue
                    rows.append(dict(method=name, impl=impl, batch=batch, context=context,
                                     **time_attention(cfg, impl, batch, context,
                                                      in_graph=batch == 1 and impl == "mosaic")))
                    print("grid", rows[-1], flush=True)
    return rows


def memory_table(gpu_bytes: int):
    """Cache bytes per token and layer, and the longest context for B=1 and B=16 of a 32-layer
    stack with 10% of the GPU left for weights and activations."""
    rows = []
    for name, cfg in METHODS.items():
        rows.append(dict(method=name, cache_bytes_per_token_per_layer=decode.cache_bytes_per_token(cfg),
                         **{f"max_context_b{b}_32_layers": decode.max_context(
                             cfg, gpu_bytes, batch=b, num_layers=32, reserved_bytes=gpu_bytes // 10)
                            for b in (1, 16)}))
    return rows


def main(argv):
    del argv
    if FLAGS.smoke:
        FLAGS.contexts, FLAGS.batches = ["256"], ["1", "2"]
        FLAGS.accept_context, FLAGS.accept_batch = 256, 2
    device = jax.devices()[0]
    gpu_bytes = (device.memory_stats() or {}).get("bytes_limit", 80 * 10 ** 9)
    result = dict(device=device_name(), date=datetime.date.today().isoformat(), jax=jax.__version__,
                  method="median of 7 repeats of 10 calls (steps) per sync; bf16; d=128, E=2048",
                  gpu_bytes=gpu_bytes)

    def save(**parts):
        result.update(parts)
        result.setdefault("elapsed_s", {}).update({k: time.perf_counter() - START for k in parts})
        with open(FLAGS.out, "w") as f:
            json.dump(result, f, indent=1)

    save(memory=memory_table(gpu_bytes), copy_tb_s=copy_bandwidth())
    print(f"copy bandwidth {result['copy_tb_s']:.2f} TB/s", flush=True)
    save(kernel_checks=check_kernel())
    cell, sweep = acceptance_cell()
    save(acceptance_cell=cell, sweep=sweep, acceptance=acceptance(cell, sweep, result["copy_tb_s"]))
    save(grid=grid(cell))
    save(steps=layer_and_model_steps(FLAGS.accept_batch, FLAGS.accept_context,
                                     num_layers=2 if FLAGS.smoke else 4,
                                     vocab=512 if FLAGS.smoke else 32000))
    print_summary(result)
    print(f"wrote {FLAGS.out}")


def acceptance(cell, sweep, copy_tb_s):
    """CCGQA's attention step vs MHA's and GQA's (each at its best implementation), and the
    kernel's bandwidth over the measured copy bandwidth."""
    best = {}
    for row in cell + [dict(method="CCGQA 8:2", impl="mosaic", **r) for r in sweep]:
        if "us" in row and row["us"] < best.get(row["method"], {}).get("us", float("inf")):
            best[row["method"]] = row
    ours = best.get("CCGQA 8:2")
    if not ours or "MHA 16:16" not in best or "GQA 16:4" not in best:
        return {"error": "a method has no timing", "best": best}
    default = next((r for r in cell if r["method"] == "CCGQA 8:2" and r["impl"] == "mosaic"), {})
    return dict(best=best,
                speedup_vs_mha=best["MHA 16:16"]["us"] / ours["us"],
                speedup_vs_gqa=best["GQA 16:4"]["us"] / ours["us"],
                kernel_fraction_of_copy=ours["tb_s"] / copy_tb_s,
                default_options_us=default.get("us"),
                pass_6x_mha=best["MHA 16:16"]["us"] / ours["us"] >= 6,
                pass_1_5x_gqa=best["GQA 16:4"]["us"] / ours["us"] >= 1.5,
                pass_70pct_copy=ours["tb_s"] / copy_tb_s >= 0.7)


def print_summary(result):
    print(f"\n{result['device']}  copy {result['copy_tb_s']:.2f} TB/s")
    for row in result.get("kernel_checks", []):
        print(f"check {row['method']:<10} B={row['batch']:<3} T={row['context']:<6} "
              f"{'ok' if row['ok'] else 'FAIL'} {row.get('rel_err', row.get('error'))}")
    print(f"{'method':<10} {'impl':<7} {'B':>3} {'ctx':>7} {'us':>9} {'TB/s':>6}")
    for row in result.get("grid", []):
        if "us" in row:
            print(f"{row['method']:<10} {row['impl']:<7} {row['batch']:>3} {row['context']:>7} "
                  f"{row['us']:>9.1f} {row['tb_s']:>6.2f}"
                  + (f"  in-graph {row['us_in_graph']:.1f}" if "us_in_graph" in row else ""))
    for row in result.get("sweep", []):
        print("sweep", row["options"], f"{row.get('us', 0):.1f} us {row.get('tb_s', 0):.2f} TB/s",
              row.get("error", ""))
    for row in result.get("steps", []):
        print(f"step {row['method']:<10} {row['impl']:<7} layers={row['layers']} "
              f"{row.get('us', float('nan')):.1f} us {row.get('error', '')}")
    print("acceptance", {k: v for k, v in result.get("acceptance", {}).items() if k != "best"})


if __name__ == "__main__":
    app.run(main)
