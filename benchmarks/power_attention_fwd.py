"""SM clock and power draw while each forward implementation runs: are the sustained
benchmarks power-capped, and which kernel does the most work per joule?

    PYTHONPATH=. python3 benchmarks/power_attention_fwd.py --out=$OUT/power_fwd.json

For every cell, each implementation (cuDNN, tokamax when its wheels are carried, and ours with
each configuration named by ``--configs`` from `benchmarks.fwd_configs.CONFIGS`) runs
for ``--seconds`` of back-to-back calls (synced every ten), in ``--rounds`` interleaved rounds,
while ``nvidia-smi -lms`` samples the GPU. A sample counts for the window it was taken in,
after the window's first ``--settle`` seconds. Per implementation it prints TF/s over its
windows, the median SM clock (MHz) and power (W), TF/s per kW (= GFLOP per joule) and FLOP per
SM clock cycle, and the share of samples in which the driver reported the software power cap
as a clock-limiting reason. At the power limit the GFLOP per joule decides the speed; with clocks
free, FLOP per cycle does.
"""

from __future__ import annotations

import datetime
import json
import statistics
import time

import jax
from absl import app, flags

from benchmarks.fwd_configs import cell_inputs, forward_flops, forward_runs
from benchmarks.nvidia_smi import Sampler, supported_fields
from benchmarks.peers import peers
from benchmarks.timing import device_name
from ccajax.pallas.sm90_common import sm_count

flags.DEFINE_string("out", "benchmarks/results/power_attention_fwd.json", "JSON output path.")
flags.DEFINE_list("cells", ["16384:16:16:full", "16384:16:16:causal"],
                  "Cells as S:Hq:Hkv:mask (batch = 16384 // S).")
flags.DEFINE_list("configs", ["default"], "Our configurations (names from CONFIGS).")
flags.DEFINE_float("seconds", 3.0, "Length of one implementation's window.")
flags.DEFINE_float("settle", 0.5, "Samples in a window's first this many seconds are dropped.")
flags.DEFINE_integer("rounds", 3, "Interleaved rounds of windows.")
flags.DEFINE_integer("sample_ms", 50, "nvidia-smi sampling period.")
FLAGS = flags.FLAGS


def _window(fn, args, seconds: float) -> dict:
    """Calls ``fn(*args)`` for ``seconds`` (synced every ten calls); start/end unix times."""
    start, calls = time.time(), 0
    while time.time() - start < seconds:
        for _ in range(10):
            out = fn(*args)
        jax.block_until_ready(out)
        calls += 10
    return dict(start=start, end=time.time(), calls=calls)


def _summary(quantity, values):
    """Median of a window's samples; for ``power_capped`` (0 or 1) the share of samples."""
    if not values:
        return None
    return statistics.fmean(values) if quantity == "power_capped" else statistics.median(values)


def main(argv):
    del argv
    fns, missing = peers()
    peer_names = [p for p in ("cudnn", "tokamax") if p in fns]
    fields = supported_fields()
    if "mhz" not in fields or "watts" not in fields:
        raise SystemExit(f"nvidia-smi reports no SM clock or power here (found {fields})")
    sampler = Sampler(fields, FLAGS.sample_ms)
    rows = []
    try:
        for cell in FLAGS.cells:
            seq, hq, hkv, mask = cell.split(":")
            seq, hq, hkv, causal = int(seq), int(hq), int(hkv), mask == "causal"
            batch = max(1, 16384 // seq)
            q, k, v = cell_inputs(batch, seq, hq, hkv)
            flops = forward_flops(batch, seq, hq, causal)
            runs = forward_runs(fns, peer_names, FLAGS.configs, causal, prefix="ours:")
            for fn in runs.values():  # compile and warm up
                jax.block_until_ready(fn(q, k, v))
            windows = {name: [] for name in runs}
            for round_ in range(FLAGS.rounds):  # odd rounds in reverse, as `time_interleaved`
                for name in (reversed(runs) if round_ % 2 else runs):
                    windows[name].append(_window(runs[name], (q, k, v), FLAGS.seconds))
            time.sleep(2 * FLAGS.sample_ms / 1e3)  # the last samples' lines
            results = {}
            for name, ws in windows.items():
                samples = [s for w in ws for s in sampler.between(w["start"] + FLAGS.settle,
                                                                   w["end"])]
                per_window = [flops * w["calls"] / (w["end"] - w["start"]) / 1e12 for w in ws]
                tflops = statistics.median(per_window)
                stats = {q: _summary(q, [s[q] for s in samples if q in s]) for q in fields}
                results[name] = dict(
                    tflops=tflops, window_tflops=[round(t, 1) for t in per_window],
                    samples=len(samples), **stats,
                    gflop_per_joule=(1e3 * tflops / stats["watts"] if stats["watts"] else None),
                    flop_per_sm_cycle=(tflops * 1e12 / (stats["mhz"] * 1e6) / sm_count()
                                       if stats["mhz"] else None))
            rows.append(dict(seq=seq, batch=batch, hq=hq, hkv=hkv, causal=causal,
                             results=results))
            print(f"S={seq} {hq}:{hkv} {mask}")
            for name, r in results.items():
                capped = r.get("power_capped")
                print(f"  {name:<16} {r['tflops']:5.0f} TF/s  {r['mhz'] or 0:5.0f} MHz  "
                      f"{r['watts'] or 0:4.0f} W  {r['gflop_per_joule'] or 0:5.0f} GFLOP/J  "
                      f"{r['flop_per_sm_cycle'] or 0:5.0f} FLOP/SM/cycle  power-capped "
                      f"{'n/a' if capped is None else f'{capped:.0%}'} "
                      f"({r['samples']} samples)", flush=True)
    finally:
        sampler.stop()
    result = dict(device=device_name(), date=datetime.date.today().isoformat(),
                  jax=jax.__version__, nvidia_smi_fields=fields, missing_peers=missing,
                  method=f"{FLAGS.rounds} interleaved rounds (odd ones in reverse order) of "
                         f"{FLAGS.seconds} s windows per implementation; nvidia-smi every "
                         f"{FLAGS.sample_ms} ms, the first {FLAGS.settle} s of each window "
                         f"dropped; medians (power_capped: the share of samples)", rows=rows)
    with open(FLAGS.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
