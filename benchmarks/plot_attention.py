"""Bar chart of a `benchmarks/attention.py` result: forward TF/s per cell, ours against cuDNN.

    python benchmarks/plot_attention.py benchmarks/results/attention_h100_2026-11-23.json
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot(path: Path) -> Path:
    result = json.loads(path.read_text())
    rows = result["rows"]
    labels = [f"S={r['seq'] // 1024}k B={r['batch']}\n{r['hq']}:{r['hkv']} "
              f"{'causal' if r['causal'] else 'full'}" for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.4
    ax.bar([x - width / 2 for x in xs], [r["mosaic_fwd_tflops"] for r in rows], width,
           label="ccajax mosaic (first version)")
    ax.bar([x + width / 2 for x in xs], [r["cudnn_fwd_tflops"] for r in rows], width, label="cuDNN")
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("forward TF/s (bf16, d=128)")
    ax.set_title(f"Attention forward, {result['device']}, {result['date']}, jax {result['jax']}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    print(plot(Path(sys.argv[1])))
