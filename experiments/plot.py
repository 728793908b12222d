"""Loss curves of several runs on one figure (PNG).

    python -m experiments.plot runs/mha runs/ccgqa --out=loss.png
    python -m experiments.plot runs/mha:MHA runs/ccgqa:CCGQA --metric=perplexity

Each run is a workdir of `experiments.train` (its ``metrics.jsonl``), optionally ``:label``
(default: the directory name). Training curves are solid, validation curves (``val_`` + metric)
dashed in the same colour.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from absl import app, flags  # noqa: E402

_OUT = flags.DEFINE_string("out", "loss.png", "Output PNG path.")
_METRIC = flags.DEFINE_string("metric", "loss", "Metric to plot (its val_ twin is added if logged).")
_LOG_Y = flags.DEFINE_bool("log_y", True, "Logarithmic y axis.")


def read_metric(workdir, metric: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``metric`` in ``workdir/metrics.jsonl``, the last row of a step winning."""
    by_step = {}
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if metric in row:
            by_step[row["step"]] = row[metric]
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot_runs(runs: dict, out, metric: str = "loss", log_y: bool = True) -> Path:
    """Draws ``metric`` (solid) and ``val_`` + metric (dashed) of each ``{label: workdir}``."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (label, workdir) in enumerate(runs.items()):
        color = f"C{i}"
        ax.plot(*read_metric(workdir, metric), color=color, label=f"{label} train")
        steps, values = read_metric(workdir, f"val_{metric}")
        if steps:
            ax.plot(steps, values, "--o", color=color, markersize=3, label=f"{label} val")
    ax.set(xlabel="step", ylabel=metric, yscale="log" if log_y else "linear",
           title=f"{metric}: " + " vs ".join(runs))
    ax.grid(True, alpha=0.3)
    ax.legend()
    out = Path(out)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out


def main(argv):
    if len(argv) < 2:
        raise app.UsageError("give one or more run directories (workdir or workdir:label)")
    runs = {}
    for arg in argv[1:]:
        workdir, _, label = arg.partition(":")
        runs[label or Path(workdir).name] = workdir
    print(f"wrote {plot_runs(runs, _OUT.value, _METRIC.value, _LOG_Y.value)}")


if __name__ == "__main__":
    app.run(main)
