"""The quality campaign driver (`experiments.quality`): run naming, reproducible commands, the
train loop over subprocesses with its time budget, and the report (table and figure)."""

import json

import pytest

from ccajax import costs
from experiments import quality, train
from experiments.configs import quality as quality_config

TINY = ["config.data.sources=('excerpt',)", "config.train.steps=4", "config.optim.warmup_steps=1",
        "config.model.num_layers=1", "config.data.seq_len=64", "config.data.batch_size=4",
        "config.train.eval_every=2", "config.train.eval_batches=2", "config.model.dtype=float32"]


def test_run_names_and_commands():
    assert quality.parse_run("ccgqa8@3") == ("ccgqa8", 3)
    assert quality.command("mla8@1") == (
        "python -m experiments.train --config=experiments/configs/quality.py "
        "--config.model.attention=mla --config.model.kv_lora_rank=96 --config.train.seed=1 "
        "--config.train.workdir=runs/quality/mla8@1")
    with pytest.raises(ValueError, match=r"unknown run 'gqa16'; valid: mha, gqa4"):
        quality.parse_run("gqa16")
    with pytest.raises(ValueError, match=r"seed of 'mha@x' must be a non-negative int"):
        quality.parse_run("mha@x")


def test_expected_wall_prefers_the_same_run_then_attention():
    done = [("mha", 110.0), ("mla8", 215.0), ("ccgqa8", 140.0)]
    assert quality.expected_wall("mha", done, run_s=1.0) == 110.0
    assert quality.expected_wall("ccgqa8_noshift", done, run_s=1.0) == 140.0  # same attention
    assert quality.expected_wall("gqa4", done, run_s=1.0) == 215.0  # none alike: the longest
    assert quality.expected_wall("gqa4", [], run_s=7.0) == 7.0


def test_every_run_builds_its_model():
    """Each RUNS entry's overrides make a valid model config (a typo would fail on the GPU)."""
    for name, (_, kv_compression, overrides) in quality.RUNS.items():
        config = quality_config.get_config()
        config.model.update(overrides)
        model_cfg = train.model_config(config, vocab_size=320)
        mha_kv = 2 * config.model.num_heads * config.model.head_dim
        assert costs.kv_cache_values_per_token(model_cfg.attention) * kv_compression == mha_kv, name


def test_train_runs_then_report(tmp_path):
    """Tiny runs two at a time on the CPU: MHA and MLA finish, the CCGQA runs fail with the
    trainer's own error (a bad override); a run past the budget is not started; the report
    tables and plots the finished ones."""
    extra = TINY + [f"config.data.cache_dir={tmp_path / 'cache'}"]
    result = quality.train_runs(["mha", "ccgqa8_noshift", "mla8", "ccgqa8"], tmp_path / "out",
                                workers=2, budget_s=60.0, run_s=1.0,
                                extra=extra + ["config.model.compression=3"])
    runs = result["runs"]
    # compression=3 does not divide 8 heads: every cca/ccgqa run fails, mha and mla run
    assert runs["mha"]["status"] == "ok" and runs["mla8"]["status"] == "ok", runs["mha"]["log_tail"]
    assert runs["ccgqa8_noshift"]["status"].startswith("failed (exit 1): ValueError: config.model: "
                                                       "compression=3 must divide num_heads=8")
    assert runs["mha"]["params"] > runs["mla8"]["params"] > 0
    assert runs["mla8"]["kv_values_per_token_layer"] == 128
    assert [r["step"] for r in runs["mha"]["metrics"] if "val_loss" in r] == [2, 4]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["runs"].keys() == runs.keys()

    late = quality.train_runs(["mha"], tmp_path / "late", workers=1, budget_s=1.0, run_s=5.0,
                              extra=extra)
    assert late["runs"]["mha"]["status"].startswith("not started")

    merged = quality.merge([tmp_path / "out" / "summary.json", tmp_path / "late" / "summary.json"])
    assert merged["mha"]["status"] == "ok"  # a later "not started" never hides a finished run
    md = quality.table(merged)
    assert "| MHA 8:8 | 1x |" in md and "| MLA r=96 | 8x |" in md and "+0.00%" in md
    assert "CCGQA" not in md
    quality.plot(merged, str(tmp_path / "q.png"), tokens_per_step=256)
    assert (tmp_path / "q.png").stat().st_size > 10_000
