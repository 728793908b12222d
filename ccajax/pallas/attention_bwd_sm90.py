"""Flash-attention backward for Hopper (sm90), written in explicit Mosaic GPU style.

Public entry: :func:`attention_bwd` (q, k, v, out, lse, d_out) -> (dq, dk, dv).

Shapes
------
* q, out, d_out: (B, Sq, Hq, d); k, v: (B, Sk, Hkv, d); Hkv divides Hq and query head h reads kv
  head ``h // (Hq // Hkv)`` (GQA / MQA). bf16 or fp16 (one dtype for all five), d in {64, 128}.
* lse: (B, Hq, Sq) float32, natural-log log-sum-exp of the *scaled* scores of each query row,
  as :func:`ccajax.pallas.attention_fwd_sm90.attention_fwd` returns it; ``-inf`` for a row that
  sees no key (such rows get exactly zero gradient, never NaN).
* segment_ids: optional (B, S) int32, S == Sq == Sk; query and key interact iff equal ids.
* dq: (B, Sq, Hq, d); dk, dv: (B, Sk, Hkv, d); all in the input dtype, accumulated in fp32.

Math (per query row i, key j, with s_ij = scale * q_i . k_j)
-----------------------------------------------------------
P = exp(s - lse) (0 where masked), dV = P^T dO, dP = dO V^T, delta_i = sum_d dO_i * out_i,
dS = P * (dP - delta), dQ = scale * dS K, dK = scale * dS^T Q. Exponentials are ``exp2`` with
``scale * log2(e)`` folded into one multiply and lse pre-multiplied by log2(e).

Wrapper pre-pass (plain jnp, outside the kernels)
--------------------------------------------------
* delta = rowsum(d_out * out) in fp32, (B, Hq, Sq). A separate jnp pass in this version (it reads
  out and d_out once more); a later version may fuse it into a small pre-kernel.
* lse2 = lse * log2(e), with ``-inf`` rows replaced by ``+inf``: then exp2(s - lse2) is exactly 0
  for every key of a row that sees no key, so those rows contribute nothing and make no NaN
  (exp2(s + inf) * 0 would). Padded query rows get lse2 = +inf as well, so they need no mask.
* Tails: Sq is zero-padded up to a multiple of block_q and Sk up to a multiple of block_kv (a
  copy, only when needed); the outputs are sliced back.

dK/dV kernel
------------
* Grid ``(Hkv, num_kv_blocks, B)``, one CTA (one warpgroup) per (kv head, kv block, batch). The
  CTA TMA-loads its k and v tiles once and keeps fp32 dK and dV accumulators in registers. It
  loops over the G = Hq / Hkv query heads of its kv head (outer loop) and over the q blocks that
  can see its kv block (inner loops), so the GQA reduction over the group happens inside the
  kernel and per-query-head dk/dv are never materialised.
* It works in the transposed orientation, S^T = K Q^T of shape (block_kv, block_q), so that its
  rows are keys: P^T and dS^T are then directly the A operands of dV += P^T dO and
  dK += dS^T Q, and the per-query vectors lse / delta are per-*column* vectors (WGMMA
  ``reduce(0)`` layout).
* q-side pipeline: q, dO, lse2 and delta go through two-slot shared-memory rings, one TMA barrier
  per buffer and slot. At the start of step t the CTA issues step t+1's copies into the other
  slot (its last reader, step t-1, is complete: every wgmma result is read, hence awaited, before
  the step ends), then waits for q and lse2 (S^T, P^T), dO (dV, dP^T) and delta (dS^T) in the
  order they are needed. The flat step index t runs across the head boundary, so the prefetch
  of the next head's first tile overlaps the current head's last step.
* Causal: q blocks that cannot see any key of the kv block are skipped; the diagonal q blocks
  (some pair masked) run a masked loop, the q blocks below the diagonal run an unmasked loop.

dQ kernel
---------
* Grid ``(Hq, num_q_blocks, B)``, one CTA per (query head, query block, batch). q, dO, lse2 and
  delta are TMA-loaded once; k and v go through a two-slot ring (prefetch of step i+1 at the
  start of step i, separate k and v barriers so S = Q K^T need not wait for v), exactly like the
  forward. Per step: S = Q K^T, P, dP = dO V^T, dS, dQ += dS K. The scale is applied once to
  the final accumulator.
* Causal: kv blocks above the diagonal are never loaded; unmasked steps run first, then the
  masked ones (the diagonal tiles and the tile holding the end of Sk).
* No atomics anywhere: dq, dk and dv are each written by exactly one CTA, so the backward is
  deterministic (bit-identical across runs).

Masking (both kernels, same rules as the forward)
-------------------------------------------------
* causal: query i may see key j iff ``j <= i + (Sk - Sq)`` (the last query meets the last key).
* tails: padded keys are masked by ``j < Sk`` in the dQ kernel; in the dK/dV kernel the padded
  key rows are simply sliced off. Padded queries have lse2 = +inf (P = 0) and zero dO.
* segment_ids: the wrapper pads them to the block multiples; each kernel TMA-loads (block,) int32
  tiles of the query-side and key-side ids into shared memory and reads them into registers with
  ``plgpu.load(..., layout=WGMMA.reduce(1))`` (per row) or ``reduce(0)`` (per column), then
  broadcasts and compares them against each other. With segment ids every step is a masked step
  (no block skipping by segment ranges yet).

Shared memory (16-bit tiles with (8, 64) tiling + 128-byte swizzle, as wgmma wants)
---------------------------------------------------------------------------------
* dK/dV: k, v (block_kv x d, reused for the dk/dv output), 2-slot rings of q and dO
  (block_q x d), one (block_kv x block_q) tile for P^T and then dS^T, 2-slot f32 rings of lse2
  and delta. block_q/block_kv/d = 64/64/128: 106 KiB; 128/128/128: 226 KiB (the limit is 227 KiB,
  so 128/128/128 with segment_ids is refused with a ValueError).
* dQ: q (reused for the dq output), dO (block_q x d), 2-slot rings of k and v (block_kv x d),
  dS (block_q x block_kv), lse2, delta. 64/64/128: 106 KiB.

Status (measured)
-----------------
* CPU interpret mode with the race detector: ``tests/test_pallas_attention_bwd.py``.
* H100 (jax 0.11.2), bf16, d=128, B=1, S=8192, backward only, median ms, 64x64 blocks:
  Hq:Hkv 16:16 full 3.83 / causal 2.71; 8:2 full 2.18 / causal 2.09 (1.48 in an earlier run).
  cuDNN backward (its fwd+bwd minus its fwd) 2.77 / 1.58; 1.45 / 0.85, so this version is
  1.4-2.5x slower than cuDNN. 64x64 is the fastest of 64x64, 128x64, 64x128, 128x128 here.
  Fusing the dV and dP^T waits (``_FUSE_DV_DPT``) took 16:16 full from 4.69 to 3.83 ms.
* Not done yet (speed): warp specialisation / a producer warpgroup, two consumer warpgroups,
  register-resident P^T / dS^T operands, fusing the delta pre-pass, segment-range block skipping,
  per-kernel block sizes, causal load balancing.

Interpret mode (CPU)
--------------------
The same code runs under ``plgpu.force_gpu_interpret_mode()``. As in the forward: no
``pl.run_state`` (every wgmma writes a fresh zero ``plgpu.ACC`` inside ``pl.run_scoped`` and the
result is added to a register accumulator), and wgmma operands must be shared-memory refs (P^T,
dS^T and dS are staged in shared memory with ``commit_smem`` before their wgmma).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ccajax.pallas.sm90_common import (BLOCK_MULTIPLE, LOG2E, check_attention_args,
                                       check_block_sizes, pad_axis, round_up)

MAX_BLOCK = 128  # two fp32 (block_kv, d) accumulators plus S/dP tiles must fit one warpgroup
# Issue the dV and dP^T wgmmas of a dK/dV step into two accumulators of one run_scoped and await
# them together; False awaits each on its own (the form first validated on an H100).
_FUSE_DV_DPT = True


def _check_args(q, k, v, out, lse, d_out, is_causal, scale, segment_ids, block_q, block_kv):
    check_attention_args(q, k, v, is_causal=is_causal, scale=scale, segment_ids=segment_ids,
                         same_dtype=(("out", out), ("d_out", d_out)))
    batch, seq_q, num_q_heads, head_dim = q.shape
    for name, x in (("out", out), ("d_out", d_out)):
        if x.shape != q.shape:
            raise ValueError(
                f"{name} must have q's shape (B, Sq, Hq, d) = {q.shape}; "
                f"got {name}.shape={x.shape}")
    lse_shape = (batch, num_q_heads, seq_q)
    if lse.shape != lse_shape:
        raise ValueError(
            f"lse must have shape (B, Hq, Sq) = {lse_shape}; got lse.shape={lse.shape}")
    if jnp.dtype(lse.dtype) != jnp.dtype(jnp.float32):
        raise ValueError(f"lse.dtype must be float32; got lse.dtype={lse.dtype}")
    check_block_sizes(block_q, block_kv, MAX_BLOCK)
    # Blocks are clamped to the padded lengths before use, exactly as in _attention_bwd.
    bq = min(block_q, round_up(seq_q, BLOCK_MULTIPLE))
    bkv = min(block_kv, round_up(k.shape[1], BLOCK_MULTIPLE))
    smem = _smem_bytes(bq, bkv, head_dim, segment_ids is not None)
    if smem > SMEM_LIMIT_BYTES:
        raise ValueError(
            f"block_q={block_q}, block_kv={block_kv} with d={head_dim}"
            f"{' and segment_ids' if segment_ids is not None else ''} need {smem} bytes of shared "
            f"memory, more than the {SMEM_LIMIT_BYTES} an sm90 CTA has; use smaller blocks "
            f"(e.g. block_q=64)")


# Shared memory per CTA on sm90 (opt-in maximum); Mosaic GPU aligns every buffer to 1 KiB.
SMEM_LIMIT_BYTES = 227 * 1024


def _smem_bytes(block_q: int, block_kv: int, head_dim: int, segments: bool) -> int:
    """Shared memory of the larger of the two kernels (dK/dV is the larger for equal blocks)."""
    def buf(*shape, itemsize=2):
        return round_up(math.prod(shape) * itemsize, 1024)
    dkv = (2 * buf(block_kv, head_dim) + 2 * buf(2, block_q, head_dim) + buf(block_kv, block_q)
           + 2 * buf(2, block_q, itemsize=4) + 10 * 8)
    dq = (2 * buf(block_q, head_dim) + 2 * buf(2, block_kv, head_dim) + buf(block_q, block_kv)
          + 2 * buf(block_q, itemsize=4) + 8 * 8)
    if segments:
        dkv += buf(block_kv, itemsize=4) + buf(2, block_q, itemsize=4) + 3 * 8
        dq += buf(block_q, itemsize=4) + buf(2, block_kv, itemsize=4) + 3 * 8
    return max(dkv, dq)


def attention_bwd(q, k, v, out, lse, d_out, *, is_causal: bool, scale: float | None,
                  segment_ids=None, block_q: int = 64, block_kv: int = 64):
    """Flash-attention backward on Hopper; see the module docstring for the kernel layout.

    Args:
      q: (B, Sq, Hq, d) bf16/fp16 queries.
      k, v: (B, Sk, Hkv, d) keys and values, same dtype; Hkv divides Hq.
      out: (B, Sq, Hq, d) the forward output.
      lse: (B, Hq, Sq) float32 natural-log log-sum-exp of the scaled scores (-inf: no key).
      d_out: (B, Sq, Hq, d) the output cotangent.
      is_causal: causal mask with the last query aligned to the last key.
      scale: score scale (a static Python float); None means 1/sqrt(d).
      segment_ids: optional (B, S) integer ids (Sq == Sk == S); tokens attend iff equal ids.
      block_q, block_kv: tile sizes, 64 or 128, used by both kernels.
    Returns:
      (dq, dk, dv) with the shapes and dtype of q, k, v.
    Raises:
      ValueError: for unsupported dtypes, head dims, head counts, block sizes or mismatched
        shapes; the message names the argument, the value and what is valid.
    """
    _check_args(q, k, v, out, lse, d_out, is_causal, scale, segment_ids, block_q, block_kv)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if segment_ids is not None:
        segment_ids = segment_ids.astype(jnp.int32)
    return _attention_bwd(q, k, v, out, lse, d_out, segment_ids, is_causal=is_causal,
                          scale=scale, block_q=block_q, block_kv=block_kv)


# 16-bit tiles for wgmma: (8, 64) tiling + 128-byte swizzle (64 elements x 2 bytes).
def _tile_transforms():
    return (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def _row_vec(ref):
    """A (block,) SMEM vector as one value per accumulator row (WGMMA row layout)."""
    return plgpu.load(ref, layout=plgpu.Layout.WGMMA.reduce(1))


def _col_vec(ref):
    """A (block,) SMEM vector as one value per accumulator column (WGMMA column layout)."""
    return plgpu.load(ref, layout=plgpu.Layout.WGMMA.reduce(0))


def _matmul(a_ref, b_ref, shape):
    """a @ b into a fresh zero fp32 accumulator (no pl.run_state: see the module docstring)."""
    def body(acc_ref):
        plgpu.wgmma(acc_ref, a_ref, b_ref)
        return acc_ref[...]
    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


@functools.partial(jax.jit, static_argnames=("is_causal", "scale", "block_q", "block_kv"))
def _attention_bwd(q, k, v, out, lse, d_out, segment_ids, *, is_causal, scale, block_q,
                   block_kv):
    batch, seq_q, num_q_heads, head_dim = q.shape
    seq_k, num_kv_heads = k.shape[1], k.shape[2]
    group = num_q_heads // num_kv_heads
    dtype = q.dtype
    has_segments = segment_ids is not None

    # Short sequences do not need a tile larger than their padded length.
    block_q = min(block_q, round_up(seq_q, BLOCK_MULTIPLE))
    block_kv = min(block_kv, round_up(seq_k, BLOCK_MULTIPLE))
    seq_q_pad = round_up(seq_q, block_q)
    seq_k_pad = round_up(seq_k, block_kv)
    num_q_blocks = seq_q_pad // block_q
    num_kv_blocks = seq_k_pad // block_kv
    causal_offset = seq_k - seq_q  # query i sees key j iff j <= i + causal_offset
    score_mult = scale * LOG2E

    # --- jnp pre-pass: delta, lse in log2 units with "no key" rows -> +inf, padding ---------
    delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), d_out.astype(jnp.float32))
    lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse * LOG2E)
    delta = pad_axis(delta, 2, seq_q_pad)
    lse2 = pad_axis(lse2, 2, seq_q_pad, jnp.inf)
    q_p, do_p = pad_axis(q, 1, seq_q_pad), pad_axis(d_out, 1, seq_q_pad)
    k_p, v_p = pad_axis(k, 1, seq_k_pad), pad_axis(v, 1, seq_k_pad)
    if has_segments:
        # Padded positions are masked by other means (lse2 = +inf rows, j < Sk, sliced rows).
        seg_q = pad_axis(segment_ids, 1, seq_q_pad)
        seg_k = pad_axis(segment_ids, 1, seq_k_pad)
        seg_args = (seg_q, seg_k)
    else:
        seg_args = ()

    transforms = _tile_transforms()
    params = plgpu.CompilerParams(approx_math=True)

    # ================================ dK / dV kernel ========================================
    def dkv_kernel(*refs):
        if has_segments:
            (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, segq_ref, segk_ref,
             dk_ref, dv_ref, *scratch) = refs
            (k_smem, v_smem, q_smem, do_smem, pt_smem, lse_smem, delta_smem,
             kv_bars, q_bars, do_bars, lse_bars, delta_bars, segk_smem, segq_smem,
             segk_bar, segq_bars) = scratch
        else:
            (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *scratch) = refs
            (k_smem, v_smem, q_smem, do_smem, pt_smem, lse_smem, delta_smem,
             kv_bars, q_bars, do_bars, lse_bars, delta_bars) = scratch
        kv_head = lax.axis_index("heads")
        kv_block = lax.axis_index("kv_blocks")
        b = lax.axis_index("batch")
        kv_start = kv_block * block_kv

        # --- which q blocks see this kv block, and which of them need a mask ----------------
        if is_causal:
            # The first query that sees any key of the block is kv_start - causal_offset.
            q_lo = lax.div(jnp.maximum(kv_start - causal_offset, 0), jnp.int32(block_q))
            # A q block needs no mask when its first query sees the block's last key.
            need = kv_start + (block_kv - 1) - causal_offset
            q_free = lax.div(jnp.maximum(need, 0) + (block_q - 1), jnp.int32(block_q))
        else:
            q_lo = jnp.int32(0)
            q_free = jnp.int32(0)
        q_lo = jnp.minimum(q_lo, num_q_blocks)
        q_free = jnp.int32(num_q_blocks) if has_segments else q_free
        q_free = jnp.clip(q_free, q_lo, num_q_blocks)
        steps_per_head = num_q_blocks - q_lo
        total_steps = group * steps_per_head

        def issue_q(t, slot):
            g = lax.div(t, steps_per_head)
            qb = q_lo + lax.rem(t, steps_per_head)
            head = kv_head * group + g
            rows = (b, pl.ds(qb * block_q, block_q), head)
            vec = (b, head, pl.ds(qb * block_q, block_q))
            plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem.at[slot], q_bars.at[slot])
            plgpu.copy_gmem_to_smem(lse_ref.at[vec], lse_smem.at[slot], lse_bars.at[slot])
            plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem.at[slot], do_bars.at[slot])
            plgpu.copy_gmem_to_smem(delta_ref.at[vec], delta_smem.at[slot], delta_bars.at[slot])
            if has_segments:
                plgpu.copy_gmem_to_smem(segq_ref.at[b, pl.ds(qb * block_q, block_q)],
                                        segq_smem.at[slot], segq_bars.at[slot])

        kv_rows = (b, pl.ds(kv_start, block_kv), kv_head)
        plgpu.copy_gmem_to_smem(k_ref.at[kv_rows], k_smem, kv_bars.at[0])
        plgpu.copy_gmem_to_smem(v_ref.at[kv_rows], v_smem, kv_bars.at[1])
        if has_segments:
            plgpu.copy_gmem_to_smem(segk_ref.at[b, pl.ds(kv_start, block_kv)], segk_smem,
                                    segk_bar.at[0])

        @pl.when(total_steps > 0)
        def _():
            issue_q(0, 0)

        plgpu.barrier_wait(kv_bars.at[0])
        plgpu.barrier_wait(kv_bars.at[1])
        if has_segments:
            plgpu.barrier_wait(segk_bar.at[0])
            k_seg = _row_vec(segk_smem)  # keys are the rows of S^T
        else:
            k_seg = None

        def q_step(qb, carry, *, g, masked: bool):
            dk_acc, dv_acc = carry
            t = g * steps_per_head + (qb - q_lo)
            slot = lax.rem(t, jnp.int32(2))

            # Prefetch step t+1 into the other slot: its last reader (step t-1) has completed,
            # because every wgmma result below is read (hence awaited) before the step ends.
            @pl.when(t + 1 < total_steps)
            def _():
                issue_q(t + 1, 1 - slot)

            plgpu.barrier_wait(q_bars.at[slot])
            plgpu.barrier_wait(lse_bars.at[slot])
            # S^T = K Q^T: rows are keys, columns are queries.
            st = _matmul(k_smem, q_smem.at[slot].transpose((1, 0)), (block_kv, block_q))
            lse_col = _col_vec(lse_smem.at[slot])
            st = st * score_mult - lax.broadcast_in_dim(lse_col, st.shape, [1])
            if masked:
                allowed = None
                if is_causal:
                    kv_ids = kv_start + plgpu.broadcasted_iota(
                        jnp.int32, st.shape, 0, layout=plgpu.Layout.WGMMA)
                    q_ids = qb * block_q + causal_offset + plgpu.broadcasted_iota(
                        jnp.int32, st.shape, 1, layout=plgpu.Layout.WGMMA)
                    allowed = kv_ids <= q_ids
                if has_segments:
                    plgpu.barrier_wait(segq_bars.at[slot])
                    q_seg = _col_vec(segq_smem.at[slot])
                    same = (lax.broadcast_in_dim(k_seg, st.shape, [0])
                            == lax.broadcast_in_dim(q_seg, st.shape, [1]))
                    allowed = same if allowed is None else allowed & same
                st = jnp.where(allowed, st, -jnp.inf)
            pt = jnp.exp2(st)  # P^T; 0 for masked pairs and for rows with lse2 = +inf

            pt_smem[...] = pt.astype(dtype)
            plgpu.commit_smem()  # generic-proxy store -> visible to wgmma (async proxy)
            plgpu.barrier_wait(do_bars.at[slot])

            # dV partial = P^T dO and dP^T = V dO^T: both wgmmas are issued before either result
            # is read (one wait for the two on the GPU).
            def dv_dpt(dv_ref, dpt_ref):
                plgpu.wgmma(dv_ref, pt_smem, do_smem.at[slot])
                plgpu.wgmma(dpt_ref, v_smem, do_smem.at[slot].transpose((1, 0)))
                return dv_ref[...], dpt_ref[...]

            if _FUSE_DV_DPT:
                dv_part, dpt = pl.run_scoped(
                    dv_dpt, plgpu.ACC((block_kv, head_dim), jnp.float32),
                    plgpu.ACC((block_kv, block_q), jnp.float32))
            else:
                dv_part = _matmul(pt_smem, do_smem.at[slot], (block_kv, head_dim))
                dpt = _matmul(v_smem, do_smem.at[slot].transpose((1, 0)), (block_kv, block_q))
            dv_acc = dv_acc + dv_part

            plgpu.barrier_wait(delta_bars.at[slot])
            delta_col = _col_vec(delta_smem.at[slot])
            dst = pt * (dpt - lax.broadcast_in_dim(delta_col, dpt.shape, [1]))
            # dS^T reuses the P^T tile: the wgmma that read P^T has completed (its result was
            # read above), and sharing keeps 128x128 blocks with d=128 within shared memory.
            pt_smem[...] = dst.astype(dtype)
            plgpu.commit_smem()
            dk_acc = dk_acc + _matmul(pt_smem, q_smem.at[slot], (block_kv, head_dim))
            return dk_acc, dv_acc

        def head_loop(g, carry):
            if is_causal or has_segments:  # otherwise no q block needs a mask (q_free == q_lo)
                carry = lax.fori_loop(q_lo, q_free,
                                      functools.partial(q_step, g=g, masked=True), carry)
            carry = lax.fori_loop(q_free, num_q_blocks,
                                  functools.partial(q_step, g=g, masked=False), carry)
            return carry

        zeros = plgpu.layout_cast(jnp.full((block_kv, head_dim), 0.0, jnp.float32),
                                  plgpu.Layout.WGMMA)
        dk_acc, dv_acc = lax.fori_loop(0, group, head_loop, (zeros, zeros))

        # k and v are no longer needed: their tiles stage the outputs.
        k_smem[...] = (dk_acc * scale).astype(dtype)
        v_smem[...] = dv_acc.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[kv_rows])
        plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[kv_rows])
        plgpu.wait_smem_to_gmem(0)

    dkv_scratch = [
        plgpu.SMEM((block_kv, head_dim), dtype, transforms=transforms),  # k, then dk
        plgpu.SMEM((block_kv, head_dim), dtype, transforms=transforms),  # v, then dv
        plgpu.SMEM((2, block_q, head_dim), dtype, transforms=transforms),  # q ring
        plgpu.SMEM((2, block_q, head_dim), dtype, transforms=transforms),  # dO ring
        plgpu.SMEM((block_kv, block_q), dtype, transforms=transforms),  # P^T, then dS^T
        plgpu.SMEM((2, block_q), jnp.float32),  # lse2 ring
        plgpu.SMEM((2, block_q), jnp.float32),  # delta ring
        plgpu.Barrier(num_barriers=2),  # k, v arrived
        plgpu.Barrier(num_barriers=2),  # q slot arrived
        plgpu.Barrier(num_barriers=2),  # dO slot arrived
        plgpu.Barrier(num_barriers=2),  # lse2 slot arrived
        plgpu.Barrier(num_barriers=2),  # delta slot arrived
    ]
    if has_segments:
        dkv_scratch += [
            plgpu.SMEM((block_kv,), jnp.int32),  # key-side segment ids
            plgpu.SMEM((2, block_q), jnp.int32),  # query-side segment ids ring
            plgpu.Barrier(num_barriers=1),
            plgpu.Barrier(num_barriers=2),
        ]
    kv_shape = jax.ShapeDtypeStruct((batch, seq_k_pad, num_kv_heads, head_dim), dtype)
    dk, dv = plgpu.kernel(
        dkv_kernel,
        out_type=(kv_shape, kv_shape),
        scratch_types=tuple(dkv_scratch),
        grid=(num_kv_heads, num_kv_blocks, batch),
        grid_names=("heads", "kv_blocks", "batch"),
        compiler_params=params,
    )(q_p, k_p, v_p, do_p, lse2, delta, *seg_args)

    # ================================== dQ kernel ===========================================
    def dq_kernel(*refs):
        if has_segments:
            (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, segq_ref, segk_ref, dq_ref,
             *scratch) = refs
            (q_smem, do_smem, k_smem, v_smem, ds_smem, lse_smem, delta_smem, q_bars,
             k_bars, v_bars, segq_smem, segk_smem, segk_bars) = scratch
        else:
            (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *scratch) = refs
            (q_smem, do_smem, k_smem, v_smem, ds_smem, lse_smem, delta_smem, q_bars,
             k_bars, v_bars) = scratch
        q_head = lax.axis_index("heads")
        q_block = lax.axis_index("q_blocks")
        b = lax.axis_index("batch")
        kv_head = lax.div(q_head, jnp.array(group, q_head.dtype))
        q_start = q_block * block_q

        # --- which kv blocks this q block needs, and which of them need a mask -------------
        if is_causal:
            kv_end = jnp.clip(q_start + block_q + causal_offset, 0, seq_k)
            kv_steps = lax.div(kv_end + (block_kv - 1), jnp.int32(block_kv))
            first_row_limit = q_start + causal_offset  # inclusive, may be negative
            unmasked_steps = lax.div(jnp.maximum(first_row_limit + 1, 0), jnp.int32(block_kv))
        else:
            kv_steps = jnp.int32(num_kv_blocks)
            unmasked_steps = jnp.int32(num_kv_blocks)
        if seq_k % block_kv:
            unmasked_steps = jnp.minimum(unmasked_steps, num_kv_blocks - 1)
        if has_segments:
            unmasked_steps = jnp.int32(0)
        unmasked_steps = jnp.minimum(unmasked_steps, kv_steps)

        def issue_kv(step, slot):
            rows = (b, pl.ds(step * block_kv, block_kv), kv_head)
            plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_bars.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_bars.at[slot])
            if has_segments:
                plgpu.copy_gmem_to_smem(segk_ref.at[b, pl.ds(step * block_kv, block_kv)],
                                        segk_smem.at[slot], segk_bars.at[slot])

        q_rows = (b, pl.ds(q_start, block_q), q_head)
        q_vec = (b, q_head, pl.ds(q_start, block_q))
        plgpu.copy_gmem_to_smem(q_ref.at[q_rows], q_smem, q_bars.at[0])
        plgpu.copy_gmem_to_smem(do_ref.at[q_rows], do_smem, q_bars.at[1])
        plgpu.copy_gmem_to_smem(lse_ref.at[q_vec], lse_smem, q_bars.at[2])
        plgpu.copy_gmem_to_smem(delta_ref.at[q_vec], delta_smem, q_bars.at[3])
        if has_segments:
            plgpu.copy_gmem_to_smem(segq_ref.at[b, pl.ds(q_start, block_q)], segq_smem,
                                    q_bars.at[4])

        @pl.when(kv_steps > 0)
        def _():
            issue_kv(0, 0)

        for i in range(5 if has_segments else 4):
            plgpu.barrier_wait(q_bars.at[i])
        lse_row = _row_vec(lse_smem)
        delta_row = _row_vec(delta_smem)
        q_seg = _row_vec(segq_smem) if has_segments else None

        def kv_step(step, acc, *, masked: bool):
            slot = lax.rem(step, jnp.int32(2))

            @pl.when(step + 1 < kv_steps)
            def _():
                issue_kv(step + 1, 1 - slot)

            plgpu.barrier_wait(k_bars.at[slot])
            s = _matmul(q_smem, k_smem.at[slot].transpose((1, 0)), (block_q, block_kv))
            s = s * score_mult - lax.broadcast_in_dim(lse_row, s.shape, [0])
            if masked:
                kv_ids = step * block_kv + plgpu.broadcasted_iota(
                    jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
                allowed = kv_ids < seq_k
                if is_causal:
                    q_ids = q_start + causal_offset + plgpu.broadcasted_iota(
                        jnp.int32, s.shape, 0, layout=plgpu.Layout.WGMMA)
                    allowed = allowed & (kv_ids <= q_ids)
                if has_segments:
                    plgpu.barrier_wait(segk_bars.at[slot])
                    k_seg = _col_vec(segk_smem.at[slot])
                    allowed = allowed & (lax.broadcast_in_dim(q_seg, s.shape, [0])
                                         == lax.broadcast_in_dim(k_seg, s.shape, [1]))
                s = jnp.where(allowed, s, -jnp.inf)
            p = jnp.exp2(s)

            plgpu.barrier_wait(v_bars.at[slot])
            dp = _matmul(do_smem, v_smem.at[slot].transpose((1, 0)), (block_q, block_kv))
            ds = p * (dp - lax.broadcast_in_dim(delta_row, dp.shape, [0]))
            ds_smem[...] = ds.astype(dtype)
            plgpu.commit_smem()
            return acc + _matmul(ds_smem, k_smem.at[slot], (block_q, head_dim))

        acc = plgpu.layout_cast(jnp.full((block_q, head_dim), 0.0, jnp.float32),
                                plgpu.Layout.WGMMA)
        acc = lax.fori_loop(0, unmasked_steps, functools.partial(kv_step, masked=False), acc)
        acc = lax.fori_loop(unmasked_steps, kv_steps, functools.partial(kv_step, masked=True),
                            acc)

        q_smem[...] = (acc * scale).astype(dtype)  # q is no longer needed: stage dq in it
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[q_rows])
        plgpu.wait_smem_to_gmem(0)

    dq_scratch = [
        plgpu.SMEM((block_q, head_dim), dtype, transforms=transforms),  # q, then dq
        plgpu.SMEM((block_q, head_dim), dtype, transforms=transforms),  # dO
        plgpu.SMEM((2, block_kv, head_dim), dtype, transforms=transforms),  # k ring
        plgpu.SMEM((2, block_kv, head_dim), dtype, transforms=transforms),  # v ring
        plgpu.SMEM((block_q, block_kv), dtype, transforms=transforms),  # dS
        plgpu.SMEM((block_q,), jnp.float32),  # lse2
        plgpu.SMEM((block_q,), jnp.float32),  # delta
        plgpu.Barrier(num_barriers=5 if has_segments else 4),  # q, dO, lse2, delta, [seg]
        plgpu.Barrier(num_barriers=2),  # k slot arrived
        plgpu.Barrier(num_barriers=2),  # v slot arrived
    ]
    if has_segments:
        dq_scratch += [
            plgpu.SMEM((block_q,), jnp.int32),  # query-side segment ids
            plgpu.SMEM((2, block_kv), jnp.int32),  # key-side segment ids ring
            plgpu.Barrier(num_barriers=2),
        ]
    dq = plgpu.kernel(
        dq_kernel,
        out_type=jax.ShapeDtypeStruct((batch, seq_q_pad, num_q_heads, head_dim), dtype),
        scratch_types=tuple(dq_scratch),
        grid=(num_q_heads, num_q_blocks, batch),
        grid_names=("heads", "q_blocks", "batch"),
        compiler_params=params,
    )(q_p, k_p, v_p, do_p, lse2, delta, *seg_args)

    if seq_q_pad != seq_q:
        dq = dq[:, :seq_q]
    if seq_k_pad != seq_k:
        dk, dv = dk[:, :seq_k], dv[:, :seq_k]
    return dq, dk, dv
