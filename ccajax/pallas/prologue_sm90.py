"""The CCA/CCGQA prologue as one Hopper (sm90) kernel, explicit Mosaic GPU style.

Public entry: :func:`mosaic_prologue` (custom VJP): from the down-projection's output it writes
attention-ready q', k' in one pass: the two-stage causal convolution (with its 2-row halo and the
spec's bias semantics), the q-k mean, L2 normalisation with the key temperature, and RoPE (full or
partial). Its reference is `ccajax.cca_fused.fused_prologue` (itself equal to `ccajax.cca`'s
functions); the backward is that reference's VJP, recomputed in jnp.

Shapes
------
* p: (B, S, Hp, d), the down-projection output viewed as heads; heads ``0..Hq-1`` are q,
  ``Hq..Hq+Hkv-1`` are k (further heads, e.g. the values, are not read). bf16/fp16, d in {64, 128}.
* positions, segment_positions: (B, S) int32 RoPE positions and each token's index in its segment.
* out: q' (B, S, Hq, d), k' (B, S, Hkv, d) in p's dtype.

Kernel layout
-------------
* Grid ``(Hq + Hkv, S / 64, B)``, one warpgroup per CTA, one output head and 64 rows each.
* TMA copies into shared memory: the head's rows t - lag for lag 0, 1, 2 into three untiled
  buffers (block 0 copies rows [0, 64 - lag) to buffer rows [lag, 64); the rows before stay
  unwritten and are masked below), the q-k mean partners through two slots (a q head reads its k
  head G times, a k head its G q heads, so both sum G tiles and divide by G), the two conv1 taps
  of the head, the rotate-half matrix, the head's per-channel vectors and the rows' positions.
  Tiled (swizzled) tiles are only filled from tile-aligned rows: Mosaic's layout inference rejects
  a TMA into a tiled tile from a row offset it cannot prove a multiple of 8. Shifted rows are
  shifted by the copy, not by the load: WGMMA-layout loads of an untiled buffer at row offsets 7
  and 6 passed interpret mode but gave wrong rows on the H100 (2026-11-23).
* Registers (WGMMA layout, float32): the lags, masked by ``segment_positions >= lag`` (zero
  before the segment start); conv0 at t and t-1 (c0[t-1] = b0 at a segment start, the spec's
  bias semantics), stored as bf16 into two swizzled operand tiles, then conv1 = two wgmmas.
  y = c1 + b1 + mean.
* RoPE needs y with its halves swapped: y is split as bf16 hi + lo (exact to ~2^-16) and
  multiplied by the signed permutation matrix on the tensor cores (two more wgmmas), since wgmma
  operands (not register shuffles) are what the interpreter and the GPU both take. cos/sin are
  computed in the kernel from position * inv_freq (the reference's float32 angles).
* out = (y cos + rot(y) sin) * sqrt(d) / ||y|| (* temperature for keys), rounded once, TMA-stored.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ccajax.config import CCAConfig, rotary_dims
from ccajax.pallas.sm90_common import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, pad_axis, round_up

BLOCK_ROWS = 64  # one warpgroup's wgmma tile
LAGS = 3  # conv0 at t and t-1 reads rows t, t-1, t-2
PARTNER_SLOTS = 2  # q-k mean partner tiles in flight (G of them pass through)
_VEC_ROWS = 8  # per-head vectors: w0 older tap, w0 current tap, b0, b1, out scale, inv_freq


def unsupported_reason(cfg: CCAConfig, dtype) -> str | None:
    """Why the kernel cannot run this config (None when it can)."""
    if jnp.dtype(dtype) not in SUPPORTED_DTYPES:
        return f"dtype {jnp.dtype(dtype)} (needs bfloat16 or float16)"
    if cfg.head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {cfg.head_dim} (needs one of {SUPPORTED_HEAD_DIMS})"
    if not cfg.use_conv or cfg.conv_kernel_sizes != (2, 2):
        return (f"conv {cfg.use_conv} {cfg.conv_kernel_sizes} "
                "(the kernel does the (2, 2) convolution)")
    return None


def head_vectors(conv: dict, temp, cfg: CCAConfig) -> jnp.ndarray:
    """(Hq+Hkv, 8, d) float32 rows: w0[0], w0[1], b0, b1, out scale sqrt(d)*temperature, inv_freq
    (RoPE frequency of each column's pair, 0 past the rotated dims), 0, 0."""
    heads, d = cfg.num_q_heads + cfg.num_kv_heads, cfg.head_dim
    f32 = jnp.float32
    w0 = conv["w0"].astype(f32).reshape(2, heads, d)
    scale = jnp.full((heads,), d ** 0.5, f32)
    if temp is not None:
        t = temp.astype(f32)
        t = jnp.exp(t) if cfg.temperature_form == "exp" else t
        scale = scale.at[cfg.num_q_heads:].multiply(t)
    rotary = rotary_dims(d, cfg.rope_fraction)
    inv_freq = jnp.zeros((d,), f32)
    if rotary:
        # The same float32 expression as `ccajax.rope.apply_rope`, so the angles match exactly.
        freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, rotary, 2, dtype=f32) / rotary))
        inv_freq = inv_freq.at[:rotary].set(jnp.tile(freq, 2))
    rows = [w0[0], w0[1], conv["b0"].astype(f32).reshape(heads, d),
            conv["b1"].astype(f32).reshape(heads, d), jnp.broadcast_to(scale[:, None], (heads, d)),
            jnp.broadcast_to(inv_freq, (heads, d))]
    rows += [jnp.zeros((heads, d), f32)] * (_VEC_ROWS - len(rows))
    return jnp.stack(rows, axis=1)


def rotate_half_matrix(head_dim: int, rotary: int, dtype) -> jnp.ndarray:
    """(d, d) signed permutation R with (y @ R) = rotate_half(y) on the first ``rotary`` dims
    (-y[j + r/2] for j < r/2, y[j - r/2] for r/2 <= j < r) and 0 beyond."""
    half = rotary // 2
    j = jnp.arange(head_dim)
    r = jnp.zeros((head_dim, head_dim), jnp.float32)
    r = r.at[j[:half] + half, j[:half]].set(-1.0)
    r = r.at[j[half:rotary] - half, j[half:rotary]].set(1.0)
    return r.astype(dtype)


def prologue_fwd(p, conv, temp, positions, segment_positions, cfg: CCAConfig):
    """Runs the kernel (see the module docstring for shapes); q', k' in p's dtype."""
    why = unsupported_reason(cfg, p.dtype)
    if why is not None:
        raise ValueError(f"the mosaic prologue does not support {why}; use the jnp prologue")
    batch, seq, _, d = p.shape
    hq, hkv, group = cfg.num_q_heads, cfg.num_kv_heads, cfg.group_size
    heads = hq + hkv
    dtype = p.dtype
    rows = BLOCK_ROWS
    seq_pad = round_up(seq, rows)
    # Tails: zero rows (a copy, only when S is not a block multiple), sliced off at the end.
    p = pad_axis(p, 1, seq_pad)
    positions = pad_axis(positions.astype(jnp.int32), 1, seq_pad)
    segment_positions = pad_axis(segment_positions.astype(jnp.int32), 1, seq_pad)
    vecs = head_vectors(conv, temp, cfg)
    rotary = rotary_dims(d, cfg.rope_fraction)
    w1 = conv["w1"].astype(dtype)
    rot = rotate_half_matrix(d, rotary, dtype)

    slots = min(group, PARTNER_SLOTS)

    def kernel(p_ref, pos_ref, segpos_ref, vec_ref, w1_ref, rot_ref, q_ref, k_ref, *,
               lag_smem, op_smem, part_smem, w1_smem, rot_smem, vec_smem, pos_smem, segpos_smem,
               lag_barrier, part_barriers, const_barrier):
        h = lax.axis_index("heads")
        block = lax.axis_index("rows")
        b = lax.axis_index("batch")
        s0 = block * rows
        is_q = h < hq

        # --- copies in ---------------------------------------------------------------------
        for tap in range(2):
            plgpu.copy_gmem_to_smem(w1_ref.at[tap, h], w1_smem.at[tap], const_barrier)
        plgpu.copy_gmem_to_smem(rot_ref, rot_smem, const_barrier)
        plgpu.copy_gmem_to_smem(vec_ref.at[h], vec_smem, const_barrier)
        plgpu.copy_gmem_to_smem(pos_ref.at[b, pl.ds(s0, rows)], pos_smem, const_barrier)
        plgpu.copy_gmem_to_smem(segpos_ref.at[b, pl.ds(s0, rows)], segpos_smem, const_barrier)

        # lag_smem[lag][t] = p[s0 + t - lag]; block 0 has no rows before it, so its copies
        # start at buffer row `lag` and rows t < lag stay unwritten (masked below).
        plgpu.copy_gmem_to_smem(p_ref.at[b, pl.ds(s0, rows), h], lag_smem.at[0], lag_barrier)
        for lag in range(1, LAGS):
            @pl.when(block == 0)
            def _():
                plgpu.copy_gmem_to_smem(p_ref.at[b, pl.ds(0, rows - lag), h],
                                        lag_smem.at[lag, pl.ds(lag, rows - lag)], lag_barrier)

            @pl.when(block > 0)
            def _():
                plgpu.copy_gmem_to_smem(p_ref.at[b, pl.ds(s0 - lag, rows), h], lag_smem.at[lag],
                                        lag_barrier)

        # A q head's partner is its k head (read G times); a k head's are its G q heads.
        k_head = hq + lax.div(h, jnp.int32(group))

        def copy_partner(g):
            src = jnp.where(is_q, k_head, (h - hq) * group + g)
            plgpu.copy_gmem_to_smem(p_ref.at[b, pl.ds(s0, rows), src], part_smem.at[g % slots],
                                    part_barriers.at[g % slots])

        if cfg.use_qk_mean:
            for g in range(slots):
                copy_partner(g)

        # --- conv0 at t and t-1 in registers -----------------------------------------------
        wgmma_layout = plgpu.Layout.WGMMA
        shape = (rows, d)
        plgpu.barrier_wait(const_barrier)

        def column(i):
            v = plgpu.load(vec_smem.at[i], layout=wgmma_layout.reduce(0))
            return lax.broadcast_in_dim(v, shape, [1])

        def per_row(v):
            return lax.broadcast_in_dim(v, shape, [0])

        segpos = per_row(plgpu.load(segpos_smem, layout=wgmma_layout.reduce(1)))
        plgpu.barrier_wait(lag_barrier)
        lags = []
        for lag in range(LAGS):
            u = plgpu.load(lag_smem.at[lag], layout=wgmma_layout).astype(jnp.float32)
            # u[t - lag] exists only inside t's segment (zero before it, as the spec pads); a
            # select, so block 0's unwritten rows (any bits) never reach the result.
            lags.append(u if lag == 0 else jnp.where(segpos >= lag, u, 0.0))
        w_old, w_cur, b0 = column(0), column(1), column(2)
        c0_prev = b0 + w_cur * lags[1] + w_old * lags[2]  # conv0 at t-1; b0 at a segment start
        c0_cur = b0 + w_cur * lags[0] + w_old * lags[1]
        mean = 0.0
        if cfg.use_qk_mean:
            partners = 0.0
            for g in range(group):
                plgpu.barrier_wait(part_barriers.at[g % slots])
                partners = partners + plgpu.load(part_smem.at[g % slots],
                                                 layout=wgmma_layout).astype(jnp.float32)
                if g + slots < group:
                    plgpu.commit_smem()  # warpgroup barrier: every thread has read the slot
                    copy_partner(g + slots)
            mean = 0.5 * (lags[0] + partners * (1.0 / group))
        op_smem.at[0][...] = c0_prev.astype(dtype)
        op_smem.at[1][...] = c0_cur.astype(dtype)
        plgpu.commit_smem()

        def conv1(acc_ref):
            plgpu.wgmma(acc_ref, op_smem.at[0], w1_smem.at[0])
            plgpu.wgmma(acc_ref, op_smem.at[1], w1_smem.at[1])
            return acc_ref[...]

        y = pl.run_scoped(conv1, plgpu.ACC(shape, jnp.float32)) + column(3) + mean

        # --- normalise, temperature, RoPE --------------------------------------------------
        inv_norm = 1.0 / jnp.maximum(jnp.sqrt((y * y).sum(axis=1)), jnp.finfo(jnp.float32).eps)
        out = y
        if rotary:
            y_hi = y.astype(dtype)
            op_smem.at[0][...] = y_hi  # conv1's wgmmas are done: its result was read
            op_smem.at[1][...] = (y - y_hi.astype(jnp.float32)).astype(dtype)
            plgpu.commit_smem()

            def rotate(acc_ref):
                plgpu.wgmma(acc_ref, op_smem.at[0], rot_smem)
                plgpu.wgmma(acc_ref, op_smem.at[1], rot_smem)
                return acc_ref[...]

            y_rot = pl.run_scoped(rotate, plgpu.ACC(shape, jnp.float32))
            pos = per_row(plgpu.load(pos_smem, layout=wgmma_layout.reduce(1))).astype(jnp.float32)
            angle = pos * column(5)
            out = y * jnp.cos(angle) + y_rot * jnp.sin(angle)
        out = out * per_row(inv_norm) * column(4)

        # --- store ---------------------------------------------------------------------------
        out_smem = op_smem.at[0]  # the rotation's wgmmas are done: their result was read
        out_smem[...] = out.astype(dtype)
        plgpu.commit_smem()

        @pl.when(is_q)
        def _():
            plgpu.copy_smem_to_gmem(out_smem, q_ref.at[b, pl.ds(s0, rows), h])

        @pl.when(jnp.logical_not(is_q))
        def _():
            plgpu.copy_smem_to_gmem(out_smem, k_ref.at[b, pl.ds(s0, rows), h - hq])

        plgpu.wait_smem_to_gmem(0)

    # 16-bit tiles for wgmma: (8, 64) tiling + 128-byte swizzle (64 elements x 2 bytes).
    swizzle = min(128, d * 2)
    transforms = (plgpu.TilingTransform((8, swizzle // 2)), plgpu.SwizzleTransform(swizzle))
    scratch = dict(
        lag_smem=plgpu.SMEM((LAGS, rows, d), dtype),
        op_smem=plgpu.SMEM((2, rows, d), dtype, transforms=transforms),
        part_smem=plgpu.SMEM((slots, rows, d), dtype, transforms=transforms),
        w1_smem=plgpu.SMEM((2, d, d), dtype, transforms=transforms),
        rot_smem=plgpu.SMEM((d, d), dtype, transforms=transforms),
        vec_smem=plgpu.SMEM((_VEC_ROWS, d), jnp.float32),
        pos_smem=plgpu.SMEM((rows,), jnp.int32),
        segpos_smem=plgpu.SMEM((rows,), jnp.int32),
        lag_barrier=plgpu.Barrier(num_arrivals=LAGS),
        part_barriers=plgpu.Barrier(num_barriers=slots),
        const_barrier=plgpu.Barrier(num_arrivals=6),  # 2 conv1 taps, R, vectors, ids
    )
    q, k = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((batch, seq_pad, hq, d), dtype),
                  jax.ShapeDtypeStruct((batch, seq_pad, hkv, d), dtype)),
        scratch_types=scratch,
        grid=(heads, seq_pad // rows, batch),
        grid_names=("heads", "rows", "batch"),
    )(p, positions, segment_positions, vecs, w1, rot)
    return q[:, :seq], k[:, :seq]


def _reference(p, conv, temp, positions, segment_positions, cfg):
    from ccajax.cca_fused import fused_prologue  # imports ccajax.cca, which is heavier

    return fused_prologue(conv, temp, p[:, :, :cfg.num_q_heads + cfg.num_kv_heads], cfg,
                          positions, segment_positions)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _prologue(p, conv, temp, positions, segment_positions, cfg, interpret):
    return _prologue_fwd(p, conv, temp, positions, segment_positions, cfg, interpret)[0]


def _prologue_fwd(p, conv, temp, positions, segment_positions, cfg, interpret):
    if interpret:
        with plgpu.force_gpu_interpret_mode():
            out = prologue_fwd(p, conv, temp, positions, segment_positions, cfg)
    else:
        out = prologue_fwd(p, conv, temp, positions, segment_positions, cfg)
    return out, (p, conv, temp, positions, segment_positions)


def _prologue_bwd(cfg, interpret, residuals, d_out):
    p, conv, temp, positions, segment_positions = residuals
    # The backward is the jnp reference's VJP (recomputing its forward, fused by XLA).
    _, vjp = jax.vjp(lambda p, conv, temp: _reference(p, conv, temp, positions,
                                                      segment_positions, cfg), p, conv, temp)
    return (*vjp(d_out), None, None)


_prologue.defvjp(_prologue_fwd, _prologue_bwd)


def mosaic_prologue(p, conv: dict, temp, positions, segment_positions, cfg: CCAConfig, *,
                    interpret: bool = False):
    """q', k' from the down-projection output, through the sm90 kernel (differentiable).

    Args:
      p: (B, S, Hp, d) bf16/fp16 heads of the down-projection output, q heads then k heads first.
      conv: {"w0" (2, C), "b0" (C,), "w1" (2, Hq+Hkv, d, d), "b1" (C,)}, C = (Hq+Hkv)*d.
      temp: (Hkv,) key temperature, or None without one.
      positions, segment_positions: (B, S) int RoPE positions and index of each token in its
        segment (the convolution does not reach before a segment's start).
      cfg: the layer's config (must pass `unsupported_reason`).
      interpret: run on the CPU under Mosaic GPU interpret mode (tests).
    Returns:
      q' (B, S, Hq, d), k' (B, S, Hkv, d) in p's dtype.
    Raises:
      ValueError: naming what the kernel does not support (dtype, head dim, conv sizes, group).
    """
    why = unsupported_reason(cfg, p.dtype)
    if why is not None:
        raise ValueError(f"the mosaic prologue does not support {why}; use the jnp prologue")
    if p.ndim != 4 or p.shape[2] < cfg.num_q_heads + cfg.num_kv_heads or p.shape[3] != cfg.head_dim:
        raise ValueError(f"p must be (B, S, Hp >= Hq+Hkv = {cfg.num_q_heads + cfg.num_kv_heads}, "
                         f"d = {cfg.head_dim}); got p.shape={p.shape}")
    return _prologue(p, conv, temp, positions, segment_positions, cfg, interpret)
