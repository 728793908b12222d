"""Flax NNX modules: thin wrappers that hold the functional core's params as ``nnx.Param``s.

A module's ``nnx.state`` has the same nesting as the functional param pytree, and ``__call__``
calls the pure function, so a model can always be used as a pure function of its state::

    graphdef, state = nnx.split(layer)
    y = nnx.merge(graphdef, state)(x)

Each CCA ingredient has its own module (`Compression`, `ConvMixing`, `QKMean`, `ValueShift`,
`QKNorm`, `LatentRoPE`); `CCAttention` holds them under the names of the param pytree.
Linen users: ``flax.nnx.bridge.to_linen(CCAttention, cfg)``.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from ccajax import cca
from ccajax.config import CCAConfig, MHAConfig, MLAConfig
from ccajax.mha import init_mha_params, mha_attention
from ccajax.mla import init_mla_params, mla_attention
from ccajax.rope import default_positions


class ParamGroup(nnx.Module):
    """A flat dict of arrays held as ``nnx.Param`` attributes of the same names."""

    def __init__(self, arrays: dict):
        self.names = tuple(arrays)
        for name, array in arrays.items():
            setattr(self, name, nnx.Param(array))

    def arrays(self) -> dict:
        """The current param values as the functional core's dict."""
        return {name: getattr(self, name)[...] for name in self.names}


class Compression(ParamGroup):
    """Down-projection: x (B, S, E) -> q (B, S, Hq, d), k (B, S, Hkv, d)."""

    def __init__(self, cfg: CCAConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        super().__init__(cca.init_compress(rngs.params(), cfg, param_dtype))
        self.cfg = cfg

    def __call__(self, x):
        """x (B, S, E) -> latent q (B, S, Hq, d), k (B, S, Hkv, d), in x's dtype."""
        return cca.compress(self.arrays(), x, self.cfg)


class ConvMixing(ParamGroup):
    """Two-stage causal conv of q (B, S, Hq, d) and k (B, S, Hkv, d); returns the mixed q, k."""

    def __init__(self, cfg: CCAConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        super().__init__(cca.init_conv(rngs.params(), cfg, param_dtype))
        self.cfg = cfg

    def __call__(self, q, k, segment_ids=None):
        """q (B, S, Hq, d), k (B, S, Hkv, d), segment_ids (B, S) int or None -> convolved q, k
        (same shapes and dtype; `ccajax.cca.conv_mix`)."""
        positions = default_positions(segment_ids, *q.shape[:2])
        return cca.conv_mix(self.arrays(), q, k, self.cfg, positions)


class QKMean(nnx.Module):
    """q (B, S, Hq, d), k (B, S, Hkv, d) -> (mq, mk), the q-k mean (no params)."""

    def __call__(self, q, k):
        """q (B, S, Hq, d), k (B, S, Hkv, d) -> their q-k means, same shapes
        (`ccajax.cca.qk_mean`)."""
        return cca.qk_mean(q, k)


class ValueShift(ParamGroup):
    """x (B, S, E) -> v (B, S, Hkv, d): half the channels from the current token, half from the last."""

    def __init__(self, cfg: CCAConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        super().__init__(cca.init_value(rngs.params(), cfg, param_dtype))
        self.cfg = cfg

    def __call__(self, x, segment_ids=None):
        """x (B, S, E), segment_ids (B, S) int or None -> v (B, S, Hkv, d) from the current and
        the previous token (`ccajax.cca.value_shift`)."""
        positions = default_positions(segment_ids, *x.shape[:2])
        return cca.value_shift(self.arrays(), x, self.cfg, positions)


class QKNorm(ParamGroup):
    """L2 norm of q, k to sqrt(d) with the learned per-kv-head key temperature."""

    def __init__(self, cfg: CCAConfig, *, param_dtype=jnp.float32):
        super().__init__(cca.init_qk_norm(cfg, param_dtype))
        self.cfg = cfg

    def __call__(self, q, k):
        """q (B, S, Hq, d), k (B, S, Hkv, d) -> L2-normalised q, k with the key temperature, in
        their dtype (`ccajax.cca.qk_normalize`)."""
        return cca.qk_normalize(q, k, self.cfg, self.temp[...])


class LatentRoPE(nnx.Module):
    """RoPE on the first rope_fraction*d dims of latent q, k given positions (B, S) (no params)."""

    def __init__(self, cfg: CCAConfig):
        self.cfg = cfg

    def __call__(self, q, k, positions):
        """RoPE on the first rope_fraction * d dims of q (B, S, Hq, d) and k (B, S, Hkv, d) at
        positions (S,) or (B, S) int (`ccajax.cca.latent_rope`)."""
        return cca.latent_rope(q, k, positions, self.cfg)


class OutProjection(ParamGroup):
    """Up-projection (B, S, Hq*d) -> (B, S, E)."""

    def __init__(self, cfg: CCAConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        super().__init__(cca.init_out(rngs.params(), cfg, param_dtype))

    def __call__(self, o):
        """o (B, S, Hq * d) -> (B, S, E) in the promoted dtype of o and the weight."""
        return o @ self.wo[...]


class CCAttention(nnx.Module):
    """CCA / CCGQA attention layer: x (B, S, E) -> y (B, S, E).

    Args:
      cfg: `CCAConfig` (CCGQA when num_kv_heads < num_q_heads).
      rngs: ``nnx.Rngs`` with a ``params`` stream.
      dtype: compute dtype (default: the input's); norms and softmax stay in float32.
      param_dtype: storage dtype of the params.
      implementation: attention backend (see `ccajax.attention.dot_product_attention`).
      prologue: how q/k/v are made, see `ccajax.cca.cca_attention` (None: its default).
    """

    def __init__(self, cfg: CCAConfig, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32,
                 implementation: str | None = None, prologue: str | None = None):
        self.cfg, self.dtype, self.implementation = cfg, dtype, implementation
        self.prologue = prologue
        self.compress = Compression(cfg, rngs=rngs, param_dtype=param_dtype)
        self.conv = ConvMixing(cfg, rngs=rngs, param_dtype=param_dtype) if cfg.use_conv else None
        self.value = ValueShift(cfg, rngs=rngs, param_dtype=param_dtype)
        self.qk_norm = QKNorm(cfg, param_dtype=param_dtype) if cfg.use_key_temperature else None
        self.out = OutProjection(cfg, rngs=rngs, param_dtype=param_dtype)

    def params(self) -> dict:
        """The functional param pytree (`ccajax.init_cca_params` layout) of the current values."""
        groups = ("compress", "conv", "value", "qk_norm", "out")
        return {g: getattr(self, g).arrays() for g in groups if getattr(self, g) is not None}

    def __call__(self, x, *, segment_ids=None, positions=None):
        """x (B, S, E); segment_ids (B, S) int or None; positions (S,)/(B, S) int or None."""
        return cca.cca_attention(self.params(), x, self.cfg, segment_ids=segment_ids,
                                 positions=positions, implementation=self.implementation,
                                 dtype=self.dtype, prologue=self.prologue)


class _FlatAttention(ParamGroup):
    """A baseline layer whose functional params are one flat dict."""

    init_fn = apply_fn = None  # set by subclasses

    def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32,
                 implementation: str | None = None):
        super().__init__(type(self).init_fn(rngs.params(), cfg, param_dtype))
        self.cfg, self.dtype, self.implementation = cfg, dtype, implementation

    def params(self) -> dict:
        return self.arrays()

    def __call__(self, x, *, segment_ids=None, positions=None):
        """x (B, S, E) -> y (B, S, E); segment_ids, positions as in `CCAttention`."""
        return type(self).apply_fn(self.arrays(), x, self.cfg, segment_ids=segment_ids,
                                   positions=positions, implementation=self.implementation,
                                   dtype=self.dtype)


class MultiHeadAttention(_FlatAttention):
    """MHA / GQA / MQA layer from an `MHAConfig`; same arguments as `CCAttention`."""

    init_fn = staticmethod(init_mha_params)
    apply_fn = staticmethod(mha_attention)


class MultiLatentAttention(_FlatAttention):
    """DeepSeek-V2 MLA layer from an `MLAConfig`; same arguments as `CCAttention`."""

    init_fn = staticmethod(init_mla_params)
    apply_fn = staticmethod(mla_attention)


def attention_module(cfg, *, rngs: nnx.Rngs, **kwargs) -> nnx.Module:
    """The module for a config: `CCAttention`, `MultiHeadAttention` or `MultiLatentAttention`."""
    for config_type, module_type in ((CCAConfig, CCAttention), (MHAConfig, MultiHeadAttention),
                                     (MLAConfig, MultiLatentAttention)):
        if isinstance(cfg, config_type):
            return module_type(cfg, rngs=rngs, **kwargs)
    raise ValueError(f"cfg must be a CCAConfig, MHAConfig or MLAConfig, got {type(cfg).__name__}")
