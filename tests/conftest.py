"""Shared test helpers: fresh random inputs per test, float64 numpy references."""

import faulthandler
import os
import sys
import threading
import zlib

# Mosaic GPU interpret mode runs each warpgroup as an XLA CPU computation that blocks a worker of
# XLA's CPU thread pool on barriers; on a 2-core machine the pool (one worker per core unless
# NPROC says otherwise, read when JAX starts) is too small and kernels deadlock.
os.environ.setdefault("NPROC", "8")

import numpy as np
import pytest


# A deadlocked interpreted kernel waits forever (a barrier wait cannot be interrupted), which
# would hold CI to its time limit: past this many seconds in one test, a watchdog thread prints
# every thread's traceback and ends the process (exit code 1): the run, or under pytest-xdist
# (`make test`) the worker, which xdist reports as crashed while the others carry on. The
# slowest test took 41-49 s in CI (2 cores, 2 xdist workers, 2026-12-02).
HANG_S = float(os.environ.get("CCAJAX_TEST_HANG_S", 900))


@pytest.fixture(autouse=True)
def _end_the_run_on_a_hang(request):
    capture = request.config.pluginmanager.getplugin("capturemanager")

    def end_the_run():
        if capture is not None:  # pytest captures fd 2 during a test: hand it back first
            capture.suspend_global_capture(in_=True)
        print(f"\n{request.node.nodeid} still running after {HANG_S:.0f} s "
              "(CCAJAX_TEST_HANG_S): a hang; ending the run.", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr)
        os._exit(1)

    watchdog = threading.Timer(HANG_S, end_the_run)
    watchdog.daemon = True
    watchdog.start()
    yield
    watchdog.cancel()


@pytest.fixture
def rng(request):
    """A numpy Generator seeded from the test's id: every case gets its own inputs, reproducibly."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def lag_warpgroup(monkeypatch):
    """``lag_warpgroup(w)`` makes warpgroup w of interpreted Mosaic GPU kernels sleep before each
    barrier wait, so that the others run as far ahead as the kernel's barriers let them. The
    interpreter fails a kernel in which one thread completes a barrier phase twice before a
    waiter has observed the first (on a GPU, whose waits compare the phase parity, a hang);
    thread timing alone seldom opens that window, a lagging warpgroup does so every time.
    ``lag_warpgroup(w, block=i)`` slows it only in CTA i of each cluster (for kernels that
    launch clusters: the other CTA's warpgroups then run ahead too)."""
    import time

    from jax._src.pallas.mosaic_gpu.interpret import shared_memory

    def lag(warpgroup_id: int, seconds: float = 0.02, block: int | None = None):
        wait = shared_memory.Barrier._wait

        def lagging_wait(self, thread, *args, **kwargs):
            if (getattr(thread, "warpgroup_id", None) == warpgroup_id
                    and block in (None, getattr(thread, "block_id", None))):
                time.sleep(seconds)
            return wait(self, thread, *args, **kwargs)

        monkeypatch.setattr(shared_memory.Barrier, "_wait", lagging_wait)

    return lag
