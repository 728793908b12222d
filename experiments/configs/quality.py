"""The quality comparison of `experiments/RESULTS.md` (`python -m experiments.quality`).

`small`'s blocks (E=512, 8 layers, MHA baseline of 8 heads of 64, SwiGLU 1536) on byte tokens of
all five text sources (35.6M training tokens), sequences of 1024, 32 rows: 24.6M tokens in 750
steps, evaluated on the whole held-out split (543k tokens of 74 documents) every 125 steps. The
attention of each run is set by `experiments.quality.RUNS` through config overrides.

    python -m experiments.train --config=experiments/configs/quality.py --config.model.attention=mha
"""

from experiments.configs.common import defaults

SOURCES = ("shakespeare", "milton", "bible", "austen", "linux-doc")


def get_config():
    c = defaults()
    c.model.update(d_model=512, num_layers=8, num_heads=8, head_dim=64, num_kv_heads=1,
                   compression=2, mlp_dim=1536)
    c.data.update(sources=SOURCES, tokenizer="byte", batch_size=32, seq_len=1024)
    c.optim.update(learning_rate=2e-3, warmup_steps=75)
    c.train.update(steps=750, workdir="runs/quality", log_every=25, eval_every=125,
                   eval_batches=0, checkpoint_every=0, keep_last=1, keep_best=0, progress=False)
    return c
