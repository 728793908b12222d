"""Train a decoder-only LM with CCA, CCGQA or a baseline attention.

    python -m experiments.train --config=experiments/configs/tiny.py            # CPU, minutes
    python -m experiments.train --config=experiments/configs/small.py --config.model.attention=mha
    python -m experiments.train --config=experiments/configs/small.py --resume  # continue its workdir

Every config field can be overridden (``--config.train.steps=200``); configs live in
``experiments/configs/``. A run writes into ``config.train.workdir``: ``config.json``,
``model.json`` (parameters, KV-cache values per token and layer, train FLOPs per step),
``metrics.jsonl`` (one JSON object per log/eval line), ``tensorboard/`` and ``checkpoints/`` (orbax,
periodic async saves of params, optimizer state, step and data position; keep-last-N + keep-best).
``--resume`` continues from the newest loadable checkpoint exactly: same batches, same updates,
so the loss curve of a killed and resumed run equals the uninterrupted one.

Metrics: loss, perplexity, tokens/s, step time and MFU. MFU = model FLOPs per step
(`ccajax.models.train_flops_per_step`: 6 * matmul weights * tokens + attention and conv FLOPs of
`ccajax.costs`, forward + backward) / (step time * train.peak_flops_per_device * devices).
tokens/s counts every position of the global batch (B * S), padding included.

All devices form one (data, fsdp) mesh (`ccajax.sharding`); the same command runs on one device.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags
from tensorboard.summary import Writer
from tqdm import tqdm

from ccajax import costs, models, sharding, training
from ccajax.checkpoint import Checkpointer
from experiments import data

CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/tiny.py",
                                          "Experiment config file (experiments/configs/*.py).")
_RESUME = flags.DEFINE_bool("resume", False,
                            "Continue from the newest loadable checkpoint in config.train.workdir.")


def _section(name: str, build):
    """Runs a config constructor, naming the config section in its ValueError."""
    try:
        return build()
    except ValueError as error:
        raise ValueError(f"config.{name}: {error}") from None


def model_config(config, vocab_size: int) -> models.LMConfig:
    """The `LMConfig` of ``config.model``; vocab_size=0 takes ``vocab_size`` (the corpus's)."""
    m = config.model
    attention = _section("model", lambda: models.attention_config(
        m.attention, d_model=m.d_model, num_heads=m.num_heads, head_dim=m.head_dim,
        num_kv_heads=m.num_kv_heads, compression=m.compression, kv_lora_rank=m.kv_lora_rank,
        rope_theta=m.rope_theta, rope_fraction=m.rope_fraction, use_conv=m.use_conv,
        use_qk_mean=m.use_qk_mean, use_value_shift=m.use_value_shift,
        use_key_temperature=m.use_key_temperature))
    return _section("model", lambda: models.LMConfig(
        vocab_size=m.vocab_size or vocab_size, num_layers=m.num_layers, attention=attention,
        mlp_dim=m.mlp_dim, num_experts=m.num_experts, experts_per_token=m.experts_per_token,
        tie_embeddings=m.tie_embeddings, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat,
        attention_implementation=m.attention_implementation or None,
        cca_prologue=m.cca_prologue or None))


def optimizer_config(config) -> training.OptimizerConfig:
    return _section("optim", lambda: training.OptimizerConfig(
        total_steps=config.train.steps, **config.optim.to_dict()))


def validate(config, num_devices: int) -> None:
    """Raises ValueError naming the first invalid field of ``config``, its value and what is valid."""
    t, d = config.train, config.data
    for name, value, low in (("train.steps", t.steps, 1), ("train.log_every", t.log_every, 1),
                             ("train.eval_every", t.eval_every, 0),
                             ("train.eval_batches", t.eval_batches, 0),
                             ("train.checkpoint_every", t.checkpoint_every, 0),
                             ("train.seed", t.seed, 0), ("train.keep_last", t.keep_last, 1),
                             ("train.keep_best", t.keep_best, 0), ("data.batch_size", d.batch_size, 1),
                             ("data.seq_len", d.seq_len, 1), ("sample.length", config.sample.length, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"config.{name} must be an int >= {low}, got {value!r}")
    if d.batch_size % num_devices:
        raise ValueError(f"config.data.batch_size={d.batch_size} must be a multiple of the "
                         f"{num_devices} devices")
    if not t.workdir:
        raise ValueError("config.train.workdir must name a directory, got ''")
    if tuple(d.sources) == ("synthetic",):
        if not config.model.vocab_size:
            raise ValueError("config.model.vocab_size must be > 0 with config.data.sources="
                             "('synthetic',): there is no corpus to take it from")
    else:
        bad = [s for s in d.sources if s not in data.SOURCES]
        if bad or not d.sources:
            raise ValueError(f"config.data.sources={tuple(d.sources)!r}: each must be one of "
                             f"{tuple(data.SOURCES)}, or the sources must be ('synthetic',)")
    model_config(config, vocab_size=1)
    optimizer_config(config)


class SyntheticBatches:
    """Uniform random tokens in the `experiments.data.PackedBatches` format, for benchmarks
    without a corpus; deterministic in (seed, step) and resumable through ``state()``."""

    def __init__(self, vocab_size: int, batch_size: int, seq_len: int, seed: int = 0,
                 shard_index: int = 0, shard_count: int = 1, state: dict | None = None):
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed
        self.rows = batch_size // shard_count
        self.first_row = shard_index * self.rows
        self.step = (state or {}).get("step", 0)

    def state(self) -> dict:
        return {"step": self.step}

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        rng = np.random.default_rng([self.seed, self.step])
        self.step += 1
        tokens = rng.integers(0, self.vocab_size, (self.first_row + self.rows, self.seq_len + 1),
                              dtype=np.int32)[self.first_row:]
        return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                "segment_ids": np.ones_like(tokens[:, 1:]),
                "loss_mask": np.ones(tokens[:, 1:].shape, np.float32)}


class MetricLogger:
    """Writes metric rows to ``metrics.jsonl``, TensorBoard and (through tqdm) stdout."""

    def __init__(self, workdir: Path, resume_step: int | None):
        self.path = workdir / "metrics.jsonl"
        if resume_step is None:
            self.path.write_text("")
        else:  # drop rows the killed run wrote after its last checkpoint: they are redone
            rows = [line for line in self.path.read_text().splitlines()
                    if line and json.loads(line)["step"] <= resume_step] if self.path.exists() else []
            self.path.write_text("".join(row + "\n" for row in rows))
        self.tensorboard = Writer(str(workdir / "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        metrics = {k: float(v) for k, v in metrics.items()}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for name, value in metrics.items():
            self.tensorboard.add_scalar(name, value, step)
        self.tensorboard.flush()
        tqdm.write(f"step {step:>6}  " + "  ".join(_format(k, v) for k, v in metrics.items()))

    def close(self) -> None:
        self.tensorboard.close()


def _format(name: str, value: float) -> str:
    if name == "tokens_per_s":
        return f"{name} {value:,.0f}"
    return f"{name} {value:.4g}"


class Run:
    """A training run of ``config``: corpus, mesh, jitted steps, state and its checkpoints."""

    def __init__(self, config, resume: bool = False):
        self.config = config
        validate(config, jax.device_count())
        d, t = config.data, config.train
        self.synthetic = tuple(d.sources) == ("synthetic",)
        self.corpus = None if self.synthetic else data.prepare_corpus(
            sources=tuple(d.sources), cache_dir=d.cache_dir, tokenizer=d.tokenizer,
            tiktoken_file=d.tiktoken_file or None)
        self.model_cfg = model_config(config, self.corpus.vocab_size if self.corpus else 0)
        self.optim_cfg = optimizer_config(config)
        self.mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
        self.workdir = Path(t.workdir).expanduser()
        self.workdir.mkdir(parents=True, exist_ok=True)

        self.checkpoints = Checkpointer(self.workdir / "checkpoints", keep_last=t.keep_last,
                                        keep_best=t.keep_best, async_save=t.async_checkpoint)
        if self.checkpoints.steps() and not resume:
            raise ValueError(f"{self.workdir} already holds checkpoints (steps "
                             f"{self.checkpoints.steps()}): pass --resume to continue that run, "
                             "or set --config.train.workdir to a new directory")

        tx = training.make_optimizer(self.optim_cfg)
        self.graphdef, abstract_state, shardings = training.abstract_train_state(
            self.model_cfg, tx, self.mesh)
        restored = self.checkpoints.restore_latest(abstract_state) if resume else None
        if restored is None:
            self.step, data_state = 0, None
            self.state = training.init_train_state(self.model_cfg, tx, t.seed, shardings)
        else:
            self.step, self.state, saved = restored
            data_state = saved["train_data"]
            print(f"Resuming {self.workdir} from its checkpoint at step {self.step}.", flush=True)
        self.train_step, self.eval_step = training.jit_steps(
            self.graphdef, shardings, self.mesh, z_loss=t.z_loss, moe_aux_weight=t.moe_aux_weight)
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        self.flops_per_step = models.train_flops_per_step(self.model_cfg, d.batch_size, d.seq_len)
        (self.workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
        (self.workdir / "model.json").write_text(json.dumps({
            "params": models.param_count(self.model_cfg),
            "kv_values_per_token_layer": costs.kv_cache_values_per_token(self.model_cfg.attention),
            "train_flops_per_step": self.flops_per_step}, indent=1))
        self.logger = MetricLogger(self.workdir, self.step if resume else None)
        self.stream = self.batches("train", data_state)

    def batches(self, split: str, state: dict | None = None):
        """The global batch's rows of this process, from the corpus or synthetic."""
        d, seed = self.config.data, self.config.train.seed
        shard = dict(shard_index=jax.process_index(), shard_count=jax.process_count(), state=state)
        if self.synthetic:
            return SyntheticBatches(self.model_cfg.vocab_size, d.batch_size, d.seq_len,
                                    seed=seed + (split == "val"), **shard)
        return data.PackedBatches(self.corpus, split=split, batch_size=d.batch_size,
                                  seq_len=d.seq_len, seed=seed, **shard)

    def _device_batch(self, batch: dict) -> dict:
        if not self.config.data.use_segment_ids:
            batch = {k: v for k, v in batch.items() if k != "segment_ids"}
        return sharding.shard_batch(batch, self.batch_sharding)

    def evaluate(self) -> dict:
        """Mean loss and perplexity over ``train.eval_batches`` validation batches (0: all)."""
        stream, limit = self.batches("val"), self.config.train.eval_batches
        totals = None
        for i, batch in enumerate(stream):
            if limit and i == limit:
                break
            out = self.eval_step(self.state, self._device_batch(batch))
            totals = out if totals is None else jax.tree.map(lambda a, b: a + b, totals, out)
        loss = float(totals["loss_sum"]) / max(float(totals["tokens"]), 1.0)
        return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}

    def train(self) -> dict:
        """Trains to ``train.steps``, logging, evaluating and checkpointing; returns the last
        logged train metrics and validation metrics."""
        t = self.config.train
        lr = self.optim_cfg.schedule()
        tokens = self.config.data.batch_size * self.config.data.seq_len
        bar = tqdm(total=t.steps, initial=self.step, disable=not t.progress, unit="step",
                   dynamic_ncols=True)
        summary, timer, timed_steps = {}, None, 0
        while self.step < t.steps:
            batch = self._device_batch(next(self.stream))
            self.state, metrics = self.train_step(self.state, batch)
            self.step += 1
            bar.update()
            if timer is None:  # the first step compiles: time from its end
                jax.block_until_ready(metrics)
                timer = time.perf_counter()
            else:
                timed_steps += 1
            last = self.step == t.steps
            if self.step % t.log_every == 0 or last:
                metrics = jax.device_get(metrics)
                now = time.perf_counter()
                row = {"loss": metrics["loss"], "perplexity": math.exp(min(metrics["loss"], 50.0)),
                       "grad_norm": metrics["grad_norm"], "learning_rate": lr(self.step - 1)}
                if self.model_cfg.num_experts:
                    row["moe_aux"] = metrics["moe_aux"]
                if timed_steps:
                    step_time = (now - timer) / timed_steps
                    row.update(step_time=step_time, tokens_per_s=tokens / step_time,
                               mfu=self.flops_per_step / (step_time * t.peak_flops_per_device
                                                          * jax.device_count()))
                self.logger.write(self.step, row)
                bar.set_postfix(loss=f"{row['loss']:.3f}")
                summary.update(row)
                timer, timed_steps = time.perf_counter(), 0
            val = None
            if t.eval_every and (self.step % t.eval_every == 0 or last):
                val = self.evaluate()
                self.logger.write(self.step, val)
                summary.update(val)
                timer, timed_steps = time.perf_counter(), 0
            if (t.checkpoint_every and self.step % t.checkpoint_every == 0) or last:
                self.checkpoints.save(self.step, self.state, {"train_data": self.stream.state()},
                                      metrics=val)
                timer, timed_steps = time.perf_counter(), 0  # step times exclude evals and saves
        bar.close()
        self.checkpoints.close()
        self.logger.close()
        return summary

    def model(self) -> models.TransformerLM:
        """The trained model (an nnx module over the current params)."""
        return nnx.merge(self.graphdef, self.state)["model"]


def quiet_logging() -> None:
    """Library INFO logs (orbax's, per save) off unless --verbosity is given; warnings stay."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def main(argv):
    del argv
    quiet_logging()
    Run(CONFIG.value, resume=_RESUME.value).train()


if __name__ == "__main__":
    app.run(main)
