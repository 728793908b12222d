"""Cross-entropy over a large vocabulary without float32 logits in HBM.

A language model's head writes (tokens, V) logits in the compute dtype (bf16); upcasting them to
float32 before the loss (as ``optax.softmax_cross_entropy_with_integer_labels`` on float32
logits does) makes XLA write and re-read float32 copies and float32 softmax residuals: at 32k
tokens x V=50,304 that is 6.6 GB per pass. `cross_entropy` keeps the logits in their dtype,
reduces them in float32 inside the fused passes, saves only the logits and the log-partition
(tokens,) for the backward, and returns the logits' gradient in their dtype in one pass. The
values equal the float32 computation on the same (already rounded) logits; the gradient is the
float32 one rounded once to the logits' dtype, which is what the head's matmul consumed anyway.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def cross_entropy(logits: jnp.ndarray, targets: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Softmax cross-entropy with integer labels, and the log-partition for a z-loss.

    Args:
      logits: (..., V) float, any float dtype (reduced in float32).
      targets: (...) int labels in [0, V); a label outside, negative ones included (no
        wrap-around), gives a NaN ce: select such positions away, as `ccajax.training.lm_loss`
        does with its mask.
    Returns:
      (ce, log_z), each (...) float32: ``log_z = logsumexp(logits)``, ``ce = log_z -
      logits[target]``. Both are differentiable in ``logits`` (a z-loss ``log_z**2`` included).
    """
    return _forward(logits, targets)[0]


def _forward(logits, targets):
    wide = logits.astype(jnp.float32)
    top = wide.max(axis=-1, keepdims=True)  # for range only: the VJP is `_backward`'s
    log_z = jnp.log(jnp.exp(wide - top).sum(axis=-1)) + top[..., 0]
    targets = targets.astype(jnp.int32)
    picked = jnp.take_along_axis(wide, targets[..., None], axis=-1, mode="clip")[..., 0]
    picked = jnp.where((targets >= 0) & (targets < logits.shape[-1]), picked, jnp.nan)
    return (log_z - picked, log_z), (logits, targets, log_z)


def _backward(residuals, cotangents):
    logits, targets, log_z = residuals
    g_ce, g_log_z = cotangents
    # d ce / d logits = softmax - onehot(target); d log_z / d logits = softmax.
    probs = jnp.exp(logits.astype(jnp.float32) - log_z[..., None])
    onehot = jnp.arange(logits.shape[-1]) == targets[..., None]
    grad = probs * (g_ce + g_log_z)[..., None] - jnp.where(onehot, g_ce[..., None], 0.0)
    return grad.astype(logits.dtype), None


cross_entropy.defvjp(_forward, _backward)
