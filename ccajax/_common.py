"""Input checks, initialisers and small array helpers shared by every attention layer."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ccajax.attention import dot_product_attention
from ccajax.rope import contiguous_segments, default_positions


def lecun_normal(key, shape, dtype, fan_in: int) -> jnp.ndarray:
    """Normal(0, 1/fan_in) weights: unit-variance activations through a linear map."""
    return (jax.random.normal(key, shape, jnp.float32) * fan_in ** -0.5).astype(dtype)


def torch_uniform(key, shape, dtype, fan_in: int) -> jnp.ndarray:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): torch's default Conv1d weight/bias init, which ZAYA1 trains from."""
    bound = fan_in ** -0.5
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def prepare_inputs(x, d_model: int, segment_ids, positions, dtype):
    """Validates a layer's inputs and fills defaults.

    Args:
      x: (B, S, E) floating layer input.
      d_model: the config's E.
      segment_ids: (B, S) integer ids or None; each maximal run of equal ids is one segment.
      positions: (B, S) or (S,) integer RoPE positions, or None for 0..S-1 (restarting per segment).
      dtype: compute dtype or None for x's dtype.
    Returns:
      (x cast to the compute dtype, positions (B, S) int32, run-numbered segment_ids or None).
    """
    x = jnp.asarray(x)
    if x.ndim != 3:
        raise ValueError(f"x must be (batch, seq_len, d_model={d_model}), got shape {x.shape}")
    if x.shape[-1] != d_model:
        raise ValueError(f"x has width {x.shape[-1]} but the config's d_model is {d_model}; x: {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be floating point (float32, bfloat16, float16), got dtype {x.dtype}")
    dtype = jnp.dtype(x.dtype if dtype is None else dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    batch, seq_len = x.shape[:2]
    if segment_ids is not None:
        segment_ids = jnp.asarray(segment_ids)
        if segment_ids.shape != (batch, seq_len) or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(
                f"segment_ids must be integer (batch, seq_len) = {(batch, seq_len)}, got "
                f"{segment_ids.shape} {segment_ids.dtype}")
        segment_ids = contiguous_segments(segment_ids)
    if positions is None:
        positions = default_positions(segment_ids, batch, seq_len)
    else:
        positions = jnp.asarray(positions)
        if positions.shape not in ((seq_len,), (batch, seq_len)) or not jnp.issubdtype(
                positions.dtype, jnp.integer):
            raise ValueError(
                f"positions must be integer (seq_len,) or (batch, seq_len) = {(batch, seq_len)}, got "
                f"{positions.shape} {positions.dtype}")
        positions = jnp.broadcast_to(positions, (batch, seq_len)).astype(jnp.int32)
    return x.astype(dtype), positions, segment_ids


def cast_tree(params, dtype):
    """Casts every array of a param pytree to the compute dtype."""
    return jax.tree.map(lambda p: jnp.asarray(p).astype(dtype), params)


def split_heads(a: jnp.ndarray, head_dim: int) -> jnp.ndarray:
    """(B, S, H*d) -> (B, S, H, d)."""
    return a.reshape(*a.shape[:-1], a.shape[-1] // head_dim, head_dim)


@functools.lru_cache(maxsize=256)
def _expected_shapes(init_fn, cfg) -> dict:
    expected = jax.eval_shape(lambda: init_fn(jax.random.key(0), cfg))
    return {jax.tree_util.keystr(p): s.shape for p, s in jax.tree_util.tree_leaves_with_path(expected)}


def check_params(params, init_fn, cfg) -> None:
    """Raises ValueError naming the first entry of ``params`` whose presence or shape differs from what
    ``init_fn(key, cfg)`` makes (shapes are static: nothing runs on the device)."""
    want = _expected_shapes(init_fn, cfg)
    got = {jax.tree_util.keystr(p): jnp.shape(a) for p, a in jax.tree_util.tree_leaves_with_path(params)}
    for path in sorted(want.keys() | got.keys()):
        if path not in got:
            raise ValueError(f"params lack {path} (shape {want[path]}) that this config needs: {cfg}")
        if path not in want:
            raise ValueError(f"params have {path} that this config does not use: {cfg}")
        if got[path] != want[path]:
            raise ValueError(f"params{path} has shape {got[path]}, expected {want[path]} for {cfg}")


def attend(params, x, cfg, init_fn, qkv_fn, *, segment_ids, positions, implementation, dtype):
    """The body every attention layer shares: checks, casts, q/k/v, then the dispatched attention.

    Args:
      params, x (B, S, E), cfg: the layer's params, input and config.
      init_fn: the layer's param initialiser (its shapes validate ``params``).
      qkv_fn: ``(params, x, positions, segment_ids) -> (q, k, v)`` on compute-dtype params.
      segment_ids, positions, implementation, dtype: as in `ccajax.cca_attention`.
    Returns:
      (o (B, S, Hq*dv) in the compute dtype, params cast to the compute dtype) for the up-projection.
    """
    check_params(params, init_fn, cfg)
    x, positions, segment_ids = prepare_inputs(x, cfg.d_model, segment_ids, positions, dtype)
    params = cast_tree(params, x.dtype)
    q, k, v = qkv_fn(params, x, positions, segment_ids)
    o = dot_product_attention(q, k, v, is_causal=cfg.causal, segment_ids=segment_ids,
                              implementation=implementation)
    return o.reshape(*x.shape[:2], -1), params
