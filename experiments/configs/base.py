"""Base LM, GPT-2-small sized: E=768, 12 layers, GPT-2 vocabulary (124M params with MHA, 107M with CCGQA).

    python -m experiments.train --config=experiments/configs/base.py --config.model.attention=ccgqa
"""

from experiments.configs.common import defaults


def get_config():
    c = defaults()
    c.model.update(d_model=768, num_layers=12, num_heads=12, head_dim=64, num_kv_heads=3,
                   compression=2, mlp_dim=2048)
    c.data.update(sources=("shakespeare",), tokenizer="gpt2", batch_size=16, seq_len=2048)
    c.optim.update(learning_rate=6e-4, warmup_steps=500)
    c.train.update(steps=20000, workdir="runs/base", eval_every=1000, checkpoint_every=1000)
    return c
