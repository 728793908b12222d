"""Bad layer inputs and params raise ValueError naming the argument, the value and what is valid."""

import jax
import jax.numpy as jnp
import pytest

from ccajax import CCAConfig, cca_attention, init_cca_params

CFG = CCAConfig(32, 4, 2, 8)
PARAMS = init_cca_params(jax.random.key(0), CFG)
X = jnp.zeros((2, 5, 32))


@pytest.mark.parametrize("x, kwargs, match", [
    (jnp.zeros((2, 5, 48)), {}, r"x has width 48 but the config's d_model is 32"),
    (jnp.zeros((5, 32)), {}, r"x must be \(batch, seq_len, d_model=32\), got shape \(5, 32\)"),
    (jnp.zeros((2, 5, 32), jnp.int32), {}, "x must be floating point .* got dtype int32"),
    (X, dict(dtype=jnp.int8), "dtype must be a floating dtype, got int8"),
    (X, dict(segment_ids=jnp.zeros((2, 4), jnp.int32)), r"segment_ids must be integer \(batch, seq_len\) = \(2, 5\)"),
    (X, dict(segment_ids=jnp.zeros((2, 5))), r"segment_ids must be integer .* float32"),
    (X, dict(positions=jnp.arange(4)), r"positions must be integer \(seq_len,\) or \(batch, seq_len\)"),
    (X, dict(implementation="flash"), "implementation must be one of"),
])
def test_input_errors(x, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cca_attention(PARAMS, x, CFG, **kwargs)


def test_param_errors():
    no_conv = {k: v for k, v in PARAMS.items() if k != "conv"}
    with pytest.raises(ValueError, match=r"params lack \['conv'\]\['b0'\] \(shape \(48,\)\)"):
        cca_attention(no_conv, X, CFG)
    with pytest.raises(ValueError, match=r"params have \['conv'\]\['b0'\] that this config does not use"):
        cca_attention(PARAMS, X, CCAConfig(32, 4, 2, 8, use_conv=False))
    wrong = {**PARAMS, "out": {"wo": jnp.zeros((32, 16))}}
    with pytest.raises(ValueError, match=r"params\['out'\]\['wo'\] has shape \(32, 16\), expected \(32, 32\)"):
        cca_attention(wrong, X, CFG)


def test_errors_surface_under_jit():
    with pytest.raises(ValueError, match="x has width 48"):
        jax.jit(lambda p, x: cca_attention(p, x, CFG))(PARAMS, jnp.zeros((1, 3, 48)))


def test_reused_segment_id_starts_a_new_segment():
    # A segment is a run of equal ids: [0, 0, 1, 1, 0, 0] packs three sequences, like [0, 0, 1, 1, 2, 2].
    x = jax.random.normal(jax.random.key(2), (1, 6, 32))
    reused = cca_attention(PARAMS, x, CFG, segment_ids=jnp.asarray([[0, 0, 1, 1, 0, 0]]))
    distinct = cca_attention(PARAMS, x, CFG, segment_ids=jnp.asarray([[0, 0, 1, 1, 2, 2]]))
    alone = cca_attention(PARAMS, x[:, 4:], CFG)
    assert jnp.array_equal(reused, distinct)
    assert jnp.allclose(reused[:, 4:], alone, atol=1e-5)
