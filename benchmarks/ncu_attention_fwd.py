"""Our forward kernel beside tokamax's under Nsight Compute (or, with ``--backward``, our
backward kernel alone): what each executes, instruction by instruction, and where it spills.

On the device (ncu works there with ``--clock-control none``), one process per cell; each
kernel is compiled, then called once, and ncu profiles those calls:

    ncu --clock-control none -k regex:"mosaic|flash" --section SourceCounters \\
        --section WarpStateStats --import-source no --page source --print-source sass --csv \\
        python3 benchmarks/ncu_attention_fwd.py --causal > $OUT/sass.csv
    ncu --clock-control none -k regex:"mosaic|flash" --section SpeedOfLight \\
        --section WarpStateStats --section InstructionStats --section ComputeWorkloadAnalysis \\
        --section SchedulerStats --section MemoryWorkloadAnalysis --page raw --csv \\
        python3 benchmarks/ncu_attention_fwd.py --causal > $OUT/raw.csv

Then, anywhere, ``--summarize=sass.csv [--raw=raw.csv] [--out=summary.json]`` prints each
kernel's executed warp instructions and stall samples by opcode, its local-memory (spill) loads
and stores with the most executed of those instructions, the opcodes whose counts differ most
between the kernels, and (from the raw page) duration, issue and stall metrics.
tokamax needs its carried wheels (`benchmarks/attention.py`).
"""

from __future__ import annotations

import collections
import csv
import io
import json
import re

from absl import app, flags

flags.DEFINE_integer("seq", 16384, "Sequence length (batch 1).")
flags.DEFINE_string("heads", "16:16", "Hq:Hkv.")
flags.DEFINE_bool("causal", False, "Causal mask.")
flags.DEFINE_bool("backward", False, "Run our backward kernel instead (dK/dV with dQ summed in it, "
                  "on random out and lse: no forward kernel runs); tokamax is not run.")
flags.DEFINE_string("summarize", None, "An ncu source-page CSV (--print-source sass) to "
                    "summarise instead of running the kernels.")
flags.DEFINE_string("raw", None, "With --summarize: an ncu raw-page CSV of the same kernels.")
flags.DEFINE_string("out", None, "With --summarize: write the summary here as JSON.")
FLAGS = flags.FLAGS

# Raw-page metrics worth quoting (the stall metrics are added by prefix).
RAW_METRICS = ("gpu__time_duration.sum", "smsp__inst_executed.sum",
               "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active",
               "smsp__issue_active.avg.pct_of_peak_sustained_active",
               "smsp__warps_active.avg.per_cycle_active",
               # L2 and DRAM traffic (each CTA reads its head's whole k and v through L2).
               "lts__t_bytes.sum.per_second", "lts__throughput.avg.pct_of_peak_sustained_elapsed",
               "dram__bytes_read.sum.per_second")
STALL_PREFIX = "smsp__average_warps_issue_stalled_"


def run_kernels() -> None:
    import jax
    import jax.numpy as jnp

    from benchmarks.peers import peers
    from ccajax.pallas.attention_bwd_sm90 import attention_bwd
    from ccajax.pallas.attention_fwd_sm90 import attention_fwd

    hq, hkv = map(int, FLAGS.heads.split(":"))
    keys = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(keys[0], (1, FLAGS.seq, hq, 128), jnp.bfloat16)
    k, v = (jax.random.normal(key, (1, FLAGS.seq, hkv, 128), jnp.bfloat16) for key in keys[1:])
    if FLAGS.backward:  # the kernel's work does not depend on the values of out and lse
        out, d_out = (jax.random.normal(key, q.shape, jnp.bfloat16)
                      for key in jax.random.split(jax.random.key(2), 2))
        lse = jnp.zeros((1, hq, FLAGS.seq), jnp.float32)
        grads = jax.jit(lambda *args: attention_bwd(*args, is_causal=FLAGS.causal, scale=None))
        jax.block_until_ready(grads(q, k, v, out, lse, d_out))
        print("ran ours (backward)", flush=True)
        return
    fns, missing = peers()
    runs = {"ours": lambda q, k, v: attention_fwd(q, k, v, is_causal=FLAGS.causal,
                                                  scale=None)[0]}
    if "tokamax" in fns:
        runs["tokamax"] = lambda q, k, v: fns["tokamax"](q, k, v, FLAGS.causal)
    else:
        print(f"tokamax missing: {missing['tokamax']}")
    for name, fn in runs.items():
        jax.block_until_ready(jax.jit(fn)(q, k, v))  # compile and run: ncu profiles the run
        print(f"ran {name}", flush=True)


def _kernel_sections(text: str) -> dict[str, list[dict]]:
    """Split a source-page CSV into its kernels' rows (one dict per SASS instruction)."""
    parts = re.split(r'^"Kernel Name","([^"]*)",\s*$', text, flags=re.M)
    kernels = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        lines = [line for line in body.splitlines() if line.startswith('"')]
        kernels[name] = list(csv.DictReader(io.StringIO("\n".join(lines))))
    return kernels


def _count(value: str) -> int:
    return int(value.replace(",", "") or 0)


def _opcode(row: dict) -> str | None:
    words = row["Source"].split()
    if not words:
        return None
    return words[1] if words[0].startswith("@") else words[0]  # skip a predicate


def opcode_counts(rows: list[dict]) -> tuple[collections.Counter, collections.Counter]:
    """(executed warp instructions, warp stall samples) per full opcode, e.g. ``IMAD.U32``."""
    executed, samples = collections.Counter(), collections.Counter()
    for row in rows:
        opcode = _opcode(row)
        if opcode is None:
            continue
        executed[opcode] += _count(row["Instructions Executed"])
        samples[opcode] += _count(row["Warp Stall Sampling (All Samples)"])
    return executed, samples


def local_memory(rows: list[dict], top: int = 12) -> dict:
    """The spill traffic: executed local loads and stores (LDL / STL) and the most executed of
    those instructions as (address, SASS, executed), to find the loop that spills."""
    local = [row for row in rows if (_opcode(row) or "").startswith(("LDL", "STL"))]
    hottest = sorted(local, key=lambda row: -_count(row["Instructions Executed"]))[:top]
    return {"loads": sum(_count(r["Instructions Executed"]) for r in local
                         if _opcode(r).startswith("LDL")),
            "stores": sum(_count(r["Instructions Executed"]) for r in local
                          if _opcode(r).startswith("STL")),
            "hottest": [(row.get("Address", ""), row["Source"].strip(),
                         _count(row["Instructions Executed"])) for row in hottest]}


def raw_metrics(text: str) -> dict[str, dict[str, str]]:
    """Kernel name -> the quoted raw-page metrics (values as ncu prints them)."""
    lines = [line for line in text.splitlines() if line.startswith('"')]
    rows = list(csv.reader(lines))
    header, data = rows[0], rows[2:]  # rows[1] holds the units
    name_col = header.index("Kernel Name")
    wanted = [j for j, h in enumerate(header) if h in RAW_METRICS or h.startswith(STALL_PREFIX)]
    return {row[name_col]: {header[j]: row[j] for j in wanted} for row in data}


def summarize(sass_path: str, raw_path: str | None, out_path: str | None) -> dict:
    with open(sass_path) as f:
        kernels = _kernel_sections(f.read())
    counts = {name: opcode_counts(rows) for name, rows in kernels.items()}
    summary = {"kernels": {}}
    for name, (executed, samples) in counts.items():
        total, sampled = sum(executed.values()), sum(samples.values())
        summary["kernels"][name] = {
            "sass_instructions": len(kernels[name]), "executed": total, "samples": sampled,
            "top_opcodes": [(op, n, round(100 * samples[op] / max(sampled, 1), 1))
                            for op, n in executed.most_common(12)]}
        print(f"{name}: {len(kernels[name])} SASS instructions, {total:,} executed, "
              f"{sampled:,} stall samples")
        for op, n, pct in summary["kernels"][name]["top_opcodes"]:
            print(f"  {op:28s} {n:14,d} ({100 * n / total:4.1f}%)  samples {pct:4.1f}%")
        spills = summary["kernels"][name]["local_memory"] = local_memory(kernels[name])
        print(f"  local memory: {spills['loads']:,} loads, {spills['stores']:,} stores executed")
        for address, source, n in spills["hottest"]:
            print(f"    {address:>8s} {source:60s} {n:12,d}")
    if len(counts) == 2:
        (a, (ea, _)), (b, (eb, _)) = counts.items()
        diffs = sorted(set(ea) | set(eb), key=lambda op: -abs(ea[op] - eb[op]))[:16]
        summary["largest_differences"] = [(op, ea[op], eb[op]) for op in diffs]
        print(f"opcodes whose counts differ most ({a[:24]} - {b[:24]}):")
        for op in diffs:
            print(f"  {op:28s} {ea[op]:14,d} {eb[op]:14,d} {ea[op] - eb[op]:+14,d}")
    if raw_path:
        with open(raw_path) as f:
            summary["raw"] = raw_metrics(f.read())
        for name, metrics in summary["raw"].items():
            print(name)
            for metric, value in metrics.items():
                print(f"  {metric:70s} {value}")
    if out_path:
        with open(out_path, "w") as f:
            json.dump(summary, f, indent=1)
    return summary


def main(argv):
    del argv
    if FLAGS.summarize:
        summarize(FLAGS.summarize, FLAGS.raw, FLAGS.out)
    else:
        run_kernels()


if __name__ == "__main__":
    app.run(main)
