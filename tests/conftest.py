"""Shared test helpers: fresh random inputs per test, float64 numpy references."""

import os
import zlib

# Mosaic GPU interpret mode runs each warpgroup as an XLA CPU computation that blocks a worker of
# XLA's CPU thread pool on barriers; on a 2-core machine the pool (one worker per core unless
# NPROC says otherwise, read when JAX starts) is too small and kernels deadlock.
os.environ.setdefault("NPROC", "8")

import numpy as np
import pytest


@pytest.fixture
def rng(request):
    """A numpy Generator seeded from the test's id: every case gets its own inputs, reproducibly."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
