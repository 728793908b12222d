"""`ccajax.losses.cross_entropy` against the float32 computation (optax, jax.nn) on the same logits."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ccajax.losses import cross_entropy

# bf16: the gradient is rounded once to bf16 (8 bits), so compare to 2^-8 of its largest element.
GRAD_TOL = {jnp.bfloat16: 2 ** -8, jnp.float16: 2 ** -11, jnp.float32: 1e-5}


def _reference(logits, targets, w_ce, w_z):
    wide = logits.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(wide, targets)
    log_z = jax.nn.logsumexp(wide, axis=-1)
    return jnp.sum(w_ce * ce) + jnp.sum(w_z * log_z ** 2)


def _ours(logits, targets, w_ce, w_z):
    ce, log_z = cross_entropy(logits, targets)
    return jnp.sum(w_ce * ce) + jnp.sum(w_z * log_z ** 2)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("shape", [(3, 7, 50), (5, 1000)], ids=["3x7xV50", "5xV1000"])
def test_matches_float32_reference(rng, dtype, shape):
    # Large logits (scale 30) check the max-subtraction; masked weights (zeros) and a z-loss term
    # check that both cotangents reach the gradient.
    logits = jnp.asarray(30 * rng.normal(size=shape), dtype)
    targets = jnp.asarray(rng.integers(0, shape[-1], size=shape[:-1]), jnp.int32)
    w_ce = jnp.asarray(rng.integers(0, 2, size=shape[:-1]) * rng.uniform(size=shape[:-1]), jnp.float32)
    w_z = jnp.asarray(1e-2 * rng.uniform(size=shape[:-1]), jnp.float32)

    ce, log_z = jax.jit(cross_entropy)(logits, targets)
    wide = logits.astype(jnp.float32)
    np.testing.assert_allclose(ce, optax.softmax_cross_entropy_with_integer_labels(wide, targets),
                               rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(log_z, jax.nn.logsumexp(wide, axis=-1), rtol=1e-6, atol=1e-5)
    assert ce.dtype == log_z.dtype == jnp.float32

    got = jax.jit(jax.grad(_ours))(logits, targets, w_ce, w_z)
    want = jax.jit(jax.grad(_reference))(wide, targets, w_ce, w_z)
    assert got.dtype == dtype
    tol = GRAD_TOL[dtype] * float(jnp.abs(want).max())
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=tol, rtol=0)


def test_vmaps_and_jits_under_a_model_loss(rng):
    """The logits' gradient flows through a matmul to its weights in the compute dtype."""
    x = jnp.asarray(rng.normal(size=(4, 6, 16)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(16, 40)) / 4, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 40, size=(4, 6)), jnp.int32)

    def loss(w, fn):
        logits = x @ w.astype(jnp.bfloat16)
        return fn(logits, targets, jnp.ones((4, 6)), jnp.zeros((4, 6)))

    got = jax.jit(jax.grad(lambda w: loss(w, _ours)))(w)
    want = jax.jit(jax.grad(lambda w: loss(w, lambda l, *a: _reference(l.astype(jnp.float32), *a))))(w)
    np.testing.assert_allclose(got, want, atol=2e-2 * float(jnp.abs(want).max()))
