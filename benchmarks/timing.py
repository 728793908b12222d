"""The project's timing method (`../shared/ANCHORS.md`): ten back-to-back calls per sync, median
of several repeats after warm-up, every competitor in the same process."""

from __future__ import annotations

import statistics
import time

import jax


def time_call(fn, *args, calls_per_sync: int = 10, repeats: int = 7, warmup: int = 2) -> float:
    """Median seconds per call of ``fn(*args)`` (already jitted), synced once per ``calls_per_sync``."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls_per_sync):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / calls_per_sync)
    return statistics.median(samples)


def device_name() -> str:
    return jax.devices()[0].device_kind


def format_vs_cudnn(row) -> str:
    """One line per cell of a tuning sweep: each entry's TF/s and its ratio to cuDNN's."""
    res = row["results"]
    base = res["cudnn"]["tflops"]
    parts = [f"S={row['seq']} {row['hq']:>2}:{row['hkv']:<2} {'causal' if row['causal'] else 'full  '}"
             f" cudnn {base:4.0f}"]
    for name, r in res.items():
        if name != "cudnn":
            parts.append(f"{name} {r['tflops']:4.0f} ({r['tflops'] / base:.2f})" if "tflops" in r
                         else f"{name} ERR")
    return " | ".join(parts)
