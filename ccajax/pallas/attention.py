"""Mosaic GPU attention with a custom VJP: the ``"mosaic"`` backend of the attention dispatch.

Forward: the sm90 flash-attention kernel (`attention_fwd_sm90`), which also returns the
log-sum-exp. Backward: the sm90 dq and dk/dv kernels (`attention_bwd_sm90`) from the saved q, k,
v, out and log-sum-exp; the GQA reduction of dk/dv happens inside the kernel.
Under a mesh the kernels run per device over the batch (`sm90_common.over_batch`).
"""

from __future__ import annotations

import contextlib
import functools

import jax
from jax.experimental.pallas import mosaic_gpu as plgpu

from ccajax.pallas.attention_bwd_sm90 import attention_bwd
from ccajax.pallas.attention_fwd_sm90 import attention_fwd
from ccajax.pallas.sm90_common import over_batch, vary_like


def mosaic_attention(q, k, v, *, is_causal: bool = False, scale: float | None = None,
                     segment_ids=None, interpret: bool = False):
    """Softmax attention on Hopper through the Mosaic GPU kernels.

    Args:
      q: (B, Sq, Hq, d) bf16/fp16; k, v: (B, Sk, Hkv, d), Hkv divides Hq; d in {64, 128}.
      is_causal: causal mask, last query aligned with last key.
      scale: static score scale; default 1/sqrt(d).
      segment_ids: (B, S) int32 or None (needs Sq == Sk): tokens attend only within their segment.
      interpret: run the kernels on the CPU under Mosaic GPU interpret mode (simulated TMA,
        barriers and wgmma; slow, for tests).
    Returns:
      (B, Sq, Hq, d) in q's dtype; rows with no allowed key are 0 (with zero gradients).
    """
    return over_batch(lambda q, k, v, s: _attention(q, k, v, s, is_causal, scale, interpret),
                      q, k, v, segment_ids)


def _interpreted(interpret: bool):
    # The interpret context is read when a kernel is traced, so it wraps each kernel call.
    return plgpu.force_gpu_interpret_mode() if interpret else contextlib.nullcontext()


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention(q, k, v, segment_ids, is_causal, scale, interpret):
    return _attention_fwd(q, k, v, segment_ids, is_causal, scale, interpret)[0]


def _attention_fwd(q, k, v, segment_ids, is_causal, scale, interpret):
    with _interpreted(interpret):
        out, lse = attention_fwd(q, k, v, is_causal=is_causal, scale=scale, segment_ids=segment_ids)
    # Typed varying like q under `over_batch`: else shard_map's transpose sums the cotangents.
    out = vary_like(out, q)
    return out, (q, k, v, segment_ids, out, lse)


def _attention_bwd(is_causal, scale, interpret, residuals, d_out):
    q, k, v, segment_ids, out, lse = residuals
    d_out = vary_like(d_out, out).astype(out.dtype)
    with _interpreted(interpret):
        grads = attention_bwd(q, k, v, out, lse, d_out, is_causal=is_causal, scale=scale,
                              segment_ids=segment_ids)
    # Integer segment ids have no cotangent.
    return (*(vary_like(g, x) for g, x in zip(grads, (q, k, v))), None)


_attention.defvjp(_attention_fwd, _attention_bwd)
