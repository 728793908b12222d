"""In-kernel pieces the sm90 attention kernels share: the k/v producer ring, the causal step
ranges, operand helpers for wgmma. Used inside ``plgpu.kernel`` bodies only.

The forward kernel and the dQ kernel have the same outer structure: one CTA per (query head,
query block), compute warpgroups of 64 query rows each, and one producer warpgroup that streams
the kv tiles of the CTA's kv head through a ``stages``-slot shared-memory ring
(``ring_producer``, which the dK/dV kernel also uses for its q-side ring).
"""

from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp
from jax import lax
from jax._src import config as jax_config
from jax.experimental import pallas as pl
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.pallas import mosaic_gpu as plgpu

from ccajax.pallas.sm90_common import varies_over_a_mesh_axis

# Rows of one compute warpgroup's tile: wgmma's M is 64 per warpgroup.
WG_ROWS = 64


def in_interpret_mode() -> bool:
    """True under ``plgpu.force_gpu_interpret_mode`` (read when the kernel is traced)."""
    return jax_config.pallas_tpu_interpret_mode_context_manager.value is not None


def check_interpret_threads(threads_per_kernel: int) -> None:
    """Interpret mode runs each warpgroup of a kernel as its own XLA CPU computation, and a
    warpgroup blocked on a barrier holds a worker of XLA's CPU thread pool while it waits; the
    calling computation holds one more. With fewer workers than ``threads_per_kernel + 1`` a
    warpgroup never starts and the others wait for it forever (seen on a 2-core machine, jax
    0.11.2). The pool has ``$NPROC`` workers if set (read when JAX starts), else one per core.
    """
    nproc = os.environ.get("NPROC")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = int(nproc) if nproc and nproc.isdigit() else cores
    if threads_per_kernel > 1 and workers < threads_per_kernel + 1:
        raise RuntimeError(
            f"Mosaic GPU interpret mode of this kernel needs {threads_per_kernel + 1} workers in "
            f"XLA's CPU thread pool (one per warpgroup and one for the caller), but it has "
            f"{workers} here ({'NPROC' if nproc else 'CPU cores'}); it would deadlock. Set the "
            f"environment variable NPROC=8 before JAX starts (tests/conftest.py does).")


# Hardware named barriers of a CTA: 16, of which Mosaic GPU takes id 0 (the CTA-wide barrier)
# and ids 1-3 (one per warpgroup, for its own warpgroup-wide syncs).
FIRST_NAMED_BARRIER = 4
NUM_NAMED_BARRIERS = 16
THREADS_PER_WG = 128
THREADS_PER_WARP = 32


def named_barrier(op: str, barrier_id, num_threads: int) -> None:
    """``bar.sync`` (``op="sync"``: wait until ``num_threads`` threads, the caller's included,
    have reached hardware barrier ``barrier_id``) or ``bar.arrive`` (``op="arrive"``: count the
    calling warpgroup in and go on). ``barrier_id``: a static int or an int32 scalar.

    A single instruction per warp, against an mbarrier arrive that Mosaic issues from each of
    the warpgroup's 128 threads. GPU only: the interpreter has no named barriers. A named
    barrier has no phases: a second round of arrivals before the waiters' sync would complete
    it early, so every use must strictly alternate arrivals and syncs.
    """
    if op not in ("sync", "arrive"):
        raise ValueError(f"op must be 'sync' or 'arrive'; got op={op!r}")
    if isinstance(barrier_id, int):
        @plgpu.inline_mgpu()
        def _static(_):
            mgpu.utils.inline_ptx(f"bar.{op} {barrier_id}, {num_threads};",
                                  has_side_effects=True)
        _static()
    else:
        @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WG_SPLAT,))
        def _dynamic(_, barrier_id):
            mgpu.utils.inline_ptx(f"bar.{op} $0, {num_threads};", barrier_id.registers[()],
                                  has_side_effects=True)
        _dynamic(jnp.asarray(barrier_id, jnp.int32))


def run_producer(fn, *, single_warp: bool) -> None:
    """Run the producer warpgroup's part ``fn()`` (TMA copies and slot waits) on warp 0 only
    (``single_warp``; the other three warps skip it, so each of its instructions issues once
    per CTA instead of once per warp, as in tokamax's sm90 kernel), or on all four warps.
    jax 0.11.2's ``plgpu.warp_map`` refuses refs of arrays that vary over a manual mesh axis
    (inside `jax.shard_map`): see `resolve_single_warp_producer`."""
    if not single_warp:
        fn()
        return

    @plgpu.warp_map
    def _per_warp(warp):
        pl.when(warp == 0)(fn)


def resolve_single_warp_producer(single_warp_producer, *inputs) -> bool:
    """The kernels' ``single_warp_producer`` option: None means True, except for inputs that
    vary over a manual mesh axis (batch-sharded, inside `jax.shard_map`), whose refs jax
    0.11.2's ``plgpu.warp_map`` refuses ("mpmd_map does not support Refs with varying manual
    axis types"): there the producer runs on its whole warpgroup (about 1-2% slower)."""
    if single_warp_producer not in (None, True, False):
        raise ValueError(f"single_warp_producer must be True, False or None; got "
                         f"single_warp_producer={single_warp_producer!r}")
    if single_warp_producer is None:
        return not varies_over_a_mesh_axis(*inputs)
    return single_warp_producer


@dataclasses.dataclass(frozen=True)
class NamedSlots:
    """The "consumed" signals of a ring on hardware named barriers (GPU only), in place of an
    mbarrier array: slot s is barrier ``first + s``; the compute warpgroups arrive, the
    producer (a warpgroup, or one warp of it: `run_producer`) syncs, ``num_threads`` threads
    in all. The ring keeps arrivals and syncs alternating (a slot is consumed again only after
    the producer's sync let it be refilled); the last arrivals of a kernel have no sync, and
    there are no phases to drain."""
    first: int
    num_threads: int


def release_slot(consumed, slot) -> None:
    """A compute warpgroup is done with ``slot``: arrive on ``consumed`` (an mbarrier array
    Ref or `NamedSlots`)."""
    if isinstance(consumed, NamedSlots):
        named_barrier("arrive", consumed.first + slot, consumed.num_threads)
    else:
        plgpu.barrier_arrive(consumed.at[slot])


def await_release(consumed, slot) -> None:
    """The producer waits until every compute warpgroup has released ``slot``."""
    if isinstance(consumed, NamedSlots):
        named_barrier("sync", consumed.first + slot, consumed.num_threads)
    else:
        plgpu.barrier_wait(consumed.at[slot])


def tile_transforms():
    """16-bit tiles for wgmma: (8, 64) tiling + 128-byte swizzle (64 elements x 2 bytes)."""
    return (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def f32_tile_transforms():
    """fp32 tiles for staging WGMMA-layout results: (8, 32) tiling + 128-byte swizzle. In plain
    rows of 64 or 128 floats, the layout's stores would all hit the same banks."""
    return (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))


def add_to_gmem(value, staged, dst_ref, loaded, interpret: bool) -> None:
    """``dst_ref += value`` (float32, WGMMA layout) by a TMA reduce-add staged in ``staged``
    (SMEM shaped like dst_ref, `f32_tile_transforms`): any CTA may add to any window, in an order
    that varies. The caller waits for the store (`plgpu.wait_smem_to_gmem`) before reusing
    ``staged``. The interpreter has no TMA reduction: there it reads (on the barrier
    ``loaded``), adds and writes back, the same sum since its CTAs run one after another (its
    race detector reports this when two CTAs add to one window)."""
    if interpret:
        plgpu.copy_gmem_to_smem(dst_ref, staged, loaded)
        plgpu.barrier_wait(loaded)
        staged[...] = staged[...] + value
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(staged, dst_ref)
    else:
        staged[...] = value
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(staged, dst_ref, reduction_op="add")


def row_vec(ref):
    """A (rows,) SMEM vector as one value per accumulator row (WGMMA row layout)."""
    return plgpu.load(ref, layout=plgpu.Layout.WGMMA.reduce(1))


def col_vec(ref):
    """A (cols,) SMEM vector as one value per accumulator column (WGMMA column layout)."""
    return plgpu.load(ref, layout=plgpu.Layout.WGMMA.reduce(0))


def matmul(a, b_ref, shape):
    """a @ b into a fresh zero fp32 accumulator of ``shape``.

    No ``pl.run_state``: the interpreter cannot run it, so the result is returned and added to
    a register accumulator by the caller. ``a`` is an SMEM ref (or a 16-bit WGMMA-layout value
    on the GPU); ``b_ref`` an SMEM ref, possibly a transposed view.
    """
    def body(acc_ref):
        plgpu.wgmma(acc_ref, a, b_ref)
        return acc_ref[...]
    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def matmul_into(acc, a, b_ref, while_running=None):
    """acc += a @ b in place (GPU only: ``pl.run_state`` is not interpretable).

    ``while_running()``, if given, runs after the wgmma is issued and before its result is
    awaited (e.g. a barrier wait that the tensor cores then hide)."""
    def body(acc_ref):
        plgpu.wgmma(acc_ref, a, b_ref)
        if while_running is not None:
            while_running()
    return pl.run_state(body)(plgpu.ACC.init(acc))


def zeros_acc(shape):
    """A zero fp32 (rows, cols) register accumulator in WGMMA layout."""
    return plgpu.layout_cast(jnp.full(shape, 0.0, jnp.float32), plgpu.Layout.WGMMA)


def full_rows(rows: int, value: float):
    """A (rows,) fp32 per-row statistic (softmax max or sum) in the WGMMA row layout."""
    return plgpu.layout_cast(jnp.full((rows,), value, jnp.float32), plgpu.Layout.WGMMA.reduce(1))


class KVSteps:
    """Which kv tiles a run of query rows visits, for a (causal or full) mask.

    Query i sees key j iff ``j <= i + causal_offset`` (causal_offset = Sk - Sq: the last query
    meets the last key). The last, partial kv tile and every tile under segment ids need a mask.
    """

    def __init__(self, *, is_causal: bool, causal_offset: int, seq_k: int, block_kv: int,
                 num_kv_blocks: int, has_segments: bool):
        self.is_causal, self.causal_offset, self.seq_k = is_causal, causal_offset, seq_k
        self.block_kv, self.num_kv_blocks, self.has_segments = block_kv, num_kv_blocks, has_segments

    def __call__(self, q_start, rows):
        """(kv steps, leading steps that need no mask) for query rows [q_start, q_start + rows)."""
        block_kv = self.block_kv
        if self.is_causal:
            # Exclusive end of the keys the last row may see.
            kv_end = jnp.clip(q_start + rows + self.causal_offset, 0, self.seq_k)
            steps = lax.div(kv_end + (block_kv - 1), jnp.int32(block_kv))
            # Tile j needs no causal mask when its last key <= the first row's limit.
            unmasked = lax.div(jnp.maximum(q_start + self.causal_offset + 1, 0),
                               jnp.int32(block_kv))
        else:
            steps = jnp.int32(self.num_kv_blocks)
            unmasked = jnp.int32(self.num_kv_blocks)
        if self.seq_k % block_kv:
            unmasked = jnp.minimum(unmasked, self.num_kv_blocks - 1)
        if self.has_segments:
            unmasked = jnp.int32(0)  # every tile compares segment ids
        return steps, jnp.minimum(unmasked, steps)


def next_step_wait(step, steps, wait, *, stages, first=0):
    """A thunk that runs ``wait(slot)`` for step + 1's slot of a ``stages``-slot ring (whose step
    i sits at position ``first + i``) when ``step + 1 < steps``: the early wait for the next
    step's operands, issued while a wgmma runs (`matmul_into`'s ``while_running``). Build it
    outside the wgmma's `run_state` body: a concrete ``steps`` (a constant array) captured inside
    that body reaches Mosaic's lowering as a bare literal, which fails there."""
    has_next = step + 1 < steps
    next_slot = lax.rem(first + step + 1, jnp.int32(stages))
    return lambda: pl.when(has_next)(lambda: wait(next_slot))


def ring_producer(*, copies, steps, stages, first=0, drain=True):
    """Producer warpgroup: fill ``stages``-slot rings for ``steps`` steps.

    ``copies`` is a sequence of ``(issue, consumed)``: ``issue(step, slot)`` starts the TMA
    copies of one ring for one step, and before it refills a slot every compute warpgroup must
    have released it on ``consumed`` (an mbarrier array or `NamedSlots`, see `release_slot`).
    The forward and dQ kernels stream k and v as two rings (released separately); the dK/dV
    kernel streams its q-side operands as one.
    Step i takes ring position ``first + i`` (a persistent CTA keeps one ring across its
    tiles); with ``drain`` the last consumed phases are observed at the end (see `ring_drain`).
    """
    if isinstance(first, int) and first == 0:
        for i in range(stages):
            @pl.when(i < steps)
            def _():
                for issue, _ in copies:
                    issue(i, i)

        @pl.loop(stages, jnp.maximum(steps, stages))
        def _refill(step):
            slot = lax.rem(step, jnp.int32(stages))
            for issue, consumed in copies:
                await_release(consumed, slot)  # step - stages is done with the slot
                issue(step, slot)
    else:
        @pl.loop(0, steps)
        def _steps(step):
            position = first + step
            slot = lax.rem(position, jnp.int32(stages))
            for issue, consumed in copies:
                pl.when(position >= stages)(lambda: await_release(consumed, slot))
                issue(step, slot)

    if drain:
        ring_drain(copies=copies, steps=first + steps, stages=stages)


def ring_drain(*, copies, steps, stages):
    """Observe the last consumed phases of rings that ran ``steps`` positions in all: free on
    the GPU, and the interpreter requires a thread that waits on a barrier to wait on every
    phase. Named barriers (`NamedSlots`) have no phases: nothing to do for them."""
    barriers = [consumed for _, consumed in copies if not isinstance(consumed, NamedSlots)]
    if not barriers:
        return

    @pl.loop(jnp.maximum(steps - stages, 0), steps)
    def _drain(step):
        slot = lax.rem(step, jnp.int32(stages))
        for consumed in barriers:
            plgpu.barrier_wait(consumed.at[slot])


def kv_flush(first, last, *, stages, k_barriers, v_barriers, k_consumed, v_consumed,
             between=None, offset=0):
    """A compute warpgroup that needs fewer kv steps than its CTA's producer loads (causal) still
    observes and releases the slots of steps [first, last). ``between`` runs after each step's
    k release (the forward's ping-pong hand-over)."""
    @pl.loop(first, last)
    def _flush(step):
        slot = lax.rem(offset + step, jnp.int32(stages))
        plgpu.barrier_wait(k_barriers.at[slot])
        release_slot(k_consumed, slot)
        plgpu.barrier_wait(v_barriers.at[slot])
        release_slot(v_consumed, slot)
        if between is not None:
            between()
