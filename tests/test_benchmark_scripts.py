"""Every benchmark script imports on the CPU, and the layer sweep runs there at a toy size: the GPU
calls that run them are few and costly.

Each import runs in its own process, as the scripts do on the device, because absl flags are
process-global (two scripts that both define ``--out`` cannot share one)."""

import json
import os
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


def test_layer_sweep_interleaves_and_records_errors(tmp_path):
    """`layers.py`'s sweep on the CPU at S=64: every variant is timed (compiled first, then in
    interleaved rounds) or records why it could not run (cuDNN has no CPU backend); the MHA
    baseline's fwd+bwd choices are its own flag's."""
    out = tmp_path / "layers.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/layers.py", "--seq_lens=64", "--tokens=64", "--causal=1",
         "--methods=MHA 16:16,CCA C=2 (8:8)", "--impls=xla,cudnn", "--bwd_impls=xla",
         "--baseline_bwd_impls=xla,cudnn",
         "--prologues=jnp", "--repeats=2", f"--out={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["MHA 16:16", "CCA C=2 (8:8)"]
    for row in rows:
        xla = next(r for name, r in row["results"].items() if name.startswith("xla"))
        cudnn = next(r for name, r in row["results"].items() if name.startswith("cudnn"))
        assert xla["fwd"]["ms"] > 0 and xla["fwdbwd"]["ms"] > 0
        assert len(xla["fwd"]["round_ms"]) == 2 and row["fwd"]["spread_pct"] >= 0
        assert "error" in cudnn["fwd"] and "ms" not in cudnn["fwd"]
        assert row["fwd"]["impl"].startswith("xla")
        # The baseline (MHA) tries --baseline_bwd_impls for fwd+bwd, the CCA layer --bwd_impls.
        assert ("fwdbwd" in cudnn) == (row["method"] == "MHA 16:16")
