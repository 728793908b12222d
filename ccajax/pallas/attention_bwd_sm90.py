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
* delta = rowsum(d_out * out) in fp32, (B, Hq, Sq): one extra read of out and d_out (about 1% of
  the backward at S=16k).
* lse2 = lse * log2(e), with ``-inf`` rows replaced by ``+inf``: then exp2(s - lse2) is exactly 0
  for every key of a row that sees no key, so those rows contribute nothing and make no NaN.
  Padded query rows get lse2 = +inf as well, so they need no mask.
* Tails: Sq and Sk are zero-padded up to a multiple of the larger block of each axis (a copy,
  only when needed); the outputs are sliced back.

Two kernels, both warp-specialised like the forward
----------------------------------------------------
Each CTA has one or two compute warpgroups (64 rows each: ``block / 64``) and one producer
warpgroup that streams the operands of the loop through a ``stages``-slot TMA ring; a slot is
refilled once every compute warpgroup has arrived on its "consumed" barrier. With two compute
warpgroups the registers are split 240 / 24 (compute / producer). No atomics anywhere: dq, dk
and dv are each written by exactly one CTA, so the backward is deterministic (bit-identical
across runs).

* dQ kernel, grid ``(Hq, Sq / dq_block_q, B)``: each compute warpgroup loads its 64 query rows
  of q, dO, lse2 and delta once; the producer streams k and v tiles of ``dq_block_kv`` keys
  (the forward's producer, shared code). Per step: S = Q K^T and dP = dO V^T issued back to
  back (v released), P, dS = P (dP - delta), dQ += dS K (k released; the next step's k and v
  are awaited while this wgmma runs). Causal: q blocks reversed (longest first), kv
  tiles above the diagonal never loaded, unmasked tiles first, then the masked ones; a
  warpgroup with fewer steps than its CTA releases the rest (``kv_flush``).
* dK/dV kernel, grid ``(Hkv, Sk / dkv_block_kv, B)``: each compute warpgroup loads its 64 keys of
  k and v once and keeps fp32 dK and dV accumulators in registers. The producer streams q, lse2
  (one barrier) and dO, delta (another) tiles of ``dkv_block_q`` queries for the flat step
  sequence (query head g of the kv head's group, q block), so the GQA reduction over the group
  happens inside the kernel and the prefetch runs across the head boundary. Per step: S^T and
  dP^T issued back to back, then dV += P^T dO and dK += dS^T Q issued back to back, during
  which the next step's operands are awaited. The warpgroup works
  in the transposed orientation, S^T = K Q^T (rows are keys), so P^T and dS^T are directly the A
  operands of dV += P^T dO and dK += dS^T Q and the per-query lse2 / delta are per-column
  vectors (``WGMMA.reduce(0)``). Causal: q blocks no key of the CTA sees are never loaded; a
  warpgroup skips (observes and releases) the q blocks only the other warpgroup's keys see, runs
  the diagonal q blocks masked and the rest unmasked.
* Operands: on the GPU (``register_operands``) P^T, dS^T and dS stay in registers as wgmma A
  operands and the accumulators are updated in place (``pl.run_state``). The interpreter
  supports neither, so there they are staged in shared memory (``commit_smem``) and each product
  lands in a fresh zero accumulator that is added to the register one.

Masking (both kernels, same rules as the forward)
-------------------------------------------------
* causal: query i may see key j iff ``j <= i + (Sk - Sq)`` (the last query meets the last key).
* tails: padded keys are masked by ``j < Sk`` in the dQ kernel; in the dK/dV kernel their rows
  are sliced off. Padded queries have lse2 = +inf (P = 0) and zero dO.
* segment_ids: the query-side ids come with q (rows or columns), the key-side ids with k; they
  are read into registers with ``plgpu.load(..., layout=WGMMA.reduce(...))``, broadcast and
  compared. With segment ids every step is a masked step (no block skipping by ranges yet).
  Ids read with ordinary loads are fenced (``commit_smem``) before their slot is released.

Status (measured): see NOTES_attention.md.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ccajax.pallas.sm90_common import (BLOCK_MULTIPLE, LOG2E, check_attention_args,
                                       check_block_sizes, pad_axis, round_up)
from ccajax.pallas.sm90_pipeline import (WG_ROWS, KVSteps, check_interpret_threads, col_vec,
                                         in_interpret_mode, kv_flush, matmul, matmul_into,
                                         next_step_wait, ring_producer, row_vec, tile_transforms,
                                         zeros_acc)

# Two fp32 (64, d) accumulators plus (64, block) S/dP tiles must fit one warpgroup's registers.
MAX_BLOCK = 128
# Shared memory per CTA on sm90 (opt-in maximum); Mosaic GPU aligns every buffer to 1 KiB.
SMEM_LIMIT_BYTES = 227 * 1024
# Registers per thread with two compute warpgroups: 2 x 128 x 240 + 128 x 24 <= 64K.
_COMPUTE_REGS, _PRODUCER_REGS = 240, 24


def _buf(*shape, itemsize=2) -> int:
    return round_up(math.prod(shape) * itemsize, 1024)


def _dq_smem_bytes(block_q, block_kv, head_dim, stages, register, segments) -> int:
    n = (2 * _buf(block_q, head_dim) + 2 * _buf(stages, block_kv, head_dim)
         + 2 * _buf(block_q, itemsize=4) + 1024)
    n += 0 if register else _buf(block_q, block_kv)
    n += _buf(block_q, itemsize=4) + _buf(stages, block_kv, itemsize=4) if segments else 0
    return n


def _dkv_smem_bytes(block_q, block_kv, head_dim, stages, register, segments) -> int:
    n = (2 * _buf(block_kv, head_dim) + 2 * _buf(stages, block_q, head_dim)
         + 2 * _buf(stages, block_q, itemsize=4) + 1024)
    n += 0 if register else _buf(block_kv, block_q)
    n += _buf(block_kv, itemsize=4) + _buf(stages, block_q, itemsize=4) if segments else 0
    return n


def _clamp_block(block: int, seq: int) -> int:
    """Short sequences do not need a tile larger than their padded length."""
    return min(block, round_up(seq, BLOCK_MULTIPLE))


def attention_bwd(q, k, v, out, lse, d_out, *, is_causal: bool, scale: float | None,
                  segment_ids=None, dq_block_q: int = 128, dq_block_kv: int | None = None,
                  dkv_block_q: int = 64, dkv_block_kv: int = 128, stages: int = 2,
                  register_operands: bool | None = None):
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
      dq_block_q, dq_block_kv: dQ kernel tiles: query rows per CTA (64 per compute warpgroup)
        and keys per step; multiples of 64, at most 128. dq_block_kv None: 128 where it fits in
        shared memory, else 64.
      dkv_block_q, dkv_block_kv: dK/dV kernel tiles: queries per step and keys per CTA (64 per
        compute warpgroup); multiples of 64, at most 128.
      stages: depth of the streamed operand rings (2 to 4).
      register_operands: feed P^T, dS^T and dS to their wgmmas from registers and update the
        accumulators in place (True, GPU only) or stage them in shared memory (False). None:
        registers on a GPU, shared memory under ``plgpu.force_gpu_interpret_mode``.
    Returns:
      (dq, dk, dv) with the shapes and dtype of q, k, v.
    Raises:
      ValueError: for unsupported dtypes, head dims, head counts, block sizes or mismatched
        shapes; the message names the argument, the value and what is valid.
    """
    check_attention_args(q, k, v, is_causal=is_causal, scale=scale, segment_ids=segment_ids,
                         same_dtype=(("out", out), ("d_out", d_out)))
    _check_residuals(q, out, lse, d_out)
    given = dict(dq_block_q=dq_block_q, dq_block_kv=dq_block_kv, dkv_block_q=dkv_block_q,
                 dkv_block_kv=dkv_block_kv)
    check_block_sizes(MAX_BLOCK, **{name: b for name, b in given.items() if b is not None})
    if not isinstance(stages, int) or not 2 <= stages <= 4:
        raise ValueError(f"stages must be an int in [2, 4]; got stages={stages!r}")
    if register_operands is None:
        register_operands = not in_interpret_mode()
    if register_operands and in_interpret_mode():
        raise ValueError("register_operands=True is not supported in Mosaic GPU interpret mode "
                         "(its wgmma reads both operands from shared memory); use False or None")
    if in_interpret_mode():
        check_interpret_threads(max(dq_block_q, dkv_block_kv) // WG_ROWS + 1)
    seq_q, seq_k, head_dim = q.shape[1], k.shape[1], q.shape[3]
    segments = segment_ids is not None
    if dq_block_kv is None:
        # benchmarks/tune_attention_bwd.py on an H100 (S=16k, d=128): 128 keys per step beat 64
        # by 0-3% in 5 of 6 cells (results/tune_attention_bwd_h100_2026-11-23.json).
        fits = _dq_smem_bytes(_clamp_block(dq_block_q, seq_q), _clamp_block(128, seq_k), head_dim,
                              stages, register_operands, segments) <= SMEM_LIMIT_BYTES
        dq_block_kv = 128 if fits else 64
    dq_blocks = (_clamp_block(dq_block_q, seq_q), _clamp_block(dq_block_kv, seq_k))
    dkv_blocks = (_clamp_block(dkv_block_q, seq_q), _clamp_block(dkv_block_kv, seq_k))
    for name, blocks, smem_bytes in (("dq", dq_blocks, _dq_smem_bytes),
                                     ("dkv", dkv_blocks, _dkv_smem_bytes)):
        need = smem_bytes(*blocks, head_dim, stages, register_operands, segments)
        if need > SMEM_LIMIT_BYTES:
            raise ValueError(
                f"{name}_block_q={blocks[0]}, {name}_block_kv={blocks[1]} with d={head_dim}, "
                f"stages={stages}{' and segment_ids' if segments else ''} need {need} bytes of "
                f"shared memory, more than the {SMEM_LIMIT_BYTES} an sm90 CTA has; use smaller "
                f"blocks or fewer stages")
    scale = head_dim ** -0.5 if scale is None else float(scale)
    if segments:
        segment_ids = segment_ids.astype(jnp.int32)
    return _attention_bwd(q, k, v, out, lse, d_out, segment_ids, is_causal=is_causal,
                          scale=scale, dq_blocks=dq_blocks, dkv_blocks=dkv_blocks, stages=stages,
                          register=bool(register_operands))


def _check_residuals(q, out, lse, d_out) -> None:
    batch, seq_q, num_q_heads, _ = q.shape
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


@dataclasses.dataclass(frozen=True)
class _Problem:
    """What both kernels need to know about the (padded) problem."""
    batch: int
    seq_q: int
    seq_k: int
    seq_q_pad: int
    seq_k_pad: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: jnp.dtype
    is_causal: bool
    scale: float
    has_segments: bool
    register: bool

    @property
    def group(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def causal_offset(self) -> int:
        """Query i sees key j iff j <= i + causal_offset (last query meets last key)."""
        return self.seq_k - self.seq_q

    @property
    def score_mult(self) -> float:
        """Scores in log2 units: s = (q . k) * scale * log2(e), so probabilities use exp2."""
        return self.scale * LOG2E


@functools.partial(jax.jit, static_argnames=("is_causal", "scale", "dq_blocks", "dkv_blocks",
                                             "stages", "register"))
def _attention_bwd(q, k, v, out, lse, d_out, segment_ids, *, is_causal, scale, dq_blocks,
                   dkv_blocks, stages, register):
    batch, seq_q, num_q_heads, head_dim = q.shape
    seq_k, num_kv_heads = k.shape[1], k.shape[2]
    # One padding serves both kernels: every block size is 64 or 128.
    seq_q_pad = round_up(seq_q, max(dq_blocks[0], dkv_blocks[0]))
    seq_k_pad = round_up(seq_k, max(dq_blocks[1], dkv_blocks[1]))
    prob = _Problem(batch, seq_q, seq_k, seq_q_pad, seq_k_pad, num_q_heads, num_kv_heads,
                    head_dim, q.dtype, is_causal, scale, segment_ids is not None, register)

    # --- jnp pre-pass: delta, lse in log2 units with "no key" rows -> +inf, padding ---------
    delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), d_out.astype(jnp.float32))
    lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse * LOG2E)
    inputs = (pad_axis(q, 1, seq_q_pad), pad_axis(k, 1, seq_k_pad), pad_axis(v, 1, seq_k_pad),
              pad_axis(d_out, 1, seq_q_pad), pad_axis(lse2, 2, seq_q_pad, jnp.inf),
              pad_axis(delta, 2, seq_q_pad))
    if segment_ids is not None:
        # One padded id array serves queries and keys (Sq == Sk); padded positions are masked
        # by other means (lse2 = +inf rows, j < Sk, sliced rows).
        inputs += (pad_axis(segment_ids, 1, max(seq_q_pad, seq_k_pad)),)
    dk, dv = _dkv_kernel(prob, *dkv_blocks, stages)(*inputs)
    dq = _dq_kernel(prob, *dq_blocks, stages)(*inputs)
    return dq[:, :seq_q], dk[:, :seq_k], dv[:, :seq_k]


def _unpack(refs, has_segments, num_outputs):
    """Kernel refs -> (q, k, v, d_out, lse2, delta, segment ids or None, *outputs)."""
    if has_segments:
        return refs
    return (*refs[:6], None, *refs[6:6 + num_outputs])


# ================================ dQ kernel ===============================================

def _dq_kernel(p: _Problem, block_q: int, block_kv: int, stages: int):
    wgs = block_q // WG_ROWS
    num_q_blocks = p.seq_q_pad // block_q
    num_kv_blocks = p.seq_k_pad // block_kv
    stages = min(stages, num_kv_blocks)
    shape = (WG_ROWS, block_kv)  # S, P, dP, dS of one warpgroup
    kv_range = KVSteps(is_causal=p.is_causal, causal_offset=p.causal_offset, seq_k=p.seq_k,
                       block_kv=block_kv, num_kv_blocks=num_kv_blocks,
                       has_segments=p.has_segments)

    def kernel(*refs, q_smem, do_smem, k_smem, v_smem, ds_smem, lse_smem, delta_smem,
               segq_smem, segk_smem, q_barriers, k_barriers, v_barriers, k_consumed,
               v_consumed):
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_ref, dq_ref = _unpack(
            refs, p.has_segments, 1)
        q_head = lax.axis_index("heads")
        q_block = lax.axis_index("q_blocks")
        if p.is_causal:
            # Longest rows first, so that the short causal blocks fill the tail of the grid.
            q_block = num_q_blocks - 1 - q_block
        b = lax.axis_index("batch")
        wg = lax.axis_index("wg")
        kv_head = lax.div(q_head, jnp.array(p.group, q_head.dtype))
        cta_q_start = q_block * block_q
        cta_steps, _ = kv_range(cta_q_start, block_q)

        @pl.when(wg == wgs)
        def _producer():
            if wgs == 2:
                plgpu.set_max_registers(_PRODUCER_REGS, action="decrease")

            def issue_k(step, slot):
                rows = pl.ds(step * block_kv, block_kv)
                plgpu.copy_gmem_to_smem(k_ref.at[b, rows, kv_head], k_smem.at[slot],
                                        k_barriers.at[slot])
                if p.has_segments:  # the key ids share k's barrier
                    plgpu.copy_gmem_to_smem(seg_ref.at[b, rows], segk_smem.at[slot],
                                            k_barriers.at[slot])

            def issue_v(step, slot):
                plgpu.copy_gmem_to_smem(v_ref.at[b, pl.ds(step * block_kv, block_kv), kv_head],
                                        v_smem.at[slot], v_barriers.at[slot])

            ring_producer(copies=((issue_k, k_consumed), (issue_v, v_consumed)),
                          steps=cta_steps, stages=stages)

        @pl.when(wg < wgs)
        def _consumer():
            if wgs == 2:
                plgpu.set_max_registers(_COMPUTE_REGS, action="increase")
            q_start = cta_q_start + wg * WG_ROWS
            kv_steps, unmasked_steps = kv_range(q_start, WG_ROWS)
            rows = pl.ds(q_start, WG_ROWS)
            bar = q_barriers.at[wg]
            plgpu.copy_gmem_to_smem(q_ref.at[b, rows, q_head], q_smem.at[wg], bar)
            plgpu.copy_gmem_to_smem(do_ref.at[b, rows, q_head], do_smem.at[wg], bar)
            plgpu.copy_gmem_to_smem(lse_ref.at[b, q_head, rows], lse_smem.at[wg], bar)
            plgpu.copy_gmem_to_smem(delta_ref.at[b, q_head, rows], delta_smem.at[wg], bar)
            if p.has_segments:
                plgpu.copy_gmem_to_smem(seg_ref.at[b, rows], segq_smem.at[wg], bar)
            plgpu.barrier_wait(bar)
            lse_row = row_vec(lse_smem.at[wg])
            delta_row = row_vec(delta_smem.at[wg])
            q_seg = row_vec(segq_smem.at[wg]) if p.has_segments else None

            def wait_kv(slot):
                plgpu.barrier_wait(k_barriers.at[slot])
                plgpu.barrier_wait(v_barriers.at[slot])

            def next_kv_waiter(step):
                return next_step_wait(step, kv_steps, wait_kv, stages=stages)

            def s_and_dp(s_ref, dp_ref, slot):
                # S = Q K^T and dP = dO V^T back to back: the second wgmma is issued before
                # the first one's result is awaited.
                plgpu.wgmma(s_ref, q_smem.at[wg], k_smem.at[slot].transpose((1, 0)))
                plgpu.wgmma(dp_ref, do_smem.at[wg], v_smem.at[slot].transpose((1, 0)))
                return s_ref[...], dp_ref[...]

            def kv_step(step, acc, *, masked: bool):
                # This step's k and v tiles were awaited during the previous step's dQ wgmma
                # (or before the loop).
                slot = lax.rem(step, jnp.int32(stages))
                s, dp = pl.run_scoped(functools.partial(s_and_dp, slot=slot),
                                      plgpu.ACC(shape, jnp.float32), plgpu.ACC(shape, jnp.float32))
                plgpu.barrier_arrive(v_consumed.at[slot])  # dp was read: that wgmma is done
                s = s * p.score_mult - lax.broadcast_in_dim(lse_row, shape, [0])
                if masked:
                    kv_ids = step * block_kv + plgpu.broadcasted_iota(
                        jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
                    allowed = kv_ids < p.seq_k
                    if p.is_causal:
                        q_ids = q_start + p.causal_offset + plgpu.broadcasted_iota(
                            jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
                        allowed = allowed & (kv_ids <= q_ids)
                    if p.has_segments:
                        k_seg = col_vec(segk_smem.at[slot])
                        allowed = allowed & (lax.broadcast_in_dim(q_seg, shape, [0])
                                             == lax.broadcast_in_dim(k_seg, shape, [1]))
                    s = jnp.where(allowed, s, -jnp.inf)
                prob = jnp.exp2(s)  # 0 where masked and on rows with lse2 = +inf
                ds = (prob * (dp - lax.broadcast_in_dim(delta_row, shape, [0]))).astype(p.dtype)
                next_kv = next_kv_waiter(step)
                if p.register:
                    acc = matmul_into(acc, ds, k_smem.at[slot], while_running=next_kv)
                else:
                    ds_smem.at[wg][...] = ds
                    plgpu.commit_smem()  # generic-proxy store -> visible to wgmma (async proxy)
                    acc = acc + matmul(ds_smem.at[wg], k_smem.at[slot], (WG_ROWS, p.head_dim))
                    next_kv()  # the GPU order of barrier waits, for the interpreter's checks
                if p.has_segments:
                    # The key ids were read with ordinary loads and the next TMA overwrites
                    # them: fence the proxies before releasing the slot.
                    plgpu.commit_smem()
                plgpu.barrier_arrive(k_consumed.at[slot])
                return acc

            pl.when(kv_steps > 0)(lambda: wait_kv(0))
            acc = zeros_acc((WG_ROWS, p.head_dim))
            acc = lax.fori_loop(0, unmasked_steps, functools.partial(kv_step, masked=False), acc)
            acc = lax.fori_loop(unmasked_steps, kv_steps, functools.partial(kv_step, masked=True),
                                acc)
            kv_flush(kv_steps, cta_steps, stages=stages, k_barriers=k_barriers,
                     v_barriers=v_barriers, k_consumed=k_consumed, v_consumed=v_consumed)

            q_smem.at[wg][...] = (acc * p.scale).astype(p.dtype)  # q is done: stage dq in it
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem.at[wg], dq_ref.at[b, rows, q_head])
            plgpu.wait_smem_to_gmem(0)

    transforms = tile_transforms()
    segs = p.has_segments
    rows_tile = plgpu.SMEM((wgs, WG_ROWS, p.head_dim), p.dtype, transforms=transforms)
    kv_ring = plgpu.SMEM((stages, block_kv, p.head_dim), p.dtype, transforms=transforms)
    scratch = dict(
        q_smem=rows_tile, do_smem=rows_tile, k_smem=kv_ring, v_smem=kv_ring,
        ds_smem=(None if p.register else
                 plgpu.SMEM((wgs, WG_ROWS, block_kv), p.dtype, transforms=transforms)),
        lse_smem=plgpu.SMEM((wgs, WG_ROWS), jnp.float32),
        delta_smem=plgpu.SMEM((wgs, WG_ROWS), jnp.float32),
        segq_smem=plgpu.SMEM((wgs, WG_ROWS), jnp.int32) if segs else None,
        segk_smem=plgpu.SMEM((stages, block_kv), jnp.int32) if segs else None,
        # q, dO, lse2, delta (and the query ids) of each warpgroup arrive on one barrier.
        q_barriers=plgpu.Barrier(num_arrivals=5 if segs else 4, num_barriers=wgs),
        k_barriers=plgpu.Barrier(num_arrivals=2 if segs else 1, num_barriers=stages),
        v_barriers=plgpu.Barrier(num_barriers=stages),
        k_consumed=plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
        v_consumed=plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
    )
    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((p.batch, p.seq_q_pad, p.num_q_heads, p.head_dim),
                                      p.dtype),
        scratch_types=scratch,
        grid=(p.num_q_heads, num_q_blocks, p.batch),
        grid_names=("heads", "q_blocks", "batch"),
        num_threads=wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )


# ================================ dK / dV kernel ==========================================

def _dkv_kernel(p: _Problem, block_q: int, block_kv: int, stages: int):
    wgs = block_kv // WG_ROWS
    num_q_blocks = p.seq_q_pad // block_q
    num_kv_blocks = p.seq_k_pad // block_kv
    shape = (WG_ROWS, block_q)  # S^T, P^T, dP^T, dS^T of one warpgroup: its keys x the queries

    def q_range(kv_start, rows):
        """(first q block that sees any of keys [kv_start, +rows), first q block that sees all
        of them from its first query on, so needs no mask)."""
        if p.is_causal:
            lo = lax.div(jnp.maximum(kv_start - p.causal_offset, 0), jnp.int32(block_q))
            last_key = kv_start + rows - 1 - p.causal_offset
            free = lax.div(jnp.maximum(last_key, 0) + (block_q - 1), jnp.int32(block_q))
        else:
            lo, free = jnp.int32(0), jnp.int32(0)
        lo = jnp.minimum(lo, num_q_blocks)
        if p.has_segments:
            free = jnp.int32(num_q_blocks)  # every step compares segment ids
        return lo, jnp.clip(free, lo, num_q_blocks)

    def kernel(*refs, k_smem, v_smem, q_smem, do_smem, pt_smem, lse_smem, delta_smem,
               segk_smem, segq_smem, kv_barriers, q_barriers, do_barriers, consumed):
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_ref, dk_ref, dv_ref = _unpack(
            refs, p.has_segments, 2)
        kv_head = lax.axis_index("heads")
        b = lax.axis_index("batch")
        wg = lax.axis_index("wg")
        # Causal: kv block 0 sees every q block and is scheduled first (the grid's x axis is
        # the head), so the light blocks fill the tail.
        cta_kv_start = lax.axis_index("kv_blocks") * block_kv
        cta_q_lo, _ = q_range(cta_kv_start, block_kv)
        # Flat step t = (query head g of the group, q block cta_q_lo + i): the producer's
        # prefetch runs across the head boundary.
        steps_per_head = num_q_blocks - cta_q_lo
        total_steps = p.group * steps_per_head

        @pl.when(wg == wgs)
        def _producer():
            if wgs == 2:
                plgpu.set_max_registers(_PRODUCER_REGS, action="decrease")

            def issue(t, slot):
                head = kv_head * p.group + lax.div(t, steps_per_head)
                rows = pl.ds((cta_q_lo + lax.rem(t, steps_per_head)) * block_q, block_q)
                plgpu.copy_gmem_to_smem(q_ref.at[b, rows, head], q_smem.at[slot],
                                        q_barriers.at[slot])
                plgpu.copy_gmem_to_smem(lse_ref.at[b, head, rows], lse_smem.at[slot],
                                        q_barriers.at[slot])
                if p.has_segments:
                    plgpu.copy_gmem_to_smem(seg_ref.at[b, rows], segq_smem.at[slot],
                                            q_barriers.at[slot])
                plgpu.copy_gmem_to_smem(do_ref.at[b, rows, head], do_smem.at[slot],
                                        do_barriers.at[slot])
                plgpu.copy_gmem_to_smem(delta_ref.at[b, head, rows], delta_smem.at[slot],
                                        do_barriers.at[slot])

            ring_producer(copies=((issue, consumed),), steps=total_steps, stages=stages)

        @pl.when(wg < wgs)
        def _consumer():
            if wgs == 2:
                plgpu.set_max_registers(_COMPUTE_REGS, action="increase")
            kv_start = cta_kv_start + wg * WG_ROWS
            kv_rows = pl.ds(kv_start, WG_ROWS)
            bar = kv_barriers.at[wg]
            plgpu.copy_gmem_to_smem(k_ref.at[b, kv_rows, kv_head], k_smem.at[wg], bar)
            plgpu.copy_gmem_to_smem(v_ref.at[b, kv_rows, kv_head], v_smem.at[wg], bar)
            if p.has_segments:
                plgpu.copy_gmem_to_smem(seg_ref.at[b, kv_rows], segk_smem.at[wg], bar)
            plgpu.barrier_wait(bar)
            k_seg = row_vec(segk_smem.at[wg]) if p.has_segments else None  # keys are rows
            q_lo, q_free = q_range(kv_start, WG_ROWS)

            # Every step's operands (q, lse2 and dO, delta) are awaited one step early: during
            # the previous step's last wgmmas (or before the first step).
            def wait_slot(slot):
                plgpu.barrier_wait(q_barriers.at[slot])
                plgpu.barrier_wait(do_barriers.at[slot])

            def next_step_waiter(t):
                return next_step_wait(t, total_steps, wait_slot, stages=stages)

            def skip_step(qb, carry, *, g):
                """A q block this warpgroup's keys cannot see (the other warpgroup's can)."""
                t = g * steps_per_head + (qb - cta_q_lo)
                plgpu.barrier_arrive(consumed.at[lax.rem(t, jnp.int32(stages))])
                next_step_waiter(t)()
                return carry

            def st_dpt(st_ref, dpt_ref, q_tile, do_tile):
                # S^T = K Q^T (rows are keys, columns are queries) and dP^T = V dO^T, issued
                # back to back before either result is awaited.
                plgpu.wgmma(st_ref, k_smem.at[wg], q_tile.transpose((1, 0)))
                plgpu.wgmma(dpt_ref, v_smem.at[wg], do_tile.transpose((1, 0)))
                return st_ref[...], dpt_ref[...]

            def q_step(qb, carry, *, g, masked: bool):
                dk_acc, dv_acc = carry
                t = g * steps_per_head + (qb - cta_q_lo)
                slot = lax.rem(t, jnp.int32(stages))
                q_tile, do_tile = q_smem.at[slot], do_smem.at[slot]
                st, dpt = pl.run_scoped(
                    functools.partial(st_dpt, q_tile=q_tile, do_tile=do_tile),
                    plgpu.ACC(shape, jnp.float32), plgpu.ACC(shape, jnp.float32))
                st = st * p.score_mult - lax.broadcast_in_dim(col_vec(lse_smem.at[slot]),
                                                              shape, [1])
                if masked:
                    allowed = None
                    if p.is_causal:
                        kv_ids = kv_start + plgpu.broadcasted_iota(
                            jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
                        q_ids = qb * block_q + p.causal_offset + plgpu.broadcasted_iota(
                            jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
                        allowed = kv_ids <= q_ids
                    if p.has_segments:
                        same = (lax.broadcast_in_dim(k_seg, shape, [0])
                                == lax.broadcast_in_dim(col_vec(segq_smem.at[slot]), shape, [1]))
                        allowed = same if allowed is None else allowed & same
                    st = jnp.where(allowed, st, -jnp.inf)
                pt = jnp.exp2(st)  # P^T; 0 where masked and for queries with lse2 = +inf
                delta_col = col_vec(delta_smem.at[slot])
                dst = (pt * (dpt - lax.broadcast_in_dim(delta_col, shape, [1]))).astype(p.dtype)
                pt16 = pt.astype(p.dtype)
                next_step = next_step_waiter(t)
                if p.register:
                    # dV += P^T dO and dK += dS^T Q in place, both issued before either is
                    # awaited; the next step's operands are awaited meanwhile.
                    def dv_dk(refs):
                        dv_ref, dk_ref = refs
                        plgpu.wgmma(dv_ref, pt16, do_tile)
                        plgpu.wgmma(dk_ref, dst, q_tile)
                        next_step()

                    dv_acc, dk_acc = pl.run_state(dv_dk)(
                        (plgpu.ACC.init(dv_acc), plgpu.ACC.init(dk_acc)))
                else:
                    pt_smem.at[wg][...] = pt16
                    plgpu.commit_smem()  # generic-proxy store -> visible to wgmma (async proxy)
                    dv_acc = dv_acc + matmul(pt_smem.at[wg], do_tile, (WG_ROWS, p.head_dim))
                    # dS^T reuses the P^T tile: the wgmma that read P^T has completed.
                    pt_smem.at[wg][...] = dst
                    plgpu.commit_smem()
                    dk_acc = dk_acc + matmul(pt_smem.at[wg], q_tile, (WG_ROWS, p.head_dim))
                    next_step()  # the GPU order of barrier waits, for the interpreter's checks
                # lse2, delta (and ids) were read with ordinary loads and the producer's next
                # TMA overwrites them: fence the proxies before releasing the slot.
                plgpu.commit_smem()
                plgpu.barrier_arrive(consumed.at[slot])
                return dk_acc, dv_acc

            def head_loop(g, carry):
                carry = lax.fori_loop(cta_q_lo, q_lo, functools.partial(skip_step, g=g), carry)
                if p.is_causal or p.has_segments:  # otherwise no q block needs a mask
                    carry = lax.fori_loop(q_lo, q_free,
                                          functools.partial(q_step, g=g, masked=True), carry)
                return lax.fori_loop(q_free, num_q_blocks,
                                     functools.partial(q_step, g=g, masked=False), carry)

            pl.when(total_steps > 0)(lambda: wait_slot(0))
            zeros = zeros_acc((WG_ROWS, p.head_dim))
            dk_acc, dv_acc = lax.fori_loop(0, p.group, head_loop, (zeros, zeros))

            # k and v are no longer needed: their tiles stage the outputs.
            k_smem.at[wg][...] = (dk_acc * p.scale).astype(p.dtype)
            v_smem.at[wg][...] = dv_acc.astype(p.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(k_smem.at[wg], dk_ref.at[b, kv_rows, kv_head])
            plgpu.copy_smem_to_gmem(v_smem.at[wg], dv_ref.at[b, kv_rows, kv_head])
            plgpu.wait_smem_to_gmem(0)

    transforms = tile_transforms()
    segs = p.has_segments
    keys_tile = plgpu.SMEM((wgs, WG_ROWS, p.head_dim), p.dtype, transforms=transforms)
    q_ring = plgpu.SMEM((stages, block_q, p.head_dim), p.dtype, transforms=transforms)
    scratch = dict(
        k_smem=keys_tile, v_smem=keys_tile, q_smem=q_ring, do_smem=q_ring,
        pt_smem=(None if p.register else
                 plgpu.SMEM((wgs, WG_ROWS, block_q), p.dtype, transforms=transforms)),
        lse_smem=plgpu.SMEM((stages, block_q), jnp.float32),
        delta_smem=plgpu.SMEM((stages, block_q), jnp.float32),
        segk_smem=plgpu.SMEM((wgs, WG_ROWS), jnp.int32) if segs else None,
        segq_smem=plgpu.SMEM((stages, block_q), jnp.int32) if segs else None,
        kv_barriers=plgpu.Barrier(num_arrivals=3 if segs else 2, num_barriers=wgs),
        q_barriers=plgpu.Barrier(num_arrivals=3 if segs else 2, num_barriers=stages),  # q, lse2
        do_barriers=plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # dO, delta
        consumed=plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
    )
    kv_shape = jax.ShapeDtypeStruct((p.batch, p.seq_k_pad, p.num_kv_heads, p.head_dim), p.dtype)
    return plgpu.kernel(
        kernel,
        out_type=(kv_shape, kv_shape),
        scratch_types=scratch,
        grid=(p.num_kv_heads, num_kv_blocks, p.batch),
        grid_names=("heads", "kv_blocks", "batch"),
        num_threads=wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )
