"""Mosaic GPU attention with a custom VJP: the ``"mosaic"`` and ``"mosaic_fwd_cudnn_bwd"``
backends of the attention dispatch.

Forward: the sm90 flash-attention kernel (`attention_fwd_sm90`), which also returns the
log-sum-exp. Backward, from the saved q, k, v, out and log-sum-exp: either the sm90 backward
kernels (`attention_bwd_sm90`; the GQA reduction of dk/dv happens inside the kernel; dq by TMA
reduce-adds from the dk/dv kernel, or, bit-reproducibly, by its own kernel), or cuDNN's
flash backward (the custom call behind ``jax.nn.dot_product_attention``'s gradient), which takes
the same residuals: our log-sum-exp is cuDNN's softmax statistic.
Under a mesh the kernels run per device over the batch (`sm90_common.over_batch`).
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

from ccajax.pallas.attention_bwd_sm90 import attention_bwd
from ccajax.pallas.attention_fwd_sm90 import attention_fwd
from ccajax.pallas.sm90_common import over_batch, vary_like


BACKWARDS = ("mosaic", "mosaic_deterministic", "cudnn")


def cudnn_backward_available() -> bool:
    """Whether this jax has the private cuDNN backward primitive `_cudnn_backward` binds (it
    does in the pinned jax 0.11.2; a later jax may move it)."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as cudnn
    except ImportError:
        return False
    return all(hasattr(cudnn, name) for name in (
        "_dot_product_attention_bwd_p_wrapper", "MaskType", "AttentionLayout"))


def cudnn_backward_unsupported(q, k, segment_ids, is_causal) -> str | None:
    """Why ``backward="cudnn"`` cannot take this call, or None when it can."""
    if segment_ids is not None:
        return "segment_ids are not passed to cuDNN here"
    if q.shape[1] % 2 or k.shape[1] % 2:
        return (f"cuDNN's backward needs even sequence lengths; got Sq={q.shape[1]}, "
                f"Sk={k.shape[1]}")
    if is_causal and q.shape[1] != k.shape[1]:
        return (f"cuDNN aligns a causal mask with the first key, ours with the last: they agree "
                f"only for Sq == Sk; got Sq={q.shape[1]}, Sk={k.shape[1]}")
    if not cudnn_backward_available():
        return f"this jax ({jax.__version__}) lacks the cuDNN backward primitive (tested: 0.11.2)"
    return None


def mosaic_attention(q, k, v, *, is_causal: bool = False, scale: float | None = None,
                     segment_ids=None, interpret: bool = False, backward: str = "mosaic"):
    """Softmax attention on Hopper through the Mosaic GPU kernels.

    Args:
      q: (B, Sq, Hq, d) bf16/fp16; k, v: (B, Sk, Hkv, d), Hkv divides Hq; d in {64, 128}.
      is_causal: causal mask, last query aligned with last key.
      scale: static score scale; default 1/sqrt(d).
      segment_ids: (B, S) int32 or None (needs Sq == Sk): tokens attend only within their segment.
      interpret: run the kernels on the CPU under Mosaic GPU interpret mode (simulated TMA,
        barriers and wgmma; slow, for tests).
      backward: ``"mosaic"`` (our backward kernels; on a GPU dq is summed with TMA reduce-adds
        where d allows, so its last bits vary between runs), ``"mosaic_deterministic"`` (our
        separate dq kernel: bit-identical gradients run to run; the fused dq's backward is 2-16%
        faster at 16k on an H200) or ``"cudnn"`` (cuDNN's flash backward on our forward's out
        and log-sum-exp; GPU only, no segment_ids, even Sq and Sk, Sq == Sk when causal: see
        `cudnn_backward_unsupported`; its dq also uses atomics).
    Returns:
      (B, Sq, Hq, d) in q's dtype; rows with no allowed key are 0 (with zero gradients).
    """
    if backward not in BACKWARDS:
        raise ValueError(f"backward must be one of {BACKWARDS}; got backward={backward!r}")
    if backward == "cudnn":
        reason = "it runs on a GPU, not in interpret mode" if interpret else \
            cudnn_backward_unsupported(q, k, segment_ids, is_causal)
        if reason:
            raise ValueError(f"backward='cudnn' (implementation='mosaic_fwd_cudnn_bwd') cannot "
                             f"take this call: {reason}; use backward='mosaic' "
                             f"(implementation='mosaic')")
    return over_batch(lambda q, k, v, s: _attention(q, k, v, s, is_causal, scale, interpret,
                                                    backward),
                      q, k, v, segment_ids)


def _interpreted(interpret: bool):
    # The interpret context is read when a kernel is traced, so it wraps each kernel call.
    return plgpu.force_gpu_interpret_mode() if interpret else contextlib.nullcontext()


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _attention(q, k, v, segment_ids, is_causal, scale, interpret, backward):
    return _attention_fwd(q, k, v, segment_ids, is_causal, scale, interpret, backward)[0]


def _attention_fwd(q, k, v, segment_ids, is_causal, scale, interpret, backward):
    del backward
    with _interpreted(interpret):
        out, lse = attention_fwd(q, k, v, is_causal=is_causal, scale=scale, segment_ids=segment_ids)
    # Typed varying like q under `over_batch`: else shard_map's transpose sums the cotangents.
    out = vary_like(out, q)
    return out, (q, k, v, segment_ids, out, lse)


def _attention_bwd(is_causal, scale, interpret, backward, residuals, d_out):
    q, k, v, segment_ids, out, lse = residuals
    d_out = vary_like(d_out, out).astype(out.dtype)
    if backward == "cudnn":
        grads = _cudnn_backward(q, k, v, out, lse, d_out, is_causal=is_causal, scale=scale)
    else:
        with _interpreted(interpret):
            grads = attention_bwd(q, k, v, out, lse, d_out, is_causal=is_causal, scale=scale,
                                  segment_ids=segment_ids,
                                  fused_dq=False if backward == "mosaic_deterministic" else None)
    # Integer segment ids have no cotangent.
    return (*(vary_like(g, x) for g, x in zip(grads, (q, k, v))), None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def _cudnn_backward(q, k, v, out, lse, d_out, *, is_causal, scale):
    """(dq, dk, dv) from cuDNN's flash backward on our forward's residuals.

    lse: (B, Hq, Sq_pad) natural-log log-sum-exp of the scaled scores, which is the softmax
    statistic cuDNN's own forward saves ((B, Hq, Sq) float32); the rows past Sq are padding.
    The primitive is private to jax (pinned 0.11.2); `cudnn_backward_available` guards it.
    """
    from jax._src.cudnn import fused_attention_stablehlo as cudnn
    unused = jnp.zeros(0, q.dtype)  # no bias, sequence lengths, offsets or page tables
    return cudnn._dot_product_attention_bwd_p_wrapper.bind(
        q, k, v, unused, unused, unused, unused, unused, unused, unused,
        lse[:, :, :q.shape[1]], out, d_out,
        scale=q.shape[-1] ** -0.5 if scale is None else float(scale), seed=0, dropout_rate=0.0,
        variadic_args=(False, False),
        mask_type=cudnn.MaskType.CAUSAL if is_causal else cudnn.MaskType.NO_MASK,
        layout=cudnn.AttentionLayout.BTNH.value, sliding_window_length=None)
