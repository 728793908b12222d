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
* Grid ``(Hq, num_q_blocks, B)``, one CTA per (query head, query block of ``block_q`` = 128
  rows, batch), made of ``compute_wgs`` = 2 compute warpgroups (64 query rows each) and one
  producer warpgroup (``plgpu.kernel(..., num_threads=3)``). The CTA reads the k/v tiles of kv
  head ``h // group`` directly from the un-repeated (B, Sk, Hkv, d) arrays (GQA without copies).
  Under causal masking the q-block index is reversed so the longest rows are scheduled first.
  Non-causal (or ``persistent=True``, any mask): a persistent grid of one CTA per SM instead,
  whose producer keeps one k/v ring across the CTA's tiles, so the next tile's first loads
  overlap the current tile's tail and epilogue (with ``prefetch_q``, the GPU default there,
  each compute warpgroup also loads its next tile's q rows into a second q tile meanwhile).
  Tiles are dealt out by :func:`persistent_tiles`: round-robin, q block fastest, when not
  causal; causal, longest first in rounds of alternating direction.
* Split last round (``split_tail``, non-causal persistent grid): when the tiles leave the last
  round partly filled, its tiles' kv steps are shared out evenly instead: each CTA (cluster)
  runs its whole rounds, then one or two pieces of ``split_tail_share`` kv steps in all
  (:func:`tail_segment`), writing each piece's normalised output and lse to a partial slot;
  XLA then merges each split tile's pieces by their lse (`_merge_split_tail`).
* Pairs (``kv_multicast``, the GPU default except causal Sk <= 4096): clusters of 2 CTAs on
  the adjacent query blocks 2j and 2j + 1 of one (head, batch) need the same k/v tiles; each
  producer TMA-copies half of every tile and multicasts it into both CTAs' shared memory, so
  a tile leaves L2 once per pair (each CTA's k/v barrier still awaits the whole tile). Both
  CTAs' compute warpgroups must release a slot before either producer refills it: the
  "consumed" signals are cluster mbarriers (a remote arrive per warpgroup and CTA) instead of
  named barriers. Under causal masking both load block 2j + 1's kv steps; block 2j's
  warpgroups flush the extra one. The persistent grid then deals out pairs of q blocks to
  clusters. On the H200 every kernel here runs at its 700 W limit, so the L2 traffic saved is
  clock: +1-2% non-causal (NOTES_attention.md, twentieth session).
* Producer warpgroup (registers lowered to 40; ptxas ignores this and the compute warpgroups'
  232, see ``_COMPUTE_REGS``): issues the TMA copies of k and v (and of the kv segment ids, on
  k's barrier) into a ``kv_stages``-slot ring; before refilling a slot it waits on that slot's
  "consumed" barriers (one arrival per compute warpgroup), separately for k and v.
* Compute warpgroups: each TMA-copies its own 64 q rows, then per kv
  step waits k, runs S = q k^T (wgmma into a zero ``plgpu.ACC`` in ``pl.run_scoped``), releases k,
  applies the mask if needed, online softmax in fp32 (log2 domain, ``exp2``), waits v and runs
  acc += P v, releasing v (the next step's k wait is issued while that wgmma runs). With
  ``pingpong`` the two warpgroups take turns on the tensor cores (each waits on its own barrier
  before P v and passes the turn on after issuing q k^T), so that one's softmax overlaps the
  other's matmuls (FA3 ping-pong); a persistent CTA alternates two sets of those barriers
  from tile to tile (warpgroup 0 passes the turn twice across a tile boundary without waiting).
  On a GPU the turns and the "consumed" signals are hardware named barriers (``bar.arrive`` /
  ``bar.sync``, one instruction per warp; ``named_barriers``); in interpret mode, mbarriers.
* P operand: with ``register_p`` (the GPU default) P stays in registers as the wgmma A operand
  and the accumulator is updated in place (``pl.run_state`` + ``plgpu.ACC.init(acc)``). The
  interpreter supports neither, so in interpret mode P is stored to shared memory
  (``commit_smem``) and the P v product is added to the register accumulator.
* Masking: kv steps are split into two loops. Steps whose whole tile is allowed for every row of
  the warpgroup run without any mask; the remaining steps (the causal diagonal tiles, the tile
  holding the end of Sk, and every step when segment ids are given) apply an iota / segment-id
  mask, built while the q k^T wgmma runs. Under causal masking, kv blocks entirely above the
  diagonal are never loaded, and a diagonal step whose seen keys all lie in the first half of
  its tile runs on that half (``narrow_diagonal``: a ``lax.cond`` between two step bodies).
* Segment ids (``segment_ids``, Sq == Sk): the q block's ids are TMA-copied with q, each kv
  tile's ids with k; rows are read in ``WGMMA.reduce(1)`` layout, columns in ``WGMMA.reduce(0)``,
  broadcast and compared. A ``commit_smem`` fence precedes the release of the k slot, since the
  ids were read with ordinary loads and the next TMA overwrites them.
* Causal alignment: query i (0-based in Sq) may see key j iff ``j <= i + (Sk - Sq)``, i.e. the
  last query meets the last key (as :func:`ccajax.attention.reference_attention`). With Sq > Sk
  the first Sq - Sk queries see no key: out 0, lse -inf.
* Sequence tails: the wrapper zero-pads Sq up to a multiple of block_q and Sk up to a multiple of
  block_kv (only when needed); padded keys are masked in the kernel and padded query rows are
  sliced off. This costs one copy of q/k/v when the lengths are not block multiples.
* Epilogue: out = acc / l (0 where l == 0) is written to the warpgroup's q shared-memory tile and
  TMA-stored; lse = (m + log2 l) * ln 2 likewise.

Interpret mode (CPU)
--------------------
The kernel runs on the CPU under ``plgpu.force_gpu_interpret_mode()``, which simulates TMA,
barriers, wgmma and the three warpgroups (as threads). In jax 0.11.2 that interpreter does not
handle ``pl.run_state`` and its wgmma reads both operands from shared memory, hence the
``register_p=False`` path there. The interpreter also requires every thread that waits on a
barrier to wait on all of its phases: the producer therefore drains the last "consumed" phases,
and a compute warpgroup with fewer causal steps than its CTA still waits/releases the remaining
slots. Each warpgroup runs as its own XLA CPU computation whose barrier waits block a worker of
XLA's CPU thread pool, so the pool needs a worker per warpgroup plus one (see
``sm90_pipeline.check_interpret_threads``). Pairs (``kv_multicast=True``) run there too: the
interpreter simulates the cluster and its cluster barriers, but a copy with
``collective_axes`` fills only the issuing CTA's tile, whole (no multicast), so the tests there
check the pair's barrier protocol and tile walk, not the multicast.
"""

from __future__ import annotations

import functools
import math
import operator

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ccajax.pallas.sm90_common import (BLOCK_MULTIPLE, LOG2E, check_attention_args,
                                       check_block_sizes, pad_axis, round_up, sm_count)
from ccajax.pallas.sm90_pipeline import (FIRST_NAMED_BARRIER, NUM_NAMED_BARRIERS,
                                         THREADS_PER_WARP, THREADS_PER_WG, KVSteps, NamedSlots,
                                         check_interpret_threads, full_rows, in_interpret_mode,
                                         kv_flush, matmul, matmul_into, named_barrier,
                                         next_step_wait, release_slot,
                                         resolve_single_warp_producer, ring_drain, ring_producer,
                                         run_producer, tile_transforms, zeros_acc)

MAX_BLOCK = 256
_LN2 = math.log(2.0)
# Registers per thread of each compute warpgroup and of the producer (setmaxnreg) with two
# compute warpgroups: 2 * 128 * 232 + 128 * 40 <= 65536. ptxas (jax 0.11.2's, on an H200)
# ignores the pair (C7507, "to maintain minimum register requirements") for producer budgets
# of 40 to 80, so every warpgroup keeps the launch's 168, in which the compute code fits
# without spills (163). It honours a producer budget of 96, and then fails to fit the compute
# code into 200 or 208 (C7600). NOTES_attention.md, 2026-12-02 (nineteenth session).
_COMPUTE_REGS, _PRODUCER_REGS = 232, 40


def _check_args(q, k, v, is_causal, scale, block_q, block_kv, segment_ids, compute_wgs,
                kv_stages):
    check_attention_args(q, k, v, is_causal=is_causal, scale=scale, segment_ids=segment_ids)
    check_block_sizes(MAX_BLOCK, block_q=block_q, block_kv=block_kv)
    if compute_wgs not in (1, 2):
        raise ValueError(f"compute_wgs must be 1 or 2; got compute_wgs={compute_wgs!r}")
    if not isinstance(kv_stages, int) or not 2 <= kv_stages <= 4:
        raise ValueError(f"kv_stages must be an int in [2, 4]; got kv_stages={kv_stages!r}")


# kv_multicast=None: pairs of CTAs share each k/v tile except under causal masking up to this
# Sk. H200, sustained 1 s windows (tune_attention_fwd_h200_2026-12-02_kv_multicast*.json):
# +1.0-1.4% at 16k non-causal (595-596 TF/s, ahead of tokamax's 588-590) and +0.5-1.4% causal,
# +1-2% at 8k; at 4k causal -0.2 to -2% (one CTA of each pair flushes a kv step it does not
# need, a larger share of short tiles). 4k non-causal on the persistent grid: +2% (16:16).
# The causal persistent grid is never the default: paired, it ran 0.88-0.97x the default
# (per tile) at 4k and 8k, every head layout (sustained, 21st session,
# tune_attention_fwd_h200_2026-12-02_causal_persistent_pairs.json); with prefetch_q as well
# it stalled (refused).
KV_MULTICAST_MIN_CAUSAL_SEQ_K = 4096


def persistent_tiles(cta, *, num_ctas: int, batch: int, num_heads: int, num_q_blocks: int,
                     is_causal: bool):
    """The tiles CTA ``cta`` of a persistent grid walks: ``(count, tile_at)``, where
    ``tile_at(i)`` is its i-th tile as (head, q block, batch) for ``0 <= i < count``.

    Non-causal (equal tiles): round-robin over the (batch, head, q block) tiles, q block
    fastest, so that the CTAs in flight share a few heads' k/v in L2. Causal (a tile's length
    grows with its q block): the tiles go longest first, all (batch, head) pairs of one q block
    together, dealt out in rounds of ``num_ctas`` whose direction alternates (CTA 0 takes the
    longest tile of even rounds, the shortest of odd ones), so that the CTAs' sums of lengths
    differ by about one round's spread rather than by one per round. Plain int32 arithmetic:
    it runs inside the kernel and, for the tests, outside it. With ``kv_multicast`` the kernel
    deals pairs of q blocks to clusters: ``cta`` is then a cluster, ``num_ctas`` the number of
    clusters and ``num_q_blocks`` the number of pairs."""
    num_tiles = batch * num_heads * num_q_blocks
    int32 = jnp.int32
    if not is_causal:
        def tile_at(i):
            return tile_coords(i * num_ctas + cta, num_heads=num_heads, num_q_blocks=num_q_blocks)
        return jnp.maximum(lax.div(num_tiles - cta + num_ctas - 1, int32(num_ctas)), 0), tile_at

    def tile_at(i):
        position = jnp.where(lax.rem(i, int32(2)) == 0, cta, num_ctas - 1 - cta)
        t = i * num_ctas + position
        pair = lax.rem(t, int32(batch * num_heads))
        return (lax.rem(pair, int32(num_heads)),
                num_q_blocks - 1 - lax.div(t, int32(batch * num_heads)),
                lax.div(pair, int32(num_heads)))
    full_rounds, left = divmod(num_tiles, num_ctas)
    last_position = cta if full_rounds % 2 == 0 else num_ctas - 1 - cta
    return full_rounds + (last_position < left).astype(int32), tile_at


def _traced_div(a, b):
    return lax.div(a, jnp.int32(b))


def _traced_rem(a, b):
    return lax.rem(a, jnp.int32(b))


def tile_coords(t, *, num_heads: int, num_q_blocks: int, div=_traced_div, rem=_traced_rem):
    """(head, q block, batch) of the non-causal grid's flat tile index ``t`` (q block fastest,
    then head, then batch). ``div``/``rem``: int32 ops in the kernel, Python's outside."""
    return (rem(div(t, num_q_blocks), num_heads), rem(t, num_q_blocks),
            div(t, num_q_blocks * num_heads))


# split_tail=None splits the last round only when that saves each CTA (cluster) at least this
# many kv steps: XLA's merge after the kernel (three small fusions) costs ~19 us, about 18 steps
# of a pair of 128-row q blocks over 128 keys at d=128. H200, sustained windows (twenty-sixth
# session, 14 lengths at 4k and 16k): 5-9 steps saved -4 to -7%, 18 -1.5%, 21-29 +1 to +1.3%
# at 4k; 25 -0.2%, 31-120 +1 to +3.6% at 16k.
SPLIT_TAIL_MIN_SAVED_STEPS = 20


def split_tail_share(num_tiles: int, num_ctas: int, steps: int, min_saved: int = 1) -> int:
    """kv steps of the last round each CTA (cluster) takes when the partly filled last round of
    a non-causal persistent grid is split (`tail_segment`): the ``num_tiles % num_ctas`` tiles'
    ``steps`` kv steps each, shared evenly. 0 (no split) when that would save a CTA fewer than
    ``min_saved`` steps of the whole tile it would otherwise run (or there is no partial
    round)."""
    left = num_tiles % num_ctas
    share = pl.cdiv(left * steps, num_ctas)
    return share if left and steps - share >= min_saved else 0


def tail_segment(cta, segment, *, num_tiles: int, num_ctas: int, steps: int, share: int,
                 div=_traced_div, minimum=jnp.minimum, maximum=jnp.maximum):
    """Segment ``segment`` (0 or 1) of CTA (cluster) ``cta``'s share of the split last round:
    ``(tile, kv_lo, kv_hi)``, the kv steps [kv_lo, kv_hi) of flat tile ``tile``
    (`tile_coords`); empty when kv_hi <= kv_lo. The last round's tiles' kv steps, laid end to
    end, are cut into pieces of ``share`` (`split_tail_share`) steps, CTA c taking the c-th; a
    piece spans at most two tiles since share < steps. The ops are int32 in the kernel, Python's
    for the merge outside it (`_merge_split_tail`)."""
    first_tail_tile = num_tiles - num_tiles % num_ctas
    start = cta * share
    end = minimum(start + share, (num_tiles % num_ctas) * steps)
    tile = div(start, steps) + segment
    return first_tail_tile + tile, maximum(start - tile * steps, 0), minimum(end - tile * steps,
                                                                             steps)


def _merge_split_tail(out, lse, part_out, part_lse, *, num_ctas: int, num_kv_blocks: int,
                      share: int, pair_rows: int):
    """Writes the split last round's tiles (`tail_segment`) into out (B, Sq_pad, Hq, d) and lse
    (B, Hq, Sq_pad): each tile's pieces, part_out (2 * num_ctas, pair_rows, d) and part_lse
    (2 * num_ctas, pair_rows) at slot 2 * cta + segment, are weighted by exp(their lse - the
    tile's), whose lse is the logsumexp of theirs (-inf, and output 0, for a row no piece saw
    a key of). The pieces are known statically: a gather, a sum and a scatter."""
    batch, seq_q_pad, num_heads, head_dim = out.shape
    num_q_blocks = seq_q_pad // pair_rows
    num_tiles = batch * num_heads * num_q_blocks
    slots = {}  # tail tile -> its pieces' slots
    for cta in range(num_ctas):
        for segment in (0, 1):
            tile, lo, hi = tail_segment(cta, segment, num_tiles=num_tiles, num_ctas=num_ctas,
                                        steps=num_kv_blocks, share=share,
                                        div=operator.floordiv, minimum=min, maximum=max)
            if hi > lo:
                slots.setdefault(tile, []).append(2 * cta + segment)
    tiles = sorted(slots)
    most = max(len(s) for s in slots.values())
    # Missing pieces repeat a tile's first slot, weighted 0.
    index = np.array([slots[t] + slots[t][:1] * (most - len(slots[t])) for t in tiles])
    valid = np.array([[i < len(slots[t]) for i in range(most)] for t in tiles])
    piece_lse = jnp.where(valid[:, :, None], part_lse[index], -jnp.inf)  # (tiles, most, rows)
    top = piece_lse.max(axis=1)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    weight = jnp.exp(piece_lse - top[:, None])
    total = weight.sum(axis=1)
    merged = jnp.einsum("tpr,tprd->trd", weight, part_out[index].astype(jnp.float32))
    merged = merged / jnp.where(total == 0.0, 1.0, total)[..., None]
    merged_lse = jnp.where(total == 0.0, -jnp.inf, top + jnp.log(total))
    head, q_block, b = (np.array(x) for x in zip(*(
        tile_coords(t, num_heads=num_heads, num_q_blocks=num_q_blocks,
                    div=operator.floordiv, rem=operator.mod) for t in tiles)))
    out = out.reshape(batch, num_q_blocks, pair_rows, num_heads, head_dim)
    out = out.at[b, q_block, :, head].set(merged.astype(out.dtype), unique_indices=True)
    lse = lse.reshape(batch, num_heads, num_q_blocks, pair_rows)
    lse = lse.at[b, head, q_block].set(merged_lse, unique_indices=True)
    return (out.reshape(batch, seq_q_pad, num_heads, head_dim),
            lse.reshape(batch, num_heads, seq_q_pad))


def attention_fwd(q, k, v, *, is_causal: bool, scale: float | None, segment_ids=None,
                  block_q: int = 128, block_kv: int = 128, compute_wgs: int = 2,
                  kv_stages: int = 2, register_p: bool | None = None, pingpong: bool = True,
                  early_k_wait: bool | None = None, oneway_pingpong: bool = True,
                  persistent: bool | None = None, num_ctas: int | None = None,
                  named_barriers: bool | None = None, auto_barriers: bool = False,
                  prefetch_q: bool | None = None, single_warp_producer: bool | None = None,
                  kv_multicast: bool | None = None, narrow_diagonal: bool = True,
                  split_tail: bool | None = None):
    """Flash-attention forward on Hopper; see the module docstring for the kernel layout.

    Args:
      q: (B, Sq, Hq, d) bf16/fp16 queries.
      k: (B, Sk, Hkv, d) keys, same dtype; Hkv divides Hq.
      v: (B, Sk, Hkv, d) values, same dtype.
      is_causal: causal mask with the last query aligned to the last key.
      scale: score scale (a static Python float); None means 1/sqrt(d).
      segment_ids: optional (B, S) integer array (cast to int32), needs Sq == Sk == S: query i
        and key j attend iff ``segment_ids[b, i] == segment_ids[b, j]`` (and the causal mask,
        if any, allows it).
      block_q: query rows per CTA (multiple of 64, at most 256), split evenly over the compute
        warpgroups (each gets a multiple of 64 rows; fewer warpgroups are used otherwise).
      block_kv: keys per kv step (multiple of 64, at most 256).
      compute_wgs: compute (consumer) warpgroups per CTA, 1 or 2; a producer warpgroup
        issues the k/v TMA copies.
      kv_stages: depth of the k/v shared-memory ring (2 to 4).
      register_p: feed P to the P v wgmma from registers (True, GPU only: the interpreter
        cannot) or through shared memory (False). None: registers on a GPU, shared memory under
        ``plgpu.force_gpu_interpret_mode``.
      pingpong: with 2 compute warpgroups, order their matmuls with barriers so one's
        softmax overlaps the other's wgmma (FA3 "ping-pong").
      early_k_wait: wait for the next step's k tile while the P v wgmma runs (its poll then
        overlaps the tensor cores) instead of at the top of each step. None: early without a
        causal mask, at the top of each step with one. Measured causal, sustained 1 s windows:
        H200 (twenty-fourth session, narrow diagonal) late 593-630 TF/s against early 575-609
        at 16k (16:16, 8:2, 4:4) and 32k 8:2, +3.1-3.7% (ptxas spills 12 B for late, 32 B for
        early), 4k 8:2 within 0.5%; H100 (twenty-third session, whole-tile diagonal) late
        +0.3-1.4% at 16k.
      oneway_pingpong: hand the turn over with one barrier per warpgroup (arrive on the
        other's after issuing q k^T, wait on one's own before P v: one wait per step) instead
        of a shared barrier both meet at twice per step.
      persistent: launch ``num_ctas`` CTAs that each walk a share of the (batch, head, query
        block) tiles (`persistent_tiles`), keeping one k/v ring across their tiles (the next
        tile's first k/v load overlaps the current tile's last steps and epilogue). None: when
        not causal; the causal per-tile grid runs the longest tiles first. Measured on an H200
        with pairs (twenty-fifth session, sustained 1 s windows, 5 rounds), persistent against
        per-tile: 16k +1.0 / +0.7 / +0.7% (16:16 / 8:2 / 4:4), 8k 8:2 +1.2%, 32k 8:2 +0.3%;
        before pairs it lost at 16k, hence a 4k limit until then.
      num_ctas: CTAs of the persistent grid; None: the GPU's SM count (2 in interpret mode),
        rounded down to even when they run in pairs (``kv_multicast``).
      named_barriers: hand the ping-pong turns and the consumed k/v slots over through
        hardware named barriers (``bar.arrive`` / ``bar.sync``: one instruction per warp)
        instead of mbarriers (an arrive from each of a warpgroup's 128 threads). GPU only (the
        interpreter has none); needs the one-way ping-pong when there are 2 compute
        warpgroups. None: True on a GPU with the one-way ping-pong (measured on an H200 with
        ``auto_barriers=False``: +1.2% mean TF/s over 12 cells, -3% to +7%; see
        NOTES_attention.md), False in interpret mode.
      auto_barriers: let Pallas put a warpgroup barrier around every shared-memory load,
        store and copy it lowers (False, the default: ``unsafe_no_auto_barriers``, as
        tokamax's kernel; the stores this kernel makes are fenced by ``commit_smem``, which
        syncs the warpgroup, before a TMA reads them).
      prefetch_q: persistent grid only: give each compute warpgroup two q tiles and load its
        next tile's q rows while the current tile runs (tokamax loads it during the epilogue),
        instead of at the start of each tile; 32 KiB more shared memory (too much with 3 kv
        stages of 128-key tiles, or with ``register_p=False``). Ignored by the per-tile grid.
        None: on the persistent grid without a causal mask, with P in registers and a k/v
        ring no larger than 2 stages of 128 x 128 (so not in interpret mode). H200,
        with pairs (twenty-fifth session, 5 rounds): +0.7 / +1.2 / +0.9% at 4k non-causal
        (16:16 / 8:2 / 4:4), within 0.3% at 16k; +0.6 to +4.5% on the causal persistent grid
        at 4k (eighteenth session, unpaired).
      single_warp_producer: the producer's TMA copies and slot waits run on one warp of its
        warpgroup, the other three idle (as tokamax); False: on all four (each copy is still
        issued once), which ncu counted as 3.8% more instructions for the whole kernel. None:
        True, except for inputs batch-sharded inside `jax.shard_map`
        (`resolve_single_warp_producer`).
      kv_multicast: launch the per-tile grid in clusters of 2 CTAs on adjacent query blocks of
        one (head, batch), whose producers each TMA-copy half of every k/v tile and multicast
        it into both CTAs' shared memory: each tile leaves L2 once per pair instead of once per
        CTA. The slots' "consumed" signals become cluster mbarriers (both CTAs' compute
        warpgroups release a slot before either producer refills it); under causal masking
        both CTAs load the later block's kv steps and the earlier one flushes the extra one.
        On the persistent grid, each cluster walks the tiles of pairs of query blocks
        (``num_ctas`` must then be even; None: the SM count rounded down to even). Ignored
        when the number of query blocks is odd. In interpret mode each CTA's copy fills its
        own tile whole (jax 0.11.2's interpreter ignores multicast), so the pairs run there
        with their cluster barriers and tile walk but without the multicast. None: on a GPU,
        except under causal masking with Sk <= ``KV_MULTICAST_MIN_CAUSAL_SEQ_K`` or on the
        persistent grid (measured, see there); off in interpret mode.
      narrow_diagonal: under causal masking with ``block_kv`` a multiple of 128, a warpgroup's
        diagonal kv step whose keys it sees all lie in the first half of the tile (the first
        64 rows of a 128-row block on a 128-key diagonal) runs q k^T, softmax and P v on that
        half only, instead of on the whole tile with the other half masked: half a step less
        per such tile, about 0.4% of a causal 16k forward's wgmma work. H200, with the late k
        wait: +1.2-1.8% at 16k and 32k over the whole-tile step, 4k 8:2 -1% (509 / 514 TF/s).
      split_tail: on the non-causal persistent grid, when its tiles leave a partly filled last
        round, split that round's tiles along the keys so that every CTA (cluster) runs an
        equal share of their kv steps (`split_tail_share`, `tail_segment`; stream-K for the
        tail). Each piece writes its rows' partial output and lse to a scratch array, and XLA
        merges the pieces of each tile by their lse after the kernel (~19 us on an H200). True:
        whenever there is a partial round; None: when that saves each CTA at least
        ``SPLIT_TAIL_MIN_SAVED_STEPS`` kv steps. H200 (twenty-sixth session, sustained 1 s
        windows, 5 rounds, against split_tail=False): +1.6% at 16k 16:16, +0.3% at 16k 8:2,
        +1.1% at 32k 8:2 (split by None); forced where None does not split, 16k 4:4 -1.1% and
        4k 8:2 -2.3%; +1 to +3.6% at other lengths near 16k (3 rounds).
    Returns:
      (out, lse): out (B, Sq, Hq, d) in q's dtype; lse (B, Hq, Sq) float32, natural-log
      log-sum-exp of the scaled scores, -inf for rows that see no key (their out is 0).
    Raises:
      ValueError: for unsupported dtypes, head dims, head counts, block sizes, segment ids or
        mismatched shapes; the message names the argument, the value and what is valid.
    """
    _check_args(q, k, v, is_causal, scale, block_q, block_kv, segment_ids, compute_wgs,
                kv_stages)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if register_p is None:
        register_p = not in_interpret_mode()
    if register_p and in_interpret_mode():
        raise ValueError("register_p=True is not supported in Mosaic GPU interpret mode "
                         "(its wgmma reads both operands from shared memory); use "
                         "register_p=False or None")
    if segment_ids is not None:
        segment_ids = segment_ids.astype(jnp.int32)
    if early_k_wait is None:
        early_k_wait = not is_causal
    if in_interpret_mode():
        check_interpret_threads(compute_wgs + 1)
    if persistent is None:
        persistent = not is_causal
    if prefetch_q is None:
        # A second q tile per warpgroup fits next to a k/v ring of the default's size (d <= 128)
        # but not also next to a P tile (232,544 B with register_p=False on an H200).
        prefetch_q = (persistent and not is_causal and register_p
                      and kv_stages * block_kv * q.shape[-1] <= 2 * 128 * 128)
    if kv_multicast is None:
        odd_ctas = persistent and isinstance(num_ctas, int) and num_ctas % 2 == 1
        kv_multicast = not in_interpret_mode() and not odd_ctas and (
            not is_causal or (k.shape[1] > KV_MULTICAST_MIN_CAUSAL_SEQ_K and not persistent))
    if kv_multicast and is_causal and persistent and prefetch_q:
        raise ValueError("kv_multicast=True with prefetch_q=True on the causal persistent grid "
                         "is not supported (it stalled on an H200 at S=4096, 16:16); use "
                         "prefetch_q=False or kv_multicast=False")
    if split_tail and is_causal:
        raise ValueError("split_tail=True splits the last round of the non-causal persistent "
                         "grid; got is_causal=True (use split_tail=None or False)")
    if split_tail and not persistent:
        raise ValueError("split_tail=True splits the last round of the persistent grid; got "
                         "persistent=False (use persistent=True or None)")
    if is_causal or not persistent:  # only the non-causal persistent grid has a tail to split
        split_tail = False
    if persistent and (num_ctas is not None
                       and (not isinstance(num_ctas, int) or num_ctas < 1)):
        raise ValueError(f"num_ctas must be a positive int; got num_ctas={num_ctas!r}")
    if persistent and kv_multicast and num_ctas is not None and num_ctas % 2:
        raise ValueError(f"kv_multicast=True on the persistent grid launches CTAs in pairs: "
                         f"num_ctas must be even; got num_ctas={num_ctas!r}")
    if persistent and num_ctas is None:
        num_ctas = 2 if in_interpret_mode() else sm_count()
        if kv_multicast:
            num_ctas -= num_ctas % 2
    if named_barriers is None:
        named_barriers = not in_interpret_mode() and oneway_pingpong
    if named_barriers and in_interpret_mode():
        raise ValueError("named_barriers=True is not supported in Mosaic GPU interpret mode "
                         "(it has no hardware named barriers); use named_barriers=False or None")
    if named_barriers and compute_wgs == 2 and pingpong and not oneway_pingpong:
        raise ValueError("named_barriers=True needs oneway_pingpong=True (the shared "
                         "rendezvous barrier is an mbarrier only)")
    return _attention_fwd(q, k, v, segment_ids, is_causal=is_causal, scale=scale,
                          block_q=block_q, block_kv=block_kv, compute_wgs=compute_wgs,
                          kv_stages=kv_stages, register_p=bool(register_p),
                          pingpong=bool(pingpong), early_k_wait=bool(early_k_wait),
                          oneway_pingpong=bool(oneway_pingpong),
                          num_ctas=num_ctas if persistent else None,
                          named_barriers=named_barriers, auto_barriers=bool(auto_barriers),
                          prefetch_q=bool(prefetch_q and persistent),
                          single_warp_producer=resolve_single_warp_producer(
                              single_warp_producer, q, k, v, segment_ids),
                          kv_multicast=bool(kv_multicast),
                          narrow_diagonal=bool(narrow_diagonal),
                          split_tail=split_tail)


@functools.partial(jax.jit, static_argnames=("is_causal", "scale", "block_q", "block_kv",
                                             "compute_wgs", "kv_stages", "register_p",
                                             "pingpong", "early_k_wait", "oneway_pingpong",
                                             "num_ctas", "named_barriers", "auto_barriers",
                                             "prefetch_q", "single_warp_producer",
                                             "kv_multicast", "narrow_diagonal",
                                             "split_tail"))
def _attention_fwd(q, k, v, segment_ids, *, is_causal, scale, block_q, block_kv, compute_wgs,
                   kv_stages, register_p, pingpong, early_k_wait, oneway_pingpong,
                   num_ctas, named_barriers, auto_barriers, prefetch_q, single_warp_producer,
                   kv_multicast, narrow_diagonal, split_tail):
    batch, seq_q, num_q_heads, head_dim = q.shape
    seq_k, num_kv_heads = k.shape[1], k.shape[2]
    group = num_q_heads // num_kv_heads
    dtype = q.dtype
    has_segments = segment_ids is not None

    # Short sequences do not need a tile larger than their padded length.
    block_q = min(block_q, round_up(seq_q, BLOCK_MULTIPLE))
    block_kv = min(block_kv, round_up(seq_k, BLOCK_MULTIPLE))
    # Each compute warpgroup owns wg_rows consecutive query rows of the CTA's block.
    while block_q % (compute_wgs * BLOCK_MULTIPLE):
        compute_wgs -= 1
    wg_rows = block_q // compute_wgs
    pingpong = pingpong and compute_wgs == 2
    oneway = pingpong and oneway_pingpong
    persistent = num_ctas is not None
    seq_q_pad = round_up(seq_q, block_q)
    seq_k_pad = round_up(seq_k, block_kv)
    q_p, k_p, v_p = pad_axis(q, 1, seq_q_pad), pad_axis(k, 1, seq_k_pad), pad_axis(v, 1, seq_k_pad)
    num_q_blocks = seq_q_pad // block_q
    num_kv_blocks = seq_k_pad // block_kv
    stages = min(kv_stages, num_kv_blocks)
    # CTAs per cluster along the query blocks (kv_multicast): pairs share each k/v tile.
    pair = 2 if kv_multicast and num_q_blocks % 2 == 0 else 1
    copy_kwargs = dict(collective_axes="pair") if pair == 2 else {}
    # Query i sees key j iff j <= i + causal_offset (last query aligned with last key).
    causal_offset = seq_k - seq_q
    # Keys of a causal diagonal step that runs narrow (narrow_diagonal), 0 if none does: half
    # a tile, kept a multiple of 64 (the wgmma operand tiles).
    narrow_cols = block_kv // 2 if narrow_diagonal and is_causal and block_kv % 128 == 0 else 0
    # Scores are kept in log2 units: s = (q . k) * scale * log2(e), so softmax uses exp2.
    score_mult = scale * LOG2E

    # split_tail: each cluster's share of the kv steps of the last round's tiles, 0: no split.
    num_clusters = num_ctas // pair if persistent else None
    num_pair_tiles = batch * num_q_heads * (num_q_blocks // pair)
    tail_share = (split_tail_share(num_pair_tiles, num_clusters, num_kv_blocks,
                                   min_saved=1 if split_tail else SPLIT_TAIL_MIN_SAVED_STEPS)
                  if split_tail is not False else 0)
    kv_range = KVSteps(is_causal=is_causal, causal_offset=causal_offset, seq_k=seq_k,
                       block_kv=block_kv, num_kv_blocks=num_kv_blocks, has_segments=has_segments)
    # Named barrier ids: the turns (2 sets when persistent), then the k and the v slots (on
    # cluster mbarriers instead when a pair shares the slots: named barriers are per CTA).
    turn_ids = FIRST_NAMED_BARRIER
    named_slots = named_barriers and pair == 1
    if named_slots:
        k_ids = turn_ids + (4 if persistent else 2)
        slot_threads = compute_wgs * THREADS_PER_WG + (
            THREADS_PER_WARP if single_warp_producer else THREADS_PER_WG)
        named_k, named_v = NamedSlots(k_ids, slot_threads), NamedSlots(k_ids + stages, slot_threads)
        assert k_ids + 2 * stages <= NUM_NAMED_BARRIERS, (k_ids, stages)  # stages <= 4

    def kernel(*refs, q_smem, k_smem, v_smem, p_smem, lse_smem, seg_q_smem, seg_kv_smem,
               q_barriers, k_barriers, v_barriers, k_consumed, v_consumed, schedule_barrier):
        if tail_share:
            *refs, part_out_ref, part_lse_ref = refs
        if has_segments:
            q_ref, k_ref, v_ref, seg_ref, out_ref, lse_ref = refs
        else:
            (q_ref, k_ref, v_ref, out_ref, lse_ref), seg_ref = refs, None
        wg = lax.axis_index("wg")
        if named_slots:
            k_consumed, v_consumed = named_k, named_v
        if compute_wgs == 2:
            pl.when(wg == compute_wgs)(
                lambda: plgpu.set_max_registers(_PRODUCER_REGS, action="decrease"))
            pl.when(wg < compute_wgs)(
                lambda: plgpu.set_max_registers(_COMPUTE_REGS, action="increase"))

        def schedule_sync():
            plgpu.barrier_arrive(schedule_barrier)
            plgpu.barrier_wait(schedule_barrier)

        # One-way ping-pong: warpgroup w waits on barrier w for its turn on the tensor cores
        # (P v of this step, then q k^T of the next) and passes it on through barrier 1 - w.
        # Warpgroup 0 takes the first turn; so that both barriers see as many arrivals as
        # waits, warpgroup 1 waits once before its first step and warpgroup 0 arrives once
        # after its last. A persistent CTA's consecutive tiles use two sets of these barriers
        # (by tile parity): warpgroup 0 arrives after its last step of one tile and again after
        # its first q k^T of the next with no wait between, so on one barrier it could complete
        # a phase that warpgroup 1 had not yet observed (seen in interpret mode; a hang on a GPU,
        # whose waits see only the phase parity).
        def pass_turn(turn_set):
            if named_barriers:
                named_barrier("arrive", turn_ids + 2 * turn_set + 1 - wg, 2 * THREADS_PER_WG)
            else:
                plgpu.barrier_arrive(schedule_barrier.at[2 * turn_set + 1 - wg])

        def await_turn(turn_set):
            if named_barriers:
                named_barrier("sync", turn_ids + 2 * turn_set + wg, 2 * THREADS_PER_WG)
            else:
                plgpu.barrier_wait(schedule_barrier.at[2 * turn_set + wg])

        def load_q(q_head, q_block, b, q_buf):
            """TMA-copy this warpgroup's rows of a tile's q (and their segment ids) into q
            tile ``q_buf`` (0, or 1 with prefetch_q) of the warpgroup."""
            q_start = q_block * block_q + wg * wg_rows
            slot = q_buf * compute_wgs + wg
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q_start, wg_rows), q_head], q_smem.at[slot],
                                    q_barriers.at[slot])
            if has_segments:  # shares the q barrier (2 arrivals)
                plgpu.copy_gmem_to_smem(seg_ref.at[b, pl.ds(q_start, wg_rows)],
                                        seg_q_smem.at[slot], q_barriers.at[slot])

        def tile(q_head, q_block, b, step0, turn_set=0, q_buf=0, prefetch=None, kv_span=None):
            """One (query head, query block, batch) tile. Its kv steps take ring positions
            step0, step0 + 1, ... (persistent CTAs keep one ring across their tiles); its
            one-way ping-pong uses the turn barriers of ``turn_set`` (0 or 1). Its q rows are in
            q tile ``q_buf``; with ``prefetch`` = (is first tile, has next, next tile's
            (q_head, q_block, b)) a warpgroup loads its q rows there only on its first tile and
            loads the next tile's into the other q tile once its own have arrived. With
            ``kv_span`` = (kv_lo, kv_hi, slot) (a piece of a split last round; no causal mask)
            it runs kv steps [kv_lo, kv_hi) only and writes its output and lse to the partial
            arrays' ``slot``. Returns the ring position after its last step (the next tile's
            ``step0``)."""
            kv_head = lax.div(q_head, jnp.array(group, q_head.dtype))
            cta_q_start = q_block * block_q
            if kv_span is None:
                kv_lo = 0
                # The kv steps the producer loads: a pair's CTAs load the same ones (the later
                # q block's, under causal masking), each half of every tile.
                cta_steps, _ = kv_range(cta_q_start - lax.rem(q_block, jnp.int32(pair)) * block_q
                                        if pair > 1 else cta_q_start, pair * block_q)
            else:
                kv_lo, kv_hi, partial_slot = kv_span
                cta_steps = kv_hi - kv_lo
            next_step0 = step0 + cta_steps

            def ring_slot(step):
                return lax.rem(step0 + step, jnp.int32(stages))

            # ----------------------------------------------------------------- producer ---------
            @pl.when(wg == compute_wgs)
            def _producer():
                def issue_k(step, slot):
                    rows = pl.ds((kv_lo + step) * block_kv, block_kv)
                    plgpu.copy_gmem_to_smem(k_ref.at[b, rows, kv_head], k_smem.at[slot],
                                            k_barriers.at[slot], **copy_kwargs)
                    if has_segments:  # the kv ids share the k barrier (2 arrivals)
                        plgpu.copy_gmem_to_smem(seg_ref.at[b, rows], seg_kv_smem.at[slot],
                                                k_barriers.at[slot], **copy_kwargs)

                def issue_v(step, slot):
                    rows = pl.ds((kv_lo + step) * block_kv, block_kv)
                    plgpu.copy_gmem_to_smem(v_ref.at[b, rows, kv_head], v_smem.at[slot],
                                            v_barriers.at[slot], **copy_kwargs)

                run_producer(lambda: ring_producer(
                    copies=((issue_k, k_consumed), (issue_v, v_consumed)), steps=cta_steps,
                    stages=stages, first=step0, drain=not persistent),
                    single_warp=single_warp_producer)

            # ----------------------------------------------------------------- consumers --------
            @pl.when(wg < compute_wgs)
            def _consumer():
                q_start = cta_q_start + wg * wg_rows
                kv_steps, unmasked_steps = kv_range(q_start, wg_rows)
                if kv_span is not None:  # no causal mask: every row runs the CTA's steps
                    kv_steps = cta_steps
                    unmasked_steps = jnp.clip(unmasked_steps - kv_lo, 0, cta_steps)
                q_slot = q_buf * compute_wgs + wg
                wg_q_smem = q_smem.at[q_slot]
                if prefetch is None:
                    load_q(q_head, q_block, b, q_buf)
                else:
                    first, has_next, next_tile = prefetch
                    pl.when(first)(lambda: load_q(q_head, q_block, b, q_buf))
                plgpu.barrier_wait(q_barriers.at[q_slot])
                if prefetch is not None:
                    # The other q tile staged the previous tile's output, whose store this
                    # warpgroup awaited (read-only) at that tile's end.
                    pl.when(has_next)(lambda: load_q(*next_tile, 1 - q_buf))
                row_ids = {}  # cols -> (wg_rows, cols) segment ids of the rows
                if has_segments:
                    q_ids = plgpu.load(seg_q_smem.at[q_slot], layout=plgpu.Layout.WGMMA.reduce(1))
                    row_ids = {cols: lax.broadcast_in_dim(q_ids, (wg_rows, cols), [0])
                               for cols in {block_kv, narrow_cols} - {0}}

                if oneway:
                    pl.when(wg == 1)(lambda: await_turn(turn_set))
                elif pingpong:
                    pl.when(wg == 1)(schedule_sync)

                def wait_k(step):
                    plgpu.barrier_wait(k_barriers.at[ring_slot(step)])

                def next_k_waiter(step):
                    return next_step_wait(step, kv_steps,
                                          lambda slot: plgpu.barrier_wait(k_barriers.at[slot]),
                                          stages=stages, first=step0)

                def kv_step(step, carry, *, masked: bool, cols: int = block_kv,
                            last: bool = False):
                    """One kv step on the first ``cols`` keys of its tile (``narrow_cols`` on a
                    causal diagonal step whose other keys no row of this warpgroup sees);
                    ``last``: statically the warpgroup's last step (no next k to wait for)."""
                    acc, m_i, l_i = carry
                    slot = ring_slot(step)
                    k_tile, v_tile = k_smem.at[slot], v_smem.at[slot]
                    if cols != block_kv:
                        k_tile, v_tile = k_tile.at[pl.ds(0, cols)], v_tile.at[pl.ds(0, cols)]
                    if not early_k_wait:
                        wait_k(step)
                    if has_segments:
                        col_ids = plgpu.load(seg_kv_smem.at[slot, pl.ds(0, cols)],
                                             layout=plgpu.Layout.WGMMA.reduce(0))

                    def allowed_keys():
                        """(wg_rows, cols) bool: which scores of this step the mask keeps."""
                        kv_ids = (kv_lo + step) * block_kv + plgpu.broadcasted_iota(
                            jnp.int32, (wg_rows, cols), 1, layout=plgpu.Layout.WGMMA)
                        if is_causal:
                            # Implies kv_ids < seq_k for every real row (i < seq_q); padded
                            # rows are sliced off.
                            q_ids = q_start + causal_offset + plgpu.broadcasted_iota(
                                jnp.int32, (wg_rows, cols), 0, layout=plgpu.Layout.WGMMA)
                            allowed = kv_ids <= q_ids
                        else:
                            allowed = kv_ids < seq_k
                        if has_segments:
                            allowed = allowed & (row_ids[cols] == lax.broadcast_in_dim(
                                col_ids, (wg_rows, cols), [1]))
                        return allowed

                    def qk_matmul(acc_ref):
                        plgpu.wgmma(acc_ref, wg_q_smem, k_tile.transpose((1, 0)))
                        if oneway:
                            pass_turn(turn_set)
                        elif pingpong:
                            schedule_sync()  # let the other warpgroup issue its wgmma
                        # The mask is built while the wgmma runs (reading acc_ref awaits it).
                        allowed = allowed_keys() if masked else None
                        return acc_ref[...], allowed

                    s, allowed = pl.run_scoped(qk_matmul,
                                               plgpu.ACC((wg_rows, cols), jnp.float32))
                    if has_segments:
                        # The producer's next TMA (async proxy) overwrites the ids this warpgroup
                        # just read with ordinary loads: fence the proxies before releasing.
                        plgpu.commit_smem()
                    release_slot(k_consumed, slot)
                    if masked:
                        s = jnp.where(allowed, s, -jnp.inf)

                    m_new = jnp.maximum(m_i, s.max(axis=1) * score_mult)
                    if masked:
                        # A row that has seen no allowed key keeps m = -inf; subtract 0 instead so
                        # that exp2 gives 0 rather than NaN (-inf - -inf). Unmasked steps come
                        # first and always see finite scores, so they need no such guard.
                        m_sub = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                    else:
                        m_sub = m_new
                    alpha = jnp.exp2(m_i - m_sub)
                    p = jnp.exp2(s * score_mult - lax.broadcast_in_dim(m_sub, s.shape, [0]))
                    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                    l_i = l_i * alpha
                    p16 = p.astype(dtype)
                    l_i = l_i + p.sum(axis=1)
                    if pingpong:
                        acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
                        if not oneway:
                            plgpu.barrier_arrive(schedule_barrier)  # softmax done
                    if not register_p:
                        # P goes through shared memory (the interpreter's wgmma needs SMEM operands).
                        p_tile = (p_smem.at[wg] if cols == block_kv
                                  else p_smem.at[wg, :, pl.ds(0, cols)])
                        p_tile[...] = p16
                        plgpu.commit_smem()  # generic-proxy store -> visible to wgmma (async proxy)
                    plgpu.barrier_wait(v_barriers.at[slot])
                    if oneway:
                        await_turn(turn_set)
                    elif pingpong:
                        plgpu.barrier_wait(schedule_barrier)  # the tensor cores are ours again

                    next_k = next_k_waiter(step) if early_k_wait and not last else None
                    if register_p:
                        acc = matmul_into(acc, p16, v_tile, while_running=next_k)
                    else:
                        acc = acc + matmul(p_tile, v_tile, (wg_rows, head_dim))
                        if next_k is not None:  # same barrier order as on the GPU, for the tests
                            next_k()
                    release_slot(v_consumed, slot)
                    return acc, m_new, l_i

                def last_masked_step(carry):
                    """The warpgroup's last step, masked: narrow (``narrow_cols`` keys) when the
                    keys its last row sees end in the first part of the tile. Only a last step
                    can be narrow (its rows see no key after it), so neither body waits for a
                    next k tile."""
                    step = kv_steps - 1
                    seen = q_start + wg_rows + causal_offset - step * block_kv
                    return lax.cond(
                        seen <= narrow_cols,
                        functools.partial(kv_step, step, masked=True, cols=narrow_cols,
                                          last=True),
                        functools.partial(kv_step, step, masked=True, last=True), carry)

                carry = (zeros_acc((wg_rows, head_dim)), full_rows(wg_rows, -jnp.inf),
                         full_rows(wg_rows, 0.0))
                if early_k_wait:
                    pl.when(kv_steps > 0)(lambda: wait_k(0))
                carry = lax.fori_loop(0, unmasked_steps, functools.partial(kv_step, masked=False),
                                      carry)
                if narrow_cols:
                    carry = lax.fori_loop(unmasked_steps, kv_steps - 1,
                                          functools.partial(kv_step, masked=True), carry)
                    carry = lax.cond(kv_steps > unmasked_steps, last_masked_step, lambda c: c,
                                     carry)
                else:
                    carry = lax.fori_loop(unmasked_steps, kv_steps,
                                          functools.partial(kv_step, masked=True), carry)
                acc, m_i, l_i = carry

                # Causal: the CTA's producer loads the kv steps of its last rows; a warpgroup that
                # needs fewer still releases (and observes) those slots, and keeps the ping-pong.
                kv_flush(kv_steps, cta_steps, stages=stages, offset=step0, k_barriers=k_barriers,
                         v_barriers=v_barriers, k_consumed=k_consumed, v_consumed=v_consumed,
                         between=((lambda: (pass_turn(turn_set), await_turn(turn_set)))
                                  if oneway else
                                  (lambda: (schedule_sync(), schedule_sync())) if pingpong
                                  else None))

                if oneway:
                    pl.when(wg == 0)(lambda: pass_turn(turn_set))
                elif pingpong:
                    pl.when(wg == 0)(schedule_sync)

                # Rows with no allowed key have l == 0 and acc == 0: output 0, lse = -inf.
                empty = l_i == 0.0
                inv_l = 1.0 / jnp.where(empty, 1.0, l_i)
                out = acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])
                wg_q_smem[...] = out.astype(dtype)  # q is no longer needed: reuse its tile
                log2_l = jnp.log2(jnp.where(empty, 1.0, l_i))
                lse_smem.at[wg][...] = jnp.where(empty, -jnp.inf, (m_i + log2_l) * _LN2)
                plgpu.commit_smem()

                def store(out_dst, lse_dst):
                    plgpu.copy_smem_to_gmem(wg_q_smem, out_dst)
                    plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_dst)

                if kv_span is None:
                    rows = pl.ds(q_start, wg_rows)
                    store(out_ref.at[b, rows, q_head], lse_ref.at[b, q_head, rows])
                else:  # a slot holds a pair tile's rows (both CTAs of a pair write one slot)
                    rows = pl.ds(lax.rem(q_block, jnp.int32(pair)) * block_q + wg * wg_rows,
                                 wg_rows)
                    store(part_out_ref.at[partial_slot, rows], part_lse_ref.at[partial_slot, rows])
                # The CTA may exit once the stores have read shared memory; they land regardless.
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

            return next_step0

        if persistent:
            # A CTA's i-th tile starts at the ring position where its (i-1)-th ended (the carry)
            # and uses turn set i % 2.
            # With pairs, the clusters walk the tiles of pairs of q blocks.
            cluster = lax.axis_index("ctas")
            count, pair_tile_at = persistent_tiles(
                cluster, num_ctas=num_clusters, batch=batch, num_heads=num_q_heads,
                num_q_blocks=num_q_blocks // pair, is_causal=is_causal)
            if tail_share:
                # The whole rounds' tiles, then (items count and count + 1) the cluster's one or
                # two pieces of the split last round.
                count = jnp.int32(num_pair_tiles // num_clusters)
                pieces = [tail_segment(cluster, s, num_tiles=num_pair_tiles,
                                       num_ctas=num_clusters, steps=num_kv_blocks,
                                       share=tail_share) for s in (0, 1)]
                num_items = count + sum((hi > lo).astype(jnp.int32) for _, lo, hi in pieces)
            else:
                num_items = count

            def piece_at(i):
                """Item i >= count's piece: its flat pair tile and kv span."""
                piece = i - count
                t, lo, hi = (jnp.where(piece == 0, first, second)
                             for first, second in zip(*pieces))
                return t, (lo, hi, 2 * cluster + piece)

            def tile_at(i):
                coords = pair_tile_at(i)
                if tail_share:  # items from count on are the pieces
                    piece_coords = tile_coords(piece_at(i)[0], num_heads=num_q_heads,
                                               num_q_blocks=num_q_blocks // pair)
                    coords = tuple(jnp.where(i >= count, p, w)
                                   for p, w in zip(piece_coords, coords))
                q_head, q_block, b = coords
                if pair > 1:
                    q_block = q_block * pair + lax.axis_index("pair")
                return q_head, q_block, b

            def run_tile(i, step0, *, is_piece=False):
                # Whole tiles keep static kv bounds: with a traced span for every item, the
                # lengths that split ran 3-6% below the unsplit kernel, where this gains 1-3.6%
                # (H200, twenty-sixth session).
                coords, kv_span = tile_at(i), piece_at(i)[1] if is_piece else None
                parity = lax.rem(i, jnp.int32(2))
                prefetch = (i == 0, i + 1 < num_items, tile_at(i + 1)) if prefetch_q else None
                return tile(*coords, step0, turn_set=parity, q_buf=parity if prefetch_q else 0,
                            prefetch=prefetch, kv_span=kv_span)

            total_steps = lax.fori_loop(0, count, run_tile, jnp.int32(0))
            if tail_share:
                total_steps = lax.fori_loop(count, num_items,
                                            functools.partial(run_tile, is_piece=True),
                                            total_steps)
            pl.when(wg == compute_wgs)(lambda: run_producer(lambda: ring_drain(
                copies=((None, k_consumed), (None, v_consumed)), steps=total_steps,
                stages=stages), single_warp=single_warp_producer))
        else:
            q_block = lax.axis_index("q_blocks")
            if pair > 1:
                q_block = q_block * pair + lax.axis_index("pair")
            if is_causal:
                # Longest rows first, so that the short causal blocks fill the tail of the grid.
                q_block = num_q_blocks - 1 - q_block
            tile(lax.axis_index("heads"), q_block, lax.axis_index("batch"), 0)

    transforms = tile_transforms()
    tx_arrivals = 2 if has_segments else 1  # a second TMA copy (the ids) per barrier
    q_tiles = 2 if prefetch_q else 1  # q tiles per compute warpgroup
    consumed = (functools.partial(plgpu.ClusterBarrier, collective_axes=("pair",))
                if pair > 1 else plgpu.Barrier)
    scratch = dict(
        q_smem=plgpu.SMEM((q_tiles * compute_wgs, wg_rows, head_dim), dtype,
                          transforms=transforms),
        k_smem=plgpu.SMEM((stages, block_kv, head_dim), dtype, transforms=transforms),
        v_smem=plgpu.SMEM((stages, block_kv, head_dim), dtype, transforms=transforms),
        p_smem=(None if register_p else
                plgpu.SMEM((compute_wgs, wg_rows, block_kv), dtype, transforms=transforms)),
        lse_smem=plgpu.SMEM((compute_wgs, wg_rows), jnp.float32),
        seg_q_smem=(plgpu.SMEM((q_tiles * compute_wgs, wg_rows), jnp.int32) if has_segments
                    else None),
        seg_kv_smem=plgpu.SMEM((stages, block_kv), jnp.int32) if has_segments else None,
        q_barriers=plgpu.Barrier(num_arrivals=tx_arrivals, num_barriers=q_tiles * compute_wgs),
        k_barriers=plgpu.Barrier(num_arrivals=tx_arrivals, num_barriers=stages),
        v_barriers=plgpu.Barrier(num_barriers=stages),
        k_consumed=(None if named_slots else
                    consumed(num_arrivals=compute_wgs, num_barriers=stages)),
        v_consumed=(None if named_slots else
                    consumed(num_arrivals=compute_wgs, num_barriers=stages)),
        schedule_barrier=(None if named_barriers else
                          plgpu.Barrier(num_barriers=4 if persistent else 2) if oneway else
                          plgpu.Barrier(num_arrivals=compute_wgs) if pingpong else None),
    )
    inputs = [q_p, k_p, v_p]
    if has_segments:
        # One padded id array serves the q blocks and the kv blocks (Sq == Sk).
        inputs.append(pad_axis(segment_ids, 1, max(seq_q_pad, seq_k_pad)))
    out_type = (jax.ShapeDtypeStruct((batch, seq_q_pad, num_q_heads, head_dim), dtype),
                jax.ShapeDtypeStruct((batch, num_q_heads, seq_q_pad), jnp.float32))
    if tail_share:  # the partial output and lse of each cluster's pieces of the last round
        out_type += (jax.ShapeDtypeStruct((2 * num_clusters, pair * block_q, head_dim), dtype),
                     jax.ShapeDtypeStruct((2 * num_clusters, pair * block_q), jnp.float32))
    out, lse, *partials = plgpu.kernel(
        kernel,
        out_type=out_type,
        scratch_types=scratch,
        grid=(num_ctas // pair,) if persistent else (num_q_heads, num_q_blocks // pair, batch),
        grid_names=("ctas",) if persistent else ("heads", "q_blocks", "batch"),
        **(dict(cluster=(pair,), cluster_names=("pair",)) if pair > 1 else {}),
        num_threads=compute_wgs + 1,
        thread_name="wg",
        # Mosaic reserves 2 KB of SMEM for reductions across warps; this kernel's row reductions
        # stay within a warp, and 3 stages of 128-key tiles need the room.
        compiler_params=plgpu.CompilerParams(
            approx_math=True, unsafe_no_auto_barriers=not auto_barriers,
            **({"reduction_scratch_bytes": 0} if stages > 2 else {})),
    )(*inputs)
    if tail_share:
        out, lse = _merge_split_tail(out, lse, *partials, num_ctas=num_clusters,
                                     num_kv_blocks=num_kv_blocks, share=tail_share,
                                     pair_rows=pair * block_q)
    if seq_q_pad != seq_q:
        out, lse = out[:, :seq_q], lse[:, :, :seq_q]
    return out, lse
