"""Checkpoints: retention, skipping corrupted or partial ones, and exact resume after a kill."""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import jax.numpy as jnp
import pytest

from ccajax.checkpoint import Checkpointer
from experiments import train
from tests.test_train import micro_config, start_script


def _state(value):
    return {"w": jnp.full((2, 3), value, jnp.float32), "opt": {"count": jnp.array(value, jnp.int32)}}


def test_keep_last_and_best_and_skip_broken(tmp_path, caplog):
    ckpt = Checkpointer(tmp_path, keep_last=2, keep_best=1)
    for step, val in [(1, 3.0), (2, None), (3, 1.0), (4, None), (5, 2.0), (6, None)]:
        ckpt.save(step, _state(step), {"pos": step}, None if val is None else {"val_loss": val})
    ckpt.close()
    assert Checkpointer(tmp_path).steps() == [3, 5, 6]  # newest two + the best validation loss

    for f in (tmp_path / "6" / "state" / "d").iterdir():  # corrupt the newest
        f.write_bytes(b"garbage")
    (tmp_path / "7.orbax-checkpoint-tmp-1").mkdir()  # an unfinished save (killed mid-write)
    ckpt = Checkpointer(tmp_path, keep_last=2, keep_best=1)
    assert ckpt.steps() == [3, 5, 6]
    step, state, data = ckpt.restore_latest(_state(0))
    assert step == 5 and data == {"pos": 5} and float(state["w"][0, 0]) == 5.0
    assert int(state["opt"]["count"]) == 5
    assert "Skipping checkpoint step 6" in caplog.text and "failed to load" in caplog.text


def test_restore_with_nothing_loadable(tmp_path):
    assert Checkpointer(tmp_path).restore_latest(_state(0)) is None
    with pytest.raises(ValueError, match=r"keep_last must be an int >= 1, got 0"):
        Checkpointer(tmp_path, keep_last=0)


def _rows(workdir):
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    timing = {"step_time", "tokens_per_s", "mfu"}
    return [{k: v for k, v in json.loads(line).items() if k not in timing} for line in lines]


def _run(config, *args) -> str:
    proc = start_script("experiments.train", config, *args, stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    return out


def test_killed_and_resumed_run_equals_uninterrupted(tmp_path):
    reference, killed = (micro_config(tmp_path / name) for name in ("reference", "killed"))
    steps = reference.train.steps
    _run(reference)

    proc = start_script("experiments.train", killed, stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if metrics.exists() and any(json.loads(line)["step"] >= 12
                                    for line in metrics.read_text().splitlines()):
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    stderr = proc.communicate()[1]
    assert proc.returncode == -signal.SIGKILL, stderr[-3000:]

    with pytest.raises(ValueError, match="already holds checkpoints.*pass --resume"):
        train.Run(killed)
    out = _run(killed, "--resume")
    resumed_at = int(re.search(r"from its checkpoint at step (\d+)", out).group(1))
    assert 5 <= resumed_at < steps and resumed_at % 5 == 0
    assert _rows(tmp_path / "killed") == _rows(tmp_path / "reference")
    assert [r["step"] for r in _rows(tmp_path / "killed") if "loss" in r] == list(range(1, steps + 1))
