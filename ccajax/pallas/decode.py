"""Decode attention (one query token per sequence over a KV cache): the dispatch and its jnp twin.

`decode_attention` is what every layer's decode step calls (`ccajax.decode`): ``"xla"`` runs
`decode_attention_reference`, ``"mosaic"`` the split-K Hopper kernel in `decode_sm90`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ccajax.pallas.sm90_common import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, over_batch
from ccajax.rope import stats_dtype

IMPLEMENTATIONS = ("xla", "mosaic")


def decode_attention_reference(q, k, v, lengths, *, scale: float | None = None):
    """Softmax attention of one query per sequence over the first ``lengths[b]`` cache rows, jnp.

    Args:
      q: (B, Hq, d) queries.
      k: (B, T, Hkv, d) key cache; Hkv divides Hq, query head h reads kv head h // (Hq // Hkv).
      v: (B, T, Hkv, dv) value cache.
      lengths: (B,) int, rows [0, lengths[b]) are attended.
      scale: score scale, default 1/sqrt(d).
    Returns:
      (B, Hq, dv) in q's dtype; scores and softmax in float32 (or wider); probabilities cast to
      v's dtype before the PV product, as the kernels do; 0 for a sequence of length 0.
    """
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    scale = head_dim ** -0.5 if scale is None else scale
    wide = stats_dtype(q.dtype)
    qg = q.reshape(batch, num_kv_heads, num_q_heads // num_kv_heads, head_dim)
    scores = jnp.einsum("bhgd,bthd->bhgt", qg, k, preferred_element_type=wide) * scale
    allowed = jnp.arange(k.shape[1])[None, :] < lengths[:, None]  # (B, T)
    scores = jnp.where(allowed[:, None, None, :], scores, -jnp.inf)
    top = jnp.max(scores, axis=-1, keepdims=True)
    probs = jnp.exp(scores - jnp.where(jnp.isfinite(top), top, 0.0))
    denom = probs.sum(axis=-1, keepdims=True)
    probs = probs / jnp.where(denom == 0.0, 1.0, denom)
    out = jnp.einsum("bhgt,bthd->bhgd", probs.astype(v.dtype), v, preferred_element_type=wide)
    return out.reshape(batch, num_q_heads, v.shape[-1]).astype(q.dtype)


def mosaic_block_kv(q, k, v) -> int | None:
    """The kernel's tile rows for these inputs (128, else 64, dividing T), or None when the
    Mosaic GPU kernel does not take them (dtype, head dims, group size or cache length)."""
    head_dim = q.shape[-1]
    if (jnp.dtype(q.dtype) not in SUPPORTED_DTYPES or not q.dtype == k.dtype == v.dtype
            or head_dim not in SUPPORTED_HEAD_DIMS or k.shape != v.shape or k.shape[3] != head_dim
            or q.shape[1] // k.shape[2] > 64):
        return None
    return next((b for b in (128, 64) if k.shape[1] % b == 0), None)


def _check(q, k, v, lengths):
    if q.ndim != 3 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q must be (B, Hq, d) and k, v (B, T, Hkv, d); got q {q.shape}, "
                         f"k {k.shape}, v {v.shape}")
    batch, num_q_heads, head_dim = q.shape
    if k.shape[0] != batch or v.shape[:3] != k.shape[:3] or k.shape[3] != head_dim:
        raise ValueError(f"k must be (B={batch}, T, Hkv, d={head_dim}) and v (B, T, Hkv, dv); got "
                         f"k {k.shape}, v {v.shape}")
    if num_q_heads % k.shape[2]:
        raise ValueError(f"kv heads Hkv={k.shape[2]} must divide query heads Hq={num_q_heads}")
    if jnp.shape(lengths) != (batch,) or not jnp.issubdtype(jnp.result_type(lengths), jnp.integer):
        raise ValueError(f"lengths must be integer of shape (B,) = ({batch},); got "
                         f"{jnp.shape(lengths)} {jnp.result_type(lengths)}")


def decode_attention(q, k, v, lengths, *, scale: float | None = None,
                     implementation: str | None = None, interpret: bool = False):
    """One decode step of attention, through the backend ``implementation`` names.

    Args:
      q: (B, Hq, d); k: (B, T, Hkv, d); v: (B, T, Hkv, dv); lengths: (B,) int (rows attended).
      scale: static score scale, default 1/sqrt(d).
      implementation: ``"xla"`` (`decode_attention_reference`, any dtype and shape),
        ``"mosaic"`` (the split-K Hopper kernel: bf16/fp16, d == dv in {64, 128}, T a multiple
        of 64, Hq/Hkv <= 64), or None: mosaic on a GPU when it takes the inputs, else xla.
      interpret: run the mosaic kernel on the CPU under Mosaic GPU interpret mode (tests).
    Returns:
      (B, Hq, dv) in q's dtype.
    """
    _check(q, k, v, lengths)
    block_kv = mosaic_block_kv(q, k, v)
    if implementation is None:
        on_gpu = jax.default_backend() == "gpu"
        implementation = "mosaic" if block_kv and (on_gpu or interpret) else "xla"
    if implementation == "xla":
        if interpret:
            raise ValueError("interpret=True runs the mosaic kernel; got implementation='xla'")
        return decode_attention_reference(q, k, v, lengths, scale=scale)
    if implementation == "mosaic":
        if block_kv is None:
            raise ValueError(
                f"implementation='mosaic' needs bf16/fp16 q, k, v, d == dv in {SUPPORTED_HEAD_DIMS}, "
                f"a cache length T that is a multiple of 64 and Hq/Hkv <= 64; got q {q.shape} "
                f"{q.dtype}, k {k.shape} {k.dtype}, v {v.shape}; use implementation='xla'")
        from ccajax.pallas import decode_sm90  # loads Mosaic GPU lazily
        kernel = lambda q, k, v, lengths: decode_sm90.decode_attention_sm90(
            q, k, v, lengths, scale=scale, block_kv=block_kv)
        if not interpret:
            return over_batch(kernel, q, k, v, lengths)  # per device under a mesh
        from jax.experimental.pallas import mosaic_gpu as plgpu
        with plgpu.force_gpu_interpret_mode():
            return kernel(q, k, v, lengths)
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}")
