"""Named option sets of `attention_fwd` that the forward benchmarks compare, and the inputs
and jitted forwards of one cell (no flags: importable by every script)."""

import jax
import jax.numpy as jnp

from ccajax.pallas.attention_fwd_sm90 import attention_fwd

HEAD_DIM = 128

CONFIGS = {
    "default": {},
    # The next k tile awaited at the top of each step (the causal default since 2026-12-02,
    # session 24) or while P v runs (the non-causal default).
    "late_k": dict(early_k_wait=False),
    "early_k": dict(early_k_wait=True),
    # Before session 24: causal diagonal steps on the whole tile, masked, early k wait.
    "wide_diagonal_early_k": dict(narrow_diagonal=False, early_k_wait=True),
    "wide_diagonal": dict(narrow_diagonal=False),
    "rendezvous": dict(oneway_pingpong=False),  # both warpgroups meet twice per step (mbarriers)
    # One CTA per tile: the causal default, and the non-causal one above 4k before session 25.
    "per_tile_grid": dict(persistent=False),
    "persistent_grid": dict(persistent=True),  # causal: longest tiles first, snake rounds
    # Each next tile's q loaded early: the non-causal default since session 25 (persistent).
    "prefetch_q": dict(prefetch_q=True),
    "no_prefetch_q": dict(prefetch_q=False),
    # The partly filled last round's tiles split along the keys (session 26): the non-causal
    # default where that saves each CTA SPLIT_TAIL_MIN_SAVED_STEPS kv steps; off; always.
    "no_split_tail": dict(split_tail=False),
    "split_tail": dict(split_tail=True),
    "persistent_prefetch_q": dict(persistent=True, prefetch_q=True),
    "stages3": dict(kv_stages=3),
    # Before 2026-12-01 (session 12): mbarriers for turns and slots, Pallas' warpgroup syncs.
    "mbarriers_auto": dict(named_barriers=False, auto_barriers=True),
    "mbarriers": dict(named_barriers=False),
    "auto_barriers": dict(auto_barriers=True),
    # Before 2026-12-02 (session 18): the producer's copies and slot syncs on all four warps.
    "warpgroup_producer": dict(single_warp_producer=False),
    # Clusters of 2 CTAs on adjacent q blocks sharing each k/v tile by TMA multicast: the
    # default since 2026-12-02 (session 20) except causal Sk <= 4096; "unpaired" is the former.
    "kv_multicast": dict(kv_multicast=True),
    "unpaired": dict(kv_multicast=False),
    "persistent_kv_multicast": dict(persistent=True, kv_multicast=True),
    "persistent_prefetch_q_kv_multicast": dict(persistent=True, prefetch_q=True,
                                               kv_multicast=True),
}


def cell_inputs(batch: int, seq: int, hq: int, hkv: int):
    """Random bf16 q (B, S, Hq, d), k and v (B, S, Hkv, d) of one cell, seeded by its heads."""
    keys = jax.random.split(jax.random.key(hq * 7 + hkv), 3)
    q = jax.random.normal(keys[0], (batch, seq, hq, HEAD_DIM), jnp.bfloat16)
    k, v = (jax.random.normal(key, (batch, seq, hkv, HEAD_DIM), jnp.bfloat16)
            for key in keys[1:])
    return q, k, v


def forward_flops(batch: int, seq: int, hq: int, causal: bool) -> float:
    """4*B*S^2*Hq*d, halved when causal."""
    return 4 * batch * seq**2 * hq * HEAD_DIM * (0.5 if causal else 1.0)


def forward_runs(fns: dict, peer_names, config_names, causal: bool, prefix: str = "") -> dict:
    """name -> jitted (q, k, v) -> out: each peer of ``fns`` (`benchmarks.peers.peers`) named in
    ``peer_names``, then ``attention_fwd`` with each of ``config_names``'s CONFIGS (its name
    after ``prefix``)."""
    runs = {p: jax.jit(lambda q, k, v, p=p: fns[p](q, k, v, causal)) for p in peer_names}
    runs.update({prefix + n: jax.jit(lambda q, k, v, cfg=CONFIGS[n]: attention_fwd(
        q, k, v, is_causal=causal, scale=None, **cfg)[0]) for n in config_names})
    return runs
