"""Compressed Convolutional Attention (CCA) and CCGQA: the pure-functional core.

Each of CCA's ingredients is a small pure function (`compress`, `qk_mean`, `conv_mix`,
`value_shift`, `qk_normalize`, `latent_rope`) so that a researcher can reuse or swap any one;
`cca_qkv` composes them into attention-ready latent q, k, v, and `cca_attention` is the whole layer.
The maths is `../shared/CCA_SPEC.md` (ZAYA1 semantics by default).

Param pytree (see `init_cca_params`), E = d_model, Cq = Hq*d, Ckv = Hkv*d:
  compress: wq (E, Cq), wk (E, Ckv)
  conv:     w0 (t0, Cq+Ckv), b0 (Cq+Ckv,), w1 (t1, Hq+Hkv, d, d), b1 (Cq+Ckv,)   [if cfg.use_conv]
  value:    wv1 (E, Ckv/2), wv2 (E, Ckv/2)
  qk_norm:  temp (Hkv,)                                                           [if cfg.use_key_temperature]
  out:      wo (Cq, E)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ccajax._common import attend, lecun_normal, split_heads, torch_uniform
from ccajax.config import CCAConfig, rotary_dims
from ccajax.rope import apply_rope, default_positions, stats_dtype


def init_compress(key: jax.Array, cfg: CCAConfig, dtype=jnp.float32) -> dict:
    """{"wq" (E, Hq*d), "wk" (E, Hkv*d)}, LeCun-normal."""
    kq, kk = jax.random.split(key)
    return {"wq": lecun_normal(kq, (cfg.d_model, cfg.q_width), dtype, cfg.d_model),
            "wk": lecun_normal(kk, (cfg.d_model, cfg.kv_width), dtype, cfg.d_model)}


def init_conv(key: jax.Array, cfg: CCAConfig, dtype=jnp.float32) -> dict:
    """{"w0" (t0, C), "b0" (C,), "w1" (t1, Hq+Hkv, d, d), "b1" (C,)}, C = (Hq+Hkv)*d; torch's Conv1d
    default init (uniform in +-1/sqrt(fan_in)), which ZAYA1 trains from."""
    (t0, t1), d = cfg.conv_kernel_sizes, cfg.head_dim
    channels, heads = cfg.q_width + cfg.kv_width, cfg.num_q_heads + cfg.num_kv_heads
    k0, kb0, k1, kb1 = jax.random.split(key, 4)
    return {"w0": torch_uniform(k0, (t0, channels), dtype, t0),
            "b0": torch_uniform(kb0, (channels,), dtype, t0),
            "w1": torch_uniform(k1, (t1, heads, d, d), dtype, t1 * d),
            "b1": torch_uniform(kb1, (channels,), dtype, t1 * d)}


def init_value(key: jax.Array, cfg: CCAConfig, dtype=jnp.float32) -> dict:
    """{"wv1", "wv2"} each (E, Hkv*d/2), LeCun-normal."""
    k1, k2 = jax.random.split(key)
    shape = (cfg.d_model, cfg.kv_width // 2)
    return {"wv1": lecun_normal(k1, shape, dtype, cfg.d_model),
            "wv2": lecun_normal(k2, shape, dtype, cfg.d_model)}


def init_qk_norm(cfg: CCAConfig, dtype=jnp.float32) -> dict:
    """{"temp" (Hkv,)} at unit scale: 1 for the "linear" form, 0 for "exp"."""
    start = 1.0 if cfg.temperature_form == "linear" else 0.0
    return {"temp": jnp.full((cfg.num_kv_heads,), start, dtype)}


def init_out(key: jax.Array, cfg: CCAConfig, dtype=jnp.float32) -> dict:
    """{"wo" (Hq*d, E)}, LeCun-normal."""
    return {"wo": lecun_normal(key, (cfg.q_width, cfg.d_model), dtype, cfg.q_width)}


def init_cca_params(key: jax.Array, cfg: CCAConfig, dtype=jnp.float32) -> dict:
    """Random CCA/CCGQA parameters in ``dtype`` (layout in the module docstring); "conv" and
    "qk_norm" are present only when their ingredient is switched on."""
    k_compress, k_conv, k_value, k_out = jax.random.split(key, 4)
    params = {"compress": init_compress(k_compress, cfg, dtype),
              "value": init_value(k_value, cfg, dtype),
              "out": init_out(k_out, cfg, dtype)}
    if cfg.use_conv:
        params["conv"] = init_conv(k_conv, cfg, dtype)
    if cfg.use_key_temperature:
        params["qk_norm"] = init_qk_norm(cfg, dtype)
    return params


def compress(params: dict, x: jnp.ndarray, cfg: CCAConfig) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Down-projects x into the latent space.

    Args: params {"wq", "wk"}; x (B, S, E).
    Returns: q (B, S, Hq, d), k (B, S, Hkv, d).
    """
    return split_heads(x @ params["wq"], cfg.head_dim), split_heads(x @ params["wk"], cfg.head_dim)


def qk_mean(q: jnp.ndarray, k: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The q-k mean, taken before the convolutions.

    Args: q (B, S, Hq, d), k (B, S, Hkv, d); query head h pairs with kv head h // G.
    Returns: mq = (q + k[h // G]) / 2, (B, S, Hq, d); mk = mean of mq over each kv head's G query
      heads, (B, S, Hkv, d).
    """
    B, S, Hq, d = q.shape
    Hkv = k.shape[2]
    mq = (q.reshape(B, S, Hkv, Hq // Hkv, d) + k[:, :, :, None, :]) * 0.5
    return mq.reshape(B, S, Hq, d), mq.mean(axis=3)


def causal_shift(a: jnp.ndarray, lag: int, segment_positions: jnp.ndarray) -> jnp.ndarray:
    """a[t - lag] where that token exists in t's segment, else 0.

    Args: a (B, S, ...); lag >= 0; segment_positions (B, S): each token's index within its
      segment (0..S-1 for an unpacked sequence).
    """
    if lag == 0:
        return a
    shifted = jnp.pad(a, [(0, 0), (lag, 0)] + [(0, 0)] * (a.ndim - 2))[:, : a.shape[1]]
    valid = (segment_positions >= lag).reshape(*segment_positions.shape, *([1] * (a.ndim - 2)))
    return jnp.where(valid, shifted, jnp.zeros((), a.dtype))


def conv_mix(params: dict, q: jnp.ndarray, k: jnp.ndarray, cfg: CCAConfig,
             segment_positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Two-stage causal convolution over u = concat(q, k): depthwise over the sequence (t0 taps),
    then a per-head channel-mixing conv (t1 taps), both with bias.

    Written as c1[t] = b1 + sum_j c0_j[t] @ w1[t1-1-j] with c0_j[t] = b0 + sum_i w0[t0-1-i] *
    u[t-j-i]: u before the segment start is zero, while c0 there is its bias b0, which is exactly
    the semantics of zero-padding u once by (t0-1)+(t1-1) rows and running both convs valid
    (ZAYA1), and it carries over unchanged to packed segments.

    Args: params {"w0", "b0", "w1", "b1"} (shapes in the module docstring); q (B, S, Hq, d);
      k (B, S, Hkv, d); segment_positions (B, S).
    Returns: c1 split back into its q part (B, S, Hq, d) and k part (B, S, Hkv, d).
    """
    t0, t1 = cfg.conv_kernel_sizes
    B, S, Hq, d = q.shape
    u = jnp.concatenate([q, k], axis=2)  # (B, S, Hq+Hkv, d)
    w0 = params["w0"].reshape(t0, Hq + k.shape[2], d)
    b0 = params["b0"].reshape(-1, d)
    lagged = [causal_shift(u, lag, segment_positions) for lag in range(t0 + t1 - 1)]
    c1 = params["b1"].reshape(-1, d)
    for j in range(t1):
        c0_j = b0 + sum(w0[t0 - 1 - i] * lagged[j + i] for i in range(t0))
        c1 = c1 + jnp.einsum("bshi,hio->bsho", c0_j, params["w1"][t1 - 1 - j])
    return c1[:, :, :Hq], c1[:, :, Hq:]


def value_shift(params: dict, x: jnp.ndarray, cfg: CCAConfig,
                segment_positions: jnp.ndarray) -> jnp.ndarray:
    """Values from the current token (wv1) and, with ``cfg.use_value_shift``, the previous one (wv2).

    Args: params {"wv1", "wv2"}; x (B, S, E); segment_positions (B, S).
    Returns: v (B, S, Hkv, d) = concat(x @ wv1, shift(x) @ wv2) over channels, shift(x)[first] = 0.
    """
    previous = causal_shift(x, 1, segment_positions) if cfg.use_value_shift else x
    v = jnp.concatenate([x @ params["wv1"], previous @ params["wv2"]], axis=-1)
    return split_heads(v, cfg.head_dim)


def qk_normalize(q: jnp.ndarray, k: jnp.ndarray, cfg: CCAConfig,
                 temp: jnp.ndarray | None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """L2-normalises q and k to norm sqrt(d) (in float32 or wider), keys times the per-kv-head temperature.

    Args: q (B, S, Hq, d); k (B, S, Hkv, d); temp (Hkv,) or None for no temperature.
    Returns: q, k in their input dtype. The norm is clamped at the dtype's eps, so a zero vector
      stays zero instead of becoming NaN.
    """
    eps = jnp.finfo(q.dtype).eps
    scale = cfg.head_dim ** 0.5

    wide = stats_dtype(q.dtype)

    def unit(a):
        aw = a.astype(wide)
        return aw * (scale / jnp.maximum(jnp.linalg.norm(aw, axis=-1, keepdims=True), eps))

    q_n, k_n = unit(q), unit(k)
    if temp is not None:
        t = temp.astype(wide)
        k_n = k_n * (jnp.exp(t) if cfg.temperature_form == "exp" else t)[:, None]
    return q_n.astype(q.dtype), k_n.astype(k.dtype)


def latent_rope(q: jnp.ndarray, k: jnp.ndarray, positions: jnp.ndarray,
                cfg: CCAConfig) -> tuple[jnp.ndarray, jnp.ndarray]:
    """RoPE on the first rope_fraction*d dims of latent q (B,S,Hq,d) and k (B,S,Hkv,d)."""
    rotary = rotary_dims(cfg.head_dim, cfg.rope_fraction)
    return (apply_rope(q, positions, theta=cfg.rope_theta, rotary_dim=rotary),
            apply_rope(k, positions, theta=cfg.rope_theta, rotary_dim=rotary))


def cca_qkv(params: dict, x: jnp.ndarray, cfg: CCAConfig, positions: jnp.ndarray,
            segment_ids: jnp.ndarray | None = None):
    """Attention-ready latent q', k', v from the layer input (steps 1-7 of the spec).

    Args: params in the compute dtype; x (B, S, E); positions (B, S) int RoPE positions;
      segment_ids (B, S) or None (convolutions and the value shift do not cross segments).
    Returns: q (B, S, Hq, d), k (B, S, Hkv, d), v (B, S, Hkv, d).
    """
    segment_positions = default_positions(segment_ids, *x.shape[:2])
    q, k = compress(params["compress"], x, cfg)
    mq, mk = qk_mean(q, k) if cfg.use_qk_mean else (0.0, 0.0)
    if cfg.use_conv:
        q, k = conv_mix(params["conv"], q, k, cfg, segment_positions)
    q, k = q + mq, k + mk
    v = value_shift(params["value"], x, cfg, segment_positions)
    temp = params["qk_norm"]["temp"] if cfg.use_key_temperature else None
    q, k = qk_normalize(q, k, cfg, temp)
    q, k = latent_rope(q, k, positions, cfg)
    return q, k, v


# How `cca_attention` makes q/k/v: the reference functions of this module, or `ccajax.cca_fused`
# with its prologue in jnp or in the Mosaic GPU kernel.
PROLOGUES = ("plain", "jnp", "mosaic")


def cca_attention(params: dict, x: jnp.ndarray, cfg: CCAConfig, *,
                  segment_ids: jnp.ndarray | None = None, positions: jnp.ndarray | None = None,
                  implementation: str | None = None, dtype=None,
                  prologue: str | None = None) -> jnp.ndarray:
    """The CCA / CCGQA attention layer.

    Args:
      params: pytree from `init_cca_params` (any float dtype; cast to the compute dtype).
      x: (B, S, E) layer input (after the block's pre-norm).
      cfg: the layer's `CCAConfig`.
      segment_ids: (B, S) int for packed sequences; a segment is a maximal run of equal ids.
        Attention, the convolutions and the value shift stay inside a segment, and default
        positions restart at each segment.
      positions: (S,) or (B, S) int RoPE positions; default 0..S-1 (per segment).
      implementation: attention backend for `ccajax.attention.dot_product_attention`.
      dtype: compute dtype; default x's dtype.
      prologue: how q/k/v are made: "plain" (this module's functions, the reference), or the
        fused path of `ccajax.cca_fused` (one down-projection matmul; same results to rounding)
        with its prologue in "jnp" or in the "mosaic" kernel (Hopper); None: chosen by
        `cca_fused.default_prologue` (mosaic on Hopper where measured faster, jnp on other
        GPUs, plain on the CPU).
    Returns:
      y (B, S, E) in the compute dtype.
    """
    if prologue not in (None, *PROLOGUES):
        raise ValueError(f"prologue must be one of {PROLOGUES} or None, got {prologue!r}")
    if prologue is None:
        from ccajax.cca_fused import default_prologue  # imports this module

        prologue = default_prologue(cfg, dtype or x.dtype)
    if prologue == "plain":
        qkv = cca_qkv
    else:
        from ccajax.cca_fused import cca_qkv_fused  # imports this module

        def qkv(p, x, cfg, pos, seg):
            return cca_qkv_fused(p, x, cfg, pos, seg, prologue=prologue)
    o, params = attend(params, x, cfg, init_cca_params,
                       lambda p, x, pos, seg: qkv(p, x, cfg, pos, seg),
                       segment_ids=segment_ids, positions=positions,
                       implementation=implementation, dtype=dtype)
    return o @ params["out"]["wo"]
