"""The CCA/CCGQA prologue as one Hopper (sm90) kernel, explicit Mosaic GPU style.

Public entry: :func:`mosaic_prologue` (custom VJP): from the down-projection's output it writes
attention-ready q', k' in one pass: the two-stage causal convolution (with its 2-row halo and the
spec's bias semantics), the q-k mean, L2 normalisation with the key temperature, and RoPE (full or
partial). Its reference is `ccajax.cca_fused.fused_prologue` (itself equal to `ccajax.cca`'s
functions). The backward (`prologue_bwd`) is three more kernels plus small XLA ops (see below).

Shapes
------
* p: (B, S, Hp, d), the down-projection output viewed as heads; heads ``0..Hq-1`` are q,
  ``Hq..Hq+Hkv-1`` are k (further heads, e.g. the values, are not read). bf16/fp16, d in {64, 128}.
* positions, segment_positions: (B, S) int32 RoPE positions and each token's index in its segment.
* out: q' (B, S, Hq, d), k' (B, S, Hkv, d) in p's dtype.

Kernel layout
-------------
* Grid ``(Hq + Hkv, S / (64 blocks_per_cta), B)``: each CTA computes ``blocks_per_cta``
  consecutive 64-row blocks of one head, with one or two compute warpgroups (the dy kernel:
  one) taking every other block, each with its own row buffers: the conv1 taps and vectors
  are copied once per CTA, a warpgroup's next block's rows (lags, positions, ids) as soon as
  it has read the current block's, so they arrive while it is computed, and its next partner
  tiles once the output store has read the slot that stages it (`_walk_conv`).
* TMA copies into shared memory: the head's rows t - lag for lag 0, 1, 2 into three untiled
  buffers (block 0 copies rows [0, 64 - lag) to buffer rows [lag, 64); the rows before stay
  unwritten and are masked below), the q-k mean partners through one or two slots (a q head
  reads its k head G times, a k head its G q heads, so both sum G tiles and divide by G), the two conv1 taps
  of the head, the head's per-channel vectors and the rows' positions.
  Tiled (swizzled) tiles are only filled from tile-aligned rows: Mosaic's layout inference rejects
  a TMA into a tiled tile from a row offset it cannot prove a multiple of 8. Shifted rows are
  shifted by the copy, not by the load: WGMMA-layout loads of an untiled buffer at row offsets 7
  and 6 passed interpret mode but gave wrong rows on the H100 (2026-11-23).
* Registers (WGMMA layout, float32): the lags, masked by ``segment_positions >= lag`` (zero
  before the segment start); conv0 at t and t-1 (c0[t-1] = b0 at a segment start, the spec's
  bias semantics), rounded to bf16, then conv1 = two wgmmas (A from registers on the GPU;
  interpret mode goes through two swizzled operand tiles). y = c1 + b1 + mean.
* RoPE (`_rope`) works on column slices of y: in the WGMMA layout a thread holds every 8-column
  block of its rows, so the rotated halves y[:, :r/2] and y[:, r/2:r] sit in the same thread and
  slicing them is register renaming (hence rotary dims a multiple of 16). cos/sin are computed
  once per (row, frequency), (64, r/2), from position * inv_freq (the reference's float32
  angles), reduced modulo 2 pi and fed to the approximate sin/cos (`_rope_angle` says why).
* out = rope(y) * sqrt(d) / ||y|| (* temperature for keys), rounded once, TMA-stored (the
  forward stages it in the first partner slot).

Backward
--------
* dy kernel, the forward's walk and recompute with one warpgroup, the cotangent g = dL/dout
  of the next block copied while the current one is computed: RoPE transposed (`_rope` with
  sin negated: the rotation by -angle), then the norm's backward gives dy = dL/dy. It writes dy
  (16-bit) and per-row sums y_hat . g (the out scale's gradient, for the temperature).
* lag products kernel (`_lag_kernel`): the sums M[l] = u[t - l]^T dy[t] over the masked lags
  l = 0, 1, 2, one warpgroup per lag; XLA derives the conv weights' gradients from them
  (`prologue_bwd` has the algebra), d b1 as the sum of dy, d b0 as that sum times
  (W1[0] + W1[1])^T.
* du kernel, CTAs and warpgroups as the forward's: the conv's mirror image, looking ahead.
  dL/dc0[t] = dy[t] W1[1]^T + m1[t+1] dy[t+1] W1[0]^T and du[t] = w0[1] dL/dc0[t] + w0[0]
  m1[t+1] dL/dc0[t+1] (m1[t]: t is not a segment start) need dy at rows t+1, t+2: copied
  shifted by TMA into untiled buffers (the last block's rows past the end stay unwritten;
  zero-padded segment positions mask them), then masked in registers into the A operands of
  four wgmmas (through swizzled tiles in interpret mode). Plus the q-k mean's share, through
  the partner slots.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ccajax.config import CCAConfig, check_positive_int, rotary_dims
from ccajax.pallas.sm90_common import (SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, over_batch, pad_axis,
                                       round_up, sm_count, vary_like)
from ccajax.pallas.sm90_pipeline import (add_to_gmem, check_interpret_threads, col_vec,
                                        f32_tile_transforms, in_interpret_mode, matmul,
                                        matmul_into, ring_drain, row_vec, tile_transforms,
                                        zeros_acc)

BLOCK_ROWS = 64  # one warpgroup's wgmma tile
LAGS = 3  # conv0 at t and t-1 reads rows t, t-1, t-2
PARTNER_SLOTS = 2  # q-k mean partner tiles in flight in the forward (G of them pass through)
_VEC_ROWS = 8  # per-head vectors: w0 older tap, w0 current tap, b0, b1, out scale, inv_freq
_WGMMA = plgpu.Layout.WGMMA
# Fast sin/cos/sqrt (see `_rope_angle`); the outputs are 16-bit.
_COMPILER_PARAMS = plgpu.CompilerParams(approx_math=True)


def unsupported_reason(cfg: CCAConfig, dtype) -> str | None:
    """Why the kernel cannot run this config (None when it can)."""
    if jnp.dtype(dtype) not in SUPPORTED_DTYPES:
        return f"dtype {jnp.dtype(dtype)} (needs bfloat16 or float16)"
    if cfg.head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {cfg.head_dim} (needs one of {SUPPORTED_HEAD_DIMS})"
    rotary = rotary_dims(cfg.head_dim, cfg.rope_fraction)
    if rotary % 16:
        return (f"{rotary} rotary dims (rope_fraction {cfg.rope_fraction} of head_dim "
                f"{cfg.head_dim}; the kernel rotates a multiple of 16 dims)")
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
    # Concatenations, not `.at[]` updates: under `over_batch` these ops run inside shard_map.
    # With a scatter there (full RoPE's `.at[:d].set`, whose empty index constant entered the
    # shard_map) XLA's GPU compile of a 2-GPU train step crashed (2026-11-30, segmentation
    # fault in shardy-xla); without it the step compiles and trains.
    key_scale = jnp.ones((cfg.num_kv_heads,), f32) if temp is None else _temperature(temp, cfg)
    scale = d ** 0.5 * jnp.concatenate([jnp.ones((cfg.num_q_heads,), f32), key_scale])
    rotary = rotary_dims(d, cfg.rope_fraction)
    inv_freq = jnp.zeros((d,), f32)
    if rotary:
        # The same float32 expression as `ccajax.rope.apply_rope`, so the angles match exactly.
        freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, rotary, 2, dtype=f32) / rotary))
        inv_freq = jnp.pad(jnp.tile(freq, 2), (0, d - rotary))
    rows = [w0[0], w0[1], conv["b0"].astype(f32).reshape(heads, d),
            conv["b1"].astype(f32).reshape(heads, d), jnp.broadcast_to(scale[:, None], (heads, d)),
            jnp.broadcast_to(inv_freq, (heads, d))]
    rows += [jnp.zeros((heads, d), f32)] * (_VEC_ROWS - len(rows))
    return jnp.stack(rows, axis=1)


def _temperature(temp, cfg: CCAConfig):
    """(Hkv,) float32 factor the keys are multiplied by."""
    t = temp.astype(jnp.float32)
    return jnp.exp(t) if cfg.temperature_form == "exp" else t


def _kernel_inputs(p, conv, temp, positions, segment_positions, cfg: CCAConfig):
    """What the forward and dy kernels read, sequences zero-padded to a block multiple (a copy
    only when S is not one): p, positions, segment positions, head vectors, W1."""
    seq_pad = round_up(p.shape[1], BLOCK_ROWS)
    return (pad_axis(p, 1, seq_pad), pad_axis(positions.astype(jnp.int32), 1, seq_pad),
            pad_axis(segment_positions.astype(jnp.int32), 1, seq_pad),
            head_vectors(conv, temp, cfg), conv["w1"].astype(p.dtype))


# --- in-kernel pieces shared by the forward and the backward kernels ----------------------------

def _column(vec_smem, i, shape):
    """Row i of a (rows, d) float32 SMEM table, broadcast down the tile's rows."""
    return lax.broadcast_in_dim(col_vec(vec_smem.at[i]), shape, [1])


def _per_row(v, shape):
    return lax.broadcast_in_dim(v, shape, [0])


def _matmul2(a0, b0, a1, b1, shape):
    """a0 @ b0 + a1 @ b1 in one fresh float32 accumulator (SMEM operands)."""
    def body(acc_ref):
        plgpu.wgmma(acc_ref, a0, b0)
        plgpu.wgmma(acc_ref, a1, b1)
        return acc_ref[...]
    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def _copy_rows_shifted(rows_of, dst, s0, shift, at_edge, barrier):
    """TMA copy of ``dst[t] = src[s0 + t + shift]`` for the block's 64 rows t, ``rows_of(ds)``
    being the source's rows. At the sequence edge (block 0 for a look-back shift < 0, the last
    block for a look-ahead shift > 0) only the rows that exist are copied; the others stay
    unwritten and the caller masks them with a select. The shift is in the copy, not in a load:
    WGMMA-layout loads at row offsets that are not multiples of 8 read wrong rows on the H100."""
    rows = BLOCK_ROWS
    n = rows - abs(shift)

    @pl.when(at_edge)
    def _():
        if shift < 0:  # the sequence's rows [0, n) go to rows [-shift, 64)
            plgpu.copy_gmem_to_smem(rows_of(pl.ds(0, n)), dst.at[pl.ds(-shift, n)], barrier)
        else:  # rows [s0 + shift, s0 + 64) go to rows [0, n)
            plgpu.copy_gmem_to_smem(rows_of(pl.ds(s0 + shift, n)), dst.at[pl.ds(0, n)], barrier)

    @pl.when(jnp.logical_not(at_edge))
    def _():
        plgpu.copy_gmem_to_smem(rows_of(pl.ds(s0 + shift, rows)), dst, barrier)


class _Partners:
    """The G tiles a head's q-k mean term reads, through the slots of ``smem``: a q head's partner
    is its k head (read G times, so that q and k heads share one branch-free code path), a k
    head's are its G q heads. ``tile_of(head)`` is the partner's 64 rows in global memory; slot
    i's barrier is ``barriers.at[first_barrier + i]``."""

    def __init__(self, tile_of, smem, barriers, h, is_q, cfg: CCAConfig, first_barrier=0):
        self.tile_of, self.smem, self.barriers, self.is_q = tile_of, smem, barriers, is_q
        self.first_barrier = first_barrier
        self.slots, self.group = smem.shape[0], cfg.group_size
        self.k_head = cfg.num_q_heads + lax.div(h, jnp.int32(self.group))
        self.first_q_head = (h - cfg.num_q_heads) * self.group

    def _copy(self, g):
        src = jnp.where(self.is_q, self.k_head, self.first_q_head + g)
        slot = g % self.slots
        plgpu.copy_gmem_to_smem(self.tile_of(src), self.smem.at[slot], self._barrier(slot))

    def _barrier(self, slot):
        return self.barriers.at[self.first_barrier + slot]

    def start(self):
        for g in range(min(self.slots, self.group)):
            self._copy(g)
        return self

    def sum(self):
        """The G tiles summed (float32, WGMMA layout); each slot is refilled once read."""
        total = 0.0
        for g in range(self.group):
            slot = g % self.slots
            plgpu.barrier_wait(self._barrier(slot))
            total = total + plgpu.load(self.smem.at[slot], layout=_WGMMA).astype(jnp.float32)
            if g + self.slots < self.group:
                plgpu.commit_smem()  # warpgroup barrier: every thread has read the slot
                self._copy(g + self.slots)
        return total


def _copy_constants(vec_ref, w1_ref, sc, h):
    """The head's conv1 taps and per-channel vectors, on ``const_barrier``."""
    for tap in range(2):
        plgpu.copy_gmem_to_smem(w1_ref.at[tap, h], sc["w1_smem"].at[tap], sc["const_barrier"])
    plgpu.copy_gmem_to_smem(vec_ref.at[h], sc["vec_smem"], sc["const_barrier"])


def _copy_rows(in_refs, sc, h, b, block):
    """Row block ``block``'s positions, segment positions and lags, on ``lag_barrier``:
    lag_smem[lag][t] = p[s0 + t - lag]; block 0's rows t < lag stay unwritten (masked)."""
    p_ref, pos_ref, segpos_ref, _, _ = in_refs
    rows, s0 = BLOCK_ROWS, block * BLOCK_ROWS
    plgpu.copy_gmem_to_smem(pos_ref.at[b, pl.ds(s0, rows)], sc["pos_smem"], sc["lag_barrier"])
    plgpu.copy_gmem_to_smem(segpos_ref.at[b, pl.ds(s0, rows)], sc["segpos_smem"],
                            sc["lag_barrier"])

    def rows_of(ds):
        return p_ref.at[b, ds, h]

    lag_smem = sc["lag_smem"]
    plgpu.copy_gmem_to_smem(rows_of(pl.ds(s0, rows)), lag_smem.at[0], sc["lag_barrier"])
    for lag in range(1, LAGS):
        _copy_rows_shifted(rows_of, lag_smem.at[lag], s0, -lag, block == 0, sc["lag_barrier"])


def _partners(in_refs, sc, h, b, block, cfg: CCAConfig):
    """The q-k mean partners of row block ``block`` (None without the mean); not started."""
    if not cfg.use_qk_mean:
        return None
    p_ref, s0 = in_refs[0], block * BLOCK_ROWS
    return _Partners(lambda head: p_ref.at[b, pl.ds(s0, BLOCK_ROWS), head], sc["part_smem"],
                     sc["part_barriers"], h, h < cfg.num_q_heads, cfg,
                     sc.get("first_part_barrier", 0))


def _lags(sc, shape):
    """u[t - lag] for lag 0, 1, 2 (float32, WGMMA layout), zero before t's segment start (as the
    spec pads); a select, so block 0's unwritten rows (any bits) never reach the result."""
    segpos = _per_row(row_vec(sc["segpos_smem"]), shape)
    lags = []
    for lag in range(LAGS):
        u = plgpu.load(sc["lag_smem"].at[lag], layout=_WGMMA).astype(jnp.float32)
        lags.append(u if lag == 0 else jnp.where(segpos >= lag, u, 0.0))
    return lags


def _conv0(sc, partners, cfg: CCAConfig):
    """(c0[t-1], c0[t], q-k mean), (64, d) float32 in WGMMA layout, from the lag buffers and
    the partner slots (the caller has awaited the lags and the constants)."""
    vec_smem = sc["vec_smem"]
    shape = sc["lag_smem"].shape[1:]
    lags = _lags(sc, shape)
    w_old, w_cur, b0 = (_column(vec_smem, i, shape) for i in range(3))
    c0_prev = b0 + w_cur * lags[1] + w_old * lags[2]
    c0_cur = b0 + w_cur * lags[0] + w_old * lags[1]
    mean = 0.0
    if partners is not None:
        mean = 0.5 * (lags[0] + partners.sum() * (1.0 / cfg.group_size))
    return c0_prev, c0_cur, mean


def _conv1(sc, c0_prev, c0_cur, mean, register_a=False):
    """y = c0[t-1] W1[0] + c0[t] W1[1] + b1 + mean, the 16-bit c0 as wgmma A operands: from
    registers with ``register_a`` (GPU only), else through op_smem (left holding c0)."""
    w1_smem, shape = sc["w1_smem"], c0_prev.shape
    if register_a:
        a0, a1 = c0_prev.astype(w1_smem.dtype), c0_cur.astype(w1_smem.dtype)
    else:
        op_smem = sc["op_smem"]
        op_smem.at[0][...] = c0_prev.astype(op_smem.dtype)
        op_smem.at[1][...] = c0_cur.astype(op_smem.dtype)
        plgpu.commit_smem()
        a0, a1 = op_smem.at[0], op_smem.at[1]
    y = _matmul2(a0, w1_smem.at[0], a1, w1_smem.at[1], shape)
    return y + _column(sc["vec_smem"], 3, shape) + mean


# 2 pi = _TWO_PI_HI + _TWO_PI_LO, the high part with 8 significant bits, so that turns * hi is
# exact for up to 2^16 turns (positions up to ~400k at the highest frequency).
_TWO_PI_HI = 6.28125
_TWO_PI_LO = 2 * math.pi - _TWO_PI_HI


def _rope_angle(sc, shape, pos_rows=None):
    """position * inv_freq (the reference's float32 angles) of the first shape[1] columns,
    reduced to [0, 2 pi).

    The kernels compile with approximate math (`_COMPILER_PARAMS`): sin.approx / cos.approx
    are accurate (~1e-6) only near [-pi, pi], and the accurate sinf / cosf they replace cost
    ~2.5 KB of local-memory spills per thread (their slow range-reduction path), which made
    the forward ~20x slower on the H200 (2026-11-30: 3.4 ms vs 0.17 ms without RoPE at 16k).
    Truncation towards zero gives [0, 2 pi) for the usual angles >= 0, and (-2 pi, 0] for
    negative positions, where the approximate sin/cos are as accurate. ``pos_rows``: the rows'
    positions (WGMMA row layout) if already loaded, else read from ``pos_smem``."""
    pos_rows = row_vec(sc["pos_smem"]) if pos_rows is None else pos_rows
    pos = _per_row(pos_rows, shape).astype(jnp.float32)
    angle = pos * lax.broadcast_in_dim(col_vec(sc["vec_smem"].at[5, pl.ds(0, shape[1])]),
                                       shape, [1])
    turns = (angle * (1.0 / (2 * math.pi))).astype(jnp.int32).astype(jnp.float32)
    return (angle - turns * _TWO_PI_HI) - turns * _TWO_PI_LO


def _rope(y, sc, rotary, inverse=False, pos_rows=None):
    """RoPE (or with ``inverse`` its transpose, the rotation by -angle) on the first ``rotary``
    columns of y (64, d) float32: [y1 cos - y2 sin, y2 cos + y1 sin, rest] for the halves y1, y2.
    Column slices at multiples of 8 of a WGMMA-layout array are register renaming."""
    if not rotary:
        return y
    half = rotary // 2
    angle = _rope_angle(sc, (y.shape[0], half), pos_rows)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    if inverse:
        sin = -sin
    y1, y2 = y[:, :half], y[:, half:rotary]
    parts = [y1 * cos - y2 * sin, y2 * cos + y1 * sin]
    return jnp.concatenate(parts + ([y[:, rotary:]] if rotary < y.shape[1] else []), axis=1)


def _inv_norm(y):
    return 1.0 / jnp.maximum(jnp.sqrt((y * y).sum(axis=1)), jnp.finfo(jnp.float32).eps)


# --- the row walk: the forward's and the backward's kernels ----------------------------------

# Row blocks each warpgroup of the kernels walks: the head's conv1 taps (64 KB at d=128) and
# vectors are loaded once per CTA instead of once per block. Compute warpgroups per CTA: 2 when
# each can have its own partner slot (G = 1; one CTA fits per SM, held by the taps), each
# walking every other block of the CTA with its own row buffers; one warpgroup alone left the SM
# idle while it waited on its copies and its wgmma. With G > 1 each of two warpgroups would have
# one slot, through which a block's G partner tiles pass in turn: 8:2 measured 0.163 ms (2
# warpgroups, 8 blocks) vs 0.149 (1, 4). The forward on the H200, S=16k, ms
# (`prologue_kernels.py fwd`, 2026-12-01): 4:4 0.083 (1, 4) -> 0.062 (2, 8); 8:8 0.144 -> 0.108.
BLOCKS_PER_WG = 4


def default_compute_wgs(cfg: CCAConfig) -> int:
    """Compute warpgroups per CTA of the forward and du kernels by default (see above)."""
    return 2 if cfg.group_size == 1 else 1


def _row_walk(cfg: CCAConfig, num_blocks, blocks_per_cta, compute_wgs):
    """(warpgroups, blocks per CTA, partner slots per warpgroup, row blocks) of a kernel walking
    ``num_blocks`` row blocks, from `prologue_fwd`'s arguments (None: the defaults); ValueError
    on bad ones."""
    compute_wgs = default_compute_wgs(cfg) if compute_wgs is None else compute_wgs
    if compute_wgs not in (1, 2):
        raise ValueError(f"compute_wgs must be 1 or 2; got compute_wgs={compute_wgs!r}")
    blocks_per_cta = BLOCKS_PER_WG * compute_wgs if blocks_per_cta is None else blocks_per_cta
    if not isinstance(blocks_per_cta, int) or blocks_per_cta < 1:
        raise ValueError(f"blocks_per_cta must be a positive int; got "
                         f"blocks_per_cta={blocks_per_cta!r}")
    # One partner slot per warpgroup with two (SMEM); the first slot also stages the output.
    slots = 1 if compute_wgs == 2 else min(cfg.group_size, PARTNER_SLOTS)
    return compute_wgs, min(blocks_per_cta, num_blocks), slots, num_blocks


def _wg_blocks(per_cta, num_blocks, wg, wgs):
    """(this CTA's first block, how many blocks warpgroup ``wg`` takes): blocks first + wg,
    first + wg + wgs, ... below the CTA's end."""
    first = lax.axis_index("rows") * per_cta
    return first, lax.div(jnp.minimum(per_cta, num_blocks - first) - wg + (wgs - 1), wgs)


def _walk_kernel(kernel, out_type, scratch, heads, batch, walk):
    """`plgpu.kernel` over (heads, CTAs of ``walk``'s row blocks, batch), ``walk`` from
    `_row_walk`, with its warpgroups as the Pallas thread axis "wg"."""
    wgs, per_cta, _, num_blocks = walk
    return plgpu.kernel(
        kernel,
        out_type=out_type,
        scratch_types=scratch,
        grid=(heads, pl.cdiv(num_blocks, per_cta), batch),
        grid_names=("heads", "rows", "batch"),
        num_threads=wgs if wgs > 1 else None,
        thread_name="wg" if wgs > 1 else None,
        compiler_params=_COMPILER_PARAMS,
    )


def _conv_walk_scratch(d, dtype, walk, register_a):
    """Scratch of `_walk_conv`: per warpgroup 3 lag buffers (untiled, shifted copies) and the
    partner slots, the first also staging the output; shared conv1 taps and vectors. d=128, 2
    warpgroups, 1 slot: 2 x 64 + 64 + 4 + 1 = 197 KB. Without ``register_a`` (interpret mode: its
    wgmma reads A from SMEM) two operand tiles per warpgroup as well."""
    wgs, _, slots, _ = walk
    tiled = tile_transforms()
    scratch = dict(
        lag_smem=plgpu.SMEM((wgs, LAGS, BLOCK_ROWS, d), dtype),
        part_smem=plgpu.SMEM((wgs, slots, BLOCK_ROWS, d), dtype, transforms=tiled),
        w1_smem=plgpu.SMEM((2, d, d), dtype, transforms=tiled),
        vec_smem=plgpu.SMEM((_VEC_ROWS, d), jnp.float32),
        pos_smem=plgpu.SMEM((wgs, BLOCK_ROWS), jnp.int32),
        segpos_smem=plgpu.SMEM((wgs, BLOCK_ROWS), jnp.int32),
        lag_barrier=plgpu.Barrier(num_arrivals=LAGS + 2, num_barriers=wgs),
        part_barriers=plgpu.Barrier(num_barriers=wgs * slots),
        const_barrier=plgpu.Barrier(num_arrivals=3),  # 2 conv1 taps, vectors
    )
    if not register_a:
        scratch["op_smem"] = plgpu.SMEM((wgs, 2, BLOCK_ROWS, d), dtype, transforms=tiled)
    return scratch


# Scratch entries with one element per warpgroup (`_wg_view`).
_PER_WG = ("lag_smem", "part_smem", "pos_smem", "segpos_smem", "lag_barrier", "op_smem")


def _wg_view(sc, wg, slots):
    """Warpgroup ``wg``'s share of the scratch, under the names the conv helpers read."""
    view = dict(sc)
    for name in _PER_WG:
        if name in sc:
            view[name] = sc[name].at[wg]
    view["first_part_barrier"] = wg * slots
    return view


def _walk_conv(in_refs, sc, cfg: CCAConfig, walk, finish, start=None):
    """The forward's and the dy kernel's loop over this warpgroup's row blocks of the CTA.

    Per block: y = the conv recompute (float32, (64, d), WGMMA layout); the next block's rows are
    copied as soon as this block's are read, and its partners once the output stores have read
    the staging slot (``wsc["part_smem"].at[0]``). ``finish(wsc, block, y, pos_rows, next_block,
    has_next)`` (pos_rows: the rows' RoPE positions) fills the staging slot and issues the
    block's stores; ``start(block)`` runs with the first block's copies.
    """
    wgs, per_cta, slots, num_blocks = walk
    h, b = lax.axis_index("heads"), lax.axis_index("batch")
    wg = lax.axis_index("wg") if wgs > 1 else 0
    wsc = _wg_view(sc, wg, slots)
    first, count = _wg_blocks(per_cta, num_blocks, wg, wgs)

    def partners(block):
        return _partners(in_refs, wsc, h, b, block, cfg)

    def start_partners(block):  # for pl.when, whose body may not return the partners
        if cfg.use_qk_mean:
            partners(block).start()

    pl.when(wg == 0)(lambda: _copy_constants(*in_refs[3:], sc, h))

    @pl.when(count > 0)
    def _():
        _copy_rows(in_refs, wsc, h, b, first + wg)
        start_partners(first + wg)
        if start is not None:
            start(first + wg)

    plgpu.barrier_wait(sc["const_barrier"])

    @pl.loop(0, count)
    def _block(i):
        block, has_next = first + wg + i * wgs, i + 1 < count
        plgpu.barrier_wait(wsc["lag_barrier"])
        pos_rows = row_vec(wsc["pos_smem"])
        c0_prev, c0_cur, mean = _conv0(wsc, partners(block), cfg)
        # Every thread has read this block's rows and partners (a warpgroup barrier): the
        # next block's rows may overwrite them while this one is computed.
        plgpu.commit_smem()
        pl.when(has_next)(lambda: _copy_rows(in_refs, wsc, h, b, block + wgs))
        # A from registers on the GPU: no SMEM round trip before the wgmma
        y = _conv1(wsc, c0_prev, c0_cur, mean, register_a="op_smem" not in sc)
        finish(wsc, block, y, pos_rows, block + wgs, has_next)
        # The next block's partners go into the staging slot once the stores have read it.
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        pl.when(has_next)(lambda: start_partners(block + wgs))

    plgpu.wait_smem_to_gmem(0)


def _walk_setup(cfg: CCAConfig, dtype, seq, blocks_per_cta, compute_wgs):
    """(walk, interpret mode?) of a kernel walking the row blocks of ``seq`` rows (padded to the
    block rows) in ``dtype``; ValueError for what the kernels do not support."""
    why = unsupported_reason(cfg, dtype)
    if why is not None:
        raise ValueError(f"the mosaic prologue does not support {why}; use the jnp prologue")
    walk = _row_walk(cfg, round_up(seq, BLOCK_ROWS) // BLOCK_ROWS, blocks_per_cta, compute_wgs)
    interpret = in_interpret_mode()
    if interpret:
        check_interpret_threads(walk[0])
    return walk, interpret


# --- forward ---------------------------------------------------------------------------------

def prologue_fwd(p, conv, temp, positions, segment_positions, cfg: CCAConfig, *,
                 blocks_per_cta: int | None = None, compute_wgs: int | None = None):
    """Runs the kernel (see the module docstring for shapes); q', k' in p's dtype.
    ``compute_wgs``: warpgroups per CTA, 1 or 2 (None: `default_compute_wgs`);
    ``blocks_per_cta``: 64-row blocks of one head each CTA computes (1: one per CTA; None:
    ``BLOCKS_PER_WG`` per warpgroup), warpgroup w taking blocks w, w + 2, ... of them."""
    walk, interpret = _walk_setup(cfg, p.dtype, p.shape[1], blocks_per_cta, compute_wgs)
    batch, seq, _, d = p.shape
    hq, hkv = cfg.num_q_heads, cfg.num_kv_heads
    dtype = p.dtype
    inputs = _kernel_inputs(p, conv, temp, positions, segment_positions, cfg)
    seq_pad = inputs[0].shape[1]
    rotary = rotary_dims(d, cfg.rope_fraction)

    def kernel(*refs, **sc):
        *in_refs, q_ref, k_ref = refs
        h, b = lax.axis_index("heads"), lax.axis_index("batch")
        is_q = h < hq

        def finish(wsc, block, y, pos_rows, *_):
            shape, stage = y.shape, wsc["part_smem"].at[0]
            out = (_rope(y, wsc, rotary, pos_rows=pos_rows) * _per_row(_inv_norm(y), shape)
                   * _column(sc["vec_smem"], 4, shape))
            stage[...] = out.astype(dtype)
            plgpu.commit_smem()
            rows = pl.ds(block * BLOCK_ROWS, BLOCK_ROWS)
            pl.when(is_q)(lambda: plgpu.copy_smem_to_gmem(stage, q_ref.at[b, rows, h]))
            pl.when(jnp.logical_not(is_q))(
                lambda: plgpu.copy_smem_to_gmem(stage, k_ref.at[b, rows, h - hq]))

        _walk_conv(in_refs, sc, cfg, walk, finish)

    q, k = _walk_kernel(
        kernel,
        (jax.ShapeDtypeStruct((batch, seq_pad, hq, d), dtype),
         jax.ShapeDtypeStruct((batch, seq_pad, hkv, d), dtype)),
        _conv_walk_scratch(d, dtype, walk, register_a=not interpret), hq + hkv, batch, walk,
    )(*inputs)
    return q[:, :seq], k[:, :seq]


# --- backward --------------------------------------------------------------------------------

def _dy_kernel(inputs, d_q, d_k, cfg: CCAConfig, *, blocks_per_cta: int | None = None):
    """dy = dL/dy (y: conv1 + b1 + mean, before the norm), recomputing y per row block as the
    forward does, with one warpgroup per CTA walking ``blocks_per_cta`` row blocks (None:
    ``BLOCKS_PER_WG``). Two warpgroups ran 2x slower: ptxas spilled 1.4 KB per thread of the
    norm's backward (255 registers) against 0.6 KB with one (H200, 4:4, S=16k, 2026-12-01:
    0.24 vs 0.107 ms), and one leaves SMEM for a cotangent tile of its own, copied a block ahead.

    ``inputs``: `_kernel_inputs`; d_q (B, S_pad, Hq, d), d_k (B, S_pad, Hkv, d): the cotangents
    of q', k', zero-padded like them. Returns dy (H, B, S_pad, d) in p's dtype, head-major for
    the du kernel and the weight gradients' matmul, and (H, B, S_pad) float32 row sums of
    g . y_hat (with g after the transposed RoPE): summed, the out scale's gradient."""
    walk, interpret = _walk_setup(cfg, inputs[0].dtype, inputs[0].shape[1], blocks_per_cta, 1)
    batch, seq_pad, _, d = inputs[0].shape
    hq, heads = cfg.num_q_heads, cfg.num_q_heads + cfg.num_kv_heads
    dtype = inputs[0].dtype
    rotary = rotary_dims(d, cfg.rope_fraction)

    def kernel(*refs, g_smem, g_barrier, row_smem, **sc):
        *in_refs, dq_ref, dk_ref, dy_ref, row_ref = refs
        h, b = lax.axis_index("heads"), lax.axis_index("batch")
        is_q = h < hq

        def copy_g(block):
            """g = the block's cotangent of q' or k'."""
            rows = pl.ds(block * BLOCK_ROWS, BLOCK_ROWS)
            pl.when(is_q)(lambda: plgpu.copy_gmem_to_smem(dq_ref.at[b, rows, h], g_smem,
                                                          g_barrier))
            pl.when(jnp.logical_not(is_q))(
                lambda: plgpu.copy_gmem_to_smem(dk_ref.at[b, rows, h - hq], g_smem, g_barrier))

        def finish(wsc, block, y, pos_rows, next_block, has_next):
            shape, stage = y.shape, wsc["part_smem"].at[0]
            inv_norm = _per_row(_inv_norm(y), shape)
            y_hat = y * inv_norm
            plgpu.barrier_wait(g_barrier)
            g = plgpu.load(g_smem, layout=_WGMMA).astype(jnp.float32)
            plgpu.commit_smem()  # every thread has read g: the next block's may come
            pl.when(has_next)(lambda: copy_g(next_block))
            gy = _rope(g, wsc, rotary, inverse=True, pos_rows=pos_rows)
            # out = scale * rope(y_hat): y_hat . gy is the row's share of d(scale) and, times
            # the scale, the norm's backward term: d(y / |y|) = (g - y_hat (y_hat . g)) / |y|.
            row_dot = (y_hat * gy).sum(axis=1)
            dy = ((inv_norm * _column(sc["vec_smem"], 4, shape))
                  * (gy - y_hat * _per_row(row_dot, shape)))
            stage[...] = dy.astype(dtype)
            row_smem[...] = row_dot
            plgpu.commit_smem()
            rows = pl.ds(block * BLOCK_ROWS, BLOCK_ROWS)
            plgpu.copy_smem_to_gmem(stage, dy_ref.at[h, b, rows])
            plgpu.copy_smem_to_gmem(row_smem, row_ref.at[h, b, rows])

        _walk_conv(in_refs, sc, cfg, walk, finish, start=copy_g)

    # SMEM at d=128: the forward's with one warpgroup (3 lags 48 KB, 1-2 partner slots 16-32,
    # taps 64, vectors 4) + the cotangent tile 16 + row sums 0.25: 148-164 KB.
    scratch = _conv_walk_scratch(d, dtype, walk, register_a=not interpret)
    scratch.update(g_smem=plgpu.SMEM((BLOCK_ROWS, d), dtype, transforms=tile_transforms()),
                   g_barrier=plgpu.Barrier(num_arrivals=1),
                   row_smem=plgpu.SMEM((BLOCK_ROWS,), jnp.float32))
    return _walk_kernel(
        kernel,
        (jax.ShapeDtypeStruct((heads, batch, seq_pad, d), dtype),
         jax.ShapeDtypeStruct((heads, batch, seq_pad), jnp.float32)),
        scratch, heads, batch, walk,
    )(*inputs, d_q, d_k)


def next_segment_positions(segment_positions):
    """(B, S) -> (B, 2, S): the segment positions of rows t+1 and t+2, zero past the end (the du
    kernel's look-ahead mask, shifted here so that its copies start at a tile's first row)."""
    seq = segment_positions.shape[1]
    ahead = pad_axis(segment_positions, 1, seq + 2)
    return jnp.stack([ahead[:, 1:1 + seq], ahead[:, 2:]], axis=1)


def _du_kernel(dy, segpos_next, vecs, w1, cfg: CCAConfig, *, blocks_per_cta: int | None = None,
               compute_wgs: int | None = None):
    """dL/du (B, S_pad, H, d) from dy (H, B, S_pad, d), the conv's look-ahead mirror image.

    With dc0[t] = dL/d c0[t] = dy[t] W1[1]^T + m1[t+1] dy[t+1] W1[0]^T (m_l[t]: t's segment
    reaches back l rows; c0[t] feeds conv1 at t and t+1):
    du[t] = w0[1] dc0[t] + w0[0] m1[t+1] dc0[t+1] + the q-k mean's share of dy.
    ``segpos_next`` (B, 2, S_pad): `next_segment_positions` (shifted in XLA, so that every
    copy starts at the tile's first row: the first version
    copied them from rows s0+1, s0+2 and hit an illegal instruction on the H200, 2026-11-30).
    CTAs and warpgroups walk row blocks as in the forward (`prologue_fwd`'s arguments).
    """
    heads, batch, seq_pad, d = dy.shape
    hq, group, rows, dtype = cfg.num_q_heads, cfg.group_size, BLOCK_ROWS, dy.dtype
    num_blocks = seq_pad // rows
    walk, interpret = _walk_setup(cfg, dtype, seq_pad, blocks_per_cta, compute_wgs)
    wgs, per_cta, slots, _ = walk
    register_a = not interpret

    def kernel(dy_ref, segpos_ref, vec_ref, w1_ref, du_ref, **sc):
        ahead_smem, own_smem, part_smem, segpos_smem = (
            sc[name] for name in ("ahead_smem", "own_smem", "part_smem", "segpos_smem"))
        w1_smem, vec_smem, op_smem = sc["w1_smem"], sc["vec_smem"], sc.get("op_smem")
        row_barriers, part_barriers = sc["row_barriers"], sc["part_barriers"]
        h, b = lax.axis_index("heads"), lax.axis_index("batch")
        wg = lax.axis_index("wg") if wgs > 1 else 0
        is_q = h < hq
        first, count = _wg_blocks(per_cta, num_blocks, wg, wgs)
        ahead, own, part = ahead_smem.at[wg], own_smem.at[wg], part_smem.at[wg]
        segpos, row_barrier, stage = segpos_smem.at[wg], row_barriers.at[wg], part.at[0]

        def rows_of(ds):
            return dy_ref.at[h, b, ds]

        def copy_rows(block):
            """own[t] = dy[s0 + t]; ahead[i][t] = dy[s0 + t + 1 + i], the last block's rows past
            the end unwritten (their segment positions are 0: masked)."""
            s0 = block * rows
            for i in range(2):
                plgpu.copy_gmem_to_smem(segpos_ref.at[b, i, pl.ds(s0, rows)], segpos.at[i],
                                        row_barrier)
            plgpu.copy_gmem_to_smem(rows_of(pl.ds(s0, rows)), own, row_barrier)
            for i in range(2):
                _copy_rows_shifted(rows_of, ahead.at[i], s0, 1 + i, block == num_blocks - 1,
                                   row_barrier)

        def partners(block):
            return _Partners(lambda head: dy_ref.at[head, b, pl.ds(block * rows, rows)], part,
                             part_barriers, h, is_q, cfg, wg * slots)

        def start_partners(block):  # for pl.when, whose body may not return the partners
            if cfg.use_qk_mean:
                partners(block).start()

        pl.when(wg == 0)(lambda: _copy_constants(vec_ref, w1_ref, sc, h))

        @pl.when(count > 0)
        def _():
            copy_rows(first + wg)
            start_partners(first + wg)

        shape = (rows, d)
        w1t = [w1_smem.at[tap].transpose((1, 0)) for tap in range(2)]
        plgpu.barrier_wait(sc["const_barrier"])

        @pl.loop(0, count)
        def _block(step):
            block = first + wg + step * wgs
            plgpu.barrier_wait(row_barrier)
            # m_{1+i}[t+1+i] dy[t+1+i] (m2[t+2] = m1[t+1] m1[t+2]), 16-bit, as wgmma A operands
            ahead_ops = []
            for i in range(2):
                lag = 1 + i
                mask = _per_row(row_vec(segpos.at[i]), shape) >= lag
                rows_ahead = plgpu.load(ahead.at[i], layout=_WGMMA).astype(jnp.float32)
                ahead_ops.append(jnp.where(mask, rows_ahead, 0.0).astype(dtype))
            if not register_a:  # interpret mode: A through shared memory
                for i in range(2):
                    op_smem.at[wg, i][...] = ahead_ops[i]
                plgpu.commit_smem()
                ahead_ops = [op_smem.at[wg, i] for i in range(2)]
            dc0 = _matmul2(own, w1t[1], ahead_ops[0], w1t[0], shape)
            dc0_next = _matmul2(ahead_ops[0], w1t[1], ahead_ops[1], w1t[0], shape)  # m1[t+1] dc0[t+1]
            du = _column(vec_smem, 1, shape) * dc0 + _column(vec_smem, 0, shape) * dc0_next
            if cfg.use_qk_mean:
                # mq_h = (u_h + u_k) / 2, mk = u_k / 2 + mean of the G q heads / 2: a q head gets
                # dy_k / (2G) (its partner tiles are G copies of dy_k), a k head its q heads' dy / 2.
                own_rows = plgpu.load(own, layout=_WGMMA).astype(jnp.float32)
                share = jnp.where(is_q, 0.5 / group ** 2, 0.5)
                du = du + 0.5 * own_rows + share * partners(block).sum()
            # Every thread has read this block's rows and partners, and the wgmmas are done (a
            # warpgroup barrier): the next block's rows may come.
            plgpu.commit_smem()
            pl.when(step + 1 < count)(lambda: copy_rows(block + wgs))
            stage[...] = du.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(stage, du_ref.at[b, pl.ds(block * rows, rows), h])
            # The next block's partners go into the staging slot once the store has read it.
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            pl.when(step + 1 < count)(lambda: start_partners(block + wgs))

        plgpu.wait_smem_to_gmem(0)

    # SMEM at d=128, 2 warpgroups with a partner slot each: per warpgroup 2 look-ahead buffers
    # 32 KB, own rows 16, partner slot 16; taps 64, vectors 4: 197 KB.
    tiled = tile_transforms()
    scratch = dict(
        ahead_smem=plgpu.SMEM((wgs, 2, rows, d), dtype),
        own_smem=plgpu.SMEM((wgs, rows, d), dtype, transforms=tiled),
        part_smem=plgpu.SMEM((wgs, slots, rows, d), dtype, transforms=tiled),
        w1_smem=plgpu.SMEM((2, d, d), dtype, transforms=tiled),
        vec_smem=plgpu.SMEM((_VEC_ROWS, d), jnp.float32),
        segpos_smem=plgpu.SMEM((wgs, 2, rows), jnp.int32),
        row_barriers=plgpu.Barrier(num_arrivals=5, num_barriers=wgs),  # 2 id rows, 3 row tiles
        part_barriers=plgpu.Barrier(num_barriers=wgs * slots),
        const_barrier=plgpu.Barrier(num_arrivals=3),  # 2 conv1 taps, vectors
    )
    if not register_a:
        scratch["op_smem"] = plgpu.SMEM((wgs, 2, rows, d), dtype, transforms=tiled)
    return _walk_kernel(kernel, jax.ShapeDtypeStruct((batch, seq_pad, heads, d), dtype), scratch,
                        heads, batch, walk)(dy, segpos_next, vecs, w1)


# The lag products kernel's ring of copies in flight (3 would take 226 KB of SMEM; untried).
LAG_STAGES = 2


def _lag_blocks_per_cta(heads, batch, num_blocks):
    """Row blocks per CTA of the lag products kernel by default: one wave of CTAs, one per SM
    (its 3 x 128 threads at 168 registers fill an SM's register file). H200, S=16k, ms, 16 / 32
    blocks: 4:4 (8 heads) 0.079 / 0.116, 8:8 (16 heads) 0.117 / 0.083 (2026-12-01). In interpret
    mode the whole sequence: then only the batch's CTAs add into one head's sums (the race
    detector reports the interpreter's stand-in for the reduce-add when two CTAs do)."""
    if in_interpret_mode():
        return num_blocks
    return pl.cdiv(heads * batch * num_blocks, sm_count())


def _lag_kernel(u, dy, segpos_next, *, blocks_per_cta: int | None = None,
                stages: int = LAG_STAGES):
    """`lag_products_reference` as a kernel: (3, H, d, d) float32 lag products
    M[l] = sum_t u[t]^T (m_l[t + l] dy[t + l]) from u (B, S_pad, Hp, d) (heads < H read: p as
    the forward reads it), dy (H, B, S_pad, d) and ``segpos_next`` (B, 2, S_pad)
    (`next_segment_positions`: m_l[t + l] is segpos_next[l - 1, t] >= l; past the end 0).

    Grid (head, batch x chunk of ``blocks_per_cta`` row blocks, None: `_lag_blocks_per_cta`);
    three warpgroups, warpgroup l summing lag l into a (d, d) float32 accumulator (128
    registers at d=128). Per block, a wgmma of the u tile transposed (A from shared memory)
    with a B tile of rows t + l: for lag 0 the dy tile itself, for lags 1 and 2 the rows copied
    shifted into an untiled buffer (`_copy_rows_shifted`) and masked in registers into a
    swizzled tile. Warpgroup 0 also issues the copies of a ``stages``-slot ring, refilling a
    slot once all three released it. Each CTA adds its sums into the output by a TMA
    reduce-add (f32; the order of the adds varies between runs).
    H200, S=16k (2026-12-01), ms: 0.065 / 0.078 / 0.058 at 4:4 / 8:8 / 8:2 against XLA's
    matmul's 0.098 / 0.164 / 0.121; one lag per CTA (each reading u and dy on its own) ran
    0.073-0.10 at 4:4. SMEM at d=128, 2 stages: 2 x (u 16 + dy 16 + 2 shifted dy 32 + ids
    0.5) + 2 B tiles 32 = 161 KB, then 192 KB to stage the sums.
    """
    heads, batch, seq_pad, d = dy.shape
    rows, dtype = BLOCK_ROWS, dy.dtype
    num_blocks = seq_pad // rows
    if blocks_per_cta is None:
        blocks_per_cta = _lag_blocks_per_cta(heads, batch, num_blocks)
    check_positive_int("blocks_per_cta", blocks_per_cta)
    check_positive_int("stages", stages)
    per_cta = min(blocks_per_cta, num_blocks)
    chunks = pl.cdiv(num_blocks, per_cta)
    interpret = in_interpret_mode()
    if interpret:
        check_interpret_threads(LAGS)
    shape = (d, d)

    def walk(u_ref, dy_ref, segpos_ref, loaded, consumed, u_smem, b_smem, ahead_smem,
             segpos_smem):
        """This warpgroup's lag summed over the CTA's row blocks; b_smem's first ``stages``
        tiles are lag 0's slots (copied), the last two the B tiles of lags 1 and 2."""
        h, lag = lax.axis_index("heads"), lax.axis_index("lag")
        cta = lax.axis_index("chunks")
        b, first = lax.div(cta, jnp.int32(chunks)), lax.rem(cta, jnp.int32(chunks)) * per_cta
        count = jnp.minimum(per_cta, num_blocks - first)

        def issue(i, slot):
            block = first + i
            s0, barrier = block * rows, loaded.at[slot]
            plgpu.copy_gmem_to_smem(u_ref.at[b, pl.ds(s0, rows), h], u_smem.at[slot], barrier)
            plgpu.copy_gmem_to_smem(segpos_ref.at[b, :, pl.ds(s0, rows)], segpos_smem.at[slot],
                                    barrier)
            plgpu.copy_gmem_to_smem(dy_ref.at[h, b, pl.ds(s0, rows)], b_smem.at[slot], barrier)
            for k in range(2):  # dy rows t + 1 + k
                _copy_rows_shifted(lambda ds: dy_ref.at[h, b, ds], ahead_smem.at[slot, k], s0,
                                   1 + k, block == num_blocks - 1, barrier)

        @pl.when(lag == 0)
        def _():
            for i in range(stages):
                pl.when(i < count)(lambda i=i: issue(i, i))

        def step(i, acc):
            slot = lax.rem(i, jnp.int32(stages))
            plgpu.barrier_wait(loaded.at[slot])

            @pl.when(lag > 0)
            def _():
                mask = _per_row(row_vec(segpos_smem.at[slot, lag - 1]), (rows, d)) >= lag
                ahead = plgpu.load(ahead_smem.at[slot, lag - 1], layout=_WGMMA)
                b_smem.at[stages + lag - 1][...] = jnp.where(mask, ahead, 0)

            # The B tile is visible to the wgmma; the ids and shifted rows are read.
            plgpu.commit_smem()
            u_t = u_smem.at[slot].transpose((1, 0))
            b_tile = b_smem.at[jnp.where(lag == 0, slot, stages + lag - 1)]
            if interpret:
                acc = acc + matmul(u_t, b_tile, shape)
            else:
                acc = matmul_into(acc, u_t, b_tile)
            # The wgmma has completed (its result is in registers): release the slot.
            plgpu.barrier_arrive(consumed.at[slot])

            @pl.when(jnp.logical_and(lag == 0, i + stages < count))
            def _():
                plgpu.barrier_wait(consumed.at[slot])
                issue(i + stages, slot)
            return acc

        acc = lax.fori_loop(0, count, step, zeros_acc(shape))

        # Warpgroup 0 waits on every phase of the consumed barriers (the interpreter checks).
        pl.when(lag == 0)(lambda: ring_drain(copies=((issue, consumed),), steps=count,
                                             stages=stages))
        return acc

    def kernel(u_ref, dy_ref, segpos_ref, m_ref, loaded, consumed, added):
        tiled = tile_transforms()
        acc = pl.run_scoped(
            functools.partial(walk, u_ref, dy_ref, segpos_ref, loaded, consumed),
            u_smem=plgpu.SMEM((stages, rows, d), dtype, transforms=tiled),
            b_smem=plgpu.SMEM((stages + 2, rows, d), dtype, transforms=tiled),
            ahead_smem=plgpu.SMEM((stages, 2, rows, d), dtype),
            segpos_smem=plgpu.SMEM((stages, 2, rows), jnp.int32),
            collective_axes="lag")

        def add(stage_smem):
            """m[h, lag] += acc, staged in the ring's freed shared memory."""
            h, lag = lax.axis_index("heads"), lax.axis_index("lag")
            add_to_gmem(acc, stage_smem.at[lag], m_ref.at[h, lag],
                        added.at[lag] if interpret else None, interpret)
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(add, plgpu.SMEM((LAGS, d, d), jnp.float32, transforms=f32_tile_transforms()),
                      collective_axes="lag")

    sums = jax.new_ref(jnp.zeros((heads, LAGS, d, d), jnp.float32))
    plgpu.kernel(
        kernel,
        out_type=(),
        scratch_types=dict(
            loaded=plgpu.Barrier(num_arrivals=5, num_barriers=stages),  # u, ids, 3 dy tiles
            consumed=plgpu.Barrier(num_arrivals=LAGS, num_barriers=stages),
            added=plgpu.Barrier(num_barriers=LAGS) if interpret else None,
        ),
        grid=(heads, batch * chunks),
        grid_names=("heads", "chunks"),
        num_threads=LAGS,
        thread_name="lag",
        compiler_params=_COMPILER_PARAMS,
    )(u, dy, segpos_next, sums)
    return jnp.moveaxis(sums[...], 1, 0)


def lag_products_reference(u, dy, segment_positions):
    """(3, H, d, d) float32: M[l] = sum over (b, t) of u[b, t - l]^T dy[b, t] where t's segment
    reaches back l rows (segment_positions >= l; the conv's masked lag l, `_lags`).
    u (B, S, H, d), dy (H, B, S, d), segment_positions (B, S). The reference of `_lag_kernel`.

    In XLA, one matmul per head, M[l] = sum_t u[t]^T (m_l[t + l] dy[t + l]), against the three
    shifted and masked dy side by side: 0.10 ms at 4:4, S=16k on the H200 (2026-12-01), against
    0.14 ms for three matmuls on shifted slices and 0.16-0.19 ms split over 16 or 64 chunks."""
    heads, _, seq, d = dy.shape
    shifted = []
    for lag in range(LAGS):
        reaches = (segment_positions[:, lag:] >= lag)[None, :, :, None]
        shifted.append(pad_axis(jnp.where(reaches, dy[:, :, lag:], 0), 2, seq))
    m = jnp.einsum("bshc,hbso->hco", u, jnp.concatenate(shifted, axis=-1),
                   preferred_element_type=jnp.float32)
    return jnp.moveaxis(m.reshape(heads, d, LAGS, d), 2, 0)


def prologue_bwd(p, conv, temp, positions, segment_positions, d_q, d_k, cfg: CCAConfig):
    """Gradients of `prologue_fwd`'s q', k' (cotangents d_q (B, S, Hq, d), d_k (B, S, Hkv, d)).

    Three kernels and XLA: the dy kernel recomputes y and writes dy = dL/dy and per-row sums
    for the temperature; the du kernel turns dy into du with the conv's look-ahead halo. The
    conv weights' gradients are linear in the lag products M[l] = u_l^T dy (`_lag_kernel`, u_l: the
    masked lag l): with c0[t] = b0 + w0[1] u_0[t] + w0[0] u_1[t] and c0[t-1] as the conv
    recompute has it (b0 + w0[1] u_1[t] + w0[0] u_2[t]; b0 alone at a segment start),
      dW1[1] = c0[t]^T dy = b0 (x) d_b1 + w0[1] M[0] + w0[0] M[1], dW1[0] likewise from M[1],
      M[2]; d w0[1] = rowsum(W1[0] * M[1] + W1[1] * M[0]), d w0[0] = rowsum(W1[0] * M[2] + W1[1]
      * M[1]); d b1 = sum_t dy[t], d b0 = d b1 (W1[0] + W1[1])^T.
    (The kernel's conv1 rounds c0 to 16 bits; these are the float32 reference's gradients.)
    Returns (dp like p (value heads zero), dconv like conv, dtemp like temp or None).
    """
    batch, seq, num_p_heads, d = p.shape
    heads = cfg.num_q_heads + cfg.num_kv_heads
    inputs = _kernel_inputs(p, conv, temp, positions, segment_positions, cfg)
    seq_pad = inputs[0].shape[1]
    d_q, d_k = (pad_axis(c.astype(p.dtype), 1, seq_pad) for c in (d_q, d_k))
    dy, row_dots = _dy_kernel(inputs, d_q, d_k, cfg)
    segpos_next = next_segment_positions(inputs[2])
    du = _du_kernel(dy, segpos_next, inputs[3], inputs[4], cfg)

    f32 = jnp.float32
    m0, m1, m2 = _lag_kernel(inputs[0], dy, segpos_next)
    w1 = conv["w1"].astype(f32)  # (tap, H, c, o): c0's channel c to y's channel o
    w_old, w_cur = conv["w0"].astype(f32).reshape(2, heads, d, 1)
    d_b1 = dy.sum(axis=(1, 2), dtype=f32)  # (H, d); padded rows have dy = 0
    bias = conv["b0"].astype(f32).reshape(heads, d, 1) * d_b1[:, None, :]
    dconv = {"w0": jnp.stack([(w1[0] * m2 + w1[1] * m1).sum(-1),
                              (w1[0] * m1 + w1[1] * m0).sum(-1)]).reshape(2, heads * d),
             "b0": jnp.einsum("ho,jhco->hc", d_b1, w1).reshape(-1),
             "w1": jnp.stack([bias + w_cur * m1 + w_old * m2, bias + w_cur * m0 + w_old * m1]),
             "b1": d_b1.reshape(-1)}
    dconv = {name: g.astype(conv[name].dtype) for name, g in dconv.items()}
    dtemp = None
    if temp is not None:
        # out scale = sqrt(d) * temperature(temp) on the k heads.
        d_scale = row_dots[cfg.num_q_heads:].sum(axis=(1, 2))
        _, temp_vjp = jax.vjp(lambda t: _temperature(t, cfg), temp.astype(f32))
        dtemp = temp_vjp(vary_like(d_scale * d ** 0.5, temp))[0].astype(temp.dtype)
    dp = jnp.pad(du[:, :seq], ((0, 0), (0, 0), (0, num_p_heads - heads), (0, 0)))
    return dp, dconv, dtemp


def _run(interpret, fn, *args):
    """fn(*args), under Mosaic GPU interpret mode when asked (tests on the CPU)."""
    if not interpret:
        return fn(*args)
    with plgpu.force_gpu_interpret_mode():
        return fn(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _prologue(p, conv, temp, positions, segment_positions, cfg, interpret):
    return _prologue_fwd(p, conv, temp, positions, segment_positions, cfg, interpret)[0]


def _prologue_fwd(p, conv, temp, positions, segment_positions, cfg, interpret):
    out = _run(interpret, prologue_fwd, p, conv, temp, positions, segment_positions, cfg)
    # Typed varying like p under `over_batch`: else shard_map's transpose sums the cotangents.
    out = tuple(vary_like(o, p) for o in out)
    return out, (p, conv, temp, positions, segment_positions)


def _prologue_bwd(cfg, interpret, residuals, d_out):
    p, conv, temp, positions, segment_positions = residuals
    dp, dconv, dtemp = _run(interpret, prologue_bwd, p, conv, temp, positions,
                            segment_positions, *d_out, cfg)
    # conv and temp arrive varying (`_vary_params_like`): their gradients must be typed so too.
    return (vary_like(dp, p), jax.tree.map(vary_like, dconv, conv),
            None if temp is None else vary_like(dtemp, temp), None, None)


_prologue.defvjp(_prologue_fwd, _prologue_bwd)


def mosaic_prologue(p, conv: dict, temp, positions, segment_positions, cfg: CCAConfig, *,
                    interpret: bool = False):
    """q', k' from the down-projection output, through the sm90 kernel; differentiable
    wrt p, conv and temp through the backward kernels (`prologue_bwd`).

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
    # Per device over the batch under a mesh; conv and temp go whole to every device.
    return over_batch(lambda p, pos, seg, conv, temp: _prologue(
        p, *_vary_params_like(p, conv, temp), pos, seg, cfg, interpret),
        p, positions, segment_positions, replicated=(conv, temp))


def _vary_params_like(p, conv, temp):
    """conv and temp typed varying over p's varying mesh axes (inside `over_batch`'s or a
    user's shard_map): the transpose of that cast sums their gradients over the devices, which
    the kernels' per-device gradients need. A no-op outside shard_map."""
    return jax.tree.map(lambda a: vary_like(a, p), (conv, temp))
