"""Where a jitted call's GPU time goes: per-kernel device time from a `jax.profiler` trace.

    rows = kernel_times(jax.jit(f), *args)   # [{"kernel", "ms", "launches"}], per call, largest first

The trace's GPU planes hold one event per kernel launch or copy (CUPTI activity records) on
lines named after their streams; their durations are device time, so they add up to the busy
time of the device and leave out the gaps between kernels (launch latency, host work). Used by
`benchmarks/layers.py --mode=kernels` to account for a layer's latency piece by piece.
"""

from __future__ import annotations

import collections
import glob
import tempfile

import jax


def kernel_times(fn, *args, calls: int = 5) -> list[dict]:
    """Per-call device time of each kernel ``fn(*args)`` launches (``fn`` jitted; run once
    first to compile), over ``calls`` back-to-back calls: [{"kernel": name, "ms": per call,
    "launches": per call}], largest first. Raises RuntimeError when the trace has no GPU
    stream lines (a CPU backend, or a profiler that recorded no device activity)."""
    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir):
            for _ in range(calls):
                out = fn(*args)
            jax.block_until_ready(out)
        (path,) = glob.glob(f"{log_dir}/**/*.xplane.pb", recursive=True)
        data = jax.profiler.ProfileData.from_file(path)
    total_ns, launches = collections.Counter(), collections.Counter()
    seen = []
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            seen.append(f"{plane.name}/{line.name}")
            if "Stream" not in line.name:  # derived lines ("XLA Ops", ...) repeat the kernels
                continue
            for event in line.events:
                total_ns[event.name] += event.duration_ns
                launches[event.name] += 1
    if not total_ns:
        raise RuntimeError(f"no GPU kernel events in the trace; its GPU lines: {seen or 'none'}")
    return [{"kernel": name, "ms": ns / calls / 1e6, "launches": launches[name] / calls}
            for name, ns in total_ns.most_common()]
