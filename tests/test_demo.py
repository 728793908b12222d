"""The README's main command: `make demo` trains the tiny CCGQA LM, checkpoints, and samples.

Run here shortened (a few steps of a 1-layer model on the committed excerpt) with the same code.
"""

import subprocess

from tests.test_train import micro_config, start_script


def test_demo_trains_checkpoints_and_samples(tmp_path):
    config = micro_config(tmp_path / "demo", log_every=10)
    config.sample.length = 12
    proc = start_script("experiments.demo", config, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "corpus: excerpt" in out and "ccgqa CCAConfig(" in out
    assert "step     30  loss" in out and "val_loss" in out and "tokens_per_s" in out and "mfu" in out
    assert "Sample (12 tokens, temperature 0.8, top_p 0.95):\nROMEO.\n" in out
    assert sorted(p.name for p in (tmp_path / "demo" / "checkpoints").iterdir()) == ["20", "25", "30"]
    assert any((tmp_path / "demo" / "tensorboard").iterdir())
