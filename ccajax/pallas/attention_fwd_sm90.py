"""Flash-attention forward for Hopper (sm90), written in explicit Mosaic GPU style.

Public entry: :func:`attention_fwd` (q, k, v) -> (out, lse).

Shapes
------
* q: (B, Sq, Hq, d); k, v: (B, Sk, Hkv, d); Hkv divides Hq and query head h reads kv head
  ``h // (Hq // Hkv)`` (GQA / MQA). bf16 or fp16, d in {64, 128}.
* out: (B, Sq, Hq, d) in q's dtype.
* lse: (B, Hq, Sq) float32, natural-log log-sum-exp of the *scaled* scores of each query row;
  ``-inf`` for a row with no allowed key (whose output is 0). Sq is the minor axis so that one
  CTA writes its block_q values with a single 1-D TMA store.

Kernel layout
-------------
* Grid ``(Hq, num_q_blocks, B)``, one CTA (a single warpgroup, 128 threads) per
  (query head, query block, batch). The CTA reads the k/v tiles of kv head ``h // group``
  directly from the un-repeated (B, Sk, Hkv, d) arrays: the query heads of one kv head read the
  same k/v tiles (from L2), k/v are never repeated in memory.
* Memory pipeline: q is TMA-copied once into shared memory. k and v go through a two-slot ring
  buffer in shared memory, each slot with its own TMA barrier. At the start of kv step i the CTA
  issues the TMA copies of step i+1 into the other slot (whose last reader, step i-1, has fully
  finished: every wgmma is awaited before its result is read), then waits for step i's k,
  computes S = q k^T with ``wgmma``, waits for step i's v, and computes P v with ``wgmma``.
  The v copy of step i thus overlaps the QK^T matmul and softmax of step i, and both copies of
  step i+1 overlap all of step i.
* Softmax: online (flash) rescaling in fp32, in the log2 domain with ``scale * log2(e)`` folded
  into one multiply, so the exponentials are ``exp2``. P is cast to the input dtype and staged in
  shared memory as the A operand of the P v wgmma (see "Interpret mode" below for why it is not
  fed from registers).
* Accumulators: each wgmma writes a fresh zero-initialised ``plgpu.ACC`` inside ``pl.run_scoped``
  and its value is added to the running register accumulator (``acc = acc * alpha + P v``).
* Masking: kv steps are split into two loops. Steps whose whole tile is allowed for every row of
  the query block run without any mask; the remaining steps (the causal diagonal tiles and the
  tile holding the end of Sk) apply an iota mask. Under causal masking, kv blocks entirely above
  the diagonal are never loaded nor computed.
* Causal alignment: query i (0-based in Sq) may see key j iff ``j <= i + (Sk - Sq)``, i.e. the
  last query meets the last key (as :func:`ccajax.attention.reference_attention`). With Sq > Sk
  the first Sq - Sk queries see no key: out 0, lse -inf.
* Sequence tails: the wrapper zero-pads Sq up to a multiple of block_q and Sk up to a multiple of
  block_kv (only when needed); padded keys are masked in the kernel and padded query rows are
  sliced off. This costs one copy of q/k/v when the lengths are not block multiples.
* Epilogue: out = acc / l (0 where l == 0) is written to the q shared-memory tile and TMA-stored;
  lse = (m + log2 l) * ln 2 likewise.

Interpret mode (CPU)
--------------------
The kernel runs on the CPU under ``plgpu.force_gpu_interpret_mode()``, which simulates TMA,
barriers and wgmma. In jax 0.11.2 that interpreter does not handle ``pl.run_state`` (so
``plgpu.ACC.init(value)`` accumulators cannot be used) and its wgmma reads both operands from
shared-memory refs (so a register-resident A operand is not supported). The kernel is written
within those limits so that the very same code is tested on the CPU and run on the GPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
SUPPORTED_HEAD_DIMS = (64, 128)
# wgmma works on 64-row warpgroup tiles, and a 64-element row of a 16-bit dtype is exactly one
# 128-byte swizzle span; both block sizes must therefore be multiples of 64.
BLOCK_MULTIPLE = 64
MAX_BLOCK = 256
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)


def _check_args(q, k, v, is_causal, scale, block_q, block_kv):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be 4-D (B, S, H, d); got {name}.shape={x.shape}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
            raise ValueError(
                f"{name}.dtype must be bfloat16 or float16; got {name}.dtype={x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"q, k, v must share one dtype; got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    batch, _, num_q_heads, head_dim = q.shape
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"head dim d must be one of {SUPPORTED_HEAD_DIMS}; got d={head_dim} "
            f"(q.shape={q.shape})")
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape (B, Sk, Hkv, d); got k {k.shape}, v {v.shape}")
    if k.shape[0] != batch:
        raise ValueError(f"q and k must share the batch B; got q {q.shape}, k {k.shape}")
    if k.shape[3] != head_dim:
        raise ValueError(
            f"q and k/v must share the head dim d; got q d={head_dim}, k d={k.shape[3]}")
    if k.shape[1] < 1 or q.shape[1] < 1:
        raise ValueError(f"sequence lengths must be >= 1; got Sq={q.shape[1]}, Sk={k.shape[1]}")
    num_kv_heads = k.shape[2]
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        raise ValueError(
            f"kv heads Hkv must divide query heads Hq; got Hq={num_q_heads}, Hkv={num_kv_heads}")
    for name, blk in (("block_q", block_q), ("block_kv", block_kv)):
        if not isinstance(blk, int) or blk <= 0 or blk % BLOCK_MULTIPLE or blk > MAX_BLOCK:
            raise ValueError(
                f"{name} must be a positive multiple of {BLOCK_MULTIPLE} and at most {MAX_BLOCK}; "
                f"got {name}={blk!r}")
    if not isinstance(is_causal, bool):
        raise ValueError(f"is_causal must be a bool; got is_causal={is_causal!r}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)
                                  and scale > 0):
        raise ValueError(f"scale must be a finite positive float or None; got scale={scale!r}")


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _pad_seq(x, length):
    """Zero-pads axis 1 of x up to `length` (no copy when it already has that length)."""
    if x.shape[1] == length:
        return x
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))


def attention_fwd(q, k, v, *, is_causal: bool, scale: float | None, block_q: int = 64,
                  block_kv: int = 64):
    """Flash-attention forward on Hopper; see the module docstring for the kernel layout.

    Args:
      q: (B, Sq, Hq, d) bf16/fp16 queries.
      k: (B, Sk, Hkv, d) keys, same dtype; Hkv divides Hq.
      v: (B, Sk, Hkv, d) values, same dtype.
      is_causal: causal mask with the last query aligned to the last key.
      scale: score scale (a static Python float); None means 1/sqrt(d).
      block_q, block_kv: tile sizes, multiples of 64 (at most 256).
    Returns:
      (out, lse): out (B, Sq, Hq, d) in q's dtype; lse (B, Hq, Sq) float32, natural-log
      log-sum-exp of the scaled scores, -inf for rows that see no key (their out is 0).
    Raises:
      ValueError: for unsupported dtypes, head dims, head counts, block sizes or mismatched
        shapes; the message names the argument, the value and what is valid.
    """
    _check_args(q, k, v, is_causal, scale, block_q, block_kv)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _attention_fwd(q, k, v, is_causal=is_causal, scale=scale, block_q=block_q,
                          block_kv=block_kv)


@functools.partial(jax.jit, static_argnames=("is_causal", "scale", "block_q", "block_kv"))
def _attention_fwd(q, k, v, *, is_causal, scale, block_q, block_kv):
    batch, seq_q, num_q_heads, head_dim = q.shape
    seq_k, num_kv_heads = k.shape[1], k.shape[2]
    group = num_q_heads // num_kv_heads
    dtype = q.dtype

    # Short sequences do not need a tile larger than their padded length.
    block_q = min(block_q, _round_up(seq_q, BLOCK_MULTIPLE))
    block_kv = min(block_kv, _round_up(seq_k, BLOCK_MULTIPLE))
    seq_q_pad = _round_up(seq_q, block_q)
    seq_k_pad = _round_up(seq_k, block_kv)
    q_p, k_p, v_p = _pad_seq(q, seq_q_pad), _pad_seq(k, seq_k_pad), _pad_seq(v, seq_k_pad)
    num_q_blocks = seq_q_pad // block_q
    num_kv_blocks = seq_k_pad // block_kv
    # Query i sees key j iff j <= i + causal_offset (last query aligned with last key).
    causal_offset = seq_k - seq_q
    # Scores are kept in log2 units: s = (q . k) * scale * log2(e), so softmax uses exp2.
    score_mult = scale * _LOG2E

    def kernel(q_ref, k_ref, v_ref, out_ref, lse_ref,
               q_smem, k_smem, v_smem, p_smem, lse_smem, q_barrier, k_barriers, v_barriers):
        q_head = lax.axis_index("heads")
        q_block = lax.axis_index("q_blocks")
        b = lax.axis_index("batch")
        kv_head = lax.div(q_head, jnp.array(group, q_head.dtype))
        q_start = q_block * block_q

        # --- which kv blocks this q block needs, and which of them need a mask -------------
        if is_causal:
            # Last key any row of this block may see (its last row's limit), exclusive end.
            kv_end = jnp.clip(q_start + block_q + causal_offset, 0, seq_k)
            kv_steps = lax.div(kv_end + (block_kv - 1), jnp.int32(block_kv))
            # Tile j needs no causal mask when its last key <= the first row's limit.
            first_row_limit = q_start + causal_offset  # inclusive, may be negative
            unmasked_steps = lax.div(jnp.maximum(first_row_limit + 1, 0), jnp.int32(block_kv))
        else:
            kv_steps = jnp.int32(num_kv_blocks)
            unmasked_steps = jnp.int32(num_kv_blocks)
        if seq_k % block_kv:
            # The last (partial) kv tile always goes through the masked loop.
            unmasked_steps = jnp.minimum(unmasked_steps, num_kv_blocks - 1)
        unmasked_steps = jnp.minimum(unmasked_steps, kv_steps)

        def issue_kv(step, slot):
            rows = (b, pl.ds(step * block_kv, block_kv), kv_head)
            plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_barriers.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_barriers.at[slot])

        plgpu.copy_gmem_to_smem(
            q_ref.at[b, pl.ds(q_start, block_q), q_head], q_smem, q_barrier.at[0])

        @pl.when(kv_steps > 0)
        def _():
            issue_kv(0, 0)

        plgpu.barrier_wait(q_barrier.at[0])

        def kv_step(step, carry, *, masked: bool):
            acc, m_i, l_i = carry
            slot = lax.rem(step, jnp.int32(2))

            # Prefetch the next tile into the other slot; its previous reader (step - 1) has
            # completed, because each wgmma result below is awaited before use.
            @pl.when(step + 1 < kv_steps)
            def _():
                issue_kv(step + 1, 1 - slot)

            plgpu.barrier_wait(k_barriers.at[slot])

            def qk_matmul(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
                return acc_ref[...]

            s = pl.run_scoped(qk_matmul, plgpu.ACC((block_q, block_kv), jnp.float32))
            s = s * score_mult
            if masked:
                kv_ids = step * block_kv + plgpu.broadcasted_iota(
                    jnp.int32, (block_q, block_kv), 1, layout=plgpu.Layout.WGMMA)
                allowed = kv_ids < seq_k
                if is_causal:
                    q_ids = q_start + causal_offset + plgpu.broadcasted_iota(
                        jnp.int32, (block_q, block_kv), 0, layout=plgpu.Layout.WGMMA)
                    allowed = allowed & (kv_ids <= q_ids)
                s = jnp.where(allowed, s, -jnp.inf)

            m_new = jnp.maximum(m_i, s.max(axis=1))
            # A row that has seen no allowed key yet keeps m = -inf; subtract 0 instead so that
            # exp2 gives 0 rather than NaN (-inf - -inf).
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            alpha = jnp.exp2(m_i - m_safe)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_safe, s.shape, [0]))
            l_i = l_i * alpha + p.sum(axis=1)

            # P goes through shared memory as the A operand of the P v wgmma (see docstring).
            p_smem[...] = p.astype(dtype)
            plgpu.commit_smem()  # make the generic-proxy store visible to wgmma (async proxy)
            plgpu.barrier_wait(v_barriers.at[slot])

            def pv_matmul(acc_ref):
                plgpu.wgmma(acc_ref, p_smem, v_smem.at[slot])
                return acc_ref[...]

            pv = pl.run_scoped(pv_matmul, plgpu.ACC((block_q, head_dim), jnp.float32))
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv
            return acc, m_new, l_i

        m_i = plgpu.layout_cast(jnp.full((block_q,), -jnp.inf, jnp.float32),
                                plgpu.Layout.WGMMA.reduce(1))
        l_i = plgpu.layout_cast(jnp.full((block_q,), 0.0, jnp.float32),
                                plgpu.Layout.WGMMA.reduce(1))
        acc = plgpu.layout_cast(jnp.full((block_q, head_dim), 0.0, jnp.float32),
                                plgpu.Layout.WGMMA)
        carry = (acc, m_i, l_i)
        carry = lax.fori_loop(0, unmasked_steps, functools.partial(kv_step, masked=False), carry)
        carry = lax.fori_loop(unmasked_steps, kv_steps, functools.partial(kv_step, masked=True),
                              carry)
        acc, m_i, l_i = carry

        # Rows with no allowed key have l == 0 and acc == 0: output 0, lse = -inf.
        empty = l_i == 0.0
        inv_l = 1.0 / jnp.where(empty, 1.0, l_i)
        out = acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])
        q_smem[...] = out.astype(dtype)  # q is no longer needed: reuse its tile for the output
        log2_l = jnp.log2(jnp.where(empty, 1.0, l_i))
        lse_smem[...] = jnp.where(empty, -jnp.inf, (m_i + log2_l) * _LN2)  # back to natural log
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, out_ref.at[b, pl.ds(q_start, block_q), q_head])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, q_head, pl.ds(q_start, block_q)])
        plgpu.wait_smem_to_gmem(0)

    # 16-bit tiles for wgmma: (8, 64) tiling + 128-byte swizzle (64 elements x 2 bytes).
    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    scratch = (
        plgpu.SMEM((block_q, head_dim), dtype, transforms=transforms),  # q, then out
        plgpu.SMEM((2, block_kv, head_dim), dtype, transforms=transforms),  # k ring
        plgpu.SMEM((2, block_kv, head_dim), dtype, transforms=transforms),  # v ring
        plgpu.SMEM((block_q, block_kv), dtype, transforms=transforms),  # P
        plgpu.SMEM((block_q,), jnp.float32),  # lse
        plgpu.Barrier(num_barriers=1),  # q arrived
        plgpu.Barrier(num_barriers=2),  # k slot arrived
        plgpu.Barrier(num_barriers=2),  # v slot arrived
    )
    out, lse = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((batch, seq_q_pad, num_q_heads, head_dim), dtype),
                  jax.ShapeDtypeStruct((batch, num_q_heads, seq_q_pad), jnp.float32)),
        scratch_types=scratch,
        grid=(num_q_heads, num_q_blocks, batch),
        grid_names=("heads", "q_blocks", "batch"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(q_p, k_p, v_p)
    if seq_q_pad != seq_q:
        out, lse = out[:, :seq_q], lse[:, :, :seq_q]
    return out, lse
