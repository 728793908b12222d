"""Split-K decode attention (flash-decoding) for Hopper (sm90), in explicit Mosaic GPU style.

Public entry: :func:`decode_attention_sm90`. One query token per sequence attends over the first
``lengths[b]`` rows of a preallocated KV cache; `ccajax.pallas.decode` dispatches here.

Shapes
------
* q: (B, Hq, d); k, v: (B, T, Hkv, d) caches (T = the cache's max length, a multiple of
  ``block_kv``); lengths: (B,) int, keys [0, lengths[b]) are attended (0 gives a zero output).
  bf16 or fp16, d in {64, 128}, Hkv divides Hq and query head h reads kv head h // (Hq // Hkv).
* out: (B, Hq, d) in q's dtype.

Kernel layout
-------------
* Grid ``(splits, Hkv, B)``: the cache's T rows are cut into ``splits`` chunks of
  ``chunk = T / splits`` rows (a multiple of ``block_kv``), and one CTA (one warpgroup) reads one
  chunk of one kv head of one sequence, so even B = 1 spreads over the whole GPU. Chunks that
  start at or after ``lengths[b]`` load nothing; the last one that holds keys stops at the
  tile holding ``lengths[b] - 1``: a ragged batch reads only its own keys.
* Rows of the tile: the G = Hq / Hkv query heads of the kv head (CCGQA 8:2: 4), zero-padded to
  the 64 rows a warpgroup's wgmma needs. The 16x wasted MMA work is free: decoding is bound by
  reading the cache (a (64 x 128) x (128 x 128) wgmma per 64 KiB of k and v takes ~0.1 us on an
  SM, reading those bytes at the SM's share of HBM bandwidth ~2.8 us), and wgmma keeps the
  operands in shared memory where TMA puts them, so no register reshuffling per tile.
* Pipeline: a ``stages``-slot ring of (block_kv, d) k and v tiles, filled by TMA. A slot's k tile
  is refilled with the tile ``stages`` steps ahead as soon as QK^T has read it, its v tile after
  PV. Every tile is masked (``key < lengths[b]``): the mask costs nothing next to the memory
  traffic, and every loaded tile holds at least one allowed key, so the running max is finite
  from the first tile on.
* Output per CTA: the chunk's normalised partial output (G, d) float32 and its log2-sum-exp
  (64,) float32 (-inf for a chunk with no key), written by TMA; the split combine (a softmax
  over the chunks' lse, weighting their outputs) runs in jnp, and reads ~1% of the cache's bytes.
* P (the softmax probabilities) reaches the PV wgmma through shared memory, on the GPU too: the
  interpreter needs it there (see NOTES_attention.md), so the interpreted path and the compiled
  path are the same code, and the few extra shared-memory stores hide under the TMA traffic.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ccajax.pallas.sm90_common import (LOG2E, SM90_SMS, SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS,
                                       sm_count)
from ccajax.pallas.sm90_pipeline import (WG_ROWS, full_rows, matmul, tile_transforms,
                                         zeros_acc)

BLOCK_KV_CHOICES = (64, 128)
# A CTA's fixed cost (q load, pipeline fill, epilogue) in units of one tile's streaming time.
CTA_OVERHEAD_TILES = 2


def default_splits(batch: int, num_kv_heads: int, max_len: int, block_kv: int,
                   num_sms: int = SM90_SMS) -> int:
    """How many chunks to cut each (sequence, kv head) into, a divisor of T / block_kv.

    Minimises the modelled time of full-length sequences: waves of one CTA per SM (at d=128 the
    kernel's shared memory admits one), each CTA streaming its chunk's tiles plus a fixed
    overhead. E.g.
    B=16, Hkv=2, T=32k: 4 splits, 128 CTAs in one wave; B=1, Hkv=2, T=128k: 64 splits.
    """
    tiles = max_len // block_kv

    def modelled_time(splits):
        waves = -(-batch * num_kv_heads * splits // num_sms)
        return waves * (tiles // splits + CTA_OVERHEAD_TILES)

    return min((s for s in range(1, tiles + 1) if tiles % s == 0), key=modelled_time)


def check_decode_args(q, k, v, lengths, block_kv, stages, splits) -> None:
    """ValueError naming the argument, its value and what is valid."""
    if q.ndim != 3 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q must be (B, Hq, d) and k, v (B, T, Hkv, d); got q {q.shape}, "
                         f"k {k.shape}, v {v.shape}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES or x.dtype != q.dtype:
            raise ValueError(f"{name}.dtype must be bfloat16 or float16, the same for q, k, v; got "
                             f"q {q.dtype}, k {k.dtype}, v {v.dtype}")
    batch, num_q_heads, head_dim = q.shape
    if head_dim not in SUPPORTED_HEAD_DIMS or k.shape[3] != head_dim or v.shape != k.shape:
        raise ValueError(f"head dim d must be one of {SUPPORTED_HEAD_DIMS}, shared by q, k and v "
                         f"(k.shape == v.shape); got q {q.shape}, k {k.shape}, v {v.shape}")
    if k.shape[0] != batch or num_q_heads % k.shape[2] or num_q_heads // k.shape[2] > WG_ROWS:
        raise ValueError(f"k must be (B={batch}, T, Hkv, d) with Hkv dividing Hq={num_q_heads} "
                         f"and Hq/Hkv <= {WG_ROWS}; got k {k.shape}")
    if lengths.shape != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be an integer array of shape (B,) = ({batch},); got "
                         f"{lengths.shape} {lengths.dtype}")
    if block_kv not in BLOCK_KV_CHOICES or k.shape[1] % block_kv:
        raise ValueError(f"block_kv must be one of {BLOCK_KV_CHOICES} and divide the cache length "
                         f"T={k.shape[1]}; got block_kv={block_kv!r}")
    if not isinstance(stages, int) or not 2 <= stages <= 4:
        raise ValueError(f"stages must be an int in [2, 4]; got stages={stages!r}")
    tiles = k.shape[1] // block_kv
    if splits is not None and (not isinstance(splits, int) or splits < 1 or tiles % splits):
        raise ValueError(f"splits must be a positive int dividing T/block_kv = {tiles}; got "
                         f"splits={splits!r}")


def decode_attention_sm90(q, k, v, lengths, *, scale: float | None = None, block_kv: int = 128,
                          stages: int = 2, splits: int | None = None):
    """One decode step of attention over a KV cache on Hopper (module docstring: the layout).

    Args:
      q: (B, Hq, d) bf16/fp16, the new token's queries.
      k, v: (B, T, Hkv, d) caches in q's dtype; T a multiple of ``block_kv``.
      lengths: (B,) int, valid cache rows per sequence (0..T).
      scale: static score scale; default 1/sqrt(d).
      block_kv: cache rows per pipeline step, 64 or 128.
      stages: depth of the shared-memory k/v ring, 2 to 4 (shared memory: 2 x stages x block_kv
        x d x 2 bytes, plus 64 KiB at d=128).
      splits: chunks per (sequence, kv head), dividing T / block_kv; default `default_splits`.
    Returns:
      (B, Hq, d) in q's dtype.
    Raises:
      ValueError: on unsupported dtypes, head dims, shapes, block sizes or splits.
    """
    check_decode_args(q, k, v, lengths, block_kv, stages, splits)
    if splits is None:
        splits = default_splits(q.shape[0], k.shape[2], k.shape[1], block_kv, sm_count())
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _decode(q, k, v, lengths.astype(jnp.int32), scale=scale, block_kv=block_kv,
                   stages=stages, splits=splits)


@functools.partial(jax.jit, static_argnames=("scale", "block_kv", "stages", "splits"))
def _decode(q, k, v, lengths, *, scale, block_kv, stages, splits):
    batch, num_q_heads, head_dim = q.shape
    max_len, num_kv_heads = k.shape[1], k.shape[2]
    group = num_q_heads // num_kv_heads
    dtype = q.dtype
    chunk = max_len // splits
    stages = min(stages, chunk // block_kv)
    score_mult = scale * LOG2E  # scores in log2 units: softmax with exp2
    # The group's query heads are the first G rows of a zero 64-row tile (wgmma's M).
    q_rows = jnp.pad(q.reshape(batch, num_kv_heads, group, head_dim),
                     ((0, 0), (0, 0), (0, WG_ROWS - group), (0, 0)))

    def kernel(q_ref, k_ref, v_ref, len_ref, o_ref, lse_ref, q_smem, k_smem, v_smem, p_smem,
               o_smem, lse_smem, q_barrier, k_barriers, v_barriers):
        split, head, b = lax.axis_index("splits"), lax.axis_index("heads"), lax.axis_index("batch")
        length = len_ref[b]
        start = split * chunk
        end = jnp.minimum(start + chunk, length)
        steps = lax.div(jnp.maximum(end - start, 0) + (block_kv - 1), jnp.int32(block_kv))

        def rows(step):
            return pl.ds(start + step * block_kv, block_kv)

        def issue_k(step, slot):
            plgpu.copy_gmem_to_smem(k_ref.at[b, rows(step), head], k_smem.at[slot],
                                    k_barriers.at[slot])

        def issue_v(step, slot):
            plgpu.copy_gmem_to_smem(v_ref.at[b, rows(step), head], v_smem.at[slot],
                                    v_barriers.at[slot])

        plgpu.copy_gmem_to_smem(q_ref.at[b, head], q_smem, q_barrier)
        for i in range(stages):
            @pl.when(i < steps)
            def _():
                issue_k(i, i)
                issue_v(i, i)

        plgpu.barrier_wait(q_barrier)

        def kv_step(step, carry):
            acc, m_i, l_i = carry
            slot = lax.rem(step, jnp.int32(stages))
            refill = step + stages < steps
            plgpu.barrier_wait(k_barriers.at[slot])
            s = matmul(q_smem, k_smem.at[slot].transpose((1, 0)), (WG_ROWS, block_kv))
            # Reading s awaited the wgmma: the k slot is free for the tile `stages` ahead.
            pl.when(refill)(lambda: issue_k(step + stages, slot))
            keys = start + step * block_kv + plgpu.broadcasted_iota(
                jnp.int32, (WG_ROWS, block_kv), 1, layout=plgpu.Layout.WGMMA)
            s = jnp.where(keys < length, s * score_mult, -jnp.inf)
            m_new = jnp.maximum(m_i, s.max(axis=1))  # finite: the tile's first key is allowed
            alpha = jnp.exp2(m_i - m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
            l_i = l_i * alpha + p.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            p_smem[...] = p.astype(dtype)
            plgpu.commit_smem()  # generic-proxy store -> visible to wgmma (async proxy)
            plgpu.barrier_wait(v_barriers.at[slot])
            acc = acc + matmul(p_smem, v_smem.at[slot], (WG_ROWS, head_dim))
            pl.when(refill)(lambda: issue_v(step + stages, slot))
            return acc, m_new, l_i

        acc, m_i, l_i = lax.fori_loop(0, steps, kv_step, (zeros_acc((WG_ROWS, head_dim)),
                                                          full_rows(WG_ROWS, -jnp.inf),
                                                          full_rows(WG_ROWS, 0.0)))

        # A chunk past the sequence's end has l == 0: output 0 and lse -inf (weight 0 when
        # combined).
        empty = l_i == 0.0
        safe_l = jnp.where(empty, 1.0, l_i)
        o_smem[...] = acc * lax.broadcast_in_dim(1.0 / safe_l, acc.shape, [0])
        lse_smem[...] = jnp.where(empty, -jnp.inf, m_i + jnp.log2(safe_l))
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, group)], o_ref.at[b, head, split])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, head, split])
        plgpu.wait_smem_to_gmem(0)

    transforms = tile_transforms()
    scratch = dict(
        q_smem=plgpu.SMEM((WG_ROWS, head_dim), dtype, transforms=transforms),
        k_smem=plgpu.SMEM((stages, block_kv, head_dim), dtype, transforms=transforms),
        v_smem=plgpu.SMEM((stages, block_kv, head_dim), dtype, transforms=transforms),
        p_smem=plgpu.SMEM((WG_ROWS, block_kv), dtype, transforms=transforms),
        o_smem=plgpu.SMEM((WG_ROWS, head_dim), jnp.float32),
        lse_smem=plgpu.SMEM((WG_ROWS,), jnp.float32),
        q_barrier=plgpu.Barrier(),
        k_barriers=plgpu.Barrier(num_barriers=stages),
        v_barriers=plgpu.Barrier(num_barriers=stages),
    )
    partial_out, lse = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((batch, num_kv_heads, splits, group, head_dim), jnp.float32),
                  jax.ShapeDtypeStruct((batch, num_kv_heads, splits, WG_ROWS), jnp.float32)),
        scratch_types=scratch,
        grid=(splits, num_kv_heads, batch),
        grid_names=("splits", "heads", "batch"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(q_rows, k, v, lengths)
    return combine_splits(partial_out, lse[..., :group]).reshape(q.shape).astype(dtype)


def combine_splits(partial_out, lse):
    """Merges the chunks' normalised outputs by their softmax mass.

    Args: partial_out (B, Hkv, splits, G, d) float32; lse (B, Hkv, splits, G) float32 log2-sum-exp
      of each chunk's scaled scores, -inf for a chunk with no key.
    Returns: (B, Hkv, G, d) float32; 0 where no chunk has a key.
    """
    top = jnp.max(lse, axis=2, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    weights = jnp.exp2(lse - top)  # (B, Hkv, splits, G)
    total = weights.sum(axis=2)
    out = jnp.einsum("bhsg,bhsgd->bhgd", weights, partial_out)
    return out / jnp.where(total == 0.0, 1.0, total)[..., None]
