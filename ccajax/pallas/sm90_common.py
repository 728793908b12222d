"""What the sm90 attention kernels share: supported inputs, argument checks, padding helpers, and
running a kernel per device over the batch under a mesh."""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec

SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
SUPPORTED_HEAD_DIMS = (64, 128)
# wgmma works on 64-row warpgroup tiles, and a 64-element row of a 16-bit dtype is exactly one
# 128-byte swizzle span; block sizes must therefore be multiples of 64.
BLOCK_MULTIPLE = 64
LOG2E = math.log2(math.e)
# SMs of an H100 / H200 SXM: `sm_count` where the device does not say.
SM90_SMS = 132


def sm_count() -> int:
    """SMs of the default device (GPUs report ``core_count``); SM90_SMS elsewhere, e.g. when
    the GPU build is lowered on a CPU-only host."""
    return getattr(jax.devices()[0], "core_count", None) or SM90_SMS


def batch_axes(batch: int) -> tuple[str, ...]:
    """The automatic axes (size > 1) of the mesh in context that a kernel splits the batch over;
    () without a mesh, inside a shard_map over all of them, or when they do not divide the batch
    (then the kernel runs replicated, with a warning, as XLA would run it)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    axes = tuple(name for name, kind in zip(mesh.axis_names, mesh.axis_types)
                 if kind == AxisType.Auto and mesh.shape[name] > 1)
    size = math.prod(mesh.shape[name] for name in axes)
    if axes and batch % size:
        warnings.warn(f"Pallas kernel: batch {batch} is not a multiple of the {size} devices of "
                      f"mesh axes {axes}; the kernel runs on the whole batch on every device",
                      stacklevel=4)
        return ()
    return axes


def over_batch(kernel, *args, replicated=()):
    """``kernel(*args, *replicated)``, each of ``args`` batch-first, per device under the mesh in
    context.

    A Pallas kernel has no SPMD partitioning rule: under `jax.jit` on a mesh, XLA would gather
    the batch and run it replicated on every device. With a mesh in context (`jax.set_mesh`, as
    `ccajax.training.jit_steps` traces), it runs under `jax.shard_map` over the batch instead:
    each device on its own rows, with no communication in the forward. ``replicated`` (pytrees,
    e.g. parameters) go whole to every device. A differentiable kernel must type, with
    `vary_like`: its outputs and gradients like their batch-sharded inputs (an output typed
    invariant would have its cotangents summed over the devices by shard_map's transpose), and
    replicated parameters like the batch-sharded inputs before its custom VJP (the transpose of
    that cast sums their per-device gradients). Without a mesh (or on one device) this is
    ``kernel(*args, *replicated)``. None args pass through.
    """
    axes = batch_axes(next(a for a in args if a is not None).shape[0])
    if not axes:
        return kernel(*args, *replicated)
    given = [i for i, a in enumerate(args) if a is not None]

    def per_device(local, whole):
        full = list(args)
        for i, a in zip(given, local):
            full[i] = a
        return kernel(*full, *whole)

    mesh = jax.sharding.get_abstract_mesh()
    spec = PartitionSpec(axes)
    # Manual over every automatic axis, also those that do not split the batch (size 1, or
    # left out): in a partly manual body every op of the kernel's wrapper gets a sharding
    # constraint for the other axes (130 in a 1-layer train step on a (data=2, fsdp=1) mesh)
    # and XLA would partition those ops over them; the kernel runs whole per device anyway.
    manual = frozenset(name for name, kind in zip(mesh.axis_names, mesh.axis_types)
                       if kind == AxisType.Auto)
    return jax.shard_map(per_device, mesh=mesh,
                         in_specs=((spec,) * len(given), PartitionSpec()), out_specs=spec,
                         axis_names=manual)(tuple(args[i] for i in given), tuple(replicated))


def varies_over_a_mesh_axis(*arrays) -> bool:
    """Whether any of ``arrays`` (None skipped) is typed varying over a manual mesh axis, as
    batch-sharded inputs are inside `jax.shard_map` (`over_batch`)."""
    return any(a is not None and jax.typeof(a).manual_axis_type.varying for a in arrays)


def vary_like(x, like):
    """x with the varying mesh axes of ``like`` (inside shard_map).

    A Pallas kernel's outputs carry no varying axes, and a cotangent may arrive without them,
    while custom_vjp requires each gradient to have its primal's type (2026-11-30: the CCA
    prologue's backward failed this check on 2 H200s)."""
    missing = tuple(jax.typeof(like).manual_axis_type.varying - jax.typeof(x).manual_axis_type.varying)
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def pad_axis(x, axis: int, length: int, value=0):
    """Pads ``axis`` of x up to ``length`` with ``value`` (no copy when it already has that length)."""
    if x.shape[axis] == length:
        return x
    pads = [(0, 0)] * x.ndim
    pads[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, pads, constant_values=value)


def check_attention_args(q, k, v, *, is_causal, scale, segment_ids, same_dtype=()) -> None:
    """ValueError naming the argument, its value and what is valid, for the inputs every sm90
    attention kernel takes.

    Args: q (B, Sq, Hq, d); k, v (B, Sk, Hkv, d); is_causal; scale; segment_ids (B, S) or None;
      same_dtype: further ``(name, array)`` pairs that must be 4-D with q's dtype (out, d_out).
    """
    named = (("q", q), ("k", k), ("v", v), *same_dtype)
    for name, x in named:
        if x.ndim != 4:
            raise ValueError(f"{name} must be 4-D (B, S, H, d); got {name}.shape={x.shape}")
    for name, x in named:
        if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
            raise ValueError(f"{name}.dtype must be bfloat16 or float16; got {name}.dtype={x.dtype}")
    if len({jnp.dtype(x.dtype) for _, x in named}) > 1:
        raise ValueError(f"{', '.join(n for n, _ in named)} must share one dtype; got "
                         + ", ".join(f"{n} {x.dtype}" for n, x in named))
    batch, seq_q, num_q_heads, head_dim = q.shape
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim d must be one of {SUPPORTED_HEAD_DIMS}; got d={head_dim} "
                         f"(q.shape={q.shape})")
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape (B, Sk, Hkv, d); got k {k.shape}, v {v.shape}")
    if k.shape[0] != batch:
        raise ValueError(f"q and k must share the batch B; got q {q.shape}, k {k.shape}")
    if k.shape[3] != head_dim:
        raise ValueError(f"q and k/v must share the head dim d; got q d={head_dim}, k d={k.shape[3]}")
    if seq_q < 1 or k.shape[1] < 1:
        raise ValueError(f"sequence lengths must be >= 1; got Sq={seq_q}, Sk={k.shape[1]}")
    num_kv_heads = k.shape[2]
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        raise ValueError(
            f"kv heads Hkv must divide query heads Hq; got Hq={num_q_heads}, Hkv={num_kv_heads}")
    if not isinstance(is_causal, bool):
        raise ValueError(f"is_causal must be a bool; got is_causal={is_causal!r}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)
                                  and scale > 0):
        raise ValueError(f"scale must be a finite positive float or None; got scale={scale!r}")
    if segment_ids is not None:
        if seq_q != k.shape[1]:
            raise ValueError(f"segment_ids need Sq == Sk; got Sq={seq_q}, Sk={k.shape[1]}")
        if tuple(segment_ids.shape) != (batch, seq_q):
            raise ValueError(f"segment_ids must have shape (B, S) = {(batch, seq_q)}; got "
                             f"segment_ids.shape={tuple(segment_ids.shape)}")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(
                f"segment_ids must be an integer array; got segment_ids.dtype={segment_ids.dtype}")


def check_block_sizes(max_block: int, **blocks) -> None:
    """Each named block size must be a positive multiple of BLOCK_MULTIPLE, at most ``max_block``."""
    for name, blk in blocks.items():
        if not isinstance(blk, int) or blk <= 0 or blk % BLOCK_MULTIPLE or blk > max_block:
            raise ValueError(f"{name} must be a positive multiple of {BLOCK_MULTIPLE} and at most "
                             f"{max_block}; got {name}={blk!r}")
