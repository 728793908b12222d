"""The project's timing method (`../shared/ANCHORS.md`): ten back-to-back calls per sync, median
of several repeats after warm-up, every competitor in the same process."""

from __future__ import annotations

import datetime
import json
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


def failure(e: Exception) -> str:
    """Why a benchmark entry could not run, for its JSON: the exception's type and message
    (cut to 300 characters)."""
    return f"{type(e).__name__}: {str(e)[:300]}"


def tflops_or_error(fn, *args, flops: float, repeats: int) -> dict:
    """``{"ms", "tflops"}`` of ``fn(*args)`` (jitted), or ``{"error"}`` saying why it failed."""
    try:
        ms = 1e3 * time_call(fn, *args, repeats=repeats)
    except Exception as e:  # noqa: BLE001 - record why a configuration could not run
        return dict(error=failure(e))
    return dict(ms=ms, tflops=flops / ms / 1e9)


def write_sweep(path: str, rows: list, *, repeats: int, **fields) -> None:
    """A tuning sweep's JSON: device, date, jax version, ``fields``, method and rows."""
    result = dict(device=device_name(), date=datetime.date.today().isoformat(),
                  jax=jax.__version__, **fields,
                  method=f"median of {repeats} repeats of 10 calls per sync", rows=rows)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
