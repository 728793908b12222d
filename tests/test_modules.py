"""Flax NNX modules: thin wrappers equal to the functional core, jit-able, pure via split/merge,
usable from Linen through nnx.bridge; the ingredient modules compose to `cca_qkv`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx

from ccajax import (CCAConfig, CCAttention, MHAConfig, MLAConfig, MultiHeadAttention,
                    MultiLatentAttention, attention_module, cca_attention, cca_qkv, init_cca_params,
                    mha_attention, mla_attention)
from ccajax import modules

CONFIGS = {
    "ccgqa": (CCAConfig(32, 4, 2, 8, rope_fraction=0.5), cca_attention),
    "cca-ablated": (CCAConfig(32, 2, 2, 8, use_conv=False, use_key_temperature=False), cca_attention),
    "gqa": (MHAConfig(32, 4, 2, 8), mha_attention),
    "mla": (MLAConfig(32, 4, 16, 8, 4, 8), mla_attention),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_module_equals_functional_and_is_pure(rng, name):
    cfg, fn = CONFIGS[name]
    layer = attention_module(cfg, rngs=nnx.Rngs(3))
    x = jnp.asarray(rng.normal(size=(2, 7, 32)), jnp.float32)
    y = nnx.jit(lambda m, x: m(x))(layer, x)
    np.testing.assert_allclose(y, fn(layer.params(), x, cfg), rtol=1e-6, atol=1e-6)
    # The module's state has exactly the functional param pytree's layout.
    graphdef, state = nnx.split(layer)
    pure = nnx.to_pure_dict(state)
    assert jax.tree.structure(pure) == jax.tree.structure(layer.params())
    np.testing.assert_allclose(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x), y,
                               rtol=1e-6, atol=1e-6)
    # Gradients flow to every param.
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2)))(layer)
    assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(nnx.to_pure_dict(grads)))


def test_module_init_matches_functional_layout():
    cfg = CCAConfig(32, 4, 2, 8)
    layer = CCAttention(cfg, rngs=nnx.Rngs(0))
    shapes = jax.tree.map(jnp.shape, init_cca_params(jax.random.key(0), cfg))
    assert jax.tree.map(jnp.shape, layer.params()) == shapes
    assert isinstance(layer.conv, modules.ConvMixing) and isinstance(layer.qk_norm, modules.QKNorm)
    assert CCAttention(CCAConfig(32, 4, 2, 8, use_conv=False), rngs=nnx.Rngs(0)).conv is None


def test_dtype_options(rng):
    cfg = CCAConfig(32, 4, 2, 8)
    layer = CCAttention(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(layer.params()))
    x = jnp.asarray(rng.normal(size=(2, 7, 32)), jnp.float32)
    y = layer(x)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), cca_attention(layer.params(), x, cfg),
                               atol=6e-2, rtol=6e-2)
    stored = MultiHeadAttention(MHAConfig(32, 4, 4, 8), rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(stored.params()))


def test_ingredient_modules_compose_to_cca_qkv(rng):
    cfg = CCAConfig(32, 4, 2, 8, rope_fraction=0.5, temperature_form="exp")
    layer = CCAttention(cfg, rngs=nnx.Rngs(1))
    layer.qk_norm.temp[...] = jnp.asarray(rng.normal(size=2), jnp.float32)
    x = jnp.asarray(rng.normal(size=(2, 6, 32)), jnp.float32)
    seg = jnp.asarray([[0, 0, 0, 1, 1, 1], [5, 5, 5, 5, 5, 5]])
    positions = jnp.asarray([[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5]])
    q, k = layer.compress(x)
    mq, mk = modules.QKMean()(q, k)
    q, k = layer.conv(q, k, segment_ids=seg)
    q, k = layer.qk_norm(q + mq, k + mk)
    q, k = modules.LatentRoPE(cfg)(q, k, positions)
    v = layer.value(x, segment_ids=seg)
    want = cca_qkv(layer.params(), x, cfg, positions, seg)
    for got, ref in zip((q, k, v), want):
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    o = jnp.zeros((2, 6, cfg.q_width))
    np.testing.assert_array_equal(layer.out(o), 0.0)


def test_linen_bridge_init_apply(rng):
    cfg = CCAConfig(32, 4, 2, 8)
    x = jnp.asarray(rng.normal(size=(2, 5, 32)), jnp.float32)
    model = nnx.bridge.to_linen(CCAttention, cfg)
    variables = model.init(jax.random.key(0), x)
    y = model.apply(variables, x)
    assert isinstance(model, linen.Module) and y.shape == x.shape
    params = jax.tree.map(lambda p: getattr(p, "value", p), variables["params"],
                          is_leaf=lambda p: hasattr(p, "value"))
    np.testing.assert_allclose(y, cca_attention(params, x, cfg), rtol=1e-6, atol=1e-6)


def test_attention_module_rejects_unknown_config():
    with pytest.raises(ValueError, match="cfg must be a CCAConfig, MHAConfig or MLAConfig, got dict"):
        attention_module({}, rngs=nnx.Rngs(0))


def test_modules_export_types():
    assert isinstance(attention_module(MLAConfig(32, 4, 16, 8, 4, 8), rngs=nnx.Rngs(0)),
                      MultiLatentAttention)
