"""Whole attention layers on the GPU: projections -> attention -> output projection, every method.

    PYTHONPATH=. python3 benchmarks/layers.py --out=$OUT/layers.json            # the sweep
    PYTHONPATH=. python3 benchmarks/layers.py --mode=breakdown --out=$OUT/bd.json

Sweep: MHA 16:16, GQA 16:4, MLA (DeepSeek-V2 proportions at E=2048: r=512, d_r=64), CCA C=2 (8:8),
CCA C=4 (4:4), CCGQA 8:2 and 4:2; E=2048, d=128, bf16 params and activations; S = 1k..64k with
B = max(1, tokens // S); causal and not; forward and forward+backward (grads of params and x).
Each method runs on its best attention kernel: the fastest of cuDNN, ours ("mosaic") and, for
fwd+bwd, our forward with cuDNN's backward ("mosaic_fwd_cudnn_bwd") per cell and mode among
``--impls`` / ``--bwd_impls`` (MHA, GQA, MLA: ``--baseline_bwd_impls``; MLA: cuDNN with v
zero-padded to the q/k head dim 192, the only flash kernel here that takes it). CCA/CCGQA use
the fused path (`ccajax.cca_fused`) with the faster of the ``--prologues`` (jnp, or the sm90
prologue kernel). Timing: ten calls per sync for short calls, fewer for long ones
(`--target_ms` of device work per sync), median of ``--repeats`` syncs (`benchmarks/timing.py`,
ANCHORS.md's method). The sweep compiles every method and variant of one (mask, S) first and
then times them in interleaved rounds, one sync each per round, so that drift over the minutes
a sweep takes (the same layer moved 3-5% between runs on the H200) is shared by MHA and the
layers compared with it; a run cut short therefore keeps only the (mask, S) cells it finished.
Speed-up = MHA latency / latency.

Breakdown (``--mode=breakdown``): the pieces of one CCA layer at S=16k B=1 (plain path and fused
path: projections, prologue, attention, out-projection), forward and forward+backward.

Kernels (``--mode=kernels``): for each of ``--methods`` at the first of ``--seq_lens`` and
``--causal``, every variant's forward+backward as device time per kernel (a `jax.profiler` trace,
`benchmarks/kernel_profile.py`) beside its wall time: which kernels a layer's latency is made of.
"""

from __future__ import annotations

import datetime
import json
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks.kernel_profile import kernel_times
from benchmarks.timing import WINDOW_HELP, device_name, failure, time_interleaved
from ccajax import cca, cca_fused, costs
from ccajax._common import cast_tree
from ccajax.attention import dot_product_attention
from ccajax.cca import cca_attention
from ccajax.config import CCAConfig, MHAConfig, MLAConfig
from ccajax.mha import mha_attention
from ccajax.mla import mla_qkv
from ccajax.pallas.prologue_sm90 import mosaic_prologue
from ccajax.rope import default_positions

flags.DEFINE_string("out", "benchmarks/results/layers.json", "Where to write the JSON results.")
flags.DEFINE_enum("mode", "sweep", ["sweep", "breakdown", "kernels"], "What to time.")
flags.DEFINE_list("seq_lens", ["1024", "2048", "4096", "8192", "16384", "32768", "65536"],
                  "Sequence lengths.")
flags.DEFINE_integer("tokens", 16384, "Batch is max(1, tokens // S).")
flags.DEFINE_list("causal", ["1", "0"], "Mask settings to run (1 causal, 0 none).")
flags.DEFINE_list("methods", [], "Subset of method names (default: all).")
flags.DEFINE_list("impls", ["cudnn", "mosaic"], "Attention kernels to try for the forward.")
flags.DEFINE_list("bwd_impls", ["cudnn", "mosaic", "mosaic_fwd_cudnn_bwd"],
                  "Attention kernels to try for fwd+bwd of the CCA/CCGQA layers.")
flags.DEFINE_list("baseline_bwd_impls", ["cudnn", "mosaic", "mosaic_fwd_cudnn_bwd"],
                  "Attention kernels to try for fwd+bwd of the MHA/GQA/MLA layers (the speed-ups' "
                  "baselines: give them at least the CCA layers' choices).")
flags.DEFINE_list("prologues", ["jnp", "mosaic"], "CCA prologues to try (`cca_attention`'s).")
flags.DEFINE_integer("breakdown_seq", 16384, "S of the breakdown (B=1).")
flags.DEFINE_integer("breakdown_compression", 2, "C of the breakdown's CCA layer (2: 8:8, 4: 4:4).")
flags.DEFINE_list("breakdown_pieces", [],
                  "Time only the breakdown's pieces whose name contains one of these substrings "
                  "('parity' for the accuracy check; default: all), so that one device call fits.")
flags.DEFINE_integer("parity_seq", 4096, "S of the breakdown's accuracy check against float32.")
flags.DEFINE_integer("repeats", 5, "Median of this many syncs.")
flags.DEFINE_integer("round_warmup", 1,
                     "Untimed calls of a method right before each of its timed syncs in the "
                     "interleaved rounds (0: the sync starts on what the previous method left).")
flags.DEFINE_float("window_s", 0.0, WINDOW_HELP)
flags.DEFINE_float("target_ms", 40.0,
                   "Device work per sync: calls per sync = this / latency, clipped to 1..10.")
FLAGS = flags.FLAGS
E, D = 2048, 128


def configs(causal: bool) -> dict:
    """name -> config, in the plot's order (MHA first: the speed-up baseline)."""
    std = costs.standard_configs(E, D, causal=causal)
    return {"MHA 16:16": std["MHA 16:16"], "GQA 16:4": std["GQA 16:4"],
            "MLA r=512": std["MLA r=512"], "CCA C=2 (8:8)": std["CCA C=2 (8:8)"],
            "CCGQA 8:2": std["CCGQA 8:2"], "CCA C=4 (4:4)": std["CCA C=4 (4:4)"],
            "CCGQA 4:2": std["CCGQA 4:2"]}


def mla_layer(params, x, cfg: MLAConfig, impl: str):
    """MLA with v zero-padded from 128 to the q/k head dim 192 (then sliced back): the form cuDNN
    takes; our kernel does not take d=192."""
    b, s = x.shape[:2]
    q, k, v = mla_qkv(params, x, cfg, default_positions(None, b, s))
    v = jnp.pad(v, [(0, 0)] * 3 + [(0, q.shape[-1] - v.shape[-1])])
    o = dot_product_attention(q, k, v, is_causal=cfg.causal, implementation=impl)
    return o[..., :cfg.v_head_dim].reshape(b, s, -1) @ params["wo"]


def layer_fn(cfg, impl: str, prologue: str = "jnp"):
    """(params, x) -> y for the config's layer on attention backend ``impl`` (CCA: and prologue)."""
    if isinstance(cfg, MLAConfig):
        return lambda p, x: mla_layer(p, x, cfg, impl)
    if isinstance(cfg, MHAConfig):
        return lambda p, x: mha_attention(p, x, cfg, implementation=impl)
    return lambda p, x: cca_attention(p, x, cfg, implementation=impl, prologue=prologue)


def fwd_and_grad(fn, args, argnums):
    """Jitted forward, and jitted forward+backward (grads of <fn(*args), ct> w.r.t. argnums)."""
    out = jax.eval_shape(fn, *args)
    cts = jax.tree.map(lambda o: jax.random.normal(jax.random.key(7), o.shape, o.dtype), out)

    def loss(*a):
        return sum(jnp.vdot(o.astype(jnp.float32), c.astype(jnp.float32))
                   for o, c in zip(jax.tree.leaves(fn(*a)), jax.tree.leaves(cts)))

    return jax.jit(fn), jax.jit(jax.grad(loss, argnums))


def prepared(make, *args) -> dict:
    """Compile ``make()`` on ``args`` and scale its calls per sync to its latency (``--target_ms``
    of device work, 1 to 10 calls): {"fn", "compile_s", "calls_per_sync"}, or {"error"} if
    building or running it fails."""
    try:
        f = make()
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        once_ms = 1e3 * (time.perf_counter() - start)
        calls = int(min(10, max(1, FLAGS.target_ms / max(once_ms, 1e-3))))
        return {"fn": f, "compile_s": compile_s, "calls_per_sync": calls}
    except Exception as e:  # noqa: BLE001 - record why a cell could not run
        return {"error": failure(e)}


def interleaved(jobs) -> None:
    """Time the ``(result, args)`` jobs (results from `prepared`) with `time_interleaved`:
    ``--repeats`` rounds after a warm-up round, one sync of each job per round, each sync after
    ``--round_warmup`` untimed calls of the same job (so that it times the layer back to back
    with itself, ANCHORS.md's "after warm-up", not its first call after another method's), or
    with ``--window_s`` that many seconds of syncs of each job per round (sustained clocks).
    Each result gets "ms", its median over the rounds, and "round_ms", every round's time (or
    "error"), and loses "fn"."""
    live = [(res, args) for res, args in jobs if "error" not in res]
    timings = time_interleaved([(res["fn"], args, res["calls_per_sync"]) for res, args in live],
                               repeats=FLAGS.repeats, warmup=FLAGS.round_warmup,
                               window_s=FLAGS.window_s)
    for (res, _), timing in zip(live, timings):
        res.pop("fn")
        res.update(timing)


def timed(make, *args) -> dict:
    """{"ms", "compile_s", "calls_per_sync"} of ``make()(*args)`` (median of ``--repeats``
    syncs), or {"error"}."""
    res = prepared(make, *args)
    if "fn" in res:
        interleaved([(res, args)])
    return res


def inputs(cfg, batch, seq, seed=0):
    init = costs._init_for(cfg)
    params = cast_tree(init(jax.random.key(seed), cfg), jnp.bfloat16)
    x = jax.random.normal(jax.random.key(seed + 1), (batch, seq, E), jnp.bfloat16)
    return params, x


def variants(cfg, mode) -> list[tuple[str, str]]:
    """(attention impl, CCA prologue) pairs to time; the prologue is "" for other layers."""
    if mode == "fwd":
        wanted = FLAGS.impls
    else:
        wanted = FLAGS.bwd_impls if isinstance(cfg, CCAConfig) else FLAGS.baseline_bwd_impls
    if isinstance(cfg, MLAConfig):
        wanted = [i for i in wanted if not i.startswith("mosaic")]
    prologues = FLAGS.prologues if isinstance(cfg, CCAConfig) else [""]
    return [(i, pro) for i in wanted for pro in prologues]


def sweep():
    """Per (mask, S): every method's variants compiled first, then timed in interleaved rounds."""
    names = FLAGS.methods or None
    rows = []
    for causal in (c == "1" for c in FLAGS.causal):
        for seq in map(int, FLAGS.seq_lens):
            batch = max(1, FLAGS.tokens // seq)
            cell, jobs = [], []
            for name, cfg in configs(causal).items():
                if names and name not in names:
                    continue
                params, x = inputs(cfg, batch, seq)
                row = dict(method=name, seq=seq, batch=batch, causal=causal, results={})
                for impl, pro in dict.fromkeys(variants(cfg, "fwd") + variants(cfg, "fwdbwd")):
                    fns = lambda: fwd_and_grad(  # noqa: E731
                        layer_fn(cfg, impl, pro or "jnp"), (params, x), (0, 1))
                    res = {}
                    for mode, index in (("fwd", 0), ("fwdbwd", 1)):
                        if (impl, pro) in variants(cfg, mode):
                            res[mode] = prepared(lambda: fns()[index], params, x)
                            jobs.append((res[mode], (params, x)))
                    row["results"][f"{impl}/{pro}" if pro else impl] = res
                cell.append(row)
            interleaved(jobs)
            for row in cell:
                for mode in ("fwd", "fwdbwd"):
                    ok = {i: r[mode]["ms"] for i, r in row["results"].items()
                          if "ms" in r.get(mode, {})}
                    if ok:
                        best = min(ok, key=ok.get)
                        rounds = row["results"][best][mode]["round_ms"]
                        # Half the range of the rounds, in % of the median: the noise a
                        # speed-up quoted to 1% has to clear.
                        spread = 50 * (max(rounds) - min(rounds)) / ok[best]
                        row[mode] = {"ms": ok[best], "impl": best, "spread_pct": spread}
                rows.append(row)
                save(rows)
                print(format_row(row, rows), flush=True)
    return rows


def format_row(row, rows) -> str:
    base = next((r for r in rows if r["method"] == "MHA 16:16" and r["seq"] == row["seq"]
                 and r["causal"] == row["causal"]), None)
    parts = [f"S={row['seq']:>5} B={row['batch']:<2} {'causal' if row['causal'] else 'full  '} "
             f"{row['method']:<14}"]
    for mode in ("fwd", "fwdbwd"):
        if mode not in row:
            errs = {i: r.get(mode, {}).get("error", "")[:80] for i, r in row["results"].items()}
            parts.append(f"{mode}: err {errs}")
            continue
        speed = (base[mode]["ms"] / row[mode]["ms"]) if base and mode in base else float("nan")
        parts.append(f"{mode} {row[mode]['ms']:8.3f} ms ±{row[mode]['spread_pct']:3.1f}% "
                     f"({row[mode]['impl']:<12}) x{speed:4.2f}")
    return "  ".join(parts)


def parity(seq: int) -> list:
    """Fused vs plain CCA layers (bf16, cuDNN attention) against the plain layer in float32
    (XLA attention): relative L2 error of y and of the grads of x and the down-projections."""
    rows = []
    for name in ("CCA C=2 (8:8)", "CCGQA 8:2"):
        cfg = configs(True)[name]
        params, x = inputs(cfg, 1, seq)
        ct = jax.random.normal(jax.random.key(3), x.shape, jnp.float32)

        def run(prologue, dtype, impl):
            f = lambda p, x: cca_attention(p, x, cfg, implementation=impl,  # noqa: E731
                                           prologue=prologue, dtype=dtype)
            y, vjp = jax.vjp(jax.jit(f), cast_tree(params, dtype), x.astype(dtype))
            gp, gx = vjp(ct.astype(dtype))
            return [a.astype(jnp.float32) for a in (y, gx, gp["compress"]["wq"], gp["conv"]["w1"])]

        ref = run("plain", jnp.float32, "xla")
        row = {"method": name, "seq": seq}
        for prologue in ("plain", *FLAGS.prologues):
            try:
                got = run(prologue, jnp.bfloat16, "cudnn")
                row[prologue] = [float(jnp.linalg.norm(g - r) / jnp.linalg.norm(r))
                                 for g, r in zip(got, ref)]
            except Exception as e:  # noqa: BLE001 - record why a prologue could not run
                row[prologue] = failure(e)
        rows.append(row)
        print(f"parity {name}: rel err vs f32 [y, dx, dwq, dw1] {row}", flush=True)
    return rows


def breakdown():
    """Pieces of the CCA layer of C=``--breakdown_compression`` (S=16k, B=1, causal), plain and
    fused, fwd and fwd+bwd."""
    cfg = CCAConfig.from_compression(E, FLAGS.breakdown_compression, D, causal=True)
    seq, batch = FLAGS.breakdown_seq, 1
    params, x = inputs(cfg, batch, seq)
    pos = default_positions(None, batch, seq)
    q, k, v = cca.cca_qkv(params, x, cfg, pos)
    o = dot_product_attention(q, k, v, is_causal=True).reshape(batch, seq, -1)
    p, _ = cca_fused.fused_projection(params, x, cfg, pos)
    u = p[:, :, :cfg.num_q_heads + cfg.num_kv_heads]
    temp = params["qk_norm"]["temp"]

    def plain_projections(p, x):
        qk = cca.compress(p["compress"], x, cfg)
        return (*qk, cca.value_shift(p["value"], x, cfg, pos))

    def plain_prologue(conv, temp, q, k):
        mq, mk = cca.qk_mean(q, k)
        q, k = cca.conv_mix(conv, q, k, cfg, pos)
        q, k = cca.qk_normalize(q + mq, k + mk, cfg, temp)
        return cca.latent_rope(q, k, pos, cfg)

    pieces = {
        "plain projections (q, k, v)": (plain_projections, (params, x)),
        "plain prologue (mean, conv, norm, rope)": (plain_prologue, (params["conv"], temp, q, k)),
        "fused projection (one matmul + v shift)": (
            lambda p, x: cca_fused.fused_projection(p, x, cfg, pos), (params, x)),
        "fused prologue (jnp)": (
            lambda c, t, u: cca_fused.fused_prologue(c, t, u, cfg, pos, pos),
            (params["conv"], temp, u)),
        "fused prologue (jnp, rematerialised)": (
            jax.checkpoint(lambda c, t, u: cca_fused.fused_prologue(c, t, u, cfg, pos, pos)),
            (params["conv"], temp, u)),
        "mosaic prologue (kernel)": (
            lambda c, t, p: mosaic_prologue(p, c, t, pos, pos, cfg), (params["conv"], temp, p)),
        "out projection": (lambda wo, o: o @ wo, (params["out"]["wo"], o)),
    }
    for impl in FLAGS.impls:
        pieces[f"attention {impl} {cfg.num_q_heads}:{cfg.num_kv_heads}"] = (
            lambda q, k, v, impl=impl: dot_product_attention(q, k, v, is_causal=True,
                                                             implementation=impl), (q, k, v))
    for prologue in ("plain", *FLAGS.prologues):
        for impl in FLAGS.impls:
            pieces[f"layer {prologue} {impl}"] = (layer_fn(cfg, impl, prologue), (params, x))
    mha = configs(True)["MHA 16:16"]
    for impl in FLAGS.impls:
        pieces[f"MHA 16:16 layer {impl}"] = (layer_fn(mha, impl), inputs(mha, batch, seq))
    wanted = lambda name: not FLAGS.breakdown_pieces or any(  # noqa: E731
        part in name for part in FLAGS.breakdown_pieces)
    rows = [{"parity": parity(FLAGS.parity_seq)}] if wanted("parity") else []
    for name, (fn, args) in pieces.items():
        if not wanted(name):
            continue
        fns = lambda: fwd_and_grad(fn, args, tuple(range(len(args))))  # noqa: E731
        row = {"piece": name, "fwd": timed(lambda: fns()[0], *args),
               "fwdbwd": timed(lambda: fns()[1], *args)}
        rows.append(row)
        save(rows)
        print(f"{name:<42} " + "  ".join(
            f"{m} {row[m]['ms']:7.3f} ms (compile {row[m]['compile_s']:4.1f}s)" if "ms" in row[m]
            else f"{m} {row[m]['error'][:120]}" for m in ("fwd", "fwdbwd")), flush=True)
    return rows


def kernels():
    """Device time per kernel of each variant's forward+backward (see the module docstring)."""
    seq, causal = int(FLAGS.seq_lens[0]), FLAGS.causal[0] == "1"
    batch = max(1, FLAGS.tokens // seq)
    rows = []
    for name, cfg in configs(causal).items():
        if FLAGS.methods and name not in FLAGS.methods:
            continue
        params, x = inputs(cfg, batch, seq)
        for impl, pro in variants(cfg, "fwdbwd"):
            step = fwd_and_grad(layer_fn(cfg, impl, pro or "jnp"), (params, x), (0, 1))[1]
            row = dict(method=name, seq=seq, batch=batch, causal=causal, impl=impl, prologue=pro,
                       wall=timed(lambda: step, params, x))
            try:
                row["kernels"] = kernel_times(step, params, x)
            except Exception as e:  # noqa: BLE001 - record why the trace could not be read
                row["kernels_error"] = failure(e)
            rows.append(row)
            save(rows)
            busy = sum(k["ms"] for k in row.get("kernels", []))
            print(f"{name} {impl}/{pro} fwd+bwd: wall {row['wall'].get('ms', float('nan')):.3f} ms,"
                  f" kernels {busy:.3f} ms {row.get('kernels_error', '')}", flush=True)
            for k in row.get("kernels", [])[:14]:
                print(f"  {k['ms']:7.3f} ms x{k['launches']:<4g} {k['kernel'][:100]}", flush=True)
    return rows


def save(rows):
    """Writes the JSON (after every row, so a run cut short keeps what it measured)."""
    result = dict(device=device_name(), date=datetime.date.today().isoformat(), jax=jax.__version__,
                  command=" ".join(sys.argv), mode=FLAGS.mode, e=E, d=D, dtype="bfloat16",
                  method=f"median of {FLAGS.repeats} syncs, up to 10 calls per sync "
                         f"({FLAGS.target_ms} ms of work per sync); sweep: methods interleaved "
                         f"(odd rounds in reverse order), "
                         + (f"{FLAGS.window_s} s of syncs each per round (their median)"
                            if FLAGS.window_s > 0 else
                            f"one sync each per round after {FLAGS.round_warmup} untimed call(s)"),
                  rows=rows)
    with open(FLAGS.out, "w") as f:
        json.dump(result, f, indent=1)


def main(argv):
    del argv
    rows = {"sweep": sweep, "breakdown": breakdown, "kernels": kernels}[FLAGS.mode]()
    save(rows)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
