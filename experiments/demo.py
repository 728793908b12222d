"""Demo: train the tiny CCGQA language model on Shakespeare on the CPU, then sample from it.

    python -m experiments.demo                                   # `make demo`: a few minutes
    python -m experiments.demo --config.train.steps=50           # any field of the config

Trains `experiments/configs/tiny.py` (byte tokens, CCGQA attention) with `experiments.train`,
which logs loss, perplexity, tokens/s and MFU, evaluates on held-out plays and saves orbax
checkpoints to ``config.train.workdir``; a second run resumes (or, once finished, only samples).
Then it prints ``config.sample.length`` tokens that `ccajax.generate` samples (KV-cached prefill
and decode steps) after ``config.sample.prompt``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app

from ccajax import models
from ccajax.generate import generate
from experiments.train import CONFIG, Run, quiet_logging


def main(argv):
    del argv
    quiet_logging()
    config = CONFIG.value
    run = Run(config, resume=True)
    print(run.corpus.describe())
    print(f"model: {config.model.attention} {run.model_cfg.attention}, "
          f"{models.param_count(run.model_cfg):,} params, {jax.device_count()} "
          f"{jax.default_backend()} device(s); workdir {run.workdir}")
    summary = run.train()
    if summary:
        print("final:", "  ".join(f"{k} {v:.4g}" for k, v in summary.items()))
    if config.sample.length:
        sc = config.sample
        prompt = jnp.asarray(run.corpus.encode(sc.prompt), jnp.int32)[None]
        out = generate(run.model(), prompt, max_new_tokens=sc.length, temperature=sc.temperature,
                       top_p=sc.top_p, rng=jax.random.key(config.train.seed),
                       cache_dtype=jnp.dtype(run.model_cfg.dtype))
        print(f"\nSample ({sc.length} tokens, temperature {sc.temperature}, top_p {sc.top_p}):\n"
              f"{sc.prompt}{run.corpus.decode(np.asarray(out.tokens[0]))}")


if __name__ == "__main__":
    app.run(main)
