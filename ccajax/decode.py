"""Per-layer decoding: a preallocated decode state, prefill of a prompt, one-token decode steps.

Functional, dispatching on the config type (CCA/CCGQA, MHA/GQA/MQA, MLA) and built from the
layers' own pure functions (`ccajax.cca`, `ccajax.mha`, `ccajax.mla`)::

    state = init_decode_state(cfg, batch, max_len, jnp.bfloat16)
    y, state = prefill(params, x, cfg, state, lengths)      # x (B, S, E), lengths (B,)
    y_t, state = decode_step(params, x_t, cfg, state)        # x_t (B, E): one token per sequence

Decode states (NamedTuples, so pytrees; spec: ``../shared/CCA_SPEC.md``, Decoding):
  `KVCache` (MHA/GQA/MQA): k, v (B, T, Hkv, d), lengths (B,).
  `CCACache` (CCA/CCGQA): latent k (after norm, temperature and RoPE) and v (B, T, Hkv, d); conv
    (B, (t0-1)+(t1-1), Hq+Hkv, d), the last raw pre-conv q/k rows u; x_prev (B, E), the previous
    token's layer input for the value shift; lengths (B,). conv / x_prev are None when their
    ingredient is switched off.
  `MLACache`: latent (B, T, r + dr), the normed c_kv and the rotated shared rope key; lengths.
``lengths[b]`` is the number of cached tokens of sequence b, which is also the RoPE position of
its next token: batches are ragged. T (max_len) is fixed at allocation.

Overflow: a step on a sequence whose cache is full raises ValueError when the lengths are
concrete (eager calls); under jit it cannot raise, so that sequence's output is NaN and the cache
is left unchanged (``generate`` checks the bound statically before it compiles).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ccajax import cca, mha, mla
from ccajax._common import attend, cast_tree, check_params
from ccajax.config import CCAConfig, MHAConfig, MLAConfig, check_positive_int
from ccajax.costs import kv_cache_values_per_token
from ccajax.pallas.decode import decode_attention


class KVCache(NamedTuple):
    k: jax.Array
    v: jax.Array
    lengths: jax.Array


class CCACache(NamedTuple):
    k: jax.Array
    v: jax.Array
    conv: jax.Array | None
    x_prev: jax.Array | None
    lengths: jax.Array


class MLACache(NamedTuple):
    latent: jax.Array
    lengths: jax.Array


_LAYERS = {CCAConfig: cca.init_cca_params, MHAConfig: mha.init_mha_params,
           MLAConfig: mla.init_mla_params}


def _init_fn(cfg):
    if type(cfg) not in _LAYERS:
        raise ValueError(f"cfg must be a CCAConfig, MHAConfig or MLAConfig, got {type(cfg).__name__}")
    if not cfg.causal:
        raise ValueError(f"decoding needs a causal layer; got cfg.causal=False in {cfg}")
    return _LAYERS[type(cfg)]


def init_decode_state(cfg, batch: int, max_len: int, dtype=jnp.float32):
    """An empty decode state (zeros, lengths 0) for ``batch`` sequences of up to ``max_len`` tokens.

    Args:
      cfg: the layer's CCAConfig, MHAConfig or MLAConfig (causal).
      batch, max_len: sequences and cache rows T. A multiple of 64 lets the Mosaic GPU decode
        kernel run (``ccajax.pallas.decode``); other lengths use the jnp path.
      dtype: the cache's dtype (bf16 for serving; float32 for exact checks).
    Returns:
      `KVCache`, `CCACache` or `MLACache` (module docstring).
    """
    _init_fn(cfg)
    check_positive_int("batch", batch)
    check_positive_int("max_len", max_len)
    lengths = jnp.zeros((batch,), jnp.int32)
    if isinstance(cfg, MLAConfig):
        return MLACache(jnp.zeros((batch, max_len, cfg.kv_lora_rank + cfg.qk_rope_head_dim), dtype),
                        lengths)
    shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    # Separate buffers for k and v: one shared array could not be donated (updated in place).
    k, v = jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
    if isinstance(cfg, MHAConfig):
        return KVCache(k, v, lengths)
    heads = cfg.num_q_heads + cfg.num_kv_heads
    conv = (jnp.zeros((batch, cfg.conv_padding, heads, cfg.head_dim), dtype)
            if cfg.use_conv else None)
    x_prev = jnp.zeros((batch, cfg.d_model), dtype) if cfg.use_value_shift else None
    return CCACache(k, v, conv, x_prev, lengths)


def _state_type(cfg):
    return {CCAConfig: CCACache, MHAConfig: KVCache, MLAConfig: MLACache}[type(cfg)]


def _check_state(cfg, state, batch: int, what: str) -> int:
    """Validates the state against cfg and the input's batch; returns the cache length T."""
    if not isinstance(state, _state_type(cfg)):
        raise ValueError(f"state must be a {_state_type(cfg).__name__} for {type(cfg).__name__} "
                         f"(from init_decode_state(cfg, ...)); got {type(state).__name__}")
    held = state.lengths.shape[0]
    if batch != held:
        raise ValueError(f"{what} has batch {batch} but the decode state holds {held} sequences "
                         f"(state.lengths.shape={state.lengths.shape}); init the state with "
                         f"batch={batch}")
    return (state.latent if isinstance(state, MLACache) else state.k).shape[1]


def _check_x(x, cfg, ndim: int, name: str) -> None:
    want = "(batch, seq_len, d_model)" if ndim == 3 else "(batch, d_model)"
    if x.ndim != ndim or x.shape[-1] != cfg.d_model:
        raise ValueError(f"{name} must be {want} with d_model={cfg.d_model}; got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be floating point, got dtype {x.dtype}")


def _concrete(a) -> bool:
    return not isinstance(a, jax.core.Tracer)


def _out_proj(params, cfg):
    return params["out"]["wo"] if isinstance(cfg, CCAConfig) else params["wo"]


def _qkv_fn(cfg):
    if isinstance(cfg, CCAConfig):
        return lambda p, x, pos, seg: cca.cca_qkv(p, x, cfg, pos, seg)
    if isinstance(cfg, MHAConfig):
        return lambda p, x, pos, _: mha.mha_qkv(p, x, cfg, pos)
    return lambda p, x, pos, _: mla.mla_qkv(p, x, cfg, pos)


def _last_rows(x, lengths, count: int):
    """x[b, lengths[b] - count : lengths[b]] (B, count, ...), zero rows before position 0."""
    idx = lengths[:, None] + jnp.arange(-count, 0)
    rows = jnp.take_along_axis(x, jnp.maximum(idx, 0).reshape(*idx.shape, *[1] * (x.ndim - 2)),
                               axis=1)
    valid = (idx >= 0).reshape(*idx.shape, *[1] * (x.ndim - 2))
    return jnp.where(valid, rows, jnp.zeros((), x.dtype))


def prefill(params, x, cfg, state, lengths=None, *, implementation: str | None = None):
    """Runs a (ragged, right-padded) prompt through the layer and fills the decode state.

    Every sequence starts afresh: cache rows [0, S) are overwritten (rows at or past
    ``lengths[b]`` are padding, masked later and overwritten by the next steps) and the conv /
    value-shift state is taken at each sequence's own end.

    Args:
      params: the layer's param pytree (any float dtype; cast to x's dtype).
      x: (B, S, E) floating prompt inputs (after the block's pre-norm), S <= T.
      cfg: the layer's config.
      state: a decode state of this cfg with B sequences (`init_decode_state`).
      lengths: (B,) int prompt lengths in [0, S]; default S for all.
      implementation: the attention backend for the prompt (`ccajax.dot_product_attention`).
    Returns:
      (y (B, S, E) in x's dtype, equal to the layer's full forward on the prompt at the valid
      positions; the new state with ``lengths``).
    """
    init_fn = _init_fn(cfg)
    x = jnp.asarray(x)
    _check_x(x, cfg, 3, "x")
    batch, seq_len = x.shape[:2]
    max_len = _check_state(cfg, state, batch, "x")
    if seq_len > max_len:
        raise ValueError(f"the prompt has seq_len={seq_len} > the state's max_len={max_len}; init "
                         f"the state with max_len >= {seq_len}")
    lengths = jnp.full((batch,), seq_len, jnp.int32) if lengths is None else jnp.asarray(lengths)
    if lengths.shape != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be an integer array of shape (B,) = ({batch},); got "
                         f"{lengths.shape} {lengths.dtype}")
    if _concrete(lengths) and (lengths.min() < 0 or lengths.max() > seq_len):
        raise ValueError(f"lengths must lie in [0, seq_len={seq_len}]; got {lengths}")
    lengths = lengths.astype(jnp.int32)
    qkv_fn = _qkv_fn(cfg)
    kv = {}

    def capture(p, x, pos, seg):
        # `attend` does the checks, casts and attention; the prompt's k and v are kept for the
        # cache (a trace-time capture: same trace, no extra work).
        q, k, v = qkv_fn(p, x, pos, seg)
        kv.update(k=k, v=v, positions=pos)
        return q, k, v

    o, params = attend(params, x, cfg, init_fn, capture, segment_ids=None, positions=None,
                       implementation=implementation, dtype=None)
    y = o @ _out_proj(params, cfg)

    def written(cache, rows):
        return jax.lax.dynamic_update_slice_in_dim(cache, rows.astype(cache.dtype), 0, axis=1)

    if isinstance(cfg, MLAConfig):
        latent = jnp.concatenate(mla.mla_latent(params, x, cfg, kv["positions"]), axis=-1)
        return y, MLACache(written(state.latent, latent), lengths)
    k_cache, v_cache = written(state.k, kv["k"]), written(state.v, kv["v"])
    if isinstance(cfg, MHAConfig):
        return y, KVCache(k_cache, v_cache, lengths)
    conv = x_prev = None
    if cfg.use_conv:
        q_rows, k_rows = cca.compress(params["compress"], _last_rows(x, lengths, cfg.conv_padding),
                                      cfg)
        conv = jnp.concatenate([q_rows, k_rows], axis=2).astype(state.conv.dtype)
    if cfg.use_value_shift:
        x_prev = _last_rows(x, lengths, 1)[:, 0].astype(state.x_prev.dtype)
    return y, CCACache(k_cache, v_cache, conv, x_prev, lengths)


def _cca_step_qkv(params, x1, cfg: CCAConfig, state: CCACache, pos):
    """q', k', v (B, 1, H, d) of the new token from the state's conv rows and previous input.

    The convolutions and the value shift run on a window of the last rows (state + new token)
    with the window rows' true positions, so `cca.conv_mix` / `cca.value_shift` see exactly the
    past the full forward sees at this position (the conv bias before the first token included).
    """
    q, k = cca.compress(params["compress"], x1, cfg)
    mq, mk = cca.qk_mean(q, k) if cfg.use_qk_mean else (0.0, 0.0)
    conv = None
    if cfg.use_conv:
        pad = cfg.conv_padding
        window = jnp.concatenate([state.conv.astype(q.dtype), jnp.concatenate([q, k], 2)], 1)
        heads = cfg.num_q_heads
        q_mix, k_mix = cca.conv_mix(params["conv"], window[:, :, :heads], window[:, :, heads:],
                                    cfg, pos + jnp.arange(-pad, 1))
        q, k, conv = q_mix[:, -1:], k_mix[:, -1:], window[:, 1:]
    q, k = q + mq, k + mk
    if cfg.use_value_shift:
        xw = jnp.concatenate([state.x_prev[:, None].astype(x1.dtype), x1], axis=1)
        v = cca.value_shift(params["value"], xw, cfg, pos + jnp.arange(-1, 1))[:, -1:]
    else:
        v = cca.value_shift(params["value"], x1, cfg, pos)
    temp = params["qk_norm"]["temp"] if cfg.use_key_temperature else None
    q, k = cca.qk_normalize(q, k, cfg, temp)
    q, k = cca.latent_rope(q, k, pos, cfg)
    return q, k, v, conv


def _append(cache, rows, pos):
    """cache (B, T, ...) with rows (B, ...) written at row pos[b]; out-of-range rows are dropped."""
    return cache.at[jnp.arange(cache.shape[0]), pos].set(rows.astype(cache.dtype), mode="drop")


def decode_step(params, x_t, cfg, state, *, implementation: str | None = None):
    """One token per sequence through the layer, attending over its cache.

    Args:
      params: the layer's param pytree (cast to x_t's dtype).
      x_t: (B, E) the new tokens' layer inputs.
      cfg: the layer's config.
      state: the decode state (B sequences); token b gets position ``state.lengths[b]``.
      implementation: decode-attention backend (`ccajax.pallas.decode.decode_attention`):
        "xla", "mosaic" or None (mosaic on a GPU where it applies).
    Returns:
      (y_t (B, E) in x_t's dtype, the state with the token appended and lengths + 1).
    Raises:
      ValueError: wrong shapes / batch, or (eager lengths) a full cache: the message says which
        max_len would hold the sequence.
    """
    init_fn = _init_fn(cfg)
    x_t = jnp.asarray(x_t)
    _check_x(x_t, cfg, 2, "x_t")
    max_len = _check_state(cfg, state, x_t.shape[0], "x_t")
    pos = state.lengths
    if _concrete(pos) and pos.max() >= max_len:
        raise ValueError(f"the decode state is full: a sequence holds {int(pos.max())} tokens = "
                         f"max_len={max_len}; init the state with a larger max_len")
    check_params(params, init_fn, cfg)
    params = cast_tree(params, x_t.dtype)
    x1, pos1 = x_t[:, None], pos[:, None]
    new_lengths = pos + 1
    if isinstance(cfg, MLAConfig):
        q = mla.mla_qkv(params, x1, cfg, pos1)[0][:, 0]  # (B, H, dn + dr)
        latent = _append(state.latent, jnp.concatenate(mla.mla_latent(params, x1, cfg, pos1),
                                                       axis=-1)[:, 0], pos)
        o = _mla_absorbed_attention(params, q, latent, new_lengths, cfg, implementation)
        new_state = MLACache(latent, new_lengths)
    else:
        if isinstance(cfg, MHAConfig):
            q, k, v = mha.mha_qkv(params, x1, cfg, pos1)
        else:
            q, k, v, conv = _cca_step_qkv(params, x1, cfg, state, pos1)
        k_cache, v_cache = _append(state.k, k[:, 0], pos), _append(state.v, v[:, 0], pos)
        # Attention runs in the cache's dtype: casting the query, not the whole cache.
        o = decode_attention(q[:, 0].astype(k_cache.dtype), k_cache, v_cache, new_lengths,
                             implementation=implementation).astype(x_t.dtype)
        if isinstance(cfg, MHAConfig):
            new_state = KVCache(k_cache, v_cache, new_lengths)
        else:
            new_state = CCACache(k_cache, v_cache,
                                 None if conv is None else conv.astype(state.conv.dtype),
                                 None if state.x_prev is None else x_t.astype(state.x_prev.dtype),
                                 new_lengths)
    y = o.reshape(x_t.shape[0], -1) @ _out_proj(params, cfg)
    overflow = (pos >= max_len)[:, None]
    new_state = new_state._replace(lengths=jnp.minimum(new_lengths, max_len))
    return jnp.where(overflow, jnp.nan, y).astype(x_t.dtype), new_state


def _mla_absorbed_attention(params, q, latent, lengths, cfg: MLAConfig, implementation):
    """MLA attention over the latent cache with the key/value up-projections absorbed.

    q_nope . (c_kv W_uk) = (q_nope W_uk^T) . c_kv and sum_t p_t (c_kv,t W_uv) = (sum_t p_t c_kv,t) W_uv,
    so every head attends over the one cached (r + dr)-row (MQA) and nothing is up-projected per
    cached token. The values are the cache rows themselves; the first r output dims are kept.
    Args: q (B, H, dn + dr) rotated; latent (B, T, r + dr) cache; lengths (B,).
    Returns: (B, H, dv).
    """
    r, dn, heads = cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.num_heads
    w_kv = params["wkv_b"].reshape(r, heads, dn + cfg.v_head_dim)
    q_latent = jnp.einsum("bhn,rhn->bhr", q[..., :dn], w_kv[..., :dn])
    kv = latent[:, :, None, :]  # (B, T, 1, r + dr)
    q_cat = jnp.concatenate([q_latent, q[..., dn:]], axis=-1).astype(latent.dtype)
    o = decode_attention(q_cat, kv, kv, lengths, scale=cfg.qk_head_dim ** -0.5,
                         implementation=implementation)
    return jnp.einsum("bhr,rhv->bhv", o[..., :r].astype(q.dtype), w_kv[..., dn:])


def cache_bytes_per_token(cfg, dtype=jnp.bfloat16) -> int:
    """Bytes the decode state grows by per cached token and sequence, per layer."""
    _init_fn(cfg)
    return kv_cache_values_per_token(cfg) * jnp.dtype(dtype).itemsize


def state_bytes(cfg, batch: int, max_len: int, dtype=jnp.bfloat16) -> int:
    """Exact bytes of one layer's decode state (nothing is allocated)."""
    shapes = jax.eval_shape(lambda: init_decode_state(cfg, batch, max_len, dtype))
    return sum(math.prod(s.shape) * s.dtype.itemsize for s in jax.tree.leaves(shapes))


def max_context(cfg, memory_bytes: int, *, batch: int = 1, num_layers: int = 1,
                dtype=jnp.bfloat16, reserved_bytes: int = 0) -> int:
    """The largest max_len whose decode states (``num_layers`` layers of ``batch`` sequences) fit
    in ``memory_bytes`` minus ``reserved_bytes`` (weights, activations); 0 if none fits."""
    per_token = cache_bytes_per_token(cfg, dtype) * batch * num_layers
    fixed = (state_bytes(cfg, batch, 1, dtype) - cache_bytes_per_token(cfg, dtype) * batch) * num_layers
    return max(0, (memory_bytes - reserved_bytes - fixed) // per_token)
