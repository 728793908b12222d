"""Rotary position embedding (rotate-half / NeoX form), full or partial."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def stats_dtype(dtype) -> jnp.dtype:
    """float32 for 16-bit inputs, the input's own dtype when it is wider (float64 references)."""
    return jnp.promote_types(dtype, jnp.float32)


def _segment_starts(segment_ids: jnp.ndarray) -> jnp.ndarray:
    """(B, S) bool: True at the first token of each maximal run of equal ids."""
    first = jnp.ones((segment_ids.shape[0], 1), bool)
    return jnp.concatenate([first, segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)


def contiguous_segments(segment_ids: jnp.ndarray) -> jnp.ndarray:
    """Renumbers (B, S) ids so that each maximal run of equal ids is its own segment (int32).

    Layers use runs as segments everywhere (attention, convolutions, value shift, positions), so an
    id reused later in a row, e.g. [0, 0, 1, 1, 0, 0], starts a new segment rather than joining
    the earlier one.
    """
    return jnp.cumsum(_segment_starts(segment_ids), axis=1, dtype=jnp.int32)


def default_positions(segment_ids: jnp.ndarray | None, batch: int, seq_len: int) -> jnp.ndarray:
    """Token positions (B, S) int32: 0..S-1, or restarting at 0 at each segment start.

    Args:
      segment_ids: (B, S) int or None. Where given, a position counts from its segment's first token.
    """
    index = jnp.arange(seq_len, dtype=jnp.int32)
    if segment_ids is None:
        return jnp.broadcast_to(index, (batch, seq_len))
    # Index of the latest segment start at or before each token.
    last_start = lax.cummax(jnp.where(_segment_starts(segment_ids), index, 0), axis=1)
    return index - last_start


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, *, theta: float, rotary_dim: int) -> jnp.ndarray:
    """Rotates the first ``rotary_dim`` dims of every head by its position; the rest pass through.

    Frequencies ``theta ** (-2i / rotary_dim)``, angles in float32 (or wider inputs' dtype), rotate-half pairing (i, i + r/2)
    within the rotated dims (as ZAYA1 and Hugging Face's NeoX form do).

    Args:
      x: (B, S, H, d) queries or keys.
      positions: (B, S) integer positions.
      theta: RoPE base.
      rotary_dim: even number of leading dims to rotate, 0 <= rotary_dim <= d.
    Returns:
      (B, S, H, d), dtype of ``x``.
    """
    if rotary_dim == 0:
        return x
    half = rotary_dim // 2
    wide = stats_dtype(x.dtype)
    inv_freq = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=wide) / rotary_dim))
    angles = positions.astype(wide)[..., None] * inv_freq  # (B, S, r/2)
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    xw = x.astype(wide)
    x1, x2, rest = xw[..., :half], xw[..., half:rotary_dim], xw[..., rotary_dim:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return rotated.astype(x.dtype)
