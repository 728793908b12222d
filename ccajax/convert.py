"""Weight import from published checkpoints into ccajax param pytrees.

ZAYA1 (Zyphra's CCGQA model, PyTorch): :func:`from_zaya1_attention` converts one attention layer's
state dict, and :func:`zaya1_attention_config` is the matching `CCAConfig`, so that
``cca_attention(from_zaya1_attention(sd, cfg), x, cfg)`` computes that layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax.numpy as jnp
import numpy as np

from ccajax._common import check_params
from ccajax.cca import init_cca_params
from ccajax.config import CCAConfig


def zaya1_attention_config(**overrides) -> CCAConfig:
    """The attention layer of ZAYA1: E=2048, Hq=8, Hkv=2, d=128, conv kernels (2, 2), RoPE on half of
    each head with theta 5e6, linear key temperature, causal. ``overrides`` replace any field."""
    fields = dict(d_model=2048, num_q_heads=8, num_kv_heads=2, head_dim=128, conv_kernel_sizes=(2, 2),
                  rope_theta=5e6, rope_fraction=0.5, causal=True, temperature_form="linear")
    fields.update(overrides)
    return CCAConfig(**fields)


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One ZAYA1 tensor: its names, where it goes in ccajax, its expected torch shape and the map."""

    name: str  # public ZAYA1 name, relative to the layer
    alias: str  # the Hugging Face transformers port's name
    path: tuple[str, str]  # (group, leaf) in the ccajax pytree
    shape: tuple[int, ...]  # expected torch shape for the config
    shape_doc: str  # that shape in config fields
    to_ccajax: Callable[[np.ndarray], np.ndarray]
    flag: str | None = None  # the CCAConfig switch that must be on to hold it; None: a linear map


def _zaya1_tensors(cfg: CCAConfig) -> list[_Tensor]:
    """Every tensor of a ZAYA1 layer, with the shapes this config implies."""
    E, Hq, Hkv, d = cfg.d_model, cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim
    t0, t1 = cfg.conv_kernel_sizes
    C, heads = cfg.q_width + cfg.kv_width, Hq + Hkv
    C_doc = "(num_q_heads+num_kv_heads)*head_dim"
    linear = np.transpose  # torch Linear (out, in) -> ccajax (in, out)
    return [
        _Tensor("qkv.linear_q.weight", "qkv_proj.q_proj.weight", ("compress", "wq"),
                (Hq * d, E), "(num_q_heads*head_dim, d_model)", linear),
        _Tensor("qkv.linear_k.weight", "qkv_proj.k_proj.weight", ("compress", "wk"),
                (Hkv * d, E), "(num_kv_heads*head_dim, d_model)", linear),
        _Tensor("qkv.val_proj1.weight", "qkv_proj.v_proj_current.weight", ("value", "wv1"),
                (Hkv * d // 2, E), "(num_kv_heads*head_dim/2, d_model)", linear),
        _Tensor("qkv.val_proj2.weight", "qkv_proj.v_proj_delayed.weight", ("value", "wv2"),
                (Hkv * d // 2, E), "(num_kv_heads*head_dim/2, d_model)", linear),
        _Tensor("o_proj.weight", "o_proj.weight", ("out", "wo"),
                (E, Hq * d), "(d_model, num_q_heads*head_dim)", linear),
        # Depthwise (C, 1, t0) -> (t0, C); torch's tap 0 is the oldest, as is ours.
        _Tensor("qkv.conv_qk.0.weight", "qkv_proj.conv_qk_depthwise.weight", ("conv", "w0"),
                (C, 1, t0), f"({C_doc}, 1, conv_kernel_sizes[0])", lambda w: w[:, 0, :].T, "use_conv"),
        _Tensor("qkv.conv_qk.0.bias", "qkv_proj.conv_qk_depthwise.bias", ("conv", "b0"),
                (C,), f"({C_doc},)", np.asarray, "use_conv"),
        # Grouped (C, d_in, t1) with out channel g*d+o -> (t1, heads, d_in, d_out).
        _Tensor("qkv.conv_qk.1.weight", "qkv_proj.conv_qk_grouped.weight", ("conv", "w1"),
                (C, d, t1), f"({C_doc}, head_dim, conv_kernel_sizes[1])",
                lambda w: w.reshape(heads, d, d, t1).transpose(3, 0, 2, 1), "use_conv"),
        _Tensor("qkv.conv_qk.1.bias", "qkv_proj.conv_qk_grouped.bias", ("conv", "b1"),
                (C,), f"({C_doc},)", np.asarray, "use_conv"),
        _Tensor("qkv.temp", "qk_norm.temp", ("qk_norm", "temp"),
                (Hkv,), "(num_kv_heads,)", np.asarray, "use_key_temperature"),
    ]


def _check_zaya1_config(cfg: CCAConfig) -> None:
    """Raises ValueError if cfg would compute something other than ZAYA1 from its weights."""
    for flag in ("use_qk_mean", "use_value_shift"):
        if not getattr(cfg, flag):
            raise ValueError(f"ZAYA1 layers use the q-k mean and the value shift, but cfg.{flag}=False; "
                             f"use {flag}=True (see zaya1_attention_config)")
    if cfg.use_key_temperature and cfg.temperature_form != "linear":
        raise ValueError(f"ZAYA1 multiplies keys by temp linearly, but cfg.temperature_form="
                         f"{cfg.temperature_form!r}; use temperature_form='linear'")


def _select(state_dict: Mapping, cfg: CCAConfig) -> list[tuple[_Tensor, str]]:
    """The tensors cfg holds, each with the key it has in state_dict; ValueError for any key that is
    missing, unexpected or given under both names."""
    everything = _zaya1_tensors(cfg)
    used = [t for t in everything if t.flag is None or getattr(cfg, t.flag)]
    by_key = {key: t for t in everything for key in (t.name, t.alias)}
    linear_biases = {key.removesuffix("weight") + "bias" for key, t in by_key.items() if t.flag is None}
    given = set(state_dict)
    for key in sorted(given):
        t = by_key.get(key)
        if key in linear_biases:
            raise ValueError(f"state dict has {key!r}, a bias on a linear map: biases on linear "
                             f"maps are not supported (ZAYA1 has none; ccajax's CCA linear maps are "
                             f"bias-free)")
        if t is None:
            raise ValueError(f"unexpected key {key!r} in a ZAYA1 attention layer's state dict (names "
                             f"are relative to the layer); valid keys: {[u.name for u in used]} or "
                             f"their Hugging Face names {[u.alias for u in used]}")
        if t not in used:
            raise ValueError(f"state dict has {key!r} but cfg.{t.flag}=False cannot hold it; use "
                             f"{t.flag}=True, as ZAYA1 does (see zaya1_attention_config)")
        if t.name != t.alias and {t.name, t.alias} <= given:
            raise ValueError(f"state dict has both {t.name!r} and its Hugging Face alias {t.alias!r}; "
                             f"give one")
    missing = [t.name for t in used if t.name not in given and t.alias not in given]
    if missing:
        raise ValueError(f"state dict lacks {missing} (or their Hugging Face aliases) that a ZAYA1 "
                         f"layer with cfg {cfg} needs; given keys: {sorted(given)}")
    return [(t, t.name if t.name in given else t.alias) for t in used]


def from_zaya1_attention(state_dict: Mapping[str, np.ndarray], cfg: CCAConfig) -> dict:
    """Converts one ZAYA1 attention layer's weights into ccajax's CCA param pytree.

    Args:
      state_dict: the layer's tensors, named relative to the layer, in the public ZAYA1 layout
        (torch shapes; E = d_model, C = (Hq+Hkv)*d):
          ``qkv.linear_q.weight`` (Hq*d, E), ``qkv.linear_k.weight`` (Hkv*d, E),
          ``qkv.val_proj1.weight`` (Hkv*d/2, E) (current token), ``qkv.val_proj2.weight``
          (Hkv*d/2, E) (previous token), ``qkv.conv_qk.0.weight`` (C, 1, t0) and ``.bias`` (C,)
          (depthwise), ``qkv.conv_qk.1.weight`` (C, d, t1) and ``.bias`` (C,) (groups Hq+Hkv),
          ``qkv.temp`` (Hkv,), ``o_proj.weight`` (E, Hq*d).
        The Hugging Face transformers port's names are accepted too: ``qkv_proj.q_proj.weight``,
        ``qkv_proj.k_proj.weight``, ``qkv_proj.v_proj_current.weight``,
        ``qkv_proj.v_proj_delayed.weight``, ``qkv_proj.conv_qk_depthwise.{weight,bias}``,
        ``qkv_proj.conv_qk_grouped.{weight,bias}``, ``qk_norm.temp``, ``o_proj.weight``.
        Values are anything ``np.asarray`` reads (numpy, jax, CPU torch tensors) of a float dtype,
        which is kept (float64 becomes float32 unless jax_enable_x64 is on). numpy cannot read torch
        bfloat16 tensors: pass ``t.float()`` or ``t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)``.
      cfg: the layer's config, e.g. :func:`zaya1_attention_config`; it must use the q-k mean, the
        value shift and a ``"linear"`` key temperature, as ZAYA1 does. The conv and temp tensors
        are expected exactly when ``cfg.use_conv`` / ``cfg.use_key_temperature`` are on.
    Returns:
      The param pytree of `ccajax.cca` (layout in its module docstring), jnp arrays.
    Raises:
      ValueError: a config that cannot compute ZAYA1, a missing, unexpected or doubly named key, a
        non-float tensor or a shape that does not match cfg.
    """
    _check_zaya1_config(cfg)
    fields = (f"d_model={cfg.d_model}, num_q_heads={cfg.num_q_heads}, num_kv_heads={cfg.num_kv_heads}, "
              f"head_dim={cfg.head_dim}, conv_kernel_sizes={cfg.conv_kernel_sizes}")
    params: dict = {}
    for t, key in _select(state_dict, cfg):
        w = np.asarray(state_dict[key])
        if not jnp.issubdtype(w.dtype, jnp.floating):
            raise ValueError(f"{key!r} has dtype {w.dtype}; weights must be floating point")
        if w.shape != t.shape:
            raise ValueError(f"{key!r} has shape {w.shape}, expected {t.shape} = {t.shape_doc} for cfg "
                             f"{fields}")
        group, leaf = t.path
        params.setdefault(group, {})[leaf] = jnp.asarray(t.to_ccajax(w))
    check_params(params, init_cca_params, cfg)
    return params
