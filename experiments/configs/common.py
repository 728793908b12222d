"""Defaults shared by the experiment configs; each field is documented here once.

A config file's ``get_config()`` starts from `defaults()` and overrides what differs. Every field
can be overridden on the command line: ``--config.model.attention=mha --config.train.steps=500``.
"""

import ml_collections


def defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict(dict(
        attention="ccgqa",          # mha | gqa | mqa | mla | cca | ccgqa
        vocab_size=0,               # 0: the corpus tokenizer's vocabulary
        d_model=512,
        num_layers=8,
        num_heads=8,                # heads of the MHA baseline of this width
        head_dim=64,
        num_kv_heads=2,             # kv heads of gqa and ccgqa
        compression=2,              # C of cca / ccgqa: num_heads / C latent query heads
        kv_lora_rank=0,             # mla latent rank; 0: d_model / 4
        rope_theta=10_000.0,
        rope_fraction=1.0,
        use_conv=True,              # cca / ccgqa ingredients (ablations): causal q/k convolution,
        use_qk_mean=True,           #   the q-k mean, the value shift (half the value heads from
        use_value_shift=True,       #   the previous token) and the learned key temperature
        use_key_temperature=True,
        mlp_dim=1536,               # SwiGLU hidden width (per expert with MoE)
        num_experts=0,              # 0: dense MLP; >= 2: top-k MoE
        experts_per_token=2,
        tie_embeddings=True,
        dtype="bfloat16",           # compute dtype
        param_dtype="float32",      # params and optimizer state
        remat="none",               # none | full | dots
        attention_implementation="",  # "" (default dispatch) | xla | cudnn | mosaic | mosaic_deterministic | mosaic_fwd_cudnn_bwd
        cca_prologue="",            # "" (cca_fused.default_prologue) | plain | jnp | mosaic: how
                                    #   cca / ccgqa make q/k/v (ccajax/pallas/NOTES_prologue.md)
    ))

    c.data = ml_collections.ConfigDict(dict(
        sources=("shakespeare",),   # experiments.data.SOURCES; "synthetic": random tokens
        tokenizer="byte",           # byte | gpt2
        tiktoken_file="",           # gpt2.tiktoken path for tokenizer=gpt2
        cache_dir="~/.cache/ccajax",
        batch_size=16,              # global batch (rows), split over all devices
        seq_len=256,
        use_segment_ids=True,       # attention stays inside packed documents
    ))

    c.optim = ml_collections.ConfigDict(dict(
        learning_rate=3e-3,
        warmup_steps=100,
        min_lr_ratio=0.1,           # cosine decays to learning_rate * min_lr_ratio at train.steps
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.1,           # on matrices only
        clip_norm=1.0,              # global-norm clipping; 0: off
    ))

    c.train = ml_collections.ConfigDict(dict(
        steps=1000,
        seed=0,
        workdir="runs/default",     # checkpoints, metrics.jsonl, config.json, tensorboard/
        log_every=10,
        eval_every=200,             # 0: no evaluation
        eval_batches=8,             # 0: the whole validation split
        checkpoint_every=200,       # 0: only at the end
        keep_last=3,
        keep_best=1,                # by validation loss
        async_checkpoint=True,
        z_loss=1e-4,
        moe_aux_weight=1e-2,
        peak_flops_per_device=800e12,  # bf16 dense peak used for MFU
        progress=True,              # tqdm progress bar
    ))

    c.mesh = ml_collections.ConfigDict(dict(
        data=-1,                    # data-parallel replicas; -1: all devices left
        fsdp=1,                     # params and optimizer state sharded over this many devices
    ))

    c.sample = ml_collections.ConfigDict(dict(
        prompt="ROMEO.\n",
        length=200,                 # tokens generated after training (0: none)
        temperature=0.8,            # 0: greedy
        top_p=0.95,                 # nucleus sampling
    ))
    return c
