"""The one dispatch point for the attention step, and its plain-jnp reference.

Every attention in ccajax (CCA, CCGQA, MHA, GQA, MQA, MLA) calls :func:`dot_product_attention`;
backends are added here and nowhere else.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ccajax.pallas.sm90_common import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS
from ccajax.rope import stats_dtype

IMPLEMENTATIONS = ("xla", "cudnn", "mosaic", "mosaic_deterministic", "mosaic_fwd_cudnn_bwd")
# The mosaic implementations and the backward each of them runs (`mosaic_attention`).
_MOSAIC_BACKWARDS = {"mosaic": "mosaic", "mosaic_deterministic": "mosaic_deterministic",
                     "mosaic_fwd_cudnn_bwd": "cudnn"}
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def attention_mask(seq_q: int, seq_k: int, *, is_causal: bool,
                   segment_ids: jnp.ndarray | None) -> jnp.ndarray | None:
    """Boolean mask (B or 1, 1, 1, Sq, Sk) of allowed query-key pairs, or None when all are allowed.

    Causal masks align the last query with the last key (queries are the newest Sq of Sk tokens).
    """
    mask = None
    if is_causal:
        q_pos = jnp.arange(seq_q)[:, None] + (seq_k - seq_q)
        mask = (q_pos >= jnp.arange(seq_k)[None, :])[None, None, None]
    if segment_ids is not None:
        same = segment_ids[:, -seq_q:, None] == segment_ids[:, None, :]
        same = same[:, None, None]
        mask = same if mask is None else mask & same
    return mask


def reference_attention(q, k, v, *, is_causal: bool = False, scale: float | None = None,
                        segment_ids: jnp.ndarray | None = None) -> jnp.ndarray:
    """Softmax attention with grouped kv heads, in plain jnp (scores and softmax statistics in fp32 or wider).

    Args:
      q: (B, Sq, Hq, d) queries.
      k: (B, Sk, Hkv, d) keys; Hkv divides Hq, query head h uses kv head h // (Hq // Hkv).
      v: (B, Sk, Hkv, dv) values.
      is_causal: mask keys after each query (last query aligned with last key).
      scale: score scale; default 1/sqrt(d).
      segment_ids: (B, S) int, S == Sq == Sk: tokens attend only within their segment.
    Returns:
      (B, Sq, Hq, dv) in q's dtype. A query with no allowed key gets 0, never NaN.
    """
    batch, seq_q, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_q_heads // num_kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    # GQA without repeating k/v in memory: query heads of one kv head form a group axis.
    qg = q.reshape(batch, seq_q, num_kv_heads, group, head_dim)
    wide = stats_dtype(q.dtype)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=wide) * scale
    mask = attention_mask(seq_q, k.shape[1], is_causal=is_causal, segment_ids=segment_ids)
    # Masks are applied as additive biases and guards as additions, not as jnp.where on
    # differentiated values: jax 0.11.2 fails to transpose select_n inside shard_map on an
    # Explicit mesh (ShardingTypeError).
    if mask is not None:
        scores = scores + jnp.where(mask, 0.0, -jnp.inf).astype(wide)
    row_max = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # fully masked row: exp(-inf) = 0
    probs = jnp.exp(scores - row_max)
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    probs = probs / (denom + (denom == 0.0).astype(wide))  # a fully masked row divides 0 by 1
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v,
                     preferred_element_type=wide)
    return out.reshape(batch, seq_q, num_q_heads, v.shape[-1]).astype(q.dtype)


def _check_inputs(q, k, v, segment_ids):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"q, k, v must be (B, S, H, d); got q {q.shape}, k {k.shape}, v {v.shape}")
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0]:
        raise ValueError(
            f"k and v must share (B, Sk, Hkv) and q the batch B; got q {q.shape}, k {k.shape}, v {v.shape}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head dims differ: q {q.shape[-1]}, k {k.shape[-1]}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(
            f"kv heads ({k.shape[2]}) must divide query heads ({q.shape[2]}): q {q.shape}, k {k.shape}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if segment_ids is not None:
        if q.shape[1] != k.shape[1]:
            raise ValueError(f"segment_ids need Sq == Sk, got Sq={q.shape[1]}, Sk={k.shape[1]}")
        if segment_ids.shape != q.shape[:2]:
            raise ValueError(f"segment_ids must be (B, S) = {q.shape[:2]}, got {segment_ids.shape}")


def _cudnn_supports(q, v, segment_ids) -> bool:
    """What the cuDNN path takes here: bf16/fp16, equal q/v head dims, no segment ids."""
    return q.dtype in _CUDNN_DTYPES and v.shape[-1] == q.shape[-1] and segment_ids is None


def _mosaic_supports(q, v) -> bool:
    """What our sm90 kernels take: bf16/fp16, d in {64, 128}, equal q/v head dims."""
    return (q.dtype in SUPPORTED_DTYPES and q.shape[-1] in SUPPORTED_HEAD_DIMS
            and v.shape[-1] == q.shape[-1])


def on_hopper() -> bool:
    device = jax.devices()[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9.")


def default_implementation(q, k, v, segment_ids, is_causal: bool = False) -> str:
    """On Hopper (compute capability 9.x), "mosaic" (our kernels both ways) when they take the
    call; elsewhere cudnn on a GPU when it takes the call, else xla.

    Why (H200, 2026-12-02, sustained windows): our forward beats cuDNN's in every cell timed
    (1.08-1.26x causal and 1.01-1.04x non-causal at 4k and 16k), and in whole layers (MHA,
    CCA 8:8 and 4:4, CCGQA 8:2: non-causal 4k-32k, causal 16k-32k; CCGQA 4:2 causal 16k-32k)
    our backward is ahead of cuDNN's after our forward ("mosaic_fwd_cudnn_bwd") or within 0.2%
    of it (benchmarks/results/layers_h200_2026-12-02_own_bwd_*.json and ..._group_splits.json;
    shorter causal sequences favour ours more: attention alone at 4k 8:2, 489 against 425 TF/s).
    The last layers where cuDNN's backward won, causal CCGQA 8:2 beyond 8k (by 0.7-1.1%), went
    ours once the dK/dV kernel split each kv head's group of query heads over several CTAs
    (``attention_bwd_sm90.default_group_splits``). Our kernels also take segment ids and odd
    lengths, which send cuDNN calls to xla. cuDNN needs bf16/fp16, equal q/v head dims and no
    segments here; its backward (jax 0.11.2, cuDNN 9.19 on H100) raises NotImplementedError
    for odd sequence lengths, so those go to xla.
    """
    del is_causal  # kept for callers: since 2026-12-02 no rule depends on the mask
    if jax.default_backend() != "gpu":
        return "xla"
    if on_hopper() and _mosaic_supports(q, v):
        return "mosaic"
    even = q.shape[1] % 2 == 0 and k.shape[1] % 2 == 0
    return "cudnn" if even and _cudnn_supports(q, v, segment_ids) else "xla"


def dot_product_attention(q, k, v, *, is_causal: bool = False, scale: float | None = None,
                          segment_ids: jnp.ndarray | None = None,
                          implementation: str | None = None, interpret: bool = False) -> jnp.ndarray:
    """Softmax attention with GQA, through the backend ``implementation`` names.

    Args:
      q: (B, Sq, Hq, d); k: (B, Sk, Hkv, d); v: (B, Sk, Hkv, dv); Hkv divides Hq.
      is_causal: causal mask (last query aligned with last key).
      scale: score scale, default 1/sqrt(d).
      segment_ids: (B, S) int32 for packed sequences (needs Sq == Sk).
      implementation: ``"xla"`` (plain jnp, always available), ``"cudnn"``
        (``jax.nn.dot_product_attention``, GPU, bf16/fp16, d == dv, no segment_ids; its backward
        needs even lengths), ``"mosaic"`` (our Pallas Mosaic GPU kernels, Hopper, bf16/fp16,
        d in {64, 128}; dq summed with atomics where d allows), ``"mosaic_deterministic"`` (the
        same with a separate dq kernel: bit-identical gradients run to run),
        ``"mosaic_fwd_cudnn_bwd"`` (our forward kernel, cuDNN's backward kernel
        on its residuals: as mosaic, plus no segment_ids, even lengths, Sq == Sk when causal),
        or None for :func:`default_implementation` (mosaic on Hopper, else cudnn where it
        applies, else xla).
      interpret: run the mosaic kernels on the CPU in Mosaic GPU interpret mode (for tests);
        needs ``implementation`` None, ``"mosaic"`` or ``"mosaic_deterministic"``.
    Returns:
      (B, Sq, Hq, dv) in q's dtype.
    """
    _check_inputs(q, k, v, segment_ids)
    if interpret and implementation not in (None, "mosaic", "mosaic_deterministic"):
        raise ValueError(f"interpret=True runs the mosaic kernel; got implementation={implementation!r}")
    if implementation is None:
        implementation = ("mosaic" if interpret else
                          default_implementation(q, k, v, segment_ids, is_causal))
    if implementation == "xla":
        return reference_attention(q, k, v, is_causal=is_causal, scale=scale, segment_ids=segment_ids)
    if implementation == "cudnn":
        if not _cudnn_supports(q, v, segment_ids):
            raise ValueError(
                f"implementation='cudnn' needs bf16/fp16 inputs, d == dv and no segment_ids; got dtype "
                f"{q.dtype}, d={q.shape[-1]}, dv={v.shape[-1]}, segment_ids "
                f"{'given' if segment_ids is not None else 'None'}; use implementation='xla'")
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=is_causal,
                                            implementation="cudnn")
    if implementation in _MOSAIC_BACKWARDS:
        # Imported here: Pallas' Mosaic GPU modules load only when the kernel is asked for.
        from ccajax.pallas.attention import mosaic_attention
        return mosaic_attention(q, k, v, is_causal=is_causal, scale=scale, segment_ids=segment_ids,
                                interpret=interpret, backward=_MOSAIC_BACKWARDS[implementation])
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}")
