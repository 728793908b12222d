"""The project's timing method (`../shared/ANCHORS.md`): ten back-to-back calls per sync, median
of several repeats after warm-up, every competitor in the same process."""

from __future__ import annotations

import datetime
import json
import os
import statistics
import sys
import threading
import time

import jax


def _one_sync(fn, args, calls_per_sync: int) -> float:
    """Seconds per call of ``calls_per_sync`` back-to-back calls of ``fn(*args)`` and one sync."""
    start = time.perf_counter()
    for _ in range(calls_per_sync):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls_per_sync


def time_call(fn, *args, calls_per_sync: int = 10, repeats: int = 7, warmup: int = 2) -> float:
    """Median seconds per call of ``fn(*args)`` (already jitted), synced once per ``calls_per_sync``."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    return statistics.median(_one_sync(fn, args, calls_per_sync) for _ in range(repeats))


WINDOW_HELP = ("If > 0, each entry's turn in a round is this many seconds of back-to-back syncs "
               "(their median), timing it at its sustained clocks (`time_window`), instead of "
               "one sync.")


def time_window(fn, *args, calls_per_sync: int = 10, seconds: float) -> float:
    """Median seconds per call of ``fn(*args)`` over syncs of ``calls_per_sync`` calls run back
    to back for ``seconds`` (at least one): its speed under sustained load, at the clocks that
    load leaves (on an H200 every attention kernel then runs at the 700 W power limit)."""
    samples, start = [], time.perf_counter()
    while not samples or time.perf_counter() - start < seconds:
        samples.append(_one_sync(fn, args, calls_per_sync))
    return statistics.median(samples)


# A job turn (its compile included) that runs longer than this plus its window ends the
# process: a hung kernel otherwise blocks a sweep, without a word, until an outer time limit
# kills it (twentieth session: a stalled kernel variant cost a whole device call's sweep).
STALL_S = 240.0
STALL_EXIT_CODE = 3


class _StallWatchdog:
    """A context whose daemon thread, while armed with a description of the running job turn,
    ends the process (exit code ``STALL_EXIT_CODE``) once that turn has lasted ``limit_s``,
    after printing which turn stalled; ``limit_s`` <= 0: no thread, arming does nothing. A hung
    GPU kernel cannot be interrupted from Python; the sweep's JSON, rewritten after every cell,
    keeps the cells already finished."""

    def __init__(self, limit_s: float):
        self._limit_s = limit_s
        self._turn: tuple[str, float] | None = None
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    def __enter__(self):
        if self._limit_s > 0:
            threading.Thread(target=self._watch, daemon=True).start()
        return self

    def __exit__(self, *exc_info):
        self._stopped.set()

    def arm(self, what: str) -> None:
        with self._lock:
            self._turn = (what, time.monotonic())

    def disarm(self) -> None:
        with self._lock:
            self._turn = None

    def _watch(self) -> None:
        while not self._stopped.wait(min(1.0, self._limit_s / 4)):
            with self._lock:
                turn = self._turn
            if turn is not None and time.monotonic() - turn[1] > self._limit_s:
                print(f"STALLED: {turn[0]} ran for more than {self._limit_s:g} s; ending the "
                      f"process (the sweep's JSON keeps the cells it finished)", flush=True)
                os._exit(STALL_EXIT_CODE)


def time_interleaved(jobs, *, repeats: int, warmup: int = 1, window_s: float = 0.0,
                     labels=None, stall_s: float = STALL_S) -> list[dict]:
    """Time ``(fn, args, calls_per_sync)`` jobs (``fn`` jitted) in ``repeats`` rounds after an
    untimed warm-up round (which also compiles): each round takes one sync of every job in
    turn (in reverse order every other round), each after ``warmup`` untimed calls of that job.
    Drift during the sweep (clocks, temperature) then reaches every job alike, where timing one
    job's repeats after another's hands it to whichever ran during a slow spell. With
    ``window_s`` > 0 a job's turn is a `time_window` of that many seconds instead of one sync:
    slower, but each job is timed at the clocks its own sustained load leaves (on an H200
    every attention kernel then runs at the power limit; per-round ranges shrank from 5-40%
    with single syncs to about 1%).

    A job's turn that lasts more than ``stall_s`` seconds plus ``window_s`` ends the process
    (`_StallWatchdog`; 0 turns this off), printing the job's name from ``labels`` (one per
    job) or its index.

    Returns per job ``{"ms": median ms per call, "round_ms": each round's}``, or ``{"error"}``
    for a job that raised (it is left out of the later rounds)."""
    samples: list[list[float]] = [[] for _ in jobs]
    errors: dict[int, str] = {}
    labels = list(labels) if labels is not None else [f"job {i}" for i in range(len(jobs))]
    if len(labels) != len(jobs):
        raise ValueError(f"labels must name every job: got {len(labels)} labels for "
                         f"{len(jobs)} jobs")
    with _StallWatchdog(stall_s + window_s if stall_s > 0 else 0.0) as watchdog:
        for round_ in range(repeats + 1):  # round 0 warms up
            # Odd rounds take the jobs in reverse order: a job's speed depends a little on the
            # job before it (on an H200, two identical kernels timed one after the other in
            # 0.5 s windows differed by 1-2%, the same way in every cell), which this averages
            # out.
            order = range(len(jobs) - 1, -1, -1) if round_ % 2 else range(len(jobs))
            for i in order:
                fn, args, calls = jobs[i]
                if i in errors:
                    continue
                watchdog.arm(f"{labels[i]} (round {round_}{', warm-up' if not round_ else ''})")
                try:
                    if window_s > 0 and round_:
                        seconds = time_window(fn, *args, calls_per_sync=calls, seconds=window_s)
                    else:
                        seconds = time_call(fn, *args, calls_per_sync=calls, repeats=1,
                                            warmup=warmup)
                except Exception as e:  # noqa: BLE001 - record why a job could not run
                    errors[i] = failure(e)
                    continue
                finally:
                    watchdog.disarm()
                if round_:
                    samples[i].append(1e3 * seconds)
    return [dict(error=errors[i]) if i in errors else
            dict(ms=statistics.median(times), round_ms=[round(t, 4) for t in times])
            for i, times in enumerate(samples)]


def paired_speedup(result: dict, baseline: dict) -> dict | None:
    """How much faster ``result`` ran than ``baseline`` (`time_interleaved` results of one
    call) round by round: baseline ms / result ms per round, whose drift the two shared.
    ``{"median", "min", "max"}``, or None if either has no rounds."""
    if "round_ms" not in result or "round_ms" not in baseline:
        return None
    ratios = [b / r for r, b in zip(result["round_ms"], baseline["round_ms"])]
    return dict(median=statistics.median(ratios), min=min(ratios), max=max(ratios))


def with_tflops(result: dict, flops: float) -> dict:
    """A `time_interleaved` result with "tflops" added (none for an error)."""
    return dict(result, tflops=flops / result["ms"] / 1e9) if "ms" in result else result


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


def method(repeats: int, window_s: float = 0.0) -> str:
    """How `time_interleaved` timed, for a JSON's "method"."""
    if window_s > 0:
        return (f"median of {repeats} interleaved rounds (odd rounds in reverse order); in each "
                f"round every entry runs syncs of 10 calls back to back for {window_s} s and "
                f"counts the median sync")
    return (f"median of {repeats} interleaved rounds (odd rounds in reverse order; one sync of "
            f"10 calls of each entry per round, after a warm-up call)")


def write_sweep(path: str, rows: list, *, repeats: int, window_s: float = 0.0,
                complete: bool = True, **fields) -> None:
    """A tuning sweep's JSON: device, date, jax version, the command line, ``fields``, method
    and rows.
    Sweeps write it after every cell with ``complete=False`` (recorded), so that a run cut
    short by a time limit still leaves the cells it finished; the last write announces itself."""
    result = dict(device=device_name(), date=datetime.date.today().isoformat(),
                  jax=jax.__version__, command=" ".join(sys.argv), **fields,
                  method=method(repeats, window_s),
                  complete=complete, rows=rows)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)  # a reader never sees half a file
    if complete:
        print(f"wrote {path}")
