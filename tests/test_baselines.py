"""MHA / GQA / MQA and MLA layers against float64 numpy re-implementations, and causality."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccajax import (MHAConfig, MLAConfig, init_mha_params, init_mla_params, mha_attention,
                    mla_attention)
from np_reference import numpy_attention, numpy_rope


def _random_params(rng, init_fn, cfg):
    shapes = jax.eval_shape(lambda: init_fn(jax.random.key(0), cfg))
    return jax.tree.map(lambda s: rng.normal(size=s.shape) * 0.4, shapes)


def _run(fn, params, x, cfg):
    with jax.enable_x64(True):
        return np.asarray(jax.jit(lambda p, x: fn(p, x, cfg))(
            jax.tree.map(jnp.asarray, params), jnp.asarray(x)))


def numpy_mha(p, x, cfg):
    B, S, _ = x.shape
    d, r = cfg.head_dim, int(cfg.head_dim * cfg.rope_fraction)
    q = numpy_rope((x @ p["wq"]).reshape(B, S, -1, d), np.arange(S), cfg.rope_theta, r)
    k = numpy_rope((x @ p["wk"]).reshape(B, S, -1, d), np.arange(S), cfg.rope_theta, r)
    v = (x @ p["wv"]).reshape(B, S, -1, d)
    return numpy_attention(q, k, v, cfg.causal).reshape(B, S, -1) @ p["wo"]


def numpy_mla(p, x, cfg):
    B, S, _ = x.shape
    H, dn, dr, r = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank

    def rms(a, w):
        return a / np.sqrt((a * a).mean(-1, keepdims=True) + cfg.norm_eps) * w

    q = rms(x @ p["wq_a"], p["q_norm"]) @ p["wq_b"] if cfg.q_lora_rank else x @ p["wq"]
    q = q.reshape(B, S, H, dn + dr)
    q = np.concatenate([q[..., :dn], numpy_rope(q[..., dn:], np.arange(S), cfg.rope_theta, dr)], -1)
    ckv_kr = x @ p["wkv_a"]
    ckv = rms(ckv_kr[..., :r], p["kv_norm"])
    k_rope = numpy_rope(ckv_kr[..., None, r:], np.arange(S), cfg.rope_theta, dr)
    kv = (ckv @ p["wkv_b"]).reshape(B, S, H, dn + cfg.v_head_dim)
    k = np.concatenate([kv[..., :dn], np.repeat(k_rope, H, axis=2)], -1)
    return numpy_attention(q, k, kv[..., dn:], cfg.causal).reshape(B, S, -1) @ p["wo"]


@pytest.mark.parametrize("hq, hkv", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("rope_fraction", [1.0, 0.5])
def test_mha_matches_numpy(rng, hq, hkv, causal, rope_fraction):
    cfg = MHAConfig(32, hq, hkv, 8, rope_fraction=rope_fraction, causal=causal)
    params = _random_params(rng, init_mha_params, cfg)
    x = rng.normal(size=(2, 6, 32))
    np.testing.assert_allclose(_run(mha_attention, params, x, cfg), numpy_mha(params, x, cfg),
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("q_lora_rank", [0, 12], ids=["q-full", "q-lora"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_mla_matches_numpy(rng, q_lora_rank, causal):
    cfg = MLAConfig(32, 4, 16, 8, 4, 6, q_lora_rank=q_lora_rank, causal=causal)
    params = _random_params(rng, init_mla_params, cfg)
    x = rng.normal(size=(2, 5, 32))
    np.testing.assert_allclose(_run(mla_attention, params, x, cfg), numpy_mla(params, x, cfg),
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("fn, init_fn, cfg", [
    (mha_attention, init_mha_params, MHAConfig(32, 4, 2, 8)),
    (mla_attention, init_mla_params, MLAConfig(32, 4, 16, 8, 4, 8)),
], ids=["gqa", "mla"])
def test_causality(rng, fn, init_fn, cfg):
    params = init_fn(jax.random.key(1), cfg)
    x = jnp.asarray(rng.normal(size=(1, 9, 32)), jnp.float32)
    y = fn(params, x, cfg)
    y2 = fn(params, x.at[:, 4].add(1.0), cfg)
    np.testing.assert_array_equal(y[:, :4], y2[:, :4])
    assert not np.allclose(y[:, 4:], y2[:, 4:])


def test_baselines_compute_dtype(rng):
    cfg = MHAConfig(32, 4, 2, 8)
    params = init_mha_params(jax.random.key(0), cfg)
    x = jnp.asarray(rng.normal(size=(2, 8, 32)), jnp.float32)
    y16 = mha_attention(params, x, cfg, dtype=jnp.bfloat16)
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), mha_attention(params, x, cfg),
                               atol=5e-2, rtol=5e-2)
