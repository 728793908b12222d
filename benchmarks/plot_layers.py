"""Plots of `benchmarks/layers.py`'s sweeps.

The paper-style plot: layer latency against sequence length, one line per method, forward and
forward+backward panels (one row per mask setting):

    python3 benchmarks/plot_layers.py benchmarks/results/layers_h100_2026-11-23.json

Speed-ups at one sequence length (``--speedups OUT.png JSON...``, sweeps of one S, e.g. a causal
and a non-causal run): bars of MHA latency / layer latency per method, forward and
forward+backward, one panel per mask, with issue 5's targets (1.8x for C=2, 3.6x for C=4) marked:

    python3 benchmarks/plot_layers.py --speedups out.png causal.json noncausal.json
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot(path: str, out: str | None = None) -> str:
    """Writes the figure next to the JSON (same name, .png) unless ``out`` is given."""
    with open(path) as f:
        result = json.load(f)
    rows = [r for r in result["rows"] if "method" in r]
    masks = sorted({r["causal"] for r in rows}, reverse=True)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(len(masks), 2, figsize=(11, 4.2 * len(masks)), squeeze=False)
    for i, causal in enumerate(masks):
        for j, (mode, title) in enumerate((("fwd", "forward"), ("fwdbwd", "forward + backward"))):
            ax = axes[i][j]
            for name in methods:
                pts = sorted((r["seq"], r[mode]["ms"]) for r in rows
                             if r["method"] == name and r["causal"] == causal and mode in r)
                if pts:
                    ax.plot(*zip(*pts), marker="o", ms=3, label=name,
                            ls="-" if name.startswith("CC") else "--")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length S (batch = max(1, 16k / S))")
            ax.set_ylabel("layer latency (ms)")
            ax.set_title(f"{title}, {'causal' if causal else 'no mask'}")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Attention layers, E=2048, d=128, bf16 - {result['device']}, {result['date']}")
    fig.tight_layout()
    out = out or path.rsplit(".", 1)[0] + ".png"
    fig.savefig(out, dpi=120)
    return out


# Issue 5's targets: within 10% of the FLOP-ratio ideal (C=2 -> 1.8x, C=4 -> 3.6x).
TARGETS = {"CCA C=2 (8:8)": 1.8, "CCGQA 8:2": 1.8, "CCA C=4 (4:4)": 3.6}


def plot_speedups(out: str, *paths: str) -> str:
    """Speed-up bars vs the MHA 16:16 layer of the same run and mask, from sweeps of one S."""
    runs, rows = [], []
    for path in paths:
        with open(path) as f:
            runs.append(json.load(f))
        rows += [r for r in runs[-1]["rows"] if "method" in r]
    masks = sorted({r["causal"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, len(masks), figsize=(6 * len(masks), 4.2), squeeze=False)
    for ax, causal in zip(axes[0], masks):
        cell = {r["method"]: r for r in rows if r["causal"] == causal}
        mha = cell.pop("MHA 16:16")
        names = list(cell)
        for k, (mode, label) in enumerate((("fwd", "forward"), ("fwdbwd", "forward + backward"))):
            speedups = [mha[mode]["ms"] / cell[n][mode]["ms"] for n in names]
            xs = [i + (k - 0.5) * 0.38 for i in range(len(names))]
            bars = ax.bar(xs, speedups, 0.36, label=label)
            ax.bar_label(bars, fmt="%.2f", fontsize=8)
        for i, name in enumerate(names):
            if name in TARGETS:
                ax.hlines(TARGETS[name], i - 0.45, i + 0.45, colors="k", linestyles="--", lw=1)
        ax.set_xticks(range(len(names)), names, fontsize=8)
        ax.set_ylabel(f"speed-up vs the MHA layer ({mha['fwd']['ms']:.2f} / "
                      f"{mha['fwdbwd']['ms']:.2f} ms)")
        ax.set_title(f"S={mha['seq']}, B={mha['batch']}, {'causal' if causal else 'no mask'}"
                     " (dashed: target)")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Attention layers, E=2048, d=128, bf16 - {runs[0]['device']}, {runs[0]['date']}")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


if __name__ == "__main__":
    args = sys.argv[1:]
    print(plot_speedups(*args[1:]) if args[:1] == ["--speedups"] else plot(*args))
