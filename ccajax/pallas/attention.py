"""Mosaic GPU attention with a custom VJP: the ``"mosaic"`` backend of the attention dispatch.

Forward: the sm90 flash-attention kernel (`attention_fwd_sm90`), which also returns the
log-sum-exp. Backward: the sm90 dq and dk/dv kernels (`attention_bwd_sm90`) from the saved q, k,
v, out and log-sum-exp; the GQA reduction of dk/dv happens inside the kernel.

SPMD: a Pallas kernel has no partitioning rule, so under `jax.jit` on a mesh XLA would gather the
batch and run the kernel replicated on every device. When a mesh is in context (`jax.set_mesh`,
as `ccajax.training.jit_steps` traces), the kernels run under `jax.shard_map` over the batch
instead: each device attends over its own rows, with no communication.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings

import jax
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.sharding import AxisType, PartitionSpec

from ccajax.pallas.attention_bwd_sm90 import attention_bwd
from ccajax.pallas.attention_fwd_sm90 import attention_fwd


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
    axes = batch_axes(q.shape[0])
    if not axes:
        return _attention(q, k, v, segment_ids, is_causal, scale, interpret)
    spec = PartitionSpec(axes)
    if segment_ids is None:
        per_device = lambda q, k, v: _attention(q, k, v, None, is_causal, scale, interpret)
        args = (q, k, v)
    else:
        per_device = lambda q, k, v, s: _attention(q, k, v, s, is_causal, scale, interpret)
        args = (q, k, v, segment_ids)
    return jax.shard_map(per_device, mesh=jax.sharding.get_abstract_mesh(),
                         in_specs=(spec,) * len(args), out_specs=spec,
                         axis_names=frozenset(axes))(*args)


def batch_axes(batch: int) -> tuple[str, ...]:
    """The automatic axes (size > 1) of the mesh in context that the kernels split the batch over;
    () without a mesh, inside a shard_map over all of them, or when they do not divide the batch
    (then the kernel runs replicated, with a warning, as XLA would run it)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    axes = tuple(name for name, kind in zip(mesh.axis_names, mesh.axis_types)
                 if kind == AxisType.Auto and mesh.shape[name] > 1)
    size = math.prod(mesh.shape[name] for name in axes)
    if axes and batch % size:
        warnings.warn(f"mosaic attention: batch {batch} is not a multiple of the {size} devices "
                      f"of mesh axes {axes}; the kernel runs on the whole batch on every device",
                      stacklevel=3)
        return ()
    return axes


def _interpreted(interpret: bool):
    # The interpret context is read when a kernel is traced, so it wraps each kernel call.
    return plgpu.force_gpu_interpret_mode() if interpret else contextlib.nullcontext()


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention(q, k, v, segment_ids, is_causal, scale, interpret):
    return _attention_fwd(q, k, v, segment_ids, is_causal, scale, interpret)[0]


def _attention_fwd(q, k, v, segment_ids, is_causal, scale, interpret):
    with _interpreted(interpret):
        out, lse = attention_fwd(q, k, v, is_causal=is_causal, scale=scale, segment_ids=segment_ids)
    return out, (q, k, v, segment_ids, out, lse)


def _vary_like(x, like):
    """Inside shard_map, a cotangent may arrive, and a kernel's output may leave, without the
    varying mesh axes of the primal it belongs to; custom_vjp requires them to match."""
    missing = tuple(jax.typeof(like).manual_axis_type.varying - jax.typeof(x).manual_axis_type.varying)
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def _attention_bwd(is_causal, scale, interpret, residuals, d_out):
    q, k, v, segment_ids, out, lse = residuals
    d_out = _vary_like(d_out, out).astype(out.dtype)
    with _interpreted(interpret):
        grads = attention_bwd(q, k, v, out, lse, d_out, is_causal=is_causal, scale=scale,
                              segment_ids=segment_ids)
    # Integer segment ids have no cotangent.
    return (*(_vary_like(g, x) for g, x in zip(grads, (q, k, v))), None)


_attention.defvjp(_attention_fwd, _attention_bwd)
