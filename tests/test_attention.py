"""The attention dispatch and its jnp reference against a float64 numpy softmax attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccajax.attention import dot_product_attention, reference_attention
from np_reference import numpy_attention


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("hq, hkv", [(2, 2), (4, 2), (4, 1), (8, 1)])
@pytest.mark.parametrize("seq", [1, 7])
def test_reference_matches_numpy(rng, causal, hq, hkv, seq):
    q, k, v = (rng.normal(size=(2, seq, h, 8)) for h in (hq, hkv, hkv))
    got = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, is_causal=causal,
                                                        implementation="xla"))(
        *(jnp.asarray(a, jnp.float32) for a in (q, k, v)))
    np.testing.assert_allclose(got, numpy_attention(q, k, v, causal), rtol=1e-5, atol=1e-5)


def test_segments_scale_and_value_dim(rng):
    seg = np.array([[0, 0, 1, 1, 1, 2], [3, 3, 3, 3, 3, 3]])
    q, k = rng.normal(size=(2, 6, 4, 8)), rng.normal(size=(2, 6, 2, 8))
    v = rng.normal(size=(2, 6, 2, 5))
    for causal in (True, False):
        got = dot_product_attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)),
                                    is_causal=causal, scale=0.3, segment_ids=jnp.asarray(seg))
        np.testing.assert_allclose(got, numpy_attention(q, k, v, causal, seg, scale=0.3),
                                   rtol=1e-5, atol=1e-5)


def test_fully_masked_rows_give_zero_and_finite_grads(rng):
    # Causal with more queries than keys: the first Sq - Sk queries see no key at all.
    q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((1, 5, 2, 8), (1, 3, 2, 8), (1, 3, 2, 8)))
    out = reference_attention(q, k, v, is_causal=True)
    np.testing.assert_array_equal(out[:, :2], 0.0)
    assert np.all(np.abs(out[:, 2:]) > 0)
    grads = jax.grad(lambda q, k, v: reference_attention(q, k, v, is_causal=True).sum(), (0, 1, 2))(q, k, v)
    assert all(np.isfinite(g).all() for g in grads)


def test_bf16_close_to_fp32(rng):
    q, k, v = (rng.normal(size=(2, 33, h, 64)) for h in (8, 2, 2))
    ref = numpy_attention(q, k, v, True)
    got = dot_product_attention(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)), is_causal=True)
    assert got.dtype == jnp.bfloat16
    # bf16 inputs (8 mantissa bits) and bf16 probabilities in the PV matmul.
    np.testing.assert_allclose(np.asarray(got, np.float32), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("shapes, kwargs, match", [
    (((1, 4, 3, 8), (1, 4, 2, 8), (1, 4, 2, 8)), {}, r"kv heads \(2\) must divide query heads \(3\)"),
    (((1, 4, 2, 8), (1, 4, 2, 16), (1, 4, 2, 16)), {}, "q and k head dims differ: q 8, k 16"),
    (((1, 4, 2, 8), (1, 5, 2, 8), (1, 4, 2, 8)), {}, "k and v must share"),
    (((4, 2, 8), (1, 4, 2, 8), (1, 4, 2, 8)), {}, r"must be \(B, S, H, d\)"),
    (((1, 4, 2, 8),) * 3, dict(implementation="triton"),
     r"implementation must be one of \('xla', 'cudnn', 'mosaic', 'mosaic_deterministic', "
     r"'mosaic_fwd_cudnn_bwd'\) or None, "
     r"got 'triton'"),
    (((1, 4, 2, 8),) * 3, dict(implementation="cudnn"), r"implementation='cudnn' needs bf16/fp16 inputs.*float32"),
    (((1, 4, 2, 8),) * 3, dict(segment_ids=jnp.zeros((1, 5), jnp.int32)), r"segment_ids must be \(B, S\) = \(1, 4\)"),
])
def test_dispatch_errors(shapes, kwargs, match):
    q, k, v = (jnp.zeros(s, jnp.float32) for s in shapes)
    with pytest.raises(ValueError, match=match):
        dot_product_attention(q, k, v, **kwargs)


def test_dispatch_rejects_mixed_dtypes():
    with pytest.raises(ValueError, match="dtypes differ"):
        dot_product_attention(jnp.zeros((1, 2, 2, 8)), jnp.zeros((1, 2, 2, 8), jnp.bfloat16),
                              jnp.zeros((1, 2, 2, 8)))
