"""The "mosaic" backend through the dispatch, in Mosaic GPU interpret mode on the CPU: forward equals
the jnp reference, gradients flow (backward is the reference's until the Mosaic backward lands),
works under jit, and misuse gives clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccajax.attention import dot_product_attention

BF16_TOL = 2e-2  # bf16 inputs, P rounded to bf16 before the PV matmul (measured worst ~8e-3)


def _qkv(rng, seq, hq, hkv, d=64):
    return tuple(jnp.asarray(rng.normal(size=(1, seq, h, d)), jnp.bfloat16) for h in (hq, hkv, hkv))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_mosaic_dispatch_forward_and_grad(rng, causal):
    q, k, v = _qkv(rng, 70, 4, 2)

    def loss(impl, interpret):
        return lambda q, k, v: jnp.sum(dot_product_attention(
            q, k, v, is_causal=causal, implementation=impl, interpret=interpret).astype(jnp.float32) ** 2)

    out = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, is_causal=causal, interpret=True))(q, k, v)
    ref = dot_product_attention(q, k, v, is_causal=causal, implementation="xla")
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               atol=BF16_TOL, rtol=BF16_TOL)
    grads = jax.jit(jax.grad(loss("mosaic", True), (0, 1, 2)))(q, k, v)
    grads_ref = jax.grad(loss("xla", False), (0, 1, 2))(q, k, v)
    for g, g_ref in zip(grads, grads_ref):
        g, g_ref = np.asarray(g, np.float32), np.asarray(g_ref, np.float32)
        assert np.abs(g - g_ref).max() <= 5e-2 * np.abs(g_ref).max()


@pytest.mark.parametrize("kwargs, match", [
    (dict(interpret=True, implementation="xla"), "interpret=True runs the mosaic kernel; got implementation='xla'"),
    (dict(interpret=True, segment_ids=jnp.zeros((1, 64), jnp.int32)), "does not take segment_ids yet"),
])
def test_mosaic_dispatch_errors(rng, kwargs, match):
    q, k, v = _qkv(rng, 64, 2, 2)
    with pytest.raises(ValueError, match=match):
        dot_product_attention(q, k, v, **kwargs)


def test_mosaic_rejects_float32(rng):
    q, k, v = (a.astype(jnp.float32) for a in _qkv(rng, 64, 2, 2))
    with pytest.raises(ValueError, match="q.dtype must be bfloat16 or float16; got q.dtype=float32"):
        dot_product_attention(q, k, v, implementation="mosaic", interpret=True)
