"""Multi-head attention and its grouped forms (GQA, MQA): the baseline with CCA's interface.

Param pytree (E = d_model, H = num_q_heads, Hkv = num_kv_heads, d = head_dim):
  wq (E, H*d), wk (E, Hkv*d), wv (E, Hkv*d), wo (H*d, E)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ccajax._common import attend, lecun_normal, split_heads
from ccajax.config import MHAConfig, rotary_dims
from ccajax.rope import apply_rope


def init_mha_params(key: jax.Array, cfg: MHAConfig, dtype=jnp.float32) -> dict:
    """LeCun-normal projections (layout in the module docstring)."""
    E, Cq, Ckv = cfg.d_model, cfg.num_q_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    kq, kk, kv, ko = jax.random.split(key, 4)
    return {"wq": lecun_normal(kq, (E, Cq), dtype, E), "wk": lecun_normal(kk, (E, Ckv), dtype, E),
            "wv": lecun_normal(kv, (E, Ckv), dtype, E), "wo": lecun_normal(ko, (Cq, E), dtype, Cq)}


def mha_qkv(params: dict, x: jnp.ndarray, cfg: MHAConfig, positions: jnp.ndarray):
    """Projected, rotated q (B, S, H, d), k (B, S, Hkv, d) and v (B, S, Hkv, d) from x (B, S, E)."""
    rotary = rotary_dims(cfg.head_dim, cfg.rope_fraction)
    q = apply_rope(split_heads(x @ params["wq"], cfg.head_dim), positions,
                   theta=cfg.rope_theta, rotary_dim=rotary)
    k = apply_rope(split_heads(x @ params["wk"], cfg.head_dim), positions,
                   theta=cfg.rope_theta, rotary_dim=rotary)
    return q, k, split_heads(x @ params["wv"], cfg.head_dim)


def mha_attention(params: dict, x: jnp.ndarray, cfg: MHAConfig, *,
                  segment_ids: jnp.ndarray | None = None, positions: jnp.ndarray | None = None,
                  implementation: str | None = None, dtype=None) -> jnp.ndarray:
    """MHA / GQA / MQA layer; same arguments as `ccajax.cca_attention`.

    Args: params from `init_mha_params`; x (B, S, E); segment_ids (B, S) int or None;
      positions (S,) or (B, S) int or None; implementation: attention backend; dtype: compute dtype.
    Returns: y (B, S, E).
    """
    o, params = attend(params, x, cfg, init_mha_params, lambda p, x, pos, _: mha_qkv(p, x, cfg, pos),
                       segment_ids=segment_ids, positions=positions,
                       implementation=implementation, dtype=dtype)
    return o @ params["wo"]
