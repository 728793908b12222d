"""Autoregressive generation for any model that implements the decode protocol.

The protocol (three methods; the model must be a pytree so that it can be a ``jax.jit`` argument:
a Flax NNX module is one, a frozen dataclass can be registered as one)::

    class MyLM(nnx.Module):
        def init_decode_state(self, batch: int, max_len: int, dtype) -> State:
            # Any pytree: typically one `ccajax.decode.init_decode_state(cfg, batch, max_len,
            # dtype)` per attention layer. Holds up to max_len tokens per sequence.
        def prefill(self, tokens, lengths, state) -> tuple[logits, State]:
            # tokens (B, S) int32, right-padded prompts; lengths (B,) int32 in [1, S].
            # Runs the prompts (`ccajax.decode.prefill` per layer) and returns the logits
            # (B, V) of each sequence's LAST prompt token, tokens[b, lengths[b] - 1].
        def decode_step(self, tokens, state) -> tuple[logits, State]:
            # tokens (B,) int32, one new token per sequence (`ccajax.decode.decode_step` per
            # layer); returns its logits (B, V) and the state with it appended.

`generate` compiles prefill + a ``lax.while_loop`` of decode steps + sampling into one program,
stops early once every sequence has produced a stop token, and pads after a sequence's stop.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class GenerateOutput(NamedTuple):
    """tokens (B, max_new_tokens) int32, ``pad_token`` after a sequence's stop token;
    num_tokens (B,) int32, tokens produced per sequence (its stop token included)."""

    tokens: jax.Array
    num_tokens: jax.Array


def sample_logits(logits, key, *, temperature=0.0, top_k=0, top_p=1.0):
    """Next tokens from logits: greedy (``temperature == 0``) or sampled from
    softmax(logits / temperature) restricted to the ``top_k`` most likely tokens (0 = all) and
    then to the smallest set whose probability reaches ``top_p`` (nucleus; always keeps the best).

    The options may be traced scalars, so changing them does not recompile `generate`.

    Args: logits (B, V) float; key: a PRNG key (unused when greedy); temperature >= 0;
      top_k int in [0, V]; top_p in (0, 1].
    Returns: (B,) int32.
    """
    def greedy(_):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled(_):
        scaled = logits.astype(jnp.float32) / temperature
        ordered = jnp.sort(scaled, axis=-1)[:, ::-1]
        vocab = logits.shape[-1]
        k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
        ordered = jnp.where(jnp.arange(vocab) < k, ordered, -jnp.inf)  # top-k, ranked
        probs = jax.nn.softmax(ordered, axis=-1)
        # A token stays if the tokens ranked above it hold less than top_p of the mass.
        keep = jnp.cumsum(probs, axis=-1) - probs < top_p
        cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        return jax.random.categorical(key, jnp.where(scaled < cutoff, -jnp.inf, scaled),
                                      axis=-1).astype(jnp.int32)

    return lax.cond(jnp.asarray(temperature) > 0, sampled, greedy, None)


def _check_sampling(temperature, top_k, top_p, rng):
    if not (isinstance(temperature, (int, float)) and temperature >= 0):
        raise ValueError(f"temperature must be a float >= 0 (0 = greedy), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = no top-k), got {top_k!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be a float in (0, 1] (1 = no nucleus), got {top_p!r}")
    if temperature > 0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs rng=jax.random.key(...)")


def generate(model, prompt, prompt_lengths=None, *, max_new_tokens: int, max_len: int | None = None,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             stop_tokens=(), pad_token: int = 0, rng=None, cache_dtype=jnp.bfloat16) -> GenerateOutput:
    """Generates up to ``max_new_tokens`` tokens after each (ragged) prompt.

    Args:
      model: a pytree implementing the decode protocol (module docstring).
      prompt: (B, S) int right-padded prompt tokens.
      prompt_lengths: (B,) int in [1, S]; default S for every sequence.
      max_new_tokens: tokens to produce per sequence (>= 1).
      max_len: the decode state's capacity in tokens; it must hold S + max_new_tokens - 1 (the
        last token is sampled, never fed back). Default: that, rounded up to a multiple of 128
        so that the Mosaic GPU decode kernel applies.
      temperature, top_k, top_p: sampling (`sample_logits`); temperature 0 is greedy. Runtime
        values: changing them reuses the compiled program.
      stop_tokens: token ids that end a sequence (kept in its output; pad_token after it); a
        runtime array too (only its count is compiled in).
      pad_token: filler after a stop token.
      rng: PRNG key, required when sampling.
      cache_dtype: dtype the model's decode state is allocated in.
    Returns:
      `GenerateOutput`.
    Raises:
      ValueError: bad shapes or options, or a max_len too small (the message gives the minimum).
    """
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 2 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(f"prompt must be integer tokens of shape (batch, seq_len), got "
                         f"{prompt.shape} {prompt.dtype}")
    batch, seq_len = prompt.shape
    if prompt_lengths is None:
        prompt_lengths = jnp.full((batch,), seq_len, jnp.int32)
    prompt_lengths = jnp.asarray(prompt_lengths)
    if prompt_lengths.shape != (batch,) or not jnp.issubdtype(prompt_lengths.dtype, jnp.integer):
        raise ValueError(f"prompt_lengths must be integer of shape (B,) = ({batch},), got "
                         f"{prompt_lengths.shape} {prompt_lengths.dtype}")
    if not isinstance(prompt_lengths, jax.core.Tracer) and (
            prompt_lengths.min() < 1 or prompt_lengths.max() > seq_len):
        raise ValueError(f"prompt_lengths must lie in [1, seq_len={seq_len}] (a prompt needs a "
                         f"token to continue from), got {prompt_lengths}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    _check_sampling(temperature, top_k, top_p, rng)
    needed = seq_len + max_new_tokens - 1
    if max_len is None:
        max_len = -(-needed // 128) * 128
    elif needed > max_len:
        raise ValueError(
            f"max_len={max_len} is too small: the prompt's seq_len={seq_len} plus "
            f"max_new_tokens={max_new_tokens} - 1 = {needed} tokens must fit the decode state; "
            f"raise max_len to at least {needed} or lower max_new_tokens to at most "
            f"{max(max_len - seq_len + 1, 0)}")
    key = jax.random.key(0) if rng is None else rng
    sampling = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
    return _generate(model, prompt.astype(jnp.int32), prompt_lengths.astype(jnp.int32), key,
                     sampling, jnp.asarray(stop_tokens, jnp.int32).reshape(-1),
                     max_new_tokens=max_new_tokens, max_len=max_len, pad_token=int(pad_token),
                     cache_dtype=jnp.dtype(cache_dtype))


@functools.partial(jax.jit, static_argnames=("max_new_tokens", "max_len", "pad_token",
                                             "cache_dtype"))
def _generate(model, prompt, prompt_lengths, key, sampling, stops, *, max_new_tokens, max_len,
              pad_token, cache_dtype):
    batch = prompt.shape[0]
    temperature, top_k, top_p = sampling
    sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)

    def is_stop(tokens):
        return (tokens[:, None] == stops[None, :]).any(axis=1)

    state = model.init_decode_state(batch, max_len, cache_dtype)
    logits, state = model.prefill(prompt, prompt_lengths, state)
    key, sub = jax.random.split(key)
    token = sample(logits, sub)
    out = jnp.full((batch, max_new_tokens), pad_token, jnp.int32).at[:, 0].set(token)
    carry = (jnp.int32(1), token, state, out, is_stop(token), jnp.ones((batch,), jnp.int32), key)

    def cond(carry):
        step, _, _, _, done, _, _ = carry
        return (step < max_new_tokens) & ~done.all()

    def body(carry):
        step, token, state, out, done, count, key = carry
        logits, state = model.decode_step(token, state)
        key, sub = jax.random.split(key)
        token = jnp.where(done, pad_token, sample(logits, sub))
        out = lax.dynamic_update_slice_in_dim(out, token[:, None], step, axis=1)
        count = count + (~done).astype(jnp.int32)
        return step + 1, token, state, out, done | is_stop(token), count, key

    _, _, _, out, _, count, _ = lax.while_loop(cond, body, carry)
    return GenerateOutput(out, count)
