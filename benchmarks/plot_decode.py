"""Plots `benchmarks/decode.py`'s JSON: attention-step latency vs context (one panel per batch)
and the achieved cache-read bandwidth of every cell against the measured copy bandwidth.

    python3 benchmarks/plot_decode.py benchmarks/results/decode_h100_2026-11-23.json
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

STYLE = {"MHA 16:16": "tab:red", "GQA 16:4": "tab:orange", "MLA r=512": "tab:purple",
         "CCGQA 8:2": "tab:blue"}


def plot(path: str) -> str:
    with open(path) as f:
        result = json.load(f)
    rows = [r for r in result.get("grid", []) if "us" in r]
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches) + 1, figsize=(4.2 * (len(batches) + 1), 3.8))
    for ax, batch in zip(axes, batches):
        for method, color in STYLE.items():
            for impl, line in (("xla", "--"), ("mosaic", "-")):
                pts = sorted({(r["context"], r["us"]) for r in rows
                              if r["batch"] == batch and r["method"] == method and r["impl"] == impl})
                if pts:
                    ax.plot(*zip(*pts), line, color=color, marker="o", ms=3,
                            label=f"{method} {impl}")
        ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="µs per step",
               title=f"attention decode step, batch {batch}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    ax = axes[-1]
    for method, color in STYLE.items():
        for impl, marker in (("xla", "x"), ("mosaic", "o")):
            pts = [(r["cache_gb"], r["tb_s"]) for r in rows if r["method"] == method
                   and r["impl"] == impl]
            if pts:
                ax.scatter(*zip(*pts), color=color, marker=marker, s=18, label=f"{method} {impl}")
    ax.axhline(result["copy_tb_s"], color="k", lw=1, label=f"copy {result['copy_tb_s']:.2f} TB/s")
    ax.axhline(0.7 * result["copy_tb_s"], color="k", lw=0.8, ls=":", label="70% of copy")
    ax.set(xscale="log", xlabel="cache read per step (GB)", ylabel="TB/s",
           title="achieved cache-read bandwidth")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.suptitle(f"{result['device']}, {result['date']}, bf16, d=128 (MLA: latent 576)")
    fig.tight_layout()
    out = path.rsplit(".", 1)[0] + ".png"
    fig.savefig(out, dpi=120)
    return out


if __name__ == "__main__":
    print(plot(sys.argv[1]))
