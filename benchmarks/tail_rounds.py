"""The partly filled last round of the non-causal forward: TF/s against S at fixed batch and
heads, ours (named `benchmarks.fwd_configs.CONFIGS`) beside cuDNN and tokamax, in one process.

    PYTHONPATH=. python3 benchmarks/tail_rounds.py --configs=default,no_split_tail \
        --out=$OUT/tail_rounds.json
    python benchmarks/tail_rounds.py --plot_only benchmarks/results/tail_rounds_*.json

A grid of 132 SMs runs B*Hq*S/256 tiles of 256 query rows (a pair of CTAs each) in rounds of
66; a length whose tiles leave the last round partly filled loses, on a naive model,
ceil(rounds)/rounds - 1 of its time (each row's ``wave_loss``). Peers whose tiles are as wide
show the same sawtooth; ``split_tail`` (`attention_fwd`) spreads the last round's kv steps
over every cluster instead. Each row times its entries in interleaved rounds of sustained
windows (`time_interleaved`); the JSON is rewritten after every length, and a plot of TF/s
against S (one panel per head layout) is written next to it.
"""

from __future__ import annotations

import json
import math
import sys
import textwrap
from pathlib import Path

from absl import app, flags

CLUSTERS = 66  # pairs of CTAs on a 132-SM H100 / H200
ROWS_PER_TILE = 256

flags.DEFINE_string("out", "benchmarks/results/tail_rounds.json", "JSON output path.")
flags.DEFINE_list("cells", ["4:8:2:3328:4864", "1:16:16:15616:17152"],
                  "batch:Hq:Hkv:first S:last S, S in steps of 256.")
flags.DEFINE_list("configs", ["default", "no_split_tail"], "Names from CONFIGS.")
flags.DEFINE_integer("repeats", 3, "Interleaved rounds.")
flags.DEFINE_float("window_s", 0.5, "Seconds of back-to-back syncs per entry and round.")
flags.DEFINE_bool("plot_only", False, "Plot the JSON files given as arguments; time nothing.")
FLAGS = flags.FLAGS


def plot(paths: list[Path]) -> Path:
    """TF/s against S per (batch, heads), every entry of every file (one line each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(p.read_text()) for p in paths]
    layouts = sorted({(r["batch"], r["hq"], r["hkv"]) for run in runs for r in run["rows"]})
    fig, axes = plt.subplots(1, len(layouts), figsize=(6 * len(layouts), 4.5), squeeze=False)
    for ax, (batch, hq, hkv) in zip(axes[0], layouts):
        for path, run in zip(paths, runs):
            rows = [r for r in run["rows"] if (r["batch"], r["hq"], r["hkv"]) == (batch, hq, hkv)]
            for name in rows[0]["results"]:
                seqs = [r["seq"] for r in rows if "tflops" in r["results"].get(name, {})]
                tflops = [r["results"][name]["tflops"] for r in rows
                          if "tflops" in r["results"].get(name, {})]
                label = name if len(paths) == 1 else f"{name} ({path.stem})"
                ax.plot(seqs, tflops, marker="o", label=label)
        losses = [r for r in runs[0]["rows"] if (r["batch"], r["hq"], r["hkv"]) == (batch, hq, hkv)]
        for r in losses:
            ax.annotate(f"{r['wave_loss']:.0%}", (r["seq"], ax.get_ylim()[0]), fontsize=7,
                        ha="center", va="bottom", color="gray")
        ax.set_title(f"B={batch} {hq}:{hkv}, non-causal forward (gray: naive last-round loss)")
        ax.set_xlabel("S")
        ax.set_ylabel("TF/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(textwrap.fill(f"{runs[0]['device']}, {runs[0]['date']}: {runs[0]['method']}",
                               140), fontsize=8)
    fig.tight_layout()
    out = paths[-1].with_suffix(".png")
    fig.savefig(out, dpi=120)
    return out


def main(argv):
    if FLAGS.plot_only:
        print("wrote", plot([Path(p) for p in argv[1:]]))
        return
    from benchmarks.fwd_configs import cell_inputs, forward_flops, forward_runs
    from benchmarks.peers import peers
    from benchmarks.timing import (device_name, method, time_interleaved, with_tflops)
    import datetime
    import jax

    fns, missing = peers()
    peer_names = [p for p in ("cudnn", "tokamax") if p in fns]
    header = dict(device=device_name(), date=str(datetime.date.today()), jax=jax.__version__,
                  command=" ".join(sys.argv),
                  method=method(FLAGS.repeats, FLAGS.window_s), configs=FLAGS.configs,
                  missing_peers=missing, rows=[])
    for cell in FLAGS.cells:
        batch, hq, hkv, first, last = map(int, cell.split(":"))
        for seq in range(first, last + 1, 256):
            q, k, v = cell_inputs(batch, seq, hq, hkv)
            runs = forward_runs(fns, peer_names, FLAGS.configs, False)
            rounds = batch * hq * math.ceil(seq / ROWS_PER_TILE) / CLUSTERS
            timings = time_interleaved([(fn, (q, k, v), 10) for fn in runs.values()],
                                       repeats=FLAGS.repeats, window_s=FLAGS.window_s,
                                       labels=[f"S={seq} {name}" for name in runs])
            flops = forward_flops(batch, seq, hq, False)
            row = dict(batch=batch, hq=hq, hkv=hkv, seq=seq, rounds=rounds,
                       wave_loss=math.ceil(rounds) / rounds - 1,
                       results={n: with_tflops(t, flops) for n, t in zip(runs, timings)})
            header["rows"].append(row)
            Path(FLAGS.out).write_text(json.dumps(header, indent=1))
            print(f"B={batch} {hq}:{hkv} S={seq} rounds={rounds:.2f} "
                  f"naive loss={row['wave_loss']:.3f} "
                  + " ".join(f"{n}={r.get('tflops', float('nan')):.0f}"
                             for n, r in row["results"].items()), flush=True)
    print("wrote", FLAGS.out, plot([Path(FLAGS.out)]))


if __name__ == "__main__":
    app.run(main)
