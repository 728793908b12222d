"""The fused CCA/CCGQA path: `cca.cca_qkv`'s function, restructured for speed on GPU.

What changes against the plain path (which stays the reference, `ccajax.cca`):
- One down-projection matmul ``x @ [Wq | Wk | Wv1 | Wv2]``. The value shift commutes with a
  row-wise linear map (``shift(x) @ Wv2 == shift(x @ Wv2)``, both zero at a segment start), so the
  previous-token values come out of the same matmul and are shifted afterwards: no copy of x.
- The prologue (convolutions, q-k mean, normalisation with temperature, RoPE) works on that
  matmul's output directly, either in jnp (`fused_prologue`: both conv1 taps are one einsum over
  stacked conv0 taps, and the element-wise tail runs in float32 and rounds once, so XLA fuses it
  into few passes) or in one Pallas kernel (`ccajax.pallas.prologue_sm90`, Hopper).

Same maths as the spec (`../shared/CCA_SPEC.md`), same segment semantics as `ccajax.cca`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ccajax._common import split_heads
from ccajax.cca import causal_shift, latent_rope, qk_mean, qk_normalize
from ccajax.config import CCAConfig
from ccajax.rope import default_positions, stats_dtype

FUSED_PROLOGUES = ("jnp", "mosaic")


def default_prologue(cfg: CCAConfig, dtype) -> str:
    """The prologue `cca.cca_attention` uses when none is named.

    - "mosaic" (the sm90 kernel) on a Hopper GPU for the configs and dtypes the kernel takes
      (`prologue_sm90.unsupported_reason`); under a mesh it runs per device (`over_batch`).
      Measured on H200s (2026-11-30): the CCA C=2 layer at S=16k causal (d=128) forward 1.50 ms
      vs 1.61 with the jnp prologue, forward+backward 5.72 vs 6.02 ms, faster in every cell
      timed (benchmarks/results/layers_h200_2026-11-30_16k_causal_v2.json); `small` training
      (d=64) 43.3% MFU vs 39.7% with "jnp" on one GPU
      (benchmarks/results/train_small_h200_2026-11-30_loss.json), and on two GPUs 1,885,229
      tokens/s vs 1,718,743 with "jnp"
      (benchmarks/results/train_small_h200x2_2026-11-30_kernel_prologue.json).
    - "jnp" (the XLA-fused path) on other GPUs and for configs the kernel does not take: in
      `small` training on an H200 it ran 1-4% more tokens/s than "plain" on one and two GPUs.
    - "plain" (the reference functions) off the GPU.
    """
    if jax.default_backend() != "gpu":
        return "plain"
    from ccajax.attention import on_hopper  # imports Pallas' sm90 helpers: GPU only

    if on_hopper():
        from ccajax.pallas.prologue_sm90 import unsupported_reason

        if unsupported_reason(cfg, dtype) is None:
            return "mosaic"
    return "jnp"


def down_weights(params: dict, cfg: CCAConfig) -> jnp.ndarray:
    """(E, Cq + Ckv + Ckv) = [Wq | Wk | Wv1 | Wv2], the one down-projection matrix."""
    return jnp.concatenate([params["compress"]["wq"], params["compress"]["wk"],
                            params["value"]["wv1"], params["value"]["wv2"]], axis=1)


def fused_projection(params: dict, x: jnp.ndarray, cfg: CCAConfig,
                     segment_positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """One matmul for every down-projection.

    Args: params in the compute dtype; x (B, S, E); segment_positions (B, S).
    Returns: p (B, S, Hq+2*Hkv, d), the matmul's output as heads: q heads, k heads (together the
      pre-conv concat u), then the value channels; v (B, S, Hkv, d) with the value shift.
    """
    cqk, half = cfg.q_width + cfg.kv_width, cfg.kv_width // 2
    p = x @ down_weights(params, cfg)
    v2 = p[..., cqk + half:]
    if cfg.use_value_shift:
        v2 = causal_shift(v2, 1, segment_positions)
    v = jnp.concatenate([p[..., cqk:cqk + half], v2], axis=-1)
    return split_heads(p, cfg.head_dim), split_heads(v, cfg.head_dim)


def _conv_stacked(conv: dict, u: jnp.ndarray, cfg: CCAConfig, segment_positions) -> jnp.ndarray:
    """`cca.conv_mix` on the concat u (B, S, Hu, d), both conv1 taps as one einsum.

    c1[t] = b1 + sum_j c0_j[t] @ w1[t1-1-j], with c0_j[t] (conv0 at t - j, b0 before the segment)
    computed in float32 and stacked over j: one matmul with contraction over (j, d).
    Returns c1 (B, S, Hu, d) in u's dtype (the einsum accumulates in float32).
    """
    t0, t1 = cfg.conv_kernel_sizes
    heads, d = u.shape[2], u.shape[3]
    wide = stats_dtype(u.dtype)
    w0 = conv["w0"].astype(wide).reshape(t0, heads, d)
    b0 = conv["b0"].astype(wide).reshape(heads, d)
    lagged = [causal_shift(u, lag, segment_positions).astype(wide) for lag in range(t0 + t1 - 1)]
    c0 = jnp.stack([b0 + sum(w0[t0 - 1 - i] * lagged[j + i] for i in range(t0))
                    for j in range(t1)], axis=2).astype(u.dtype)  # (B, S, t1, Hu, d)
    w1 = conv["w1"][::-1]  # tap j of the stack pairs with w1[t1-1-j]
    c1 = jnp.einsum("bsjhi,jhio->bsho", c0, w1)
    return c1 + conv["b1"].reshape(heads, d).astype(u.dtype)


def fused_prologue(conv: dict | None, temp: jnp.ndarray | None, u: jnp.ndarray, cfg: CCAConfig,
                   positions: jnp.ndarray, segment_positions: jnp.ndarray):
    """Steps 2-7 of the spec on the pre-conv concat u, in plain jnp shaped for XLA's fusion.

    Args: conv params (or None without conv); temp (Hkv,) or None; u (B, S, Hq+Hkv, d);
      positions, segment_positions (B, S) int.
    Returns: q' (B, S, Hq, d), k' (B, S, Hkv, d) in u's dtype.
    """
    hq = cfg.num_q_heads
    wide = stats_dtype(u.dtype)
    c = _conv_stacked(conv, u, cfg, segment_positions) if cfg.use_conv else u
    # q and k are separate expressions from here (not one array sliced later) so that XLA writes
    # the attention's two inputs straight from the fused tail.
    q, k = c[:, :, :hq].astype(wide), c[:, :, hq:].astype(wide)
    if cfg.use_qk_mean:
        mq, mk = qk_mean(u[:, :, :hq].astype(wide), u[:, :, hq:].astype(wide))
        q, k = q + mq, k + mk
    q, k = qk_normalize(q, k, cfg, temp)
    q, k = latent_rope(q, k, positions, cfg)
    return q.astype(u.dtype), k.astype(u.dtype)


def cca_qkv_fused(params: dict, x: jnp.ndarray, cfg: CCAConfig, positions: jnp.ndarray,
                  segment_ids: jnp.ndarray | None = None, *, prologue: str = "jnp",
                  interpret: bool = False):
    """`cca.cca_qkv` through the fused path: same arguments, same results to bf16 rounding.

    Args: params in the compute dtype; x (B, S, E); positions (B, S) int; segment_ids (B, S) or
      None; prologue: "jnp" (`fused_prologue`, XLA-fused) or "mosaic" (the sm90 kernel,
      `ccajax.pallas.prologue_sm90`, segments included); interpret: run that kernel on the CPU.
    Returns: q (B, S, Hq, d), k (B, S, Hkv, d), v (B, S, Hkv, d).
    """
    if prologue not in FUSED_PROLOGUES:
        raise ValueError(f"prologue must be one of {FUSED_PROLOGUES}, got {prologue!r}")
    segment_positions = default_positions(segment_ids, *x.shape[:2])
    p, v = fused_projection(params, x, cfg, segment_positions)
    temp = params["qk_norm"]["temp"] if cfg.use_key_temperature else None
    if prologue == "mosaic":
        # Imported here: Pallas' Mosaic GPU modules load only when the kernel is asked for.
        from ccajax.pallas.prologue_sm90 import mosaic_prologue
        q, k = mosaic_prologue(p, params.get("conv"), temp, positions, segment_positions, cfg,
                               interpret=interpret)
    else:
        u = p[:, :, :cfg.num_q_heads + cfg.num_kv_heads]
        q, k = fused_prologue(params.get("conv"), temp, u, cfg, positions, segment_positions)
    return q, k, v
