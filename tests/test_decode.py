"""Per-layer decoding (`ccajax.decode`) against the layers' full forward, in float32.

Prefill of a ragged, right-padded prompt then one decode step per remaining token must give the
full forward's output at every position of every sequence. Padding positions of the prompt hold
random junk, so a state that leaked padding (cache rows, conv rows, the value-shift input) fails.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccajax import decode
from ccajax.cca import cca_attention, init_cca_params
from ccajax.config import CCAConfig, MHAConfig, MLAConfig
from ccajax.mha import init_mha_params, mha_attention
from ccajax.mla import init_mla_params, mla_attention

E = 64
LAYERS = {
    "cca 4:4": (CCAConfig(E, 4, 4, 16), init_cca_params, cca_attention),
    "ccgqa 4:2 zaya1-form": (CCAConfig(E, 4, 2, 16, rope_fraction=0.5, rope_theta=5e6),
                             init_cca_params, cca_attention),
    "ccgqa 4:1 t=(3,2) exp-temp": (CCAConfig(E, 4, 1, 16, conv_kernel_sizes=(3, 2),
                                             temperature_form="exp"),
                                   init_cca_params, cca_attention),
    "cca ablated": (CCAConfig(E, 2, 2, 16, use_conv=False, use_value_shift=False,
                              use_key_temperature=False), init_cca_params, cca_attention),
    "mha 4:4": (MHAConfig(E, 4, 4, 16), init_mha_params, mha_attention),
    "gqa 4:2": (MHAConfig(E, 4, 2, 16, rope_fraction=0.5), init_mha_params, mha_attention),
    "mla q-lora": (MLAConfig(E, 4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                             v_head_dim=16, q_lora_rank=24), init_mla_params, mla_attention),
}
# Measured worst max-abs error relative to max |full| over these layers x 3 seeds: 3.2e-7 (fp32).
TOL = 3e-6


def run_unoptimized(fn, *args):
    """jit(fn)(*args) compiled at XLA's lowest backend optimisation level: these small graphs
    compile in half the time, which dominates this file's runtime on CI's CPUs."""
    compiled = jax.jit(fn).trace(*args).lower().compile({"xla_backend_optimization_level": 0})
    return jax.device_get(compiled(*args))


def _params(init, cfg, rng):
    params = init(jax.random.key(int(rng.integers(1 << 31))), cfg)
    # Nonzero temperatures / conv biases everywhere: a default init of 1 / 0 would hide a mix-up.
    return jax.tree.map(lambda p: p + 0.1 * jnp.asarray(rng.normal(size=p.shape), p.dtype), params)


@pytest.mark.parametrize("name", LAYERS)
def test_prefill_then_steps_match_full_forward(name, rng):
    cfg, init, forward = LAYERS[name]
    params = _params(init, cfg, rng)
    batch, total, prompt_len = 3, 9, 5
    prompt_lengths = np.array([5, 2, 0])
    x = rng.normal(size=(batch, total, E))
    # Right-padded prompt: junk after each sequence's own length.
    keep = np.arange(prompt_len)[None, :, None] < prompt_lengths[:, None, None]
    prompt = np.where(keep, x[:, :prompt_len], rng.normal(size=(batch, prompt_len, E)))
    steps = total - prompt_lengths.min()
    positions = np.minimum(prompt_lengths + np.arange(steps)[:, None], total - 1)  # (steps, B)
    step_inputs = x[np.arange(batch), positions]  # (steps, B, E); finished sequences repeat

    def run(params, x, prompt, lengths, step_inputs):
        """One compilation: the full forward, the prefill and a scan of decode steps."""
        full = forward(params, x, cfg, implementation="xla")
        state = decode.init_decode_state(cfg, batch, 16, jnp.float32)
        y_prompt, state = decode.prefill(params, prompt, cfg, state, lengths)

        def step(state, x_t):
            y_t, state = decode.decode_step(params, x_t, cfg, state, implementation="xla")
            return state, y_t

        state, y_steps = jax.lax.scan(step, state, step_inputs)
        return full, y_prompt, y_steps, state.lengths

    full, y_prompt, y_steps, lengths = run_unoptimized(
        run, params, *(jnp.asarray(a, jnp.float32) for a in (x, prompt)),
        jnp.asarray(prompt_lengths), jnp.asarray(step_inputs, jnp.float32))
    atol = TOL * np.abs(full).max()
    for b, n in enumerate(prompt_lengths):
        np.testing.assert_allclose(y_prompt[b, :n], full[b, :n], atol=atol, rtol=0)
        generated = total - n  # the steps that fed sequence b a real token
        np.testing.assert_allclose(y_steps[:generated, b], full[b, n:], atol=atol, rtol=0,
                                   err_msg=f"decode steps of sequence {b}")
    np.testing.assert_array_equal(lengths, prompt_lengths + steps)


def test_decode_state_layout():
    cfg = CCAConfig(2048, 8, 2, 128, rope_fraction=0.5)  # ZAYA1's shape
    state = decode.init_decode_state(cfg, 2, 64, jnp.bfloat16)
    assert state.k.shape == state.v.shape == (2, 64, 2, 128) and state.k.dtype == jnp.bfloat16
    assert state.conv.shape == (2, 2, 10, 128) and state.x_prev.shape == (2, 2048)
    assert state.lengths.dtype == jnp.int32 and not state.lengths.any()
    mla = decode.init_decode_state(MLAConfig.deepseek_v2_lite(), 2, 64)
    assert mla.latent.shape == (2, 64, 576)


def test_state_can_be_donated():
    """Serving updates the cache in place: every buffer of the state must be its own (k and v
    share init code with the MHA state)."""
    cfg = CCAConfig(E, 4, 2, 16)
    step = jax.jit(lambda s, p, x: decode.decode_step(p, x, cfg, s)[1], donate_argnums=0)
    state = step(_small_state(cfg), init_cca_params(jax.random.key(0), cfg), jnp.ones((2, E)))
    np.testing.assert_array_equal(state.lengths, [1, 1])


def test_cache_bytes_and_max_context():
    mha = MHAConfig(2048, 16, 16, 128)
    ccgqa = CCAConfig(2048, 8, 2, 128)
    assert decode.cache_bytes_per_token(mha) == 8 * decode.cache_bytes_per_token(ccgqa) == 8192
    assert decode.cache_bytes_per_token(MLAConfig.deepseek_v2_lite()) == 576 * 2
    memory = 80 * 2 ** 30
    for cfg in (mha, ccgqa):
        n = decode.max_context(cfg, memory, batch=4, num_layers=2, reserved_bytes=2 ** 30)
        used = [2 * decode.state_bytes(cfg, 4, m) for m in (n, n + 1)]
        assert used[0] <= memory - 2 ** 30 < used[1]


def _small_state(cfg, batch=2, max_len=4):
    return decode.init_decode_state(cfg, batch, max_len, jnp.float32)


def test_errors_name_the_problem(rng):
    cfg = CCAConfig(E, 4, 2, 16)
    params = init_cca_params(jax.random.key(0), cfg)
    state = _small_state(cfg)
    x = jnp.asarray(rng.normal(size=(3, E)), jnp.float32)
    with pytest.raises(ValueError, match=r"x_t has batch 3 but the decode state holds 2"):
        decode.decode_step(params, x, cfg, state)
    with pytest.raises(ValueError, match=r"seq_len=5 > the state's max_len=4"):
        decode.prefill(params, jnp.zeros((2, 5, E)), cfg, state)
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, seq_len=3\]"):
        decode.prefill(params, jnp.zeros((2, 3, E)), cfg, state, jnp.array([1, 4]))
    with pytest.raises(ValueError, match="must be a KVCache"):
        decode.decode_step(init_mha_params(jax.random.key(0), MHAConfig(E, 4, 2, 16)), x[:2],
                           MHAConfig(E, 4, 2, 16), state)
    with pytest.raises(ValueError, match="causal"):
        decode.init_decode_state(CCAConfig(E, 4, 2, 16, causal=False), 1, 8)
    with pytest.raises(ValueError, match="max_len must be a positive int"):
        decode.init_decode_state(cfg, 1, 0)


def test_cache_overflow(rng):
    cfg = MHAConfig(E, 4, 2, 16)
    params = init_mha_params(jax.random.key(0), cfg)
    x = jnp.asarray(rng.normal(size=(2, 4, E)), jnp.float32)
    _, state = decode.prefill(params, x, cfg, _small_state(cfg), jnp.array([4, 3]))
    with pytest.raises(ValueError, match="state is full.*max_len=4; init the state with a larger"):
        decode.decode_step(params, x[:, 0], cfg, state)
    # Under jit the full sequence's output is NaN and its cache untouched; the other one runs.
    y, new = jax.jit(lambda p, x, s: decode.decode_step(p, x, cfg, s))(params, x[:, 0], state)
    assert np.isnan(y[0]).all() and np.isfinite(y[1]).all()
    np.testing.assert_array_equal(new.k[0], state.k[0])
    np.testing.assert_array_equal(new.lengths, [4, 4])
