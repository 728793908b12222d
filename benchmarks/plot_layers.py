"""The paper-style plot of `benchmarks/layers.py`'s sweep: layer latency against sequence length,
one line per method, forward and forward+backward panels (one row per mask setting).

    python3 benchmarks/plot_layers.py benchmarks/results/layers_h100_2026-11-23.json
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


if __name__ == "__main__":
    print(plot(*sys.argv[1:]))
