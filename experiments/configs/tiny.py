"""Tiny CCGQA LM for the CPU demo (0.76M params, byte tokens, float32 compute: XLA's CPU
bf16 matmuls are slow): a few minutes on 2 cores.

    python -m experiments.train --config=experiments/configs/tiny.py
"""

from experiments.configs.common import defaults


def get_config():
    c = defaults()
    c.model.update(d_model=128, num_layers=4, num_heads=4, head_dim=32, num_kv_heads=1,
                   compression=2, mlp_dim=384, dtype="float32")
    c.data.update(batch_size=16, seq_len=128)
    c.optim.update(learning_rate=3e-3, warmup_steps=30)
    c.train.update(steps=300, workdir="runs/tiny", log_every=25, eval_every=100, eval_batches=4,
                   checkpoint_every=100)
    return c
