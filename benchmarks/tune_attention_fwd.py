"""Sweep the forward kernel's options on the GPU, next to cuDNN and tokamax, in one process.

    PYTHONPATH=. python3 benchmarks/tune_attention_fwd.py --out=$OUT/tune_fwd.json

Times ``attention_fwd`` for every configuration in `benchmarks.fwd_configs.CONFIGS` and every
cell (S x Hq:Hkv x mask, batch = tokens // S), beside cuDNN and tokamax (when its wheels are
carried: see `benchmarks/attention.py`), all of a cell's in interleaved rounds
(`time_interleaved`; ``--window_s`` for sustained windows instead of single syncs). TF/s counts
4*B*S^2*Hq*d, halved when causal. Prints one line per cell, each configuration as TF/s and its ratio
to cuDNN; the best configuration per cell is what ``attention_fwd``'s defaults should be.
"""

from __future__ import annotations

import functools

from absl import app, flags

from benchmarks.fwd_configs import CONFIGS, cell_inputs, forward_flops, forward_runs
from benchmarks.peers import peers
from benchmarks.timing import (WINDOW_HELP, format_vs_cudnn, time_interleaved, with_tflops,
                               write_sweep)

flags.DEFINE_string("out", "benchmarks/results/tune_attention_fwd.json", "JSON output path.")
flags.DEFINE_list("seq_lens", ["4096", "16384"], "Sequence lengths.")
flags.DEFINE_integer("tokens", 16384, "Batch is max(1, tokens // S).")
flags.DEFINE_list("heads", ["16:16", "8:2", "4:4"], "Hq:Hkv pairs.")
flags.DEFINE_list("masks", ["full", "causal"], "full and/or causal.")
flags.DEFINE_list("configs", None, "Names from CONFIGS (default: all).")
flags.DEFINE_integer("repeats", 5, "Median of this many interleaved rounds of ten calls per "
                     "sync.")
flags.DEFINE_float("window_s", 0.0, WINDOW_HELP)
FLAGS = flags.FLAGS


def main(argv):
    del argv
    names = FLAGS.configs or list(CONFIGS)
    fns, missing = peers()
    peer_names = [p for p in ("cudnn", "tokamax") if p in fns]
    rows = []
    # The JSON is rewritten after every cell (a run cut short keeps what it finished).
    save = functools.partial(write_sweep, FLAGS.out, rows, repeats=FLAGS.repeats,
                             window_s=FLAGS.window_s, configs={n: CONFIGS[n] for n in names},
                             missing_peers=missing)
    for seq in map(int, FLAGS.seq_lens):
        batch = max(1, FLAGS.tokens // seq)
        for heads in FLAGS.heads:
            hq, hkv = map(int, heads.split(":"))
            q, k, v = cell_inputs(batch, seq, hq, hkv)
            for causal in (m == "causal" for m in FLAGS.masks):
                flops = forward_flops(batch, seq, hq, causal)
                row = dict(seq=seq, batch=batch, hq=hq, hkv=hkv, causal=causal, results={})
                runs = forward_runs(fns, peer_names, names, causal)
                cell = f"S={seq} {heads} {'causal' if causal else 'full'}"
                timings = time_interleaved([(fn, (q, k, v), 10) for fn in runs.values()],
                                           repeats=FLAGS.repeats, window_s=FLAGS.window_s,
                                           labels=[f"{cell} {name}" for name in runs])
                row["results"] = {name: with_tflops(res, flops)
                                  for name, res in zip(runs, timings)}
                rows.append(row)
                save(complete=False)
                print(format_vs_cudnn(row), flush=True)
    save()


if __name__ == "__main__":
    app.run(main)
