"""Mosaic GPU attention with a custom VJP: the ``"mosaic"`` backend of the attention dispatch.

Forward: the sm90 flash-attention kernel (`attention_fwd_sm90`). Backward, for now: the gradient of
the jnp reference, recomputed from q, k, v (its scores take O(Sq*Sk) memory, like the ``"xla"``
backend) until the Mosaic GPU backward kernels land.
"""

from __future__ import annotations

import contextlib
import functools

import jax
from jax.experimental.pallas import mosaic_gpu as plgpu

from ccajax.attention import reference_attention
from ccajax.pallas.attention_fwd_sm90 import attention_fwd


def mosaic_attention(q, k, v, *, is_causal: bool = False, scale: float | None = None,
                     interpret: bool = False):
    """Softmax attention on Hopper through the Mosaic GPU kernel.

    Args:
      q: (B, Sq, Hq, d) bf16/fp16; k, v: (B, Sk, Hkv, d), Hkv divides Hq; d in {64, 128}.
      is_causal: causal mask, last query aligned with last key.
      scale: static score scale; default 1/sqrt(d).
      interpret: run the kernel on the CPU under Mosaic GPU interpret mode (simulated TMA,
        barriers and wgmma; slow, for tests).
    Returns:
      (B, Sq, Hq, d) in q's dtype; rows with no allowed key are 0.
    """
    return _attention(q, k, v, is_causal, scale, interpret)


def _forward(q, k, v, is_causal, scale, interpret):
    # The interpret context is read when the kernel is traced, so it wraps the call itself.
    mode = plgpu.force_gpu_interpret_mode() if interpret else contextlib.nullcontext()
    with mode:
        return attention_fwd(q, k, v, is_causal=is_causal, scale=scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _attention(q, k, v, is_causal, scale, interpret):
    return _forward(q, k, v, is_causal, scale, interpret)[0]


def _attention_fwd(q, k, v, is_causal, scale, interpret):
    return _forward(q, k, v, is_causal, scale, interpret)[0], (q, k, v)


def _attention_bwd(is_causal, scale, interpret, residuals, d_out):
    del interpret
    out, vjp = jax.vjp(lambda q, k, v: reference_attention(q, k, v, is_causal=is_causal, scale=scale),
                       *residuals)
    # Inside shard_map the cotangent may arrive without the output's varying mesh axes.
    missing = tuple(jax.typeof(out).manual_axis_type.varying
                    - jax.typeof(d_out).manual_axis_type.varying)
    if missing:
        d_out = jax.lax.pcast(d_out, missing, to="varying")
    return vjp(d_out)


_attention.defvjp(_attention_fwd, _attention_bwd)
