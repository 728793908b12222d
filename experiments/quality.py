"""The quality comparison: every attention of `RUNS` trained the same way, then one table + figure.

    # train (GPU): the named runs in order, none started past the time budget
    python -m experiments.quality --mode=train --runs=mha,ccgqa8,mha@1,ccgqa8@1 --out=/tmp/q
    # report: merge summaries, print the markdown table, draw the loss-vs-tokens figure
    python -m experiments.quality --mode=report --summaries=a.json,b.json --plot=quality.png

Every run is `python -m experiments.train --config=experiments/configs/quality.py` plus the
overrides of its `RUNS` entry (and ``--config.train.seed=N`` for ``name@N``): same data, width,
depth, MLP, optimizer, steps and tokens. `small`'s MHA baseline has 8 heads of 64, so the paper's
16-head ratios are halved: GQA 16:4 / 16:2 -> 8:2 / 8:1, CCGQA 8:2 / 4:2 -> 4:1 / 2:1 (the same
4x / 8x KV compression), MLA at 4x / 8x -> latent rank 224 / 96 (+ 32 RoPE dims cached).

``--mode=train`` writes ``summary.json`` into ``--out``: per run its config overrides, its
``model.json`` (parameters, KV values per token and layer), wall time, the rows of its
``metrics.jsonl`` and the final validation loss. Runs that share the GPU (``--workers`` > 1)
report indicative tokens/s only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags; defined only when run as a script, so importing this module
    (tests, notebooks) never clashes with another module's flag of the same name."""
    flags.DEFINE_enum("mode", "train", ["train", "report"], "Train runs, or report on them.")
    flags.DEFINE_list("runs", [], "RUNS names, optionally @seed (mha@1); in priority order.")
    flags.DEFINE_string("out", "runs/quality", "Train: directory of the run workdirs and "
                        "summary.json.")
    flags.DEFINE_integer("workers", 1, "Train: runs sharing the GPU at once (their compilation "
                         "overlaps; their tokens/s are then indicative only).")
    flags.DEFINE_float("budget_s", 1e9, "Train: start no run that would end after this.")
    flags.DEFINE_float("run_s", 120.0, "Train: expected seconds of one run, until one ends.")
    flags.DEFINE_multi_string("override", [], "Train: an extra --config.* flag for every run, "
                              "repeatable (e.g. config.data.cache_dir=.data).")
    flags.DEFINE_list("summaries", [], "Report: summary.json files; later ones win.")
    flags.DEFINE_string("plot", "", "Report: PNG of validation loss vs training tokens.")


CONFIG = "experiments/configs/quality.py"
HEADLINE = ("mha", "ccgqa8")

# name: (label, KV compression vs MHA, config.model overrides)
RUNS = {
    "mha": ("MHA 8:8", 1, dict(attention="mha")),
    "gqa4": ("GQA 8:2", 4, dict(attention="gqa", num_kv_heads=2)),
    "gqa8": ("GQA 8:1", 8, dict(attention="gqa", num_kv_heads=1)),
    "mla4": ("MLA r=224", 4, dict(attention="mla", kv_lora_rank=224)),
    "mla8": ("MLA r=96", 8, dict(attention="mla", kv_lora_rank=96)),
    "cca2": ("CCA C=2 (4:4)", 2, dict(attention="cca", compression=2)),
    "cca4": ("CCA C=4 (2:2)", 4, dict(attention="cca", compression=4)),
    "ccgqa8": ("CCGQA 4:1", 8, dict(attention="ccgqa", compression=2, num_kv_heads=1)),
    "ccgqa8c4": ("CCGQA 2:1 (C=4)", 8, dict(attention="ccgqa", compression=4, num_kv_heads=1)),
    "mha_moe": ("MHA 8:8 MoE 8x2", 1, dict(attention="mha", num_experts=8, mlp_dim=768)),
    "ccgqa8_moe": ("CCGQA 4:1 MoE 8x2", 8, dict(attention="ccgqa", compression=2, num_kv_heads=1,
                                                num_experts=8, mlp_dim=768)),
    "ccgqa8_noconv": ("CCGQA 4:1 no conv", 8, dict(attention="ccgqa", num_kv_heads=1,
                                                   use_conv=False)),
    "ccgqa8_nomean": ("CCGQA 4:1 no q-k mean", 8, dict(attention="ccgqa", num_kv_heads=1,
                                                       use_qk_mean=False)),
    "ccgqa8_noshift": ("CCGQA 4:1 no value shift", 8, dict(attention="ccgqa", num_kv_heads=1,
                                                           use_value_shift=False)),
    "ccgqa8_notemp": ("CCGQA 4:1 no temperature", 8, dict(attention="ccgqa", num_kv_heads=1,
                                                          use_key_temperature=False)),
}


def parse_run(run: str) -> tuple[str, int]:
    """'name' or 'name@seed' -> (name, seed); ValueError naming the valid names."""
    name, _, seed = run.partition("@")
    if name not in RUNS:
        raise ValueError(f"--runs: unknown run {name!r}; valid: {', '.join(RUNS)}")
    if seed and not seed.isdigit():
        raise ValueError(f"--runs: seed of {run!r} must be a non-negative int")
    return name, int(seed or 0)


def run_flags(name: str, seed: int, workdir, extra=()) -> list[str]:
    """The `experiments.train` flags of one run."""
    model = [f"--config.model.{k}={v}" for k, v in RUNS[name][2].items()]
    return [f"--config={CONFIG}", *model, f"--config.train.seed={seed}",
            f"--config.train.workdir={workdir}", *(f"--{o}" for o in extra)]


def command(run: str) -> str:
    """The shell command that reproduces one run (RESULTS.md quotes it)."""
    name, seed = parse_run(run)
    return "python -m experiments.train " + " ".join(run_flags(name, seed, f"runs/quality/{run}"))


def _model_facts(workdir: Path) -> dict:
    """Parameters and KV-cache values per token and layer, as `experiments.train` wrote them."""
    path = workdir / "model.json"
    return json.loads(path.read_text()) if path.exists() else {}


def read_metrics(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def train_runs(runs: list[str], out: Path, workers: int, budget_s: float, run_s: float,
               extra: list[str]) -> dict:
    """Runs `runs` as `experiments.train` subprocesses, ``workers`` at a time, in order; a run
    is only started when the time so far plus its `expected_wall` fits ``budget_s``. Returns and
    writes the summary."""
    parsed = [parse_run(r) for r in runs]
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION=f"{0.9 / workers:.2f}")
    start, queue, active, summary = time.monotonic(), list(zip(runs, parsed)), {}, {}
    ok_walls = []  # (name, wall time) of the runs that succeeded
    while queue or active:
        while queue and len(active) < workers:
            elapsed = time.monotonic() - start
            expected = expected_wall(queue[0][1][0], ok_walls, run_s)
            if elapsed + expected > budget_s:
                for run, _ in queue:
                    summary[run] = {"status": f"not started: {elapsed:.0f} s + {expected:.0f} s "
                                              f"would pass the {budget_s:.0f} s budget"}
                    print(f"[quality] {run}: {summary[run]['status']}", flush=True)
                queue = []
                break
            run, (name, seed) = queue.pop(0)
            workdir = out / run.replace("@", "_seed")
            workdir.mkdir(parents=True, exist_ok=True)
            log = (workdir / "log.txt").open("w")
            cmd = [sys.executable, "-m", "experiments.train",
                   *run_flags(name, seed, workdir, extra)]
            active[run] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env),
                           time.monotonic(), workdir, log, name, seed)
            print(f"[quality] start {run} at {elapsed:.0f} s", flush=True)
        time.sleep(1.0)
        for run, (proc, t0, workdir, log, name, seed) in list(active.items()):
            if proc.poll() is None:
                continue
            log.close()
            del active[run]
            wall = time.monotonic() - t0
            rows = read_metrics(workdir)
            val = [r for r in rows if "val_loss" in r]
            log_lines = (workdir / "log.txt").read_text().strip().splitlines() or [""]
            summary[run] = {
                "name": name, "label": RUNS[name][0], "seed": seed, "kv_compression": RUNS[name][1],
                "overrides": RUNS[name][2], "status": "ok" if proc.returncode == 0 and val else
                f"failed (exit {proc.returncode}): {log_lines[-1]}",
                "log_tail": log_lines[-30:],
                "wall_s": wall, "final_val_loss": val[-1]["val_loss"] if val else None,
                "metrics": rows, **_model_facts(workdir)}
            if summary[run]["status"] == "ok":
                ok_walls.append((name, wall))
            print(f"[quality] end {run}: {summary[run]['status']}, val "
                  f"{summary[run]['final_val_loss']}, {wall:.0f} s", flush=True)
            _write_summary(out, workers, start, summary)  # a killed campaign keeps what ended
    return _write_summary(out, workers, start, summary)


def expected_wall(name: str, ok_walls: list[tuple[str, float]], run_s: float) -> float:
    """Seconds a run of ``name`` is expected to take: the longest successful run of the same
    name, else of the same attention (MLA's XLA attention runs ~2x longer than the kernels'),
    else of any run, else ``run_s``."""
    attention = RUNS[name][2]["attention"]
    for same in (lambda n: n == name, lambda n: RUNS[n][2]["attention"] == attention,
                 lambda n: True):
        walls = [wall for n, wall in ok_walls if same(n)]
        if walls:
            return max(walls)
    return run_s


def _write_summary(out: Path, workers: int, start: float, summary: dict) -> dict:
    result = {"config": CONFIG, "workers": workers, "elapsed_s": time.monotonic() - start,
              "device": _device(), "date": time.strftime("%Y-%m-%d"), "runs": summary}
    (out / "summary.json").write_text(json.dumps(result, indent=1))
    return result


def _device() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip() or "cpu"
    except OSError:
        return "cpu"


def tokens_per_s(rows: list[dict]) -> float | None:
    """Median logged tokens/s of a run (indicative when runs shared the GPU)."""
    values = sorted(r["tokens_per_s"] for r in rows if "tokens_per_s" in r)
    return values[len(values) // 2] if values else None


def merge(paths) -> dict:
    """Runs of several summary files, later files winning per run."""
    runs = {}
    for path in paths:
        for run, entry in json.loads(Path(path).read_text())["runs"].items():
            if entry.get("status") == "ok" or run not in runs:
                runs[run] = entry
    return runs


def table(runs: dict) -> str:
    """Markdown table: one row per RUNS name, the seeds' mean ± half-range of final val loss."""
    lines = ["| attention | KV vs MHA | params | KV values/token/layer | seeds | final val loss "
             "(nats/byte) | vs MHA | tokens/s (indicative) |", "|---|---|---|---|---|---|---|---|"]
    by_name = {}
    for run, e in runs.items():
        if e.get("status") == "ok":
            by_name.setdefault(e["name"], []).append(e)
    base = by_name.get("mha")
    base_loss = sum(e["final_val_loss"] for e in base) / len(base) if base else None
    for name in RUNS:
        if name not in by_name:
            continue
        es = sorted(by_name[name], key=lambda e: e["seed"])
        losses = [e["final_val_loss"] for e in es]
        mean = sum(losses) / len(losses)
        spread = f" ± {(max(losses) - min(losses)) / 2:.4f}" if len(losses) > 1 else ""
        rel = f"{100 * (mean / base_loss - 1):+.2f}%" if base_loss else "-"
        tps = tokens_per_s(es[0]["metrics"])
        e = es[0]
        lines.append(f"| {e['label']} | {e['kv_compression']}x | {e['params'] / 1e6:.1f}M | "
                     f"{e['kv_values_per_token_layer']} | {','.join(str(x['seed']) for x in es)} | "
                     f"{mean:.4f}{spread} | {rel} | {f'{tps:,.0f}' if tps else '-'} |")
    return "\n".join(lines)


def plot(runs: dict, path: str, tokens_per_step: int) -> None:
    """Validation loss vs training tokens in three panels: the attentions (seed 0), CCGQA 4:1's
    ablations next to the full layer (seed 0), and the headline pair's every seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ablations = tuple(name for name in RUNS if name.startswith("ccgqa8_no"))
    panels = (("attentions (seed 0)", [n for n in RUNS if n not in ablations], False),
              ("CCGQA 4:1 ablations (seed 0)", ["ccgqa8", *ablations], False),
              ("MHA vs CCGQA 4:1 (8x less KV cache), every seed", list(HEADLINE), True))
    fig, axes = plt.subplots(1, 3, figsize=(19, 5.5))
    styles = ["-", "--", ":", "-."]
    ok = {run: e for run, e in sorted(runs.items()) if e.get("status") == "ok"}
    for ax, (title, names, every_seed) in zip(axes, panels):
        for run, e in ok.items():
            if e["name"] not in names or (e["seed"] != 0 and not every_seed):
                continue
            val = [r for r in e["metrics"] if "val_loss" in r]
            ax.plot([r["step"] * tokens_per_step / 1e6 for r in val], [r["val_loss"] for r in val],
                    styles[e["seed"] % 4] if every_seed else "-",
                    color=plt.cm.tab10(names.index(e["name"]) % 10),
                    marker="o", markersize=2,
                    label=f"{e['label']} (seed {e['seed']})" if every_seed else e["label"])
        ax.set(title=title, xlabel="training tokens (M)", ylabel="validation loss (nats/byte)")
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        else:  # none of this panel's runs has finished yet
            ax.text(0.5, 0.5, "no finished runs yet", transform=ax.transAxes, ha="center")
    lo = min((r["val_loss"] for e in ok.values() for r in e["metrics"] if "val_loss" in r),
             default=1.0)
    for ax in axes:
        ax.set_ylim(lo * 0.98, lo * 1.6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    del argv
    if FLAGS.mode == "train":
        if not FLAGS.runs:
            raise app.UsageError(f"--runs: name one or more of {', '.join(RUNS)}")
        train_runs(FLAGS.runs, Path(FLAGS.out), FLAGS.workers, FLAGS.budget_s, FLAGS.run_s,
                   FLAGS.override)
        return
    if not FLAGS.summaries:
        raise app.UsageError("--summaries: give one or more summary.json files")
    from experiments.configs import quality

    c = quality.get_config()
    runs = merge(FLAGS.summaries)
    print(table(runs))
    if FLAGS.plot:
        plot(runs, FLAGS.plot, c.data.batch_size * c.data.seq_len)
        print(f"wrote {FLAGS.plot}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
