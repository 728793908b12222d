"""ccajax: Compressed Convolutional Attention (CCA) and CCGQA for JAX and Flax NNX.

Functional core: ``init_cca_params`` / ``cca_attention`` (and the MHA/GQA/MQA and MLA baselines
with the same interface); Flax NNX modules in ``ccajax.modules``; ZAYA1 weight import in
``ccajax.convert``; cost accounting in ``ccajax.costs``; the attention dispatch in
``ccajax.attention``; per-layer decoding (KV caches, prefill, decode steps) in ``ccajax.decode`` and
``generate`` for any model with the decode protocol; a decoder-only language model built from any
of these attentions in ``ccajax.models`` (``LMConfig``, ``TransformerLM``, ``attention_config``),
trained with ``ccajax.training`` and its large-vocabulary loss ``ccajax.losses.cross_entropy``.

Shapes: layers map x (B, S, E) -> (B, S, E) in x's dtype (or the module's ``dtype``); attention
takes q (B, Sq, Hq, d), k (B, Sk, Hkv, d), v (B, Sk, Hkv, dv). ``notebooks/quickstart.ipynb`` walks
through all of it.
"""

from ccajax import attention, convert, costs, decode, losses, models
from ccajax.attention import dot_product_attention
from ccajax.cca import cca_attention, cca_qkv, init_cca_params
from ccajax.config import CCAConfig, MHAConfig, MLAConfig
from ccajax.generate import generate
from ccajax.mha import init_mha_params, mha_attention
from ccajax.mla import init_mla_params, mla_attention
from ccajax.models import LMConfig, TransformerLM, attention_config
from ccajax.modules import (CCAttention, MultiHeadAttention, MultiLatentAttention,
                            attention_module)

__all__ = [
    "attention", "convert", "costs", "decode", "losses", "models", "generate",
    "CCAConfig", "MHAConfig", "MLAConfig",
    "init_cca_params", "cca_attention", "cca_qkv",
    "init_mha_params", "mha_attention", "init_mla_params", "mla_attention",
    "dot_product_attention",
    "CCAttention", "MultiHeadAttention", "MultiLatentAttention", "attention_module",
    "LMConfig", "TransformerLM", "attention_config",
]
