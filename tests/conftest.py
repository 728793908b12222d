"""Shared test helpers: fresh random inputs per test, float64 numpy references."""

import zlib

import numpy as np
import pytest


@pytest.fixture
def rng(request):
    """A numpy Generator seeded from the test's id: every case gets its own inputs, reproducibly."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
