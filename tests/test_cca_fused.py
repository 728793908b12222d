"""The fused CCA path (`ccajax.cca_fused`) computes the plain path's function (`ccajax.cca`).

float32 (and float64 when x64 is on): equal to rounding, 1e-5 relative. bf16: both paths are
compared with the float32 plain layer: the fused one within 1.5x the plain one's error (+1e-3) and
under 3e-2 (it rounds less often and is usually closer; one bf16 draw differs by tens of percent).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccajax import CCAConfig, cca_attention, cca_qkv, init_cca_params
from ccajax import attention
from ccajax.cca_fused import cca_qkv_fused, default_prologue
from ccajax.rope import contiguous_segments, default_positions

CONFIGS = {
    "cca": dict(num_q_heads=4, num_kv_heads=4),
    "ccgqa-zaya1": dict(num_q_heads=4, num_kv_heads=2, rope_fraction=0.5, rope_theta=5e6),
    "ccgqa-exp-t3": dict(num_q_heads=4, num_kv_heads=1, temperature_form="exp",
                         conv_kernel_sizes=(3, 2)),
    "ablated": dict(num_q_heads=2, num_kv_heads=2, use_conv=False, use_qk_mean=False,
                    use_value_shift=False, use_key_temperature=False),
}


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _segments(rng, batch, seq):
    """Random packed segments with runs of length >= 1, including a length-1 run."""
    ids = np.cumsum(rng.random((batch, seq)) < 0.15, axis=1)
    ids[:, 1] = ids[:, 0] + 1  # token 0 is a segment of its own
    ids[:, 2:] += 1
    return jnp.asarray(ids, jnp.int32)


def _setup(rng, name, seq=19, batch=2):
    cfg = CCAConfig(d_model=48, head_dim=8, **CONFIGS[name])
    params = jax.tree.map(lambda p: p + 0.1 * jnp.asarray(rng.normal(size=p.shape), p.dtype),
                          init_cca_params(jax.random.key(int(rng.integers(1 << 30))), cfg))
    x = jnp.asarray(rng.normal(size=(batch, seq, cfg.d_model)), jnp.float32)
    return cfg, params, x


@pytest.mark.parametrize("name,segmented", [("cca", False), ("ccgqa-zaya1", True),
                                             ("ccgqa-exp-t3", True), ("ablated", True)])
def test_qkv_float32_equal_to_plain(rng, name, segmented):
    cfg, params, x = _setup(rng, name)
    seg = contiguous_segments(_segments(rng, *x.shape[:2])) if segmented else None
    pos = default_positions(seg, *x.shape[:2])
    fused, plain = (jax.jit(lambda p, x, f=f: f(p, x, cfg, pos, seg))
                    for f in (cca_qkv_fused, cca_qkv))
    for got, want in zip(fused(params, x), plain(params, x)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_layer_gradients_float32_equal_to_plain(rng):
    cfg, params, x = _setup(rng, "ccgqa-zaya1")
    seg = _segments(rng, *x.shape[:2])
    ct = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

    def grads(prologue):
        def f(p, x):
            return jnp.vdot(cca_attention(p, x, cfg, segment_ids=seg, prologue=prologue), ct)

        return jax.jit(jax.grad(f, (0, 1)))(params, x)

    for got, want in zip(jax.tree.leaves(grads("jnp")), jax.tree.leaves(grads("plain"))):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_bf16_no_less_accurate_than_plain(rng):
    cfg, params, x = _setup(rng, "cca", seq=64)
    ct = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def run(prologue, dtype):
        y, vjp = jax.vjp(lambda p, x: cca_attention(p, x, cfg, prologue=prologue, dtype=dtype),
                         params, x)
        gp, gx = vjp(ct.astype(y.dtype))
        return y, gx, gp["compress"]["wq"], gp["value"]["wv2"]

    ref = run("plain", jnp.float32)
    plain, fused = run("plain", jnp.bfloat16), run("jnp", jnp.bfloat16)
    for p, f, r in zip(plain, fused, ref):
        assert _rel(f, r) <= 1.5 * _rel(p, r) + 1e-3 and _rel(f, r) < 3e-2


def test_first_tokens_and_segment_starts_see_no_past(rng):
    """A token at a segment start gets the same q, k, v whatever precedes it (conv halo, value
    shift)."""
    cfg, params, x = _setup(rng, "ccgqa-zaya1", seq=12, batch=1)
    seg = jnp.asarray([[0] * 5 + [1] * 7], jnp.int32)
    pos = default_positions(seg, 1, 12)
    changed = x.at[:, :5].set(jnp.asarray(rng.normal(size=(1, 5, cfg.d_model)), jnp.float32))
    qkv = jax.jit(lambda x: cca_qkv_fused(params, x, cfg, pos, seg))
    for a, b in zip(qkv(x), qkv(changed)):
        np.testing.assert_allclose(a[:, 5:], b[:, 5:], rtol=1e-6, atol=1e-6)
        assert not np.allclose(a[:, :5], b[:, :5])


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the default off the GPU")
def test_default_is_plain_off_gpu(rng):
    cfg, params, x = _setup(rng, "cca", seq=5, batch=1)
    np.testing.assert_array_equal(cca_attention(params, x, cfg),
                                  cca_attention(params, x, cfg, prologue="plain"))
    with pytest.raises(ValueError, match="prologue must be"):
        cca_attention(params, x, cfg, prologue="fused")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="starts from the CPU's default")
def test_default_prologue_follows_the_measurements(monkeypatch):
    """mosaic on Hopper for the kernel's configs and dtypes, with or without a mesh; jnp on other
    GPUs, for float32 or rotary dims the kernel does not take; plain on the CPU."""
    cfg = CCAConfig(d_model=1024, num_q_heads=4, num_kv_heads=2, head_dim=128)
    assert default_prologue(cfg, jnp.bfloat16) == "plain"  # CI runs on the CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(attention, "on_hopper", lambda: True)
    assert default_prologue(cfg, jnp.bfloat16) == "mosaic"
    assert default_prologue(cfg, jnp.float16) == "mosaic"
    assert default_prologue(cfg, jnp.float32) == "jnp"
    assert default_prologue(CCAConfig(d_model=512, num_q_heads=4, num_kv_heads=2, head_dim=64),
                            jnp.bfloat16) == "mosaic"
    assert default_prologue(CCAConfig(d_model=512, num_q_heads=4, num_kv_heads=2, head_dim=64,
                                      rope_fraction=0.125), jnp.bfloat16) == "jnp"
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((2, 1), ("data", "fsdp"))):
        assert default_prologue(cfg, jnp.bfloat16) == "mosaic"  # per device (`over_batch`)
    monkeypatch.setattr(attention, "on_hopper", lambda: False)
    assert default_prologue(cfg, jnp.bfloat16) == "jnp"
