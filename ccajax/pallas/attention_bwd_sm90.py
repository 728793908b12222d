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

One or two kernels, warp-specialised like the forward
-----------------------------------------------------
Each CTA has one or two compute warpgroups (64 rows each: ``block / 64``) and one producer
warpgroup that streams the operands of the loop through a ``stages``-slot TMA ring; a slot is
refilled once every compute warpgroup has arrived on its "consumed" barrier. With two compute
warpgroups the registers are split 240 / 24 (compute / producer).

* ``fused_dq`` (the GPU default where d allows): only the dK/dV kernel runs, and it adds each
  step's dQ share into a zeroed fp32 buffer by TMA reduce-adds; dq = scale * buffer afterwards.
  5 matmuls per (key tile, query tile) instead of 7, but the order of the fp32 additions varies
  between runs, so dq is not bit-reproducible.
* otherwise a dQ kernel recomputes S and dP: no atomics anywhere, dq, dk and dv are each
  written by exactly one CTA, so the backward is bit-identical across runs.

* dQ kernel, grid ``(Hq, Sq / dq_block_q, B)``: each compute warpgroup loads its 64 query rows
  of q, dO, lse2 and delta once; the producer streams k and v tiles of ``dq_block_kv`` keys
  (the forward's producer, shared code). Per step: S = Q K^T and dP = dO V^T issued back to
  back (v released), P, dS = P (dP - delta), dQ += dS K (k released; the next step's k and v
  are awaited while this wgmma runs). Causal: q blocks reversed (longest first), kv
  tiles above the diagonal never loaded, unmasked tiles first, then the masked ones; a
  warpgroup with fewer steps than its CTA releases the rest (``kv_flush``).
* dK/dV kernel, grid ``(Hkv * group_splits, Sk / dkv_block_kv, B)``: each compute warpgroup
  loads its 64 keys of k and v once and keeps fp32 dK and dV accumulators in registers. The
  producer streams q, lse2 (one barrier) and dO, delta (another) tiles of ``dkv_block_q``
  queries for the flat step sequence (query head g of the CTA's share of the kv head's group,
  q block), so the GQA reduction over that share happens inside the kernel and the prefetch
  runs across the head boundary. With ``group_splits`` > 1 each of a kv block's CTAs writes
  partial dK/dV for its share of the group and the wrapper adds them up (in fp32): under a
  causal mask the CTA of kv block 0 walks every q block of every head of the group, and
  without the split that one CTA can outlast the average SM's whole share of the grid. Per
  step: S^T and dP^T issued back to back, then dV += P^T dO and dK += dS^T Q issued back to
  back, during which the next step's operands are awaited. The q blocks are walked from the
  last down, so the CTAs of a kv head read the same q/dO tiles (and add into the same dQ rows)
  at about the same time: from L2, also under a causal mask (walking up made the fused kernel
  2-10% slower there). Without a causal mask each CTA starts up to ``q_stagger`` - 1 blocks
  along, so that the CTAs running at once do not all reduce-add into the same dQ rows.
  fused_dq: each warpgroup also stores its dS^T rows to a shared tile (two, by step parity),
  the warpgroups meet on a barrier, and each computes dQ for its half of the head dim,
  dS K[:, half] (A: the transposed dS^T tile, B: a column slice of the CTA's k tile), and
  reduce-adds it from a swizzled fp32 staging tile. Its dK wgmma reads dS^T from that tile
  too, which frees registers for the dQ accumulator. Both warpgroups take every step (a q
  block only one warpgroup's keys see runs masked on the other). The warpgroup works
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
                                       check_block_sizes, pad_axis, round_up, sm_count)
from ccajax.pallas.sm90_pipeline import (WG_ROWS, KVSteps, add_to_gmem, check_interpret_threads,
                                         col_vec, f32_tile_transforms, in_interpret_mode, kv_flush,
                                         matmul, matmul_into, next_step_wait,
                                         resolve_single_warp_producer, ring_producer, row_vec,
                                         run_producer, tile_transforms, zeros_acc)

# Two fp32 (64, d) accumulators plus (64, block) S/dP tiles must fit one warpgroup's registers.
MAX_BLOCK = 128
# Shared memory per CTA on sm90 (opt-in maximum); Mosaic GPU aligns every buffer to 1 KiB.
SMEM_LIMIT_BYTES = 227 * 1024
# Non-causal dK/dV CTAs start their q walks up to this many blocks apart (`q_stagger`). On an
# H100 (2026-12-02, tune_attention_bwd.py, sustained windows) staggering by 4 gave +4% backward
# TF/s at 16k 8:2, +2% at 32k 8:2, +1% at 16k 16:16 and 4:4, 0-1% at 4k; 16, 64 and 256
# measured the same within 1%. Unstaggered, the CTAs that run at once (at 8:2, 66 per kv head;
# at 16:16, 8 per head) reduce-add into the same dQ rows together. On an H200 (2026-12-03, 3
# rounds) it did not pay: 16k 8:2 520 against 525 unstaggered (0.99 in each round), 16:16 523
# against 524; kept for the H100, the device the issue-4 table is measured on.
DEFAULT_Q_STAGGER = 4
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


def _dkv_smem_bytes(block_q, block_kv, head_dim, stages, register, segments,
                    fused_dq=False) -> int:
    n = (2 * _buf(block_kv, head_dim) + 2 * _buf(stages, block_q, head_dim)
         + 2 * _buf(stages, block_q, itemsize=4) + 1024)
    n += 0 if register else _buf(block_kv, block_q)
    n += _buf(block_kv, itemsize=4) + _buf(stages, block_q, itemsize=4) if segments else 0
    # dS^T twice (step parity) and the fp32 dQ tile staged for its reduce-add.
    n += 2 * _buf(block_kv, block_q) + _buf(block_q, head_dim, itemsize=4) if fused_dq else 0
    return n


def fused_dq_unsupported(head_dim: int, dkv_block_kv: int) -> str | None:
    """Why the dK/dV kernel cannot also accumulate dQ for these sizes, or None if it can.

    Its compute warpgroups split dQ's columns between them, and a wgmma B operand sliced out of
    the swizzled k tile must span whole 64-column tiles.
    """
    cols = head_dim // (dkv_block_kv // WG_ROWS)
    if cols % 64:
        return (f"fused_dq needs d / (dkv_block_kv / 64) to be a multiple of 64 (each compute "
                f"warpgroup's share of dQ's columns); got d={head_dim}, "
                f"dkv_block_kv={dkv_block_kv}")
    return None


# group_splits=None under a causal mask: split each kv head's group over as many dK/dV CTAs
# as keep every CTA at least this many steps (q blocks of one head) on average. H200, bf16,
# d=128, sustained windows (results/tune_attention_bwd_h200_2026-12-02_group_splits_*),
# backward TF/s against the undivided group for 2 / 4 / 8 parts, with each part's average
# steps: 16k 8:2 +1.2% (258) / +1.4% (129), 16k 16:2 +6.0 / +7.5 (258) / +7.7% (129), 16k 4:1
# +76% (258; 128 CTAs leave SMs idle), 32k 8:2 +3.3 / +4.2% (257), 8k 16:2 (B=2) +8.3% (260)
# / +9.6 / +2.6%; but 8k 8:2 (B=2) -1.0% (130) / -7%, 4k 8:2 (B=4) -2% (66) / -10%: once
# CTAs are short, their fixed costs and the sum of the parts outweigh the shorter tail of the
# grid (where the CTA of kv block 0 walks every q block of the whole group). Non-causal CTAs
# are all equally long: at 16k (8:2, 16:2, 4:1) 2 to 8 parts ran from 1.7% slower to 0.8%
# faster, within the noise (one configuration timed twice differed by up to 1%).
MIN_DKV_CTA_STEPS = 256


def default_group_splits(batch: int, seq_q: int, seq_k: int, num_q_heads: int,
                         num_kv_heads: int, *, is_causal: bool, dkv_blocks) -> int:
    """``group_splits`` for ``group_splits=None``: under a causal mask, the largest divisor of
    the group Hq / Hkv that leaves each dK/dV CTA ``MIN_DKV_CTA_STEPS`` steps on average; with
    either mask, more parts while the grid has fewer CTAs than the GPU has SMs.

    Args: the problem's sizes (unpadded), its mask, and the dK/dV kernel's (block_q, block_kv).
    """
    group = num_q_heads // num_kv_heads
    block_q, block_kv = dkv_blocks
    num_q_blocks = pl.cdiv(seq_q, block_q)
    starts = range(0, seq_k, block_kv)
    # A causal CTA skips the q blocks before the first one that sees its first key.
    steps = [num_q_blocks - min(max(s - (seq_k - seq_q), 0) // block_q, num_q_blocks)
             for s in starts] if is_causal else []
    divisors = [n for n in range(1, group + 1) if group % n == 0]
    splits = max(n for n in divisors if n == 1 or (
        steps and group // n * sum(steps) / len(steps) >= MIN_DKV_CTA_STEPS))
    for n in divisors:
        if n > splits and num_kv_heads * splits * len(starts) * batch < sm_count():
            splits = n
    return splits


def _clamp_block(block: int, seq: int) -> int:
    """Short sequences do not need a tile larger than their padded length."""
    return min(block, round_up(seq, BLOCK_MULTIPLE))


def attention_bwd(q, k, v, out, lse, d_out, *, is_causal: bool, scale: float | None,
                  segment_ids=None, dq_block_q: int = 128, dq_block_kv: int | None = None,
                  dkv_block_q: int = 64, dkv_block_kv: int = 128, stages: int = 2,
                  register_operands: bool | None = None, fused_dq: bool | None = None,
                  auto_barriers: bool = False, single_warp_producer: bool | None = None,
                  group_splits: int | None = None, q_stagger: int | None = None):
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
      fused_dq: True: the dK/dV kernel also computes dQ from its dS tiles and adds it into an
        fp32 buffer with TMA reduce-adds (FlashAttention-3's structure: 5 matmuls per tile
        instead of 7; the order of the additions, so dq's last bits, varies between GPU runs).
        Needs d / (dkv_block_kv / 64) to be a multiple of 64 (``fused_dq_unsupported``).
        False: a separate dQ kernel recomputes S and dP (bit-reproducible). None: True on a
        GPU where supported and the tiles fit in shared memory, else False. The interpreter
        has no TMA reduction: there True stands in a read-add-write, exact only because
        interpreted CTAs run one after another (its race detector reports it when two CTAs
        add to the same rows).
      auto_barriers: let Pallas put a warpgroup barrier around every shared-memory load, store
        and copy it lowers (True), or not (False, the default: ``unsafe_no_auto_barriers``, as
        the forward; every store that a TMA or wgmma reads is fenced by ``commit_smem``, which
        syncs the warpgroup, and a staging tile is rewritten only after ``wait_smem_to_gmem``,
        which does too). Measured on an H200 (3 processes, 24 cells at 4k and 16k): +1.4%
        backward TF/s on average, -1.9% to +8.6%; 16k 8:2 non-causal +3 to +9% in each run.
      single_warp_producer: each kernel's producer (TMA copies, slot waits) runs on one warp
        of its warpgroup, the other three idle (as the forward); False: on all four, each copy
        still issued once. Measured on an H200 at 16k (5 rounds): +1.8% backward TF/s on
        average, causal +1.6 to +4.5%. None: True, except for inputs batch-sharded inside
        `jax.shard_map` (`resolve_single_warp_producer`).
      group_splits: GQA (Hq > Hkv): the dK/dV kernel splits each kv head's group of Hq / Hkv
        query heads over this many CTAs per kv block (a divisor of Hq / Hkv). Each writes
        partial dK and dV in the input dtype and the wrapper sums them in fp32, so dk and dv
        carry one more rounding (as FlashAttention-2's GQA backward). More, shorter CTAs
        shorten the grid's tail under a causal mask, where the CTA of kv block 0 walks every
        q block of the whole group. None: `default_group_splits`.
      q_stagger: without a causal mask, the dK/dV CTA of kv block j starts its walk over the
        q blocks j % q_stagger blocks along (cyclically), so that concurrently running CTAs
        read different q/dO tiles and (fused dQ) reduce-add into different dQ rows, instead of
        all of a kv head's CTAs hitting the same rows at once. 1: no stagger. Must be 1 under
        a causal mask (there the walk starts at each CTA's own diagonal). None: 1 under a
        causal mask, else ``DEFAULT_Q_STAGGER``.
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
    if fused_dq not in (None, True, False):
        raise ValueError(f"fused_dq must be True, False or None; got fused_dq={fused_dq!r}")
    dkv_blocks = (_clamp_block(dkv_block_q, seq_q), _clamp_block(dkv_block_kv, seq_k))
    why_not_fused = fused_dq_unsupported(head_dim, dkv_blocks[1])
    if fused_dq and why_not_fused:
        raise ValueError(why_not_fused)
    if fused_dq is None:
        # benchmarks/tune_attention_bwd.py, H200 (2026-12-01): +2-16% backward TF/s at 16k,
        # -3% to +9% at 4k (results/tune_attention_bwd_h200_2026-12-01_fused_dq*.json).
        fused_dq = (not why_not_fused and not in_interpret_mode()
                    and _dkv_smem_bytes(*dkv_blocks, head_dim, stages, register_operands,
                                        segments, fused_dq=True) <= SMEM_LIMIT_BYTES)
    if dq_block_kv is None:
        # benchmarks/tune_attention_bwd.py on an H100 (S=16k, d=128): 128 keys per step beat 64
        # by 0-3% in 5 of 6 cells (results/tune_attention_bwd_h100_2026-11-23.json).
        fits = _dq_smem_bytes(_clamp_block(dq_block_q, seq_q), _clamp_block(128, seq_k), head_dim,
                              stages, register_operands, segments) <= SMEM_LIMIT_BYTES
        dq_block_kv = 128 if fits else 64
    dq_blocks = (_clamp_block(dq_block_q, seq_q), _clamp_block(dq_block_kv, seq_k))
    dkv_smem = functools.partial(_dkv_smem_bytes, fused_dq=fused_dq)
    kernels = (("dkv", dkv_blocks, dkv_smem),) + (
        () if fused_dq else (("dq", dq_blocks, _dq_smem_bytes),))
    for name, blocks, smem_bytes in kernels:
        need = smem_bytes(*blocks, head_dim, stages, register_operands, segments)
        if need > SMEM_LIMIT_BYTES:
            raise ValueError(
                f"{name}_block_q={blocks[0]}, {name}_block_kv={blocks[1]} with d={head_dim}, "
                f"stages={stages}{' and segment_ids' if segments else ''}"
                f"{' and fused_dq' if fused_dq else ''} need {need} bytes of "
                f"shared memory, more than the {SMEM_LIMIT_BYTES} an sm90 CTA has; use smaller "
                f"blocks or fewer stages")
    group = q.shape[2] // k.shape[2]
    if group_splits is None:
        group_splits = default_group_splits(q.shape[0], seq_q, seq_k, q.shape[2], k.shape[2],
                                            is_causal=is_causal, dkv_blocks=dkv_blocks)
    if (not isinstance(group_splits, int) or isinstance(group_splits, bool)
            or group_splits < 1 or group % group_splits):
        raise ValueError(f"group_splits must be a positive int dividing the group Hq / Hkv = "
                         f"{group}; got group_splits={group_splits!r}")
    if q_stagger is None:
        q_stagger = 1 if is_causal else DEFAULT_Q_STAGGER
    if (not isinstance(q_stagger, int) or isinstance(q_stagger, bool) or q_stagger < 1
            or (is_causal and q_stagger != 1)):
        where = " (1 under a causal mask)" if is_causal else ""
        raise ValueError(f"q_stagger must be a positive int{where}; got q_stagger={q_stagger!r}")
    scale = head_dim ** -0.5 if scale is None else float(scale)
    if segments:
        segment_ids = segment_ids.astype(jnp.int32)
    return _attention_bwd(q, k, v, out, lse, d_out, segment_ids, is_causal=is_causal,
                          scale=scale, dq_blocks=dq_blocks, dkv_blocks=dkv_blocks, stages=stages,
                          register=bool(register_operands), fused_dq=fused_dq,
                          auto_barriers=bool(auto_barriers),
                          single_warp_producer=resolve_single_warp_producer(
                              single_warp_producer, q, k, v, out, d_out, segment_ids),
                          group_splits=group_splits, q_stagger=q_stagger)


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
    fused_dq: bool
    auto_barriers: bool
    single_warp_producer: bool
    group_splits: int
    q_stagger: int

    @property
    def group(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def heads_per_dkv_cta(self) -> int:
        """Query heads whose steps one dK/dV CTA walks: its share of the kv head's group."""
        return self.group // self.group_splits

    @property
    def causal_offset(self) -> int:
        """Query i sees key j iff j <= i + causal_offset (last query meets last key)."""
        return self.seq_k - self.seq_q

    @property
    def compiler_params(self):
        return plgpu.CompilerParams(approx_math=True,
                                    unsafe_no_auto_barriers=not self.auto_barriers)

    @property
    def score_mult(self) -> float:
        """Scores in log2 units: s = (q . k) * scale * log2(e), so probabilities use exp2."""
        return self.scale * LOG2E


@functools.partial(jax.jit, static_argnames=("is_causal", "scale", "dq_blocks", "dkv_blocks",
                                             "stages", "register", "fused_dq",
                                             "auto_barriers", "single_warp_producer",
                                             "group_splits", "q_stagger"))
def _attention_bwd(q, k, v, out, lse, d_out, segment_ids, *, is_causal, scale, dq_blocks,
                   dkv_blocks, stages, register, fused_dq, auto_barriers, single_warp_producer,
                   group_splits, q_stagger):
    batch, seq_q, num_q_heads, head_dim = q.shape
    seq_k, num_kv_heads = k.shape[1], k.shape[2]
    # One padding serves the kernels that run (every block size is 64 or 128); with fused_dq the
    # dQ kernel's blocks would only pad more rows for the dK/dV kernel to walk.
    blocks = (dkv_blocks,) if fused_dq else (dq_blocks, dkv_blocks)
    seq_q_pad = round_up(seq_q, max(b[0] for b in blocks))
    seq_k_pad = round_up(seq_k, max(b[1] for b in blocks))
    prob = _Problem(batch, seq_q, seq_k, seq_q_pad, seq_k_pad, num_q_heads, num_kv_heads,
                    head_dim, q.dtype, is_causal, scale, segment_ids is not None, register,
                    fused_dq, auto_barriers, single_warp_producer, group_splits, q_stagger)

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
    if fused_dq:
        # Every dK/dV CTA adds its share into dq_sum: a zeroed buffer the kernel updates in
        # place (a Ref argument), unscaled fp32 until all shares are in.
        dq_sum = jax.new_ref(jnp.zeros((batch, seq_q_pad, num_q_heads, head_dim), jnp.float32))
        dk, dv = _dkv_kernel(prob, *dkv_blocks, stages)(*inputs, dq_sum)
        dq = (dq_sum[...] * scale).astype(q.dtype)
    else:
        dk, dv = _dkv_kernel(prob, *dkv_blocks, stages)(*inputs)
        dq = _dq_kernel(prob, *dq_blocks, stages)(*inputs)
    dk, dv = (_sum_parts(x[:, :seq_k], group_splits) for x in (dk, dv))
    return dq[:, :seq_q], dk, dv


def _sum_parts(parts, group_splits: int):
    """(B, Sk, Hkv * group_splits, d) partial gradients -> (B, Sk, Hkv, d), summed in fp32."""
    if group_splits == 1:
        return parts
    batch, seq_k, num_parts, head_dim = parts.shape
    split = parts.reshape(batch, seq_k, num_parts // group_splits, group_splits, head_dim)
    return split.astype(jnp.float32).sum(axis=3).astype(parts.dtype)


def _unpack(refs, has_segments, num_rest):
    """Kernel refs -> (q, k, v, d_out, lse2, delta, segment ids or None, *the next num_rest)."""
    if has_segments:
        return refs[:7 + num_rest]
    return (*refs[:6], None, *refs[6:6 + num_rest])


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

            run_producer(lambda: ring_producer(
                copies=((issue_k, k_consumed), (issue_v, v_consumed)), steps=cta_steps,
                stages=stages), single_warp=p.single_warp_producer)

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
        compiler_params=p.compiler_params,
    )


# ================================ dK / dV kernel ==========================================

def _dkv_kernel(p: _Problem, block_q: int, block_kv: int, stages: int):
    wgs = block_kv // WG_ROWS
    num_q_blocks = p.seq_q_pad // block_q
    num_kv_blocks = p.seq_k_pad // block_kv
    shape = (WG_ROWS, block_q)  # S^T, P^T, dP^T, dS^T of one warpgroup: its keys x the queries
    dq_cols = p.head_dim // wgs  # fused_dq: each warpgroup's share of dQ's columns
    interpret = in_interpret_mode()

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
               segk_smem, segq_smem, dst_smem, dq_smem, kv_barriers, q_barriers, do_barriers,
               consumed, dst_ready, dq_loaded):
        # fused_dq: the dq_sum Ref comes before the outputs dk, dv.
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_ref, *dq_sum, dk_ref, dv_ref = (
            _unpack(refs, p.has_segments, 2 + p.fused_dq))
        # The grid's head axis counts (kv head, part of its group): each CTA walks query heads
        # first_head .. first_head + heads_per_dkv_cta - 1 and writes partial dK/dV under its
        # own index, which the wrapper sums over the parts.
        part = lax.axis_index("heads")
        kv_head = lax.div(part, jnp.int32(p.group_splits))
        first_head = part * p.heads_per_dkv_cta
        b = lax.axis_index("batch")
        wg = lax.axis_index("wg")
        # Causal: kv block 0 sees every q block and is scheduled first (the grid's x axis is
        # the head), so the light blocks fill the tail.
        kv_block = lax.axis_index("kv_blocks")
        cta_kv_start = kv_block * block_kv
        cta_q_lo, _ = q_range(cta_kv_start, block_kv)
        stagger = lax.rem(kv_block, jnp.int32(p.q_stagger)) if p.q_stagger > 1 else None

        def q_block(i):
            """The q block of the i-th step of a head: the last first, ``stagger`` along."""
            if stagger is None:
                return num_q_blocks - 1 - i
            return lax.rem(num_q_blocks - 1 - i + stagger, jnp.int32(num_q_blocks))

        # Flat step t = (query head g of the CTA's heads, i): the producer's prefetch runs
        # across the head boundary. Step i visits q block num_q_blocks - 1 - i: last to first,
        # so that the CTAs of a kv head read the same q/dO tiles and (fused_dq) add into the
        # same dQ rows at about the same time, from L2, even under a causal mask; without one,
        # ``q_stagger`` > 1 starts each CTA up to q_stagger - 1 blocks along instead.
        steps_per_head = num_q_blocks - cta_q_lo
        total_steps = p.heads_per_dkv_cta * steps_per_head

        @pl.when(wg == wgs)
        def _producer():
            if wgs == 2:
                plgpu.set_max_registers(_PRODUCER_REGS, action="decrease")

            def issue(t, slot):
                head = first_head + lax.div(t, steps_per_head)
                rows = pl.ds(q_block(lax.rem(t, steps_per_head)) * block_q, block_q)
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

            run_producer(lambda: ring_producer(copies=((issue, consumed),), steps=total_steps,
                                               stages=stages),
                         single_warp=p.single_warp_producer)

        @pl.when(wg < wgs)
        def _consumer():
            if wgs == 2:
                plgpu.set_max_registers(_COMPUTE_REGS, action="increase")
            kv_start = cta_kv_start + wg * WG_ROWS
            kv_rows = pl.ds(kv_start, WG_ROWS)
            # k is one (block_kv, d) tile: the fused dQ wgmma reads every key of the CTA.
            k_tile = k_smem.at[pl.ds(wg * WG_ROWS, WG_ROWS)]
            bar = kv_barriers.at[wg]
            plgpu.copy_gmem_to_smem(k_ref.at[b, kv_rows, kv_head], k_tile, bar)
            plgpu.copy_gmem_to_smem(v_ref.at[b, kv_rows, kv_head], v_smem.at[wg], bar)
            if p.has_segments:
                plgpu.copy_gmem_to_smem(seg_ref.at[b, kv_rows], segk_smem.at[wg], bar)
            plgpu.barrier_wait(bar)
            k_seg = row_vec(segk_smem.at[wg]) if p.has_segments else None  # keys are rows
            q_lo, q_free = q_range(kv_start, WG_ROWS)
            if p.fused_dq:
                # Both warpgroups take part in every step's dQ, so neither skips a q block:
                # the ones its keys cannot see run masked (P^T = 0).
                q_lo = cta_q_lo

            # Every step's operands (q, lse2 and dO, delta) are awaited one step early: during
            # the previous step's last wgmmas (or before the first step).
            def wait_slot(slot):
                plgpu.barrier_wait(q_barriers.at[slot])
                plgpu.barrier_wait(do_barriers.at[slot])

            def next_step_waiter(t):
                return next_step_wait(t, total_steps, wait_slot, stages=stages)

            def skip_step(i, carry, *, g):
                """A q block this warpgroup's keys cannot see (the other warpgroup's can)."""
                t = g * steps_per_head + i
                plgpu.barrier_arrive(consumed.at[lax.rem(t, jnp.int32(stages))])
                next_step_waiter(t)()
                return carry

            def st_dpt(st_ref, dpt_ref, q_tile, do_tile):
                # S^T = K Q^T (rows are keys, columns are queries) and dP^T = V dO^T, issued
                # back to back before either result is awaited.
                plgpu.wgmma(st_ref, k_tile, q_tile.transpose((1, 0)))
                plgpu.wgmma(dpt_ref, v_smem.at[wg], do_tile.transpose((1, 0)))
                return st_ref[...], dpt_ref[...]

            def q_step(i, carry, *, g, masked: bool):
                dk_acc, dv_acc = carry
                t = g * steps_per_head + i
                qb = q_block(i)
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
                if p.fused_dq:
                    # dQ[q block, this warpgroup's columns] = dS K[:, columns] needs the dS^T
                    # rows of both warpgroups: each stores its own, then waits for the other's.
                    # Two tiles by step parity: a warpgroup writes tile t % 2 only after the
                    # other arrived for step t - 1, so after its dQ wgmma of step t - 2 ended.
                    dst_tile = dst_smem.at[lax.rem(t, 2)]
                    own_dst = dst_tile.at[pl.ds(wg * WG_ROWS, WG_ROWS)]
                    own_dst[...] = dst
                    plgpu.commit_smem()
                    plgpu.barrier_arrive(dst_ready)
                    k_cols = k_smem.at[:, pl.ds(wg * dq_cols, dq_cols)]
                if p.register:
                    # dV += P^T dO and dK += dS^T Q in place (and the fused dQ), all issued
                    # before any is awaited; the next step's operands are awaited meanwhile.
                    def dv_dk(refs):
                        dv_ref, dk_ref, *dq_ref = refs
                        plgpu.wgmma(dv_ref, pt16, do_tile)
                        # fused_dq: dS^T is in shared memory already; reading it from there
                        # frees its registers for the dQ accumulator.
                        plgpu.wgmma(dk_ref, own_dst if p.fused_dq else dst, q_tile)
                        if p.fused_dq:
                            plgpu.barrier_wait(dst_ready)
                            plgpu.wgmma(dq_ref[0], dst_tile.transpose((1, 0)), k_cols)
                        next_step()

                    accs = (dv_acc, dk_acc) + (
                        (zeros_acc((block_q, dq_cols)),) if p.fused_dq else ())
                    dv_acc, dk_acc, *dq = pl.run_state(dv_dk)(tuple(map(plgpu.ACC.init, accs)))
                else:
                    pt_smem.at[wg][...] = pt16
                    plgpu.commit_smem()  # generic-proxy store -> visible to wgmma (async proxy)
                    dv_acc = dv_acc + matmul(pt_smem.at[wg], do_tile, (WG_ROWS, p.head_dim))
                    if p.fused_dq:
                        dk_acc = dk_acc + matmul(own_dst, q_tile, (WG_ROWS, p.head_dim))
                        plgpu.barrier_wait(dst_ready)
                        dq = [matmul(dst_tile.transpose((1, 0)), k_cols, (block_q, dq_cols))]
                    else:
                        # dS^T reuses the P^T tile: the wgmma that read P^T has completed.
                        pt_smem.at[wg][...] = dst
                        plgpu.commit_smem()
                        dk_acc = dk_acc + matmul(pt_smem.at[wg], q_tile, (WG_ROWS, p.head_dim))
                    next_step()  # the GPU order of barrier waits, for the interpreter's checks
                if p.fused_dq:
                    head = first_head + g
                    add_dq(dq[0], dq_sum[0].at[b, pl.ds(qb * block_q, block_q), head,
                                                pl.ds(wg * dq_cols, dq_cols)])
                # lse2, delta (and ids) were read with ordinary loads and the producer's next
                # TMA overwrites them: fence the proxies before releasing the slot.
                plgpu.commit_smem()
                plgpu.barrier_arrive(consumed.at[slot])
                return dk_acc, dv_acc

            def add_dq(dq, dst_ref):
                """dq_sum[window] += dq by a TMA reduce-add (any CTA may add to any window)."""
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous add read it
                add_to_gmem(dq, dq_smem.at[wg], dst_ref,
                            dq_loaded.at[wg] if interpret else None, interpret)

            def head_loop(g, carry):
                # Steps i: q blocks from the last down; unmasked, masked, then skipped ones.
                carry = lax.fori_loop(0, num_q_blocks - q_free,
                                      functools.partial(q_step, g=g, masked=False), carry)
                if p.is_causal or p.has_segments:  # otherwise no q block needs a mask
                    carry = lax.fori_loop(num_q_blocks - q_free, num_q_blocks - q_lo,
                                          functools.partial(q_step, g=g, masked=True), carry)
                return lax.fori_loop(num_q_blocks - q_lo, steps_per_head,
                                     functools.partial(skip_step, g=g), carry)

            pl.when(total_steps > 0)(lambda: wait_slot(0))
            zeros = zeros_acc((WG_ROWS, p.head_dim))
            dk_acc, dv_acc = lax.fori_loop(0, p.heads_per_dkv_cta, head_loop, (zeros, zeros))
            if p.fused_dq:
                # The other warpgroup's last dQ wgmma reads this warpgroup's k rows: one more
                # meeting before they are overwritten.
                plgpu.barrier_arrive(dst_ready)
                plgpu.barrier_wait(dst_ready)

            # k and v are no longer needed: their tiles stage the outputs.
            k_tile[...] = (dk_acc * p.scale).astype(p.dtype)
            v_smem.at[wg][...] = dv_acc.astype(p.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(k_tile, dk_ref.at[b, kv_rows, part])
            plgpu.copy_smem_to_gmem(v_smem.at[wg], dv_ref.at[b, kv_rows, part])
            plgpu.wait_smem_to_gmem(0)

    transforms = tile_transforms()
    segs = p.has_segments
    fused = p.fused_dq
    q_ring = plgpu.SMEM((stages, block_q, p.head_dim), p.dtype, transforms=transforms)
    scratch = dict(
        k_smem=plgpu.SMEM((block_kv, p.head_dim), p.dtype, transforms=transforms),
        v_smem=plgpu.SMEM((wgs, WG_ROWS, p.head_dim), p.dtype, transforms=transforms),
        q_smem=q_ring, do_smem=q_ring,
        pt_smem=(None if p.register else
                 plgpu.SMEM((wgs, WG_ROWS, block_q), p.dtype, transforms=transforms)),
        lse_smem=plgpu.SMEM((stages, block_q), jnp.float32),
        delta_smem=plgpu.SMEM((stages, block_q), jnp.float32),
        segk_smem=plgpu.SMEM((wgs, WG_ROWS), jnp.int32) if segs else None,
        segq_smem=plgpu.SMEM((stages, block_q), jnp.int32) if segs else None,
        dst_smem=(plgpu.SMEM((2, block_kv, block_q), p.dtype, transforms=transforms)
                  if fused else None),
        dq_smem=(plgpu.SMEM((wgs, block_q, dq_cols), jnp.float32,
                            transforms=f32_tile_transforms()) if fused else None),
        kv_barriers=plgpu.Barrier(num_arrivals=3 if segs else 2, num_barriers=wgs),
        q_barriers=plgpu.Barrier(num_arrivals=3 if segs else 2, num_barriers=stages),  # q, lse2
        do_barriers=plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # dO, delta
        consumed=plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
        dst_ready=plgpu.Barrier(num_arrivals=wgs) if fused else None,
        dq_loaded=(plgpu.Barrier(num_barriers=wgs) if fused and interpret else None),
    )
    num_parts = p.num_kv_heads * p.group_splits
    kv_shape = jax.ShapeDtypeStruct((p.batch, p.seq_k_pad, num_parts, p.head_dim), p.dtype)
    return plgpu.kernel(
        kernel,
        out_type=(kv_shape, kv_shape),
        scratch_types=scratch,
        grid=(num_parts, num_kv_blocks, p.batch),
        grid_names=("heads", "kv_blocks", "batch"),
        num_threads=wgs + 1,
        thread_name="wg",
        compiler_params=p.compiler_params,
    )
