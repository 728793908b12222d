"""Train step, optimizer, experiment-config validation and the loss plot."""

import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from ccajax import models, sharding, training
from experiments import plot, train
from experiments.configs import tiny
from tests.test_models import fast_jit

ROOT = Path(__file__).resolve().parents[1]
# Subprocesses share compiled programs through JAX's persistent cache (the same tiny model is
# compiled once for all the runs of these tests instead of once per process), and XLA skips its
# CPU backend optimisations, which compile 2-3x slower than these tiny programs run.
SUBPROCESS_ENV = os.environ | {
    "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip(),
    "JAX_COMPILATION_CACHE_DIR": str(Path(tempfile.gettempdir()) / "ccajax-tests-jax-cache"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}


def micro_config(workdir, **train_fields):
    """The tiny config shrunk to seconds: 1 layer, E=32, the committed excerpt corpus.

    Tests keep the model and optimizer fields (steps included: the schedule is compiled in) equal,
    so that their subprocesses share compiled programs through the persistent cache."""
    c = tiny.get_config()
    c.model.update(d_model=32, num_layers=1, num_heads=2, head_dim=16, num_kv_heads=1, mlp_dim=64)
    c.data.update(sources=("excerpt",), batch_size=4, seq_len=32,
                  cache_dir=str(Path(workdir).parent / "corpus-cache"))
    c.optim.update(warmup_steps=2)
    c.train.update(dict(steps=30, workdir=str(workdir), log_every=1, eval_every=10, eval_batches=2,
                        checkpoint_every=5, progress=False) | train_fields)
    c.sample.length = 0
    return c


def config_flags(config) -> list[str]:
    """Command-line flags that set every field of ``config`` over experiments/configs/tiny.py."""
    return ["--config=experiments/configs/tiny.py"] + [
        f"--config.{section}.{k}={repr(v) if isinstance(v, tuple) else v}"
        for section in config for k, v in config[section].items()]


def start_script(module: str, config, *args, **popen) -> subprocess.Popen:
    """``python -m module`` with ``config`` as flags, in the repo root, sharing the JAX cache."""
    return subprocess.Popen([sys.executable, "-m", module, *config_flags(config), *args], cwd=ROOT,
                            env=SUBPROCESS_ENV, text=True, **popen)


def test_train_step_shapes_and_loss_decreases():
    att = models.attention_config("ccgqa", d_model=32, num_heads=4, head_dim=8, num_kv_heads=1)
    cfg = models.LMConfig(vocab_size=64, num_layers=1, attention=att, mlp_dim=64, dtype="float32")
    opt = training.OptimizerConfig(learning_rate=1e-2, warmup_steps=2, total_steps=20)
    mesh = sharding.make_mesh()
    tx = training.make_optimizer(opt)
    graphdef, abstract, shardings = training.abstract_train_state(cfg, tx, mesh)
    state = training.init_train_state(cfg, tx, 0, shardings)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), abstract) == jax.tree.map(lambda a: (a.shape, a.dtype), state)
    step = fast_jit(functools.partial(training.train_step, graphdef, z_loss=1e-4))
    tokens = np.random.default_rng(0).integers(0, 64, (4, 17)).astype(np.int32)
    batch = sharding.shard_batch(
        {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((4, 16), np.float32),
         "segment_ids": np.ones((4, 16), np.int32)}, sharding.batch_sharding(mesh))
    params_before = jax.tree.map(np.asarray, state["model"])
    losses = []
    for _ in range(12):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert set(metrics) == {"loss", "z_loss", "moe_aux", "tokens", "grad_norm"}
    assert all(np.shape(v) == () for v in metrics.values()) and float(metrics["tokens"]) == 64
    assert losses[0] == pytest.approx(np.log(64), abs=0.6)
    assert losses[-1] < 0.5 * losses[0]  # memorises the batch
    assert int(state["optimizer"]["step"][...]) == 12
    after = jax.tree.map(np.asarray, state["model"])
    assert jax.tree.structure(after) == jax.tree.structure(params_before)
    assert jax.tree.all(jax.tree.map(lambda a, b: a.shape == b.shape and a.dtype == b.dtype == np.float32,
                                     after, params_before))


def test_masked_targets_outside_the_vocabulary_do_not_count():
    """A masked target outside [0, V) (-1, PyTorch's ignore index -100, >= V) leaves loss and
    gradients as if those positions were absent; an unmasked one makes the loss NaN, not a
    plausible number (a negative id does not wrap around to a valid one)."""
    att = models.attention_config("mha", d_model=16, num_heads=2, head_dim=8)
    cfg = models.LMConfig(vocab_size=32, num_layers=1, attention=att, mlp_dim=32, dtype="float32")
    model = models.TransformerLM(cfg, rngs=nnx.Rngs(0))
    tokens = np.random.default_rng(1).integers(0, 32, (2, 9)).astype(np.int32)
    mask = np.ones((2, 8), np.float32)
    mask[0, 5:] = 0
    targets = tokens[:, 1:].copy()
    batch = {"inputs": tokens[:, :-1], "targets": targets, "loss_mask": mask}
    outside = np.array([-1, -100, 32, 99])[np.arange(8) % 4]
    bad = dict(batch, targets=np.where(mask > 0, targets, outside))

    def loss_and_grads(b):
        return nnx.value_and_grad(lambda m: training.lm_loss(m, b, z_loss=1e-2)[0])(model)

    (want, want_g), (got, got_g) = loss_and_grads(batch), loss_and_grads(bad)
    assert np.isfinite(float(got)) and float(got) == pytest.approx(float(want), rel=1e-6)
    for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-7)
    for wrong in (-1, 32):
        unmasked = dict(batch, targets=np.where(np.arange(8) == 3, wrong, targets))
        assert np.isnan(float(training.lm_loss(model, unmasked)[0])), wrong


def test_decay_mask_and_schedule():
    mask = training.decay_mask({"w": np.zeros((2, 3)), "scale": np.zeros(3), "experts": np.zeros((2, 2, 2))})
    assert mask == {"w": True, "scale": False, "experts": True}
    sched = training.OptimizerConfig(learning_rate=1.0, warmup_steps=10, total_steps=110,
                                     min_lr_ratio=0.1).schedule()
    assert float(sched(0)) == 0.0 and float(sched(10)) == 1.0
    assert float(sched(60)) == pytest.approx(0.55) and float(sched(110)) == pytest.approx(0.1)


@pytest.mark.parametrize("field, value, match", [
    ("model.attention", "linear", r"config.model: attention must be one of \('mha', 'gqa', 'mqa', "
                                  r"'mla', 'cca', 'ccgqa'\), got 'linear'"),
    ("model.num_kv_heads", 3, r"config.model: num_kv_heads=3 must divide num_q_heads=1"),
    ("model.remat", "all", r"config.model: remat must be one of \('none', 'full', 'dots'\)"),
    ("optim.warmup_steps", 30, r"config.optim: warmup_steps must be in \[0, total_steps=30\), got 30"),
    ("optim.b2", 1.5, r"config.optim: b2 must be in \[0, 1\], got 1.5"),
    ("train.steps", 0, r"config.train.steps must be an int >= 1, got 0"),
    ("train.keep_last", 0, r"config.train.keep_last must be an int >= 1, got 0"),
    ("data.batch_size", 3, None),
    ("data.sources", ("shakespear",), r"config.data.sources=\('shakespear',\): each must be one of"),
])
def test_config_validation_errors(tmp_path, field, value, match):
    config = micro_config(tmp_path)
    section, name = field.split(".")
    config[section][name] = value
    if match is None:  # batch 3 on 2 devices: checked against the device count
        with pytest.raises(ValueError, match=r"config.data.batch_size=3 must be a multiple of the 2 devices"):
            train.validate(config, num_devices=2)
        return
    with pytest.raises(ValueError, match=match):
        train.validate(config, num_devices=1)


def test_make_mesh_errors():
    with pytest.raises(ValueError, match=r"mesh.data x mesh.fsdp must equal the 1 devices; got 2 x 1"):
        sharding.make_mesh(2, 1)
    with pytest.raises(ValueError, match=r"mesh.fsdp must be a positive int or -1, got 0"):
        sharding.make_mesh(1, 0)
    assert dict(sharding.make_mesh(-1, 1).shape) == {"data": 1, "fsdp": 1}


def test_plot_draws_several_runs(tmp_path):
    for name, scale in (("mha", 1.0), ("ccgqa", 0.9)):
        (tmp_path / name).mkdir()
        rows = [{"step": s, "loss": scale * 5 / s} for s in range(1, 11)] + [{"step": 10, "val_loss": 0.6}]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = plot.plot_runs({"MHA": tmp_path / "mha", "CCGQA": tmp_path / "ccgqa"}, tmp_path / "loss.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert plot.read_metric(tmp_path / "mha", "val_loss") == ([10], [0.6])
