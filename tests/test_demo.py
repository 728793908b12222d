"""The README's main job runs end to end (small sizes) and prints the cost table."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_and_prints_cost_table():
    out = subprocess.run(
        [sys.executable, "experiments/demo.py", "--run_d_model=128", "--run_seq_len=16"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=True).stdout
    assert out.count("compiled and ran") == 8
    assert "CCGQA 8:2" in out and "8.0x" in out and "MHA 16:16" in out
