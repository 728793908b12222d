"""`ccajax.generate` on a tiny language model that implements the decode protocol with
`ccajax.decode` (embedding -> one CCGQA layer with a residual -> head), against a greedy loop
that recomputes the full forward over the whole sequence at every step (no cache)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ccajax import decode
from ccajax.cca import cca_attention, init_cca_params
from ccajax.config import CCAConfig
from ccajax.generate import generate, sample_logits

VOCAB, E = 32, 64
CFG = CCAConfig(E, 4, 2, 16)


class TinyLM(nnx.Module):
    """The decode protocol's reference implementation, for tests (see `ccajax.generate`)."""

    def __init__(self, key):
        k_embed, k_attn, k_head = jax.random.split(key, 3)
        self.embed = nnx.Param(jax.random.normal(k_embed, (VOCAB, E)))
        self.attn = nnx.data(init_cca_params(k_attn, CFG))
        self.head = nnx.Param(jax.random.normal(k_head, (E, VOCAB)) * E ** -0.5)

    def __call__(self, tokens):
        """Full forward, (B, S) -> logits (B, S, V)."""
        h = self.embed[...][tokens]
        return (h + cca_attention(self.attn, h, CFG, implementation="xla")) @ self.head[...]

    def init_decode_state(self, batch, max_len, dtype):
        return decode.init_decode_state(CFG, batch, max_len, dtype)

    def prefill(self, tokens, lengths, state):
        h = self.embed[...][tokens]
        y, state = decode.prefill(self.attn, h, CFG, state, lengths)
        last = (h + y)[jnp.arange(tokens.shape[0]), lengths - 1]
        return last @ self.head[...], state

    def decode_step(self, tokens, state):
        h = self.embed[...][tokens]
        y, state = decode.decode_step(self.attn, h, CFG, state)
        return (h + y) @ self.head[...], state


def _greedy_without_cache(model, prompt, lengths, steps):
    """Greedy tokens from full forwards over a fixed-size buffer: causal attention makes the
    positions after a sequence's current end irrelevant, so one compiled forward serves all steps."""
    batch = prompt.shape[0]
    buffer = np.zeros((batch, prompt.shape[1] + steps), np.int32)
    buffer[:, :prompt.shape[1]] = prompt
    forward = jax.jit(lambda m, t: m(t))
    out = []
    for j in range(steps):
        ends = lengths + j
        logits = np.asarray(forward(model, jnp.asarray(buffer)))[np.arange(batch), ends - 1]
        token = logits.argmax(-1)
        buffer[np.arange(batch), ends] = token
        out.append(token)
    return np.stack(out, axis=1)


def test_greedy_matches_full_forward_loop_with_stop_token(rng):
    model = TinyLM(jax.random.key(int(rng.integers(1 << 31))))
    prompt = rng.integers(0, VOCAB, size=(3, 6)).astype(np.int32)
    lengths = np.array([6, 3, 1], np.int32)
    steps = 7
    expected = _greedy_without_cache(model, prompt, lengths, steps)
    # Stop on the token sequence 0 produces third: it ends there; others may or may not stop.
    stop = int(expected[0, 2])
    result = generate(model, prompt, lengths, max_new_tokens=steps, stop_tokens=(stop,),
                      pad_token=-1, cache_dtype=jnp.float32)
    tokens, counts = np.asarray(result.tokens), np.asarray(result.num_tokens)
    for b in range(3):
        hits = np.flatnonzero(expected[b] == stop)
        n = hits[0] + 1 if hits.size else steps
        assert counts[b] == n
        np.testing.assert_array_equal(tokens[b, :n], expected[b, :n], err_msg=f"sequence {b}")
        assert (tokens[b, n:] == -1).all()


def test_sampling_runs_and_is_reproducible(rng):
    model = TinyLM(jax.random.key(0))
    prompt = rng.integers(0, VOCAB, size=(3, 6)).astype(np.int32)
    # The greedy test's shapes and static options: the compiled program is reused.
    kwargs = dict(max_new_tokens=7, stop_tokens=(VOCAB,), pad_token=-1, cache_dtype=jnp.float32)
    runs = [generate(model, prompt, rng=jax.random.key(seed), temperature=2.0, top_k=8, top_p=0.95,
                     **kwargs).tokens for seed in (1, 1, 2)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert (runs[0] != runs[2]).any()  # a different key draws different tokens (at T=2)
    assert runs[0].shape == (3, 7) and ((0 <= runs[0]) & (runs[0] < VOCAB)).all()


def test_sample_logits_distributions(rng):
    logits = jnp.asarray(rng.normal(size=(1, 6)) * 2, jnp.float32)
    keys = jax.random.split(jax.random.key(int(rng.integers(1 << 31))), 20000)
    @jax.jit
    def draw(temperature, top_k, top_p):
        return jax.vmap(lambda k: sample_logits(logits, k, temperature=temperature, top_k=top_k,
                                                top_p=top_p)[0])(keys)

    def frequencies(temperature, top_k=0, top_p=1.0):  # one compilation for every option
        tokens = draw(jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
        return np.bincount(np.asarray(tokens), minlength=6) / len(keys)

    probs = np.asarray(jax.nn.softmax(logits[0] / 0.7))
    # 20000 draws: the standard error of a frequency is <= 0.0036.
    np.testing.assert_allclose(frequencies(temperature=0.7), probs, atol=0.015)
    order = np.argsort(-probs)
    top2 = frequencies(temperature=0.7, top_k=2)
    assert set(np.flatnonzero(top2)) == set(order[:2])
    np.testing.assert_allclose(top2[order[:2]], probs[order[:2]] / probs[order[:2]].sum(), atol=0.015)
    # Nucleus: the smallest prefix of the ranking whose mass reaches top_p.
    top_p = 0.6
    nucleus = order[:np.searchsorted(np.cumsum(probs[order]), top_p) + 1]
    assert set(np.flatnonzero(frequencies(temperature=0.7, top_p=top_p))) == set(nucleus)
    greedy = int(np.argmax(probs))
    assert set(np.flatnonzero(frequencies(temperature=0.7, top_k=1))) == {greedy}
    assert set(np.flatnonzero(frequencies(0.0))) == {greedy}


def test_generate_errors():
    model = TinyLM(jax.random.key(0))
    prompt = np.zeros((2, 5), np.int32)
    with pytest.raises(ValueError, match=r"max_len=8 is too small.*5 plus max_new_tokens=6 - 1 = "
                                         r"10 tokens.*raise max_len to at least 10 or lower "
                                         r"max_new_tokens to at most 4"):
        generate(model, prompt, max_new_tokens=6, max_len=8)
    with pytest.raises(ValueError, match="needs rng"):
        generate(model, prompt, max_new_tokens=2, temperature=1.0)
    with pytest.raises(ValueError, match=r"prompt_lengths must lie in \[1, seq_len=5\]"):
        generate(model, prompt, np.array([0, 5]), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"top_p must be a float in \(0, 1\]"):
        generate(model, prompt, max_new_tokens=2, temperature=1.0, top_p=0.0,
                 rng=jax.random.key(0))
