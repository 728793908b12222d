"""Plot and table of `benchmarks/attention.py` results: TF/s per cell and peer, forward and
fwd+bwd panels; the rows of several runs (e.g. one device call per sequence length) together.

    python benchmarks/plot_attention.py benchmarks/results/attention_h100_DATE.json
    python benchmarks/plot_attention.py run_4k.json run_16k.json --out=attention.png --table

``--table`` also prints the issue-4 table in Markdown: per cell and mode the TF/s of ours and of
each peer, ours over the best peer (bold when ours is at least as fast), and the per-round
speed-up over that peer (median and range, `ours_vs_best_peer`).
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {"mosaic": "ccajax (mosaic)", "mosaic_fwd_cudnn_bwd": "ccajax fwd + cuDNN bwd",
          "cudnn": "cuDNN", "xla": "XLA", "tokamax": "tokamax"}
MODES = (("fwd", "forward"), ("fwdbwd", "forward + backward"))


def load(paths: list[Path]) -> tuple[dict, list]:
    """The first run's header (device, date, jax) and every run's rows, in order."""
    runs = [json.loads(p.read_text()) for p in paths]
    return runs[0], [row for run in runs for row in run["rows"]]


def timed(rows, mode) -> list[str]:
    """Implementations with a ``mode`` result in any row (the hybrid has no forward of its own)."""
    return [n for n in LABELS if any(mode in r["results"].get(n, {}) for r in rows)]


def plot(header: dict, rows: list, out: Path) -> Path:
    labels = [f"{r['seq'] // 1024}k×{r['batch']}\n{r['hq']}:{r['hkv']} {'c' if r['causal'] else 'f'}"
              for r in rows]
    fig, axes = plt.subplots(2, 1, figsize=(max(10, 0.6 * len(rows)), 8), sharex=True)
    for ax, (mode, title) in zip(axes, MODES):
        names = timed(rows, mode)
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
    fig.suptitle(f"Attention, bf16, d=128 ({header['device']}, {header['date']}, jax {header['jax']}); "
                 "c = causal, f = full")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def table(rows: list) -> str:
    """The Markdown table described in the module docstring."""
    head, rule = ["cell"], ["---"]
    for mode, title in MODES:
        names = " / ".join(LABELS[n].split(" (")[0] for n in timed(rows, mode))
        head += [f"{title}: {names}", "ours vs best", "rounds (peer)"]
        rule += ["---"] * 3
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(rule) + "|"]
    for r in rows:
        cells = [f"{r['seq'] // 1024}k {r['hq']}:{r['hkv']} {'causal' if r['causal'] else 'full'}"]
        for mode, _ in MODES:
            entries = {n: r["results"].get(n, {}).get(mode) for n in timed(rows, mode)}
            tf = {n: (e or {}).get("tflops") for n, e in entries.items()}
            cells.append(" / ".join(f"{tf[n]:.0f}" if tf[n] else "err" if e else "-"
                                    for n, e in entries.items()))  # err: raised; -: not run
            peers = [t for n, t in tf.items() if not n.startswith("mosaic") and t]
            ratio = tf.get("mosaic") / max(peers) if tf.get("mosaic") and peers else None
            cells.append("" if ratio is None else
                         f"**{ratio:.3f}**" if ratio >= 1 else f"{ratio:.3f}")
            paired = r.get("ours_vs_best_peer", {}).get(mode)
            cells.append(f"{paired['median']:.2f} ({paired['min']:.2f}-{paired['max']:.2f}) "
                         f"{paired['peer']}" if paired else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="attention.py JSON files")
    parser.add_argument("--out", type=Path, help="PNG path (default: the first JSON's, .png)")
    parser.add_argument("--table", action="store_true", help="also print the Markdown table")
    args = parser.parse_args()
    header, rows = load(args.results)
    print(plot(header, rows, args.out or args.results[0].with_suffix(".png")))
    if args.table:
        print(table(rows))


if __name__ == "__main__":
    main()
