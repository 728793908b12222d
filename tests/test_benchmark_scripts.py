"""Every benchmark script imports on the CPU: the GPU calls that run them are few and costly.

Each import runs in its own process, as the scripts do on the device, because absl flags are
process-global (two scripts that both define ``--out`` cannot share one)."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", SCRIPTS)
def test_imports(name):
    result = subprocess.run([sys.executable, "-c", f"import benchmarks.{name}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
