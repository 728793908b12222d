"""Multi-head latent attention (DeepSeek-V2): the low-rank KV baseline with CCA's interface.

Keys and values are up-projected from a per-token latent c_kv (r = kv_lora_rank, RMS-normed); a
separate RoPE key of d_r dims is shared by all heads. The KV cache holds c_kv and that key: r + d_r
values per token.

Param pytree (E = d_model, H = num_heads, dn/dr/dv = nope/rope/value head dims):
  wq (E, H*(dn+dr))                                 [q_lora_rank == 0]
  wq_a (E, rq), q_norm (rq,), wq_b (rq, H*(dn+dr))  [q_lora_rank == rq > 0]
  wkv_a (E, r+dr), kv_norm (r,), wkv_b (r, H*(dn+dv)), wo (H*dv, E)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ccajax._common import attend, lecun_normal, split_heads
from ccajax.config import MLAConfig
from ccajax.rope import apply_rope, stats_dtype


def init_mla_params(key: jax.Array, cfg: MLAConfig, dtype=jnp.float32) -> dict:
    """LeCun-normal projections and unit RMSNorm scales (layout in the module docstring)."""
    E, H, r = cfg.d_model, cfg.num_heads, cfg.kv_lora_rank
    dr, dv, dqk = cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.qk_head_dim
    keys = jax.random.split(key, 5)
    params = {
        "wkv_a": lecun_normal(keys[0], (E, r + dr), dtype, E),
        "kv_norm": jnp.ones((r,), dtype),
        "wkv_b": lecun_normal(keys[1], (r, H * (cfg.qk_nope_head_dim + dv)), dtype, r),
        "wo": lecun_normal(keys[2], (H * dv, E), dtype, H * dv),
    }
    if cfg.q_lora_rank:
        rq = cfg.q_lora_rank
        params.update(wq_a=lecun_normal(keys[3], (E, rq), dtype, E), q_norm=jnp.ones((rq,), dtype),
                      wq_b=lecun_normal(keys[4], (rq, H * dqk), dtype, rq))
    else:
        params["wq"] = lecun_normal(keys[3], (E, H * dqk), dtype, E)
    return params


def rms_norm(a: jnp.ndarray, scale: jnp.ndarray, eps: float) -> jnp.ndarray:
    """RMSNorm over the last axis, statistics in float32 or wider."""
    aw = a.astype(stats_dtype(a.dtype))
    aw = aw * jax.lax.rsqrt(jnp.mean(aw * aw, axis=-1, keepdims=True) + eps)
    return (aw * scale.astype(aw.dtype)).astype(a.dtype)


def mla_latent(params: dict, x: jnp.ndarray, cfg: MLAConfig, positions: jnp.ndarray):
    """What MLA caches per token: normed c_kv (B, S, r) and the rotated shared key (B, S, dr)."""
    c_kv, k_rope = jnp.split(x @ params["wkv_a"], [cfg.kv_lora_rank], axis=-1)
    c_kv = rms_norm(c_kv, params["kv_norm"], cfg.norm_eps)
    k_rope = apply_rope(k_rope[:, :, None, :], positions, theta=cfg.rope_theta,
                        rotary_dim=cfg.qk_rope_head_dim)[:, :, 0]
    return c_kv, k_rope


def mla_qkv(params: dict, x: jnp.ndarray, cfg: MLAConfig, positions: jnp.ndarray):
    """q (B, S, H, dn+dr), k (B, S, H, dn+dr), v (B, S, H, dv) from x (B, S, E)."""
    dn, dqk = cfg.qk_nope_head_dim, cfg.qk_head_dim
    if cfg.q_lora_rank:
        q = rms_norm(x @ params["wq_a"], params["q_norm"], cfg.norm_eps) @ params["wq_b"]
    else:
        q = x @ params["wq"]
    q_nope, q_rope = jnp.split(split_heads(q, dqk), [dn], axis=-1)
    q_rope = apply_rope(q_rope, positions, theta=cfg.rope_theta, rotary_dim=cfg.qk_rope_head_dim)
    c_kv, k_rope = mla_latent(params, x, cfg, positions)
    kv = split_heads(c_kv @ params["wkv_b"], dn + cfg.v_head_dim)
    k_nope, v = jnp.split(kv, [dn], axis=-1)
    k_rope = jnp.broadcast_to(k_rope[:, :, None, :], (*k_nope.shape[:3], cfg.qk_rope_head_dim))
    return (jnp.concatenate([q_nope, q_rope], axis=-1), jnp.concatenate([k_nope, k_rope], axis=-1), v)


def mla_attention(params: dict, x: jnp.ndarray, cfg: MLAConfig, *,
                  segment_ids: jnp.ndarray | None = None, positions: jnp.ndarray | None = None,
                  implementation: str | None = None, dtype=None) -> jnp.ndarray:
    """MLA layer; same arguments as `ccajax.cca_attention`. Scale 1/sqrt(dn+dr).

    Args: params from `init_mla_params`; x (B, S, E); segment_ids (B, S) int or None;
      positions (S,) or (B, S) int or None; implementation: attention backend; dtype: compute dtype.
    Returns: y (B, S, E).
    """
    o, params = attend(params, x, cfg, init_mla_params, lambda p, x, pos, _: mla_qkv(p, x, cfg, pos),
                       segment_ids=segment_ids, positions=positions,
                       implementation=implementation, dtype=dtype)
    return o @ params["wo"]
