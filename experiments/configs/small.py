"""Small LM for one GPU: E=512, 8 layers, GPT-2 vocabulary (53M params with MHA, 48M with CCGQA).

    python -m experiments.train --config=experiments/configs/small.py --config.model.attention=ccgqa

Packed documents (data.use_segment_ids) need an attention backend that takes segment ids: the
default dispatch picks our Mosaic kernels on Hopper; on other GPUs it falls back to XLA attention
(cuDNN's path here takes none), which is slow at S=4096.
"""

from experiments.configs.common import defaults


def get_config():
    c = defaults()
    c.model.update(d_model=512, num_layers=8, num_heads=8, head_dim=64, num_kv_heads=2,
                   compression=2, mlp_dim=1536)
    c.data.update(sources=("shakespeare",), tokenizer="gpt2", batch_size=8, seq_len=4096)
    c.optim.update(learning_rate=1e-3, warmup_steps=200)
    c.train.update(steps=5000, workdir="runs/small", eval_every=500, checkpoint_every=500)
    return c
