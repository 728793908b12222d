"""Plots of `benchmarks/layers.py`'s sweeps.

The paper-style plot: layer latency against sequence length, one line per method, forward and
forward+backward panels (one row per mask setting):

    python3 benchmarks/plot_layers.py benchmarks/results/layers_h100_2026-11-23.json

Speed-ups at one sequence length (``--speedups OUT.png JSON...``, sweeps of one S, e.g. a causal
and a non-causal run): bars of MHA latency / layer latency per method, forward and
forward+backward, one panel per mask, with issue 5's targets (1.8x for C=2, 3.6x for C=4) marked:

    python3 benchmarks/plot_layers.py --speedups out.png causal.json noncausal.json

Several runs as one sweep (``--merge OUT.json JSON...``; runs of other (mask, S) cells, or of
other methods at one cell): each row's speed-up is taken against the MHA layer of its own run,
where that run timed one, and a cell's row from an earlier file wins over a later one. Then the
paper-style plot of the merged file, its speed-ups against S beside each method's FLOP-count
ideal (``--speedup_curves``) and the speed-ups as a markdown table (``--table``):

    python3 benchmarks/plot_layers.py --merge merged.json run1.json run2.json
    python3 benchmarks/plot_layers.py --speedup_curves merged.json
    python3 benchmarks/plot_layers.py --table merged.json

Our backward against cuDNN's after our forward (``--backward_table JSON...``, runs with
``--bwd_impls=mosaic,mosaic_fwd_cudnn_bwd``): a markdown table of each layer's fwd+bwd ms, ours /
the hybrid = their ratio (> 1: ours faster, bold), a row per (mask, S), a column per method: the
measurement behind `ccajax.attention.default_implementation`'s Hopper rule.

    python3 benchmarks/plot_layers.py --backward_table causal.json noncausal.json
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _against_s(result: dict, rows: list, value, ylabel: str, title: str, out: str,
               log_y: bool = False, ideal=None, targets: dict | None = None) -> str:
    """A figure of ``value(row, mode)`` (None: no point) against S, one line per method (dashed:
    the baselines), forward and forward+backward panels, a row per mask. ``ideal(row, mode)``:
    a thin dotted line of the method's colour; ``targets``: grey horizontal lines."""
    masks = sorted({r["causal"] for r in rows}, reverse=True)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(len(masks), 2, figsize=(11, 4.2 * len(masks)), squeeze=False)
    for i, causal in enumerate(masks):
        for j, (mode, label) in enumerate((("fwd", "forward"), ("fwdbwd", "forward + backward"))):
            ax = axes[i][j]
            for name in methods:
                mine = sorted((r for r in rows if r["method"] == name and r["causal"] == causal
                               and value(r, mode) is not None), key=lambda r: r["seq"])
                if not mine:
                    continue
                seqs = [r["seq"] for r in mine]
                line, = ax.plot(seqs, [value(r, mode) for r in mine], marker="o", ms=3,
                                label=name, ls="-" if name.startswith("CC") else "--")
                if ideal:
                    ax.plot(seqs, [ideal(r, mode) for r in mine], color=line.get_color(),
                            ls=":", lw=1)
            for target in sorted(set((targets or {}).values())):
                ax.axhline(target, color="grey", ls="-.", lw=0.8)
            ax.set_xscale("log", base=2)
            if log_y:
                ax.set_yscale("log")
            ax.set_xlabel("sequence length S (batch = max(1, 16k / S))")
            ax.set_ylabel(ylabel)
            notes = ["dotted: FLOP-count ideal"] * bool(ideal) + ["grey: targets"] * bool(targets)
            ax.set_title(f"{label}, {'causal' if causal else 'no mask'}"
                         + (f" ({'; '.join(notes)})" if notes else ""), fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{title}, E=2048, d=128, bf16 - {result['device']}, {result['date']}")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def plot(path: str, out: str | None = None) -> str:
    """The paper-style latency plot; next to the JSON (same name, .png) unless ``out`` is given."""
    with open(path) as f:
        result = json.load(f)
    rows = [r for r in result["rows"] if "method" in r]
    return _against_s(result, rows, lambda r, mode: r[mode]["ms"] if mode in r else None,
                      "layer latency (ms)", "Attention layers",
                      out or path.rsplit(".", 1)[0] + ".png", log_y=True)


def speedups(rows: list) -> None:
    """Sets each row's "speedup" ({mode: MHA ms / ms}) against the MHA row of the same run,
    mask and S in ``rows`` (one run's rows), where both were timed."""
    for row in rows:
        mha = next((r for r in rows if r["method"] == "MHA 16:16" and r["seq"] == row["seq"]
                    and r["causal"] == row["causal"]), None)
        if mha:
            row["speedup"] = {m: mha[m]["ms"] / row[m]["ms"] for m in ("fwd", "fwdbwd")
                              if m in row and m in mha}


def merge(out: str, *paths: str) -> str:
    """Writes the runs' rows as one result (see the module docstring); rows keep their run's
    file name as "source" and their speed-up against that run's MHA layer."""
    runs, rows, seen = [], [], set()
    for path in paths:
        with open(path) as f:
            runs.append(json.load(f))
        run_rows = [dict(r, source=path.rsplit("/", 1)[-1]) for r in runs[-1]["rows"]
                    if "method" in r]
        speedups(run_rows)
        for row in run_rows:
            key = (row["method"], row["seq"], row["causal"])
            if key not in seen:
                seen.add(key)
                rows.append(row)
    rows.sort(key=lambda r: (not r["causal"], r["seq"]))
    first = runs[0]
    result = {k: first[k] for k in ("device", "date", "jax", "mode", "e", "d", "dtype", "method")
              if k in first}
    result.update(command=[r["command"] for r in runs],
                  sources=[path.rsplit("/", 1)[-1] for path in paths], rows=rows)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    return out


def _rows_with_speedups(path: str) -> tuple[dict, list]:
    """The result and its method rows, each with "speedup" against its own run's MHA layer
    (`merge` set it per run; one run's rows are paired here)."""
    with open(path) as f:
        result = json.load(f)
    rows = [r for r in result["rows"] if "method" in r]
    if "sources" not in result:
        speedups(rows)
    return result, rows


def table(path: str) -> str:
    """Markdown table of the speed-ups vs MHA, fwd / fwd+bwd: a row per (mask, S), a column per
    method."""
    rows = _rows_with_speedups(path)[1]
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "MHA 16:16"]
    cells = {(r["causal"], r["seq"], r["method"]): r for r in rows}
    lines = ["| mask | S (B) | MHA ms | " + " | ".join(methods) + " |",
             "|---" * (len(methods) + 3) + "|"]
    for causal, seq in dict.fromkeys((r["causal"], r["seq"]) for r in rows):
        mha = cells.get((causal, seq, "MHA 16:16"))
        first = next(r for r in rows if (r["causal"], r["seq"]) == (causal, seq))
        parts = [("causal" if causal else "none"), f"{seq // 1024}k ({first['batch']})",
                 " / ".join(f"{mha[m]['ms']:.3g}" for m in ("fwd", "fwdbwd")) if mha else "-"]
        for name in methods:
            got = cells.get((causal, seq, name), {}).get("speedup", {})
            parts.append(" / ".join(f"{got[m]:.2f}" if m in got else "-"
                                    for m in ("fwd", "fwdbwd")) if got else "-")
        lines.append("| " + " | ".join(parts) + " |")
    return "\n".join(lines)


def backward_table(*paths: str) -> str:
    """Markdown table of fwd+bwd ms with our backward against our forward with cuDNN's backward
    ("ours / hybrid = ratio") in the runs ``paths``; a cell is "-" unless its run timed both."""
    rows = []
    for path in paths:
        with open(path) as f:
            rows += [r for r in json.load(f)["rows"] if "method" in r]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cells = {(r["causal"], r["seq"], r["method"]): r for r in rows}

    def ms(row, backend):  # result keys are "impl" or "impl/prologue"
        return next((res["fwdbwd"]["ms"] for key, res in row["results"].items()
                     if key.split("/")[0] == backend and "ms" in res.get("fwdbwd", {})), None)

    lines = ["| mask, S (B) | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for causal, seq in sorted({(r["causal"], r["seq"]) for r in rows}):
        first = next(r for r in rows if (r["causal"], r["seq"]) == (causal, seq))
        parts = [f"{'causal' if causal else 'full'} {seq // 1024}k ({first['batch']})"]
        for name in methods:
            row = cells.get((causal, seq, name))
            own, hybrid = (ms(row, b) if row else None for b in ("mosaic", "mosaic_fwd_cudnn_bwd"))
            if own is None or hybrid is None:
                parts.append("-")
                continue
            ratio = f"{hybrid / own:.3f}"
            parts.append(f"{own:.3f} / {hybrid:.3f} = "
                         + (f"**{ratio}**" if hybrid >= own else ratio))
        lines.append("| " + " | ".join(parts) + " |")
    return "\n".join(lines)


# Issue 5's targets: within 10% of the FLOP-ratio ideal (C=2 -> 1.8x, C=4 -> 3.6x).
TARGETS = {"CCA C=2 (8:8)": 1.8, "CCGQA 8:2": 1.8, "CCA C=4 (4:4)": 3.6}


def plot_speedups(out: str, *paths: str) -> str:
    """Speed-up bars vs the MHA 16:16 layer of the same run and mask, from sweeps of one S."""
    runs, rows = [], []
    for path in paths:
        result, run_rows = _rows_with_speedups(path)
        runs.append(result)
        rows += run_rows
    masks = sorted({r["causal"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, len(masks), figsize=(6 * len(masks), 4.2), squeeze=False)
    for ax, causal in zip(axes[0], masks):
        cell = {r["method"]: r for r in rows if r["causal"] == causal}
        mha = cell.pop("MHA 16:16")
        names = list(cell)
        for k, (mode, label) in enumerate((("fwd", "forward"), ("fwdbwd", "forward + backward"))):
            xs = [i + (k - 0.5) * 0.38 for i in range(len(names))]
            bars = ax.bar(xs, [cell[n]["speedup"][mode] for n in names], 0.36, label=label)
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


def flop_ratio(row: dict, mode: str, e: int = 2048, d: int = 128) -> float:
    """The MHA layer's FLOPs over the row's layer's at its B, S and mask (`ccajax.costs`:
    projections, convolutions and attention matmuls; element-wise work is not counted): the
    speed-up if both ran at one FLOP rate."""
    from ccajax import costs  # here: the other plots need only matplotlib

    cfgs = costs.standard_configs(e, d, causal=row["causal"])
    mha, own = (costs.layer_cost(cfgs[name], row["batch"], row["seq"])
                for name in ("MHA 16:16", row["method"]))
    flops = (lambda c: c.forward_flops) if mode == "fwd" else (
        lambda c: c.forward_flops + c.backward_flops)
    return flops(mha) / flops(own)


def plot_speedup_curves(path: str, out: str | None = None) -> str:
    """Speed-up vs the MHA layer against S, a line per method beside its FLOP-count ideal
    (`flop_ratio`), issue 5's targets in grey; next to the JSON as *_speedups_vs_s.png unless
    ``out`` is given."""
    result, rows = _rows_with_speedups(path)
    rows = [r for r in rows if r["method"] != "MHA 16:16"]
    e, d = result.get("e", 2048), result.get("d", 128)
    return _against_s(result, rows, lambda r, mode: r.get("speedup", {}).get(mode),
                      "speed-up vs the MHA layer", "Attention layers vs MHA",
                      out or path.rsplit(".", 1)[0] + "_speedups_vs_s.png",
                      ideal=lambda r, mode: flop_ratio(r, mode, e, d), targets=TARGETS)


if __name__ == "__main__":
    args = sys.argv[1:]
    commands = {"--speedups": plot_speedups, "--merge": merge, "--table": table,
                "--speedup_curves": plot_speedup_curves, "--backward_table": backward_table}
    print(commands[args[0]](*args[1:]) if args[:1] and args[0] in commands else plot(*args))
