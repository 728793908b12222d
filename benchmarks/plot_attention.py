"""Plot of a `benchmarks/attention.py` result: TF/s per cell and peer, forward and fwd+bwd panels.

    python benchmarks/plot_attention.py benchmarks/results/attention_h100_DATE.json
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {"mosaic": "ccajax (mosaic)", "mosaic_fwd_cudnn_bwd": "ccajax fwd + cuDNN bwd",
          "cudnn": "cuDNN", "xla": "XLA", "tokamax": "tokamax"}


def plot(path: Path) -> Path:
    result = json.loads(path.read_text())
    rows = result["rows"]

    def timed(mode):  # the hybrid has no forward of its own: it is ours
        return [n for n in LABELS if any(mode in r["results"].get(n, {}) for r in rows)]

    labels = [f"{r['seq'] // 1024}k×{r['batch']}\n{r['hq']}:{r['hkv']} {'c' if r['causal'] else 'f'}"
              for r in rows]
    fig, axes = plt.subplots(2, 1, figsize=(max(10, 0.6 * len(rows)), 8), sharex=True)
    for ax, mode, title in zip(axes, ("fwd", "fwdbwd"), ("forward", "forward + backward")):
        names = timed(mode)
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            values = [r["results"].get(name, {}).get(mode, {}).get("tflops", 0.0) for r in rows]
            ax.bar([x + (i - (len(names) - 1) / 2) * width for x in range(len(rows))], values, width,
                   label=LABELS[name], color=f"C{list(LABELS).index(name)}")  # one per peer
        ax.set_ylabel(f"{title} TF/s")
        ax.set_ylim(top=ax.get_ylim()[1] * 1.2)  # headroom for the legend
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="upper center", ncol=len(names))
    axes[1].set_xticks(range(len(rows)), labels, fontsize=7)
    fig.suptitle(f"Attention, bf16, d=128 ({result['device']}, {result['date']}, jax {result['jax']}); "
                 "c = causal, f = full")
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    print(plot(Path(sys.argv[1])))
