"""The Mosaic GPU (sm90) flash-attention forward against the jnp reference, on the CPU.

The kernel runs under ``plgpu.force_gpu_interpret_mode`` with the interpreter's race detector on:
TMA copies, barriers and wgmma are simulated, and a missing barrier wait or a copy into a slot
still being read is reported as a race (both were planted once and caught). The reference is
``ccajax.attention.reference_attention`` computed in float32 from the same 16-bit inputs, so the
tolerances cover only the kernel's own rounding (P cast to the input dtype before the P v matmul,
output cast). Shapes stay at one or two tiles per axis to keep interpret mode fast.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as gpu_interpret
from jax.experimental.pallas import mosaic_gpu as plgpu

from ccajax.attention import attention_mask, reference_attention
from ccajax.pallas.attention_fwd_sm90 import (SPLIT_TAIL_MIN_SAVED_STEPS, attention_fwd,
                                              persistent_tiles, split_tail_share, tail_segment)
from error_inputs import zero_inputs

# Measured worst max-abs errors in interpret mode over this file's shapes x 3 seeds (inputs
# ~N(0, 1)): bf16 out 7.9e-3, fp16 out 9.5e-4, lse 1e-6. The bounds leave 2.5-3x headroom on out;
# the lse bound is loose on purpose (the GPU build uses approximate exp2/log2, approx_math=True).
OUT_TOL = {"bfloat16": 2e-2, "float16": 3e-3}
LSE_TOL = 1e-4


@pytest.fixture(autouse=True)
def _fresh_interpreter():
    """An exception inside an interpreted kernel leaves global interpreter state behind."""
    yield
    gpu_interpret.reset_gpu_interpret_mode_state()


def _inputs(rng, dtype, batch, seq_q, seq_k, hq, hkv, d):
    shapes = [(batch, seq_q, hq, d), (batch, seq_k, hkv, d), (batch, seq_k, hkv, d)]
    return tuple(jnp.asarray(rng.normal(size=s), dtype) for s in shapes)


def _run(q, k, v, *, detect_races=True, **kwargs):
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams(detect_races=detect_races)):
        out, lse = attention_fwd(q, k, v, **kwargs)
        out, lse = np.asarray(out.astype(jnp.float32)), np.asarray(lse)
    assert not gpu_interpret.get_races().races_found, "interpreter found a data race"
    return out, lse


def _reference_lse(q, k, *, is_causal, scale, segment_ids=None):
    """(B, Hq, Sq) natural-log logsumexp of the scaled, masked fp32 scores."""
    batch, seq_q, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.astype(jnp.float32).reshape(batch, seq_q, hkv, hq // hkv, d)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(jnp.float32)) * scale
    mask = attention_mask(seq_q, k.shape[1], is_causal=is_causal, segment_ids=segment_ids)
    if mask is not None:
        scores = jnp.where(mask, scores, -jnp.inf)
    return np.asarray(jax.nn.logsumexp(scores, axis=-1).reshape(batch, hq, seq_q))


def _check(q, k, v, *, is_causal, scale=None, segment_ids=None, **kwargs):
    out, lse = _run(q, k, v, is_causal=is_causal, scale=scale, segment_ids=segment_ids, **kwargs)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref = np.asarray(reference_attention(*f32, is_causal=is_causal, scale=scale,
                                         segment_ids=segment_ids))
    ref_lse = _reference_lse(q, k, is_causal=is_causal, scale=scale, segment_ids=segment_ids)
    assert out.shape == q.shape and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    assert lse.dtype == np.float32
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    tol = OUT_TOL[jnp.dtype(q.dtype).name]
    np.testing.assert_allclose(out, ref, atol=tol, rtol=tol)
    # -inf rows must match exactly (assert_allclose treats equal infinities as equal).
    np.testing.assert_allclose(lse, ref_lse, atol=LSE_TOL, rtol=LSE_TOL)
    return out, lse


SHAPES = {
    # id: (batch, Sq, Sk, Hq, Hkv, d)
    "gqa2-s100-d64": (1, 100, 100, 2, 1, 64),  # two tiles per axis, ragged tail
    "gqa4-s64-d128": (2, 64, 64, 4, 1, 128),
    "mha-s1-d64": (1, 1, 1, 2, 2, 64),  # length 1: 63 padded rows and keys
    "gqa8-s128-d64": (1, 128, 128, 8, 1, 64),
}


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_matches_reference(rng, shape, dtype, is_causal):
    batch, seq_q, seq_k, hq, hkv, d = shape
    _check(*_inputs(rng, dtype, batch, seq_q, seq_k, hq, hkv, d), is_causal=is_causal)


@pytest.mark.parametrize(
    "seq_q, seq_k, block_q, block_kv, d",
    [(300, 300, 128, 64, 64),  # unmasked causal tiles before the diagonal, 3 q blocks
     (200, 330, 64, 128, 128),  # Sk > Sq: diagonal shifted right, 3 kv blocks
     (128, 256, 128, 128, 128)],  # block multiples: no padding at all
    ids=["s300-bq128-bkv64", "sq200-sk330-bkv128-d128", "sq128-sk256-b128"])
def test_block_sizes_and_unequal_lengths(rng, seq_q, seq_k, block_q, block_kv, d):
    for is_causal in (True, False):
        _check(*_inputs(rng, jnp.bfloat16, 1, seq_q, seq_k, 2, 1, d), is_causal=is_causal,
               block_q=block_q, block_kv=block_kv)


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("options", ["k-wait-not-default", "rendezvous-pingpong"])
def test_other_barrier_orders(rng, options, is_causal):
    """The non-default barrier orders (the race detector checks them too): the next k tile
    awaited at the top of each step without a causal mask, during the P v wgmma with one; the
    two-way ping-pong. Causal with 3 q blocks, so warpgroups with fewer steps than their CTA
    flush the rest."""
    options = (dict(early_k_wait=is_causal) if options == "k-wait-not-default"
               else dict(oneway_pingpong=False))
    _check(*_inputs(rng, jnp.bfloat16, 1, 300, 300, 2, 1, 64), is_causal=is_causal,
           block_kv=64, **options)


@pytest.mark.parametrize("block_kv", [128, 256])
@pytest.mark.parametrize("narrow_diagonal", [True, False], ids=["narrow", "wide"])
def test_causal_diagonal_steps(rng, narrow_diagonal, block_kv):
    """Causal diagonal steps on the half tile their rows see (narrow: warpgroup 0's with
    128-key tiles; with 256-key tiles, both warpgroups' in even q blocks and none in odd ones)
    or on the whole tile, masked; Sk = 384 leaves the last 256-key tile ragged."""
    _check(*_inputs(rng, jnp.bfloat16, 1, 384, 384, 2, 1, 64), is_causal=True,
           block_kv=block_kv, narrow_diagonal=narrow_diagonal)


# prefetch_q=None prefetches only on a GPU (with P in registers): both ways, explicitly.
PERSISTENT_GRIDS = {"3-ctas": dict(num_ctas=3, prefetch_q=False),
                    "1-cta": dict(num_ctas=1, prefetch_q=False),
                    "5-ctas-prefetch-q": dict(num_ctas=5, prefetch_q=True),
                    "1-cta-prefetch-q": dict(num_ctas=1, prefetch_q=True)}
# (grid options, is_causal); the per-tile causal grid is the default of the tests above.
GRIDS = {"per-tile-grid-full": (dict(persistent=False), False),
         **{f"{name}-{mask}": (dict(persistent=True, **grid), mask == "causal")
            for name, grid in PERSISTENT_GRIDS.items() for mask in ("full", "causal")}}


@pytest.mark.parametrize("grid, is_causal", list(GRIDS.values()), ids=list(GRIDS))
def test_grids(rng, grid, is_causal):
    """The per-tile grid, and persistent CTAs with an uneven share of the 2 x 2 x 3 tiles (one
    ring across a CTA's tiles; 1 CTA runs all 12), also loading each next tile's q early (the
    next tile crosses query blocks, heads and batch rows). Causal, Sq > Sk: the tiles differ in
    length (a CTA's ring positions continue across them), and the first q block sees no key
    (0 steps)."""
    _check(*_inputs(rng, jnp.bfloat16, 2, 300, 200, 2, 1, 64), is_causal=is_causal,
           block_kv=64, segment_ids=None, **grid)


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("batch, heads, q_blocks, ctas",
                         [(1, 16, 128, 132), (4, 4, 32, 132), (2, 2, 3, 5), (1, 1, 2, 3)])
def test_persistent_tiles_cover_every_tile_once(batch, heads, q_blocks, ctas, is_causal):
    """Each (head, q block, batch) tile goes to exactly one CTA; causal: longest first, and the
    CTAs' sums of tile lengths (q block + 1) stay within two rounds' spread of q blocks of each
    other (a plain round-robin drifts by one round's spread per round)."""
    seen, loads = [], []
    for cta in range(ctas):
        count, tile_at = persistent_tiles(jnp.int32(cta), num_ctas=ctas, batch=batch,
                                          num_heads=heads, num_q_blocks=q_blocks,
                                          is_causal=is_causal)
        tiles = [tuple(int(x) for x in tile_at(jnp.int32(i))) for i in range(int(count))]
        seen += tiles
        loads.append(sum(q_block + 1 for _, q_block, _ in tiles))
        if is_causal:
            assert [q for _, q, _ in tiles] == sorted((q for _, q, _ in tiles), reverse=True)
    assert sorted(seen) == [(h, q, b) for h in range(heads) for q in range(q_blocks)
                            for b in range(batch)]
    if is_causal:
        spread = -(-ctas // (batch * heads)) + 1  # q blocks one round spans
        assert max(loads) - min(loads) <= 2 * spread, loads


def test_prefetched_q_with_segment_ids(rng):
    """The next tile's query ids travel with its q rows into the other q tile."""
    seg = jnp.asarray(_packed_segment_ids(rng, 2, 192, 70))
    _check(*_inputs(rng, jnp.float16, 2, 192, 192, 2, 2, 64), is_causal=False, block_kv=64,
           segment_ids=seg, num_ctas=2, prefetch_q=True)


@pytest.mark.parametrize("lagging", [0, 1, 2], ids=["wg0-lags", "wg1-lags", "producer-lags"])
def test_persistent_tiles_with_a_lagging_warpgroup(rng, lag_warpgroup, lagging):
    """One CTA runs 2 tiles of 2 kv steps while one warpgroup is slowed: between warpgroup 0's
    last turn hand-over of a tile and its first of the next nothing waits for warpgroup 1, so
    the two tiles' hand-overs must not share barriers (they did once: a CI failure here, and a
    possible hang on a GPU)."""
    lag_warpgroup(lagging)
    _check(*_inputs(rng, jnp.bfloat16, 1, 128, 128, 2, 1, 64), is_causal=False, block_kv=64,
           num_ctas=1, prefetch_q=False)


@pytest.mark.parametrize("lagging", [0, 1, 2], ids=["wg0-lags", "wg1-lags", "producer-lags"])
def test_causal_persistent_tiles_with_a_lagging_warpgroup(rng, lag_warpgroup, lagging):
    """One CTA walks 3 causal tiles of 4, 2 and 0 kv steps while one warpgroup is slowed:
    warpgroup 0 needs fewer steps than its CTA and flushes the rest of each tile's ring
    positions, and the next tile's positions continue from there."""
    lag_warpgroup(lagging)
    _check(*_inputs(rng, jnp.bfloat16, 1, 384, 256, 1, 1, 64), is_causal=True, block_kv=64,
           block_q=128, persistent=True, num_ctas=1)


@pytest.mark.parametrize("lagging", [0, 1], ids=["wg0-lags", "wg1-lags"])
def test_prefetched_q_with_a_lagging_warpgroup(rng, lag_warpgroup, lagging):
    """One CTA walks 4 tiles loading each next q early while one compute warpgroup is slowed:
    a q tile is reloaded only after its output store has read it."""
    lag_warpgroup(lagging)
    _check(*_inputs(rng, jnp.bfloat16, 1, 192, 128, 2, 1, 64), is_causal=False, block_kv=64,
           block_q=128, num_ctas=1, prefetch_q=True)


@pytest.mark.parametrize("tiles, ctas, steps", [(512, 66, 32), (1024, 66, 128), (3, 2, 6),
                                                (4, 5, 6), (7, 3, 1), (64, 66, 8), (12, 4, 9)])
def test_split_tail_covers_every_step_once(tiles, ctas, steps):
    """split_tail: the last round's (tile, kv step) pairs go to exactly one CTA each, in at most
    two pieces per CTA of at most ``share`` steps; the int32 (kernel) and Python (merge) forms
    agree. No split without a partial round or when a share would be a whole tile."""
    share = split_tail_share(tiles, ctas, steps)
    left = tiles % ctas
    if not share:  # no partial round, or no share shorter than a tile covers it
        assert left == 0 or (steps - 1) * ctas < left * steps
        return
    # The shortest share that covers the round, and shorter than a tile.
    assert (share - 1) * ctas < left * steps <= share * ctas and share < steps
    seen = []
    for cta in range(ctas):
        pieces = [tail_segment(cta, s, num_tiles=tiles, num_ctas=ctas, steps=steps, share=share,
                               div=lambda a, b: a // b, minimum=min, maximum=max)
                  for s in (0, 1)]
        traced = [tuple(int(x) for x in tail_segment(jnp.int32(cta), jnp.int32(s),
                                                     num_tiles=tiles, num_ctas=ctas,
                                                     steps=steps, share=share))
                  for s in (0, 1)]
        assert [p for p in pieces if p[2] > p[1]] == [p for p in traced if p[2] > p[1]]
        assert sum(max(hi - lo, 0) for _, lo, hi in pieces) <= share
        seen += [(t, step) for t, lo, hi in pieces for step in range(lo, hi)]
    assert sorted(seen) == [(t, step) for t in range(tiles - left, tiles) for step in range(steps)]


# split_tail in interpret mode (2 CTAs unless num_ctas says otherwise). id: (batch, Sq, Sk, Hq,
# options): 3 tiles over 2 CTAs leave one tile for the last round, each CTA taking 3 of its 6
# kv steps of 64 keys.
SPLIT_TAILS = {
    "3-tiles": (1, 128, 384, 3, dict(prefetch_q=False)),
    "3-tiles-prefetch-q": (1, 128, 384, 3, dict(prefetch_q=True)),
    # Ragged: padded query rows, and the piece holding the end of Sk masks its last step.
    "ragged": (1, 100, 330, 3, dict(prefetch_q=True)),
    # 4 tiles over 5 CTAs: no whole round; every CTA runs 5 steps, most in two pieces.
    "no-whole-round": (2, 128, 384, 2, dict(num_ctas=5, prefetch_q=True)),
    # 4 tiles over 3 CTAs: 2 steps each from the last tile, one piece per CTA.
    "3-ctas": (2, 128, 384, 2, dict(num_ctas=3, prefetch_q=False)),
    # Pairs: 3 pair tiles over 2 clusters; each piece's partial has both CTAs' rows.
    "pairs": (1, 256, 384, 3, dict(num_ctas=4, kv_multicast=True, prefetch_q=True)),
}


@pytest.mark.parametrize("batch, seq_q, seq_k, hq, options", list(SPLIT_TAILS.values()),
                         ids=list(SPLIT_TAILS))
def test_split_tail(rng, batch, seq_q, seq_k, hq, options):
    _check(*_inputs(rng, jnp.bfloat16, batch, seq_q, seq_k, hq, 1, 64), is_causal=False,
           block_kv=64, split_tail=True, **options)


@pytest.mark.parametrize("seq_k, splits",
                         [(384, False), (64 * 2 * SPLIT_TAIL_MIN_SAVED_STEPS, True)],
                         ids=["3-steps-saved", "threshold-saved"])
def test_split_tail_default_needs_enough_saved_steps(seq_k, splits):
    """split_tail=None splits 3 tiles over 2 CTAs only when each CTA's half of the last tile
    saves it SPLIT_TAIL_MIN_SAVED_STEPS kv steps (the merge after the kernel is a scatter)."""
    q, k, v = (jnp.zeros((1, s, 3, 64), jnp.bfloat16) for s in (128, seq_k, seq_k))
    with plgpu.force_gpu_interpret_mode():
        jaxpr = jax.make_jaxpr(lambda q, k, v: attention_fwd(
            q, k, v, is_causal=False, scale=None, block_kv=64))(q, k, v)
    assert ("scatter" in str(jaxpr)) == splits
    assert split_tail_share(512, 66, 32, min_saved=SPLIT_TAIL_MIN_SAVED_STEPS) == 0  # 4k 8:2
    assert split_tail_share(1024, 66, 128, min_saved=SPLIT_TAIL_MIN_SAVED_STEPS) == 66  # 16k


def test_split_tail_with_segment_ids(rng):
    """The rows of the last segment (350-383) see no key in their tile's first piece (keys
    0-191): lse -inf and output 0 there, which must weigh nothing in the merge."""
    ids = jnp.asarray(np.repeat([[0, 1, 2]], [150, 200, 34], axis=1), jnp.int32)
    _check(*_inputs(rng, jnp.float16, 1, 384, 384, 1, 1, 64), is_causal=False, block_kv=64,
           segment_ids=ids, split_tail=True, prefetch_q=True)


@pytest.mark.parametrize("lagging", [0, 1, 2], ids=["wg0-lags", "wg1-lags", "producer-lags"])
def test_split_tail_with_a_lagging_warpgroup(rng, lag_warpgroup, lagging):
    """5 tiles of 4 kv steps over 3 CTAs: CTA 1 walks a whole tile and then two pieces (1 and 2
    steps; ring positions continue, turn sets and q tiles alternate) while one warpgroup is
    slowed."""
    lag_warpgroup(lagging)
    _check(*_inputs(rng, jnp.bfloat16, 1, 128, 256, 5, 1, 64), is_causal=False, block_kv=64,
           num_ctas=3, split_tail=True, prefetch_q=True)


# Pairs of CTAs (kv_multicast=True) in interpret mode. The interpreter runs each cluster's two
# CTAs and their cluster barriers, but a copy with collective_axes fills only the issuing CTA's
# tile, whole: these check the pairs' barrier protocol and the tiles they walk, not the
# multicast (test_compiled_on_gpu does, on a GPU). 64-key tiles: several refills per slot.
PAIRS = {
    # id: (batch, Sq, Sk, Hq, is_causal, kernel options)
    "per-tile-full": (1, 512, 512, 2, False, dict(persistent=False)),  # 2 pairs per head
    # Both CTAs load the later block's kv steps; the earlier block's warpgroups flush the rest.
    "causal": (1, 512, 512, 2, True, {}),
    "causal-sq-gt-sk": (1, 512, 320, 1, True, {}),  # q block 0 sees no key, its pair some
    "causal-sq-lt-sk": (1, 256, 448, 1, True, {}),
    "odd-q-blocks": (1, 384, 384, 1, True, {}),  # 3 q blocks: single CTAs instead
    # One cluster walks the 2 batches x 2 heads x 1 pair of q blocks, one ring across them.
    "persistent-full": (2, 256, 256, 2, False, dict(persistent=True, num_ctas=2,
                                                     prefetch_q=False)),
    "persistent-causal": (2, 512, 384, 1, True, dict(persistent=True, num_ctas=4)),  # 2 clusters
    "persistent-prefetch-q": (2, 256, 256, 2, False, dict(persistent=True, num_ctas=2,
                                                           prefetch_q=True)),
}


@pytest.mark.parametrize("batch, seq_q, seq_k, hq, is_causal, options", list(PAIRS.values()),
                         ids=list(PAIRS))
def test_pairs(rng, batch, seq_q, seq_k, hq, is_causal, options):
    _check(*_inputs(rng, jnp.bfloat16, batch, seq_q, seq_k, hq, 1, 64), is_causal=is_causal,
           block_kv=64, kv_multicast=True, **options)


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_pairs_with_segment_ids(rng, is_causal):
    """The kv tiles' ids travel with k (the same collective copy), the q blocks' with q."""
    ids = jnp.asarray(_packed_segment_ids(rng, 1, 512, max_len=90))
    _check(*_inputs(rng, jnp.bfloat16, 1, 512, 512, 2, 2, 64), is_causal=is_causal,
           block_kv=64, segment_ids=ids, kv_multicast=True)


@pytest.mark.parametrize("lagging", [0, 1, 2], ids=["wg0-lags", "wg1-lags", "producer-lags"])
@pytest.mark.parametrize("options", [{}, dict(persistent=True, num_ctas=2)],
                         ids=["per-tile", "persistent"])
def test_pairs_with_one_ctas_warpgroup_lagging(rng, lag_warpgroup, options, lagging):
    """A warpgroup of the earlier block's CTA is slowed, so that the other CTA's warpgroups run
    as far ahead as the cluster barriers on the shared slots let them (the interpreter fails a
    barrier phase completed twice before a waiter saw it). Causal, so the earlier CTA also
    flushes a step per tile."""
    lag_warpgroup(lagging, block=0)
    _check(*_inputs(rng, jnp.bfloat16, 1, 512, 512, 1, 1, 64), is_causal=True, block_kv=64,
           kv_multicast=True, **options)


def test_causal_rows_without_keys_give_zero_and_minus_inf(rng):
    # Sq > Sk, causal: the first Sq - Sk queries precede every key.
    q, k, v = _inputs(rng, jnp.bfloat16, 1, 130, 70, 2, 1, 64)
    out, lse = _check(q, k, v, is_causal=True)
    assert np.all(out[:, :60] == 0.0)
    assert np.all(lse[:, :, :60] == -np.inf)
    assert np.all(np.isfinite(lse[:, :, 60:]))


def test_explicit_scale(rng):
    _check(*_inputs(rng, jnp.float16, 1, 100, 100, 2, 2, 64), is_causal=True, scale=0.3)


def _packed_segment_ids(rng, batch, seq, max_len):
    """(B, S) int32 ids of consecutive segments with random lengths in [1, max_len]."""
    rows = []
    for _ in range(batch):
        lengths = rng.integers(1, max_len + 1, size=seq)
        rows.append(np.repeat(np.arange(seq), lengths)[:seq])
    return jnp.asarray(np.stack(rows), jnp.int32)


SEGMENT_CASES = {
    # id: (batch, S, Hq, Hkv, d, dtype, kernel kwargs, segment ids kind)
    # Default blocks: 128 query rows = 2 compute warpgroups, one 128-key tile per step.
    "2wg-gqa2-s200": (2, 200, 4, 2, 64, jnp.bfloat16, {}, "packed"),
    # One compute warpgroup, 5 kv steps of 64 keys, d=128.
    "1wg-s300-bkv64-d128": (1, 300, 2, 1, 128, jnp.bfloat16,
                            dict(block_q=64, block_kv=64), "packed"),
    # Ids in no particular order (not contiguous segments), fp16.
    "unsorted-fp16": (1, 130, 2, 2, 64, jnp.float16, dict(block_kv=64), "random"),
}


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", list(SEGMENT_CASES.values()), ids=list(SEGMENT_CASES))
def test_segment_ids_match_reference(rng, case, is_causal):
    batch, seq, hq, hkv, d, dtype, kwargs, kind = case
    q, k, v = _inputs(rng, dtype, batch, seq, seq, hq, hkv, d)
    if kind == "packed":  # several segments per tile, some crossing tile boundaries
        ids = _packed_segment_ids(rng, batch, seq, max_len=40)
    else:
        ids = jnp.asarray(rng.integers(0, 3, size=(batch, seq)), jnp.int32)
    _check(q, k, v, is_causal=is_causal, segment_ids=ids, **kwargs)


def test_segment_ids_first_kv_tiles_fully_masked(rng):
    # Rows of the last segment see no key in the first three 64-key tiles: their running max
    # stays -inf over whole masked steps, which must not produce NaN.
    seq = 256
    ids = jnp.asarray(np.repeat([[0, 1, 2]], [100, 90, 66], axis=1), jnp.int32)
    q, k, v = _inputs(rng, jnp.bfloat16, 1, seq, seq, 2, 1, 64)
    for is_causal in (False, True):
        _check(q, k, v, is_causal=is_causal, segment_ids=ids, block_q=64, block_kv=64)


def test_segment_ids_single_token_segments(rng):
    # Every token its own segment: out is exactly v of its own position, lse its own score.
    seq = 70
    q, k, v = _inputs(rng, jnp.bfloat16, 1, seq, seq, 2, 1, 64)
    ids = jnp.arange(seq, dtype=jnp.int32)[None]
    out, lse = _check(q, k, v, is_causal=False, segment_ids=ids)
    np.testing.assert_allclose(out, np.repeat(np.asarray(v.astype(jnp.float32)), 2, axis=2),
                               atol=1e-6)


def _args(**over):
    shapes = dict(q=(1, 64, 4, 64), k=(1, 64, 2, 64), v=(1, 64, 2, 64))
    dtypes = dict(q=jnp.bfloat16, k=jnp.bfloat16, v=jnp.bfloat16)
    return zero_inputs(shapes, dtypes, over)


@pytest.mark.parametrize("over, match", [
    (dict(q_dtype=jnp.float32, k_dtype=jnp.float32, v_dtype=jnp.float32),
     r"q.dtype must be bfloat16 or float16; got q.dtype=float32"),
    (dict(k_dtype=jnp.float16), r"share one dtype; got q bfloat16, k float16"),
    (dict(q_shape=(1, 64, 4, 96), k_shape=(1, 64, 2, 96), v_shape=(1, 64, 2, 96)),
     r"head dim d must be one of \(64, 128\); got d=96"),
    (dict(k_shape=(1, 64, 3, 64), v_shape=(1, 64, 3, 64)),
     r"Hkv must divide query heads Hq; got Hq=4, Hkv=3"),
    (dict(block_q=96), r"block_q must be a positive multiple of 64 .*; got block_q=96"),
    (dict(block_kv=32), r"block_kv must be a positive multiple of 64 .*; got block_kv=32"),
    (dict(v_shape=(1, 32, 2, 64)), r"k and v must have the same shape"),
    (dict(k_shape=(2, 64, 2, 64), v_shape=(2, 64, 2, 64)), r"share the batch B"),
    (dict(q_shape=(64, 4, 64)), r"q must be 4-D \(B, S, H, d\); got q.shape=\(64, 4, 64\)"),
    (dict(q_shape=(1, 64, 4, 128)), r"share the head dim d; got q d=128, k d=64"),
    (dict(scale=-1.0), r"scale must be a finite positive float or None; got scale=-1.0"),
    (dict(k_shape=(1, 32, 2, 64), v_shape=(1, 32, 2, 64), segment_ids=jnp.zeros((1, 64), jnp.int32)),
     r"segment_ids need Sq == Sk; got Sq=64, Sk=32"),
    (dict(segment_ids=jnp.zeros((1, 63), jnp.int32)),
     r"segment_ids must have shape \(B, S\) = \(1, 64\); got segment_ids.shape=\(1, 63\)"),
    (dict(segment_ids=jnp.zeros((1, 64), jnp.float32)),
     r"segment_ids must be an integer array; got segment_ids.dtype=float32"),
    (dict(compute_wgs=3), r"compute_wgs must be 1 or 2; got compute_wgs=3"),
    (dict(num_ctas=0), r"num_ctas must be a positive int; got num_ctas=0"),
    (dict(single_warp_producer="yes"), r"single_warp_producer must be True, False or None; "
                                       r"got single_warp_producer='yes'"),
    (dict(named_barriers=True, oneway_pingpong=False),
     r"named_barriers=True needs oneway_pingpong=True"),
    (dict(kv_multicast=True, persistent=True, num_ctas=7),
     r"kv_multicast=True on the persistent grid launches CTAs in pairs: num_ctas must be "
     r"even; got num_ctas=7"),
    (dict(kv_multicast=True, persistent=True, prefetch_q=True, is_causal=True),
     r"kv_multicast=True with prefetch_q=True on the causal persistent grid is not supported"),
    (dict(split_tail=True, is_causal=True),
     r"split_tail=True splits the last round of the non-causal persistent grid; got "
     r"is_causal=True \(use split_tail=None or False\)"),
    (dict(split_tail=True, persistent=False),
     r"split_tail=True splits the last round of the persistent grid; got persistent=False "
     r"\(use persistent=True or None\)"),
], ids=["f32", "mixed-dtypes", "d96", "hkv-not-dividing", "block_q96", "block_kv32",
        "k-v-shapes", "batch", "q-3d", "q-k-head-dim", "negative-scale",
        "segments-sq-ne-sk", "segments-shape", "segments-float", "compute-wgs3",
        "num-ctas0", "single-warp-producer-yes", "named-rendezvous",
        "multicast-odd-ctas", "multicast-causal-prefetch", "split-tail-causal",
        "split-tail-per-tile-grid"])
def test_errors(over, match):
    arrays, kwargs = _args(**over)
    with pytest.raises(ValueError, match=match):
        attention_fwd(*arrays, **kwargs)


@pytest.mark.parametrize("option", ["register_p", "named_barriers"])
def test_gpu_only_options_refused_in_interpret_mode(option):
    arrays, kwargs = _args()
    with pytest.raises(ValueError, match=rf"{option}=True is not supported in Mosaic GPU "
                                         r"interpret mode"):
        _run(*arrays, **kwargs, **{option: True})


def test_lse_is_natural_log():
    # One key per query: lse is exactly the scaled score, out is exactly v.
    q = jnp.full((1, 1, 1, 64), 0.5, jnp.bfloat16)
    k = jnp.full((1, 1, 1, 64), 0.25, jnp.bfloat16)
    v = jnp.full((1, 1, 1, 64), 3.0, jnp.bfloat16)
    out, lse = _run(q, k, v, is_causal=False, scale=1.0)
    np.testing.assert_allclose(lse, np.full((1, 1, 1), 64 * 0.125), rtol=1e-5)
    np.testing.assert_allclose(out, np.full((1, 1, 1, 64), 3.0))
    assert math.isclose(float(lse[0, 0, 0]), 8.0, rel_tol=1e-5)


GPU_CONFIGS = {
    # The default: 2 compute warpgroups + a TMA producer, P fed to wgmma from registers.
    "default": {},
    # The interpretable path (P through shared memory), compiled.
    "smem-p": dict(register_p=False),
    "no-pingpong": dict(pingpong=False),
    "1wg-b64": dict(block_q=64, block_kv=64, compute_wgs=1),
    "3-stages-bkv64": dict(kv_stages=3, block_kv=64),
    # Fits only without Mosaic's 2 KB reduction scratch (232568 B with it > 227 KiB), and not
    # with segment ids (233592 B).
    "3-stages": dict(kv_stages=3),
    # The next k tile awaited at the top of each step (the causal default) or during P v.
    "late-k-wait": dict(early_k_wait=False),
    "early-k-wait": dict(early_k_wait=True),
    # Causal diagonal steps on the whole tile (the default narrows wg 0's to its first half).
    "wide-diagonal": dict(narrow_diagonal=False),
    "rendezvous-pingpong": dict(oneway_pingpong=False),  # on mbarriers (named: one-way only)
    "per-tile-grid": dict(persistent=False),
    # 8 CTAs over 128 tiles: each CTA walks 16 tiles, alternating its turn barriers; with 132
    # CTAs this shape gives every CTA at most one tile.
    "persistent-8-ctas": dict(persistent=True, num_ctas=8, prefetch_q=False),
    "persistent-8-ctas-prefetch-q": dict(persistent=True, num_ctas=8, prefetch_q=True),
    # The defaults use hardware named barriers and no automatic warpgroup barriers; the
    # mbarrier path (the interpreter's) compiled, with and without them.
    "mbarriers": dict(named_barriers=False),
    "mbarriers-8-ctas": dict(named_barriers=False, persistent=True, num_ctas=8),
    "mbarriers-auto-barriers": dict(named_barriers=False, auto_barriers=True),
    "auto-barriers": dict(auto_barriers=True),
    # The producer on its whole warpgroup (the default runs it on one warp).
    "warpgroup-producer": dict(single_warp_producer=False),
    "warpgroup-producer-mbarriers-8-ctas": dict(single_warp_producer=False, named_barriers=False,
                                                persistent=True, num_ctas=8),
    # Pairs of CTAs (8 q blocks: 4 clusters per head) multicasting each k/v tile; causal pairs
    # differ by one kv step, which the earlier block's warpgroups flush.
    "kv-multicast": dict(kv_multicast=True),
    # Unpaired CTAs (the default pairs them on a GPU when not causal).
    "no-kv-multicast": dict(kv_multicast=False),
    "no-kv-multicast-8-ctas": dict(kv_multicast=False, persistent=True, num_ctas=8),
    "kv-multicast-mbarriers": dict(kv_multicast=True, named_barriers=False),
    "kv-multicast-warpgroup-producer-b64": dict(kv_multicast=True, single_warp_producer=False,
                                                block_q=64, block_kv=64),
    # 4 clusters over 64 pair tiles (2 batches x 8 heads x 4 q-block pairs).
    "kv-multicast-persistent-8-ctas": dict(kv_multicast=True, persistent=True, num_ctas=8,
                                           prefetch_q=False),
    "kv-multicast-persistent-prefetch-q-8-ctas": dict(kv_multicast=True, persistent=True,
                                                      prefetch_q=True, num_ctas=8),
    # split_tail (refused with a causal mask): 64 pair tiles over 5 clusters leave 4 for the
    # last round, 7 of their 8 kv steps per cluster; 128 unpaired tiles over 6 CTAs leave 2,
    # 3 steps per CTA.
    "split-tail-10-ctas": dict(persistent=True, num_ctas=10, split_tail=True),
    "split-tail-unpaired-6-ctas": dict(persistent=True, num_ctas=6, kv_multicast=False,
                                       prefetch_q=False, split_tail=True),
}


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="compiles the kernel for a real Hopper GPU; CPU runs use interpret mode above")
@pytest.mark.parametrize("segments", [False, True], ids=["nosegs", "segs"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("config", list(GPU_CONFIGS.values()), ids=list(GPU_CONFIGS))
def test_compiled_on_gpu(rng, config, is_causal, segments):
    # Register-resident P (the default on a GPU) cannot run in the interpreter: this is its test.
    q, k, v = _inputs(rng, jnp.bfloat16, 2, 1000, 1000, 8, 2, 128)
    ids = _packed_segment_ids(rng, 2, 1000, max_len=300) if segments else None
    if segments and config == GPU_CONFIGS["3-stages"]:
        with pytest.raises(ValueError, match="exceeds available shared memory"):
            attention_fwd(q, k, v, is_causal=is_causal, scale=None, segment_ids=ids, **config)
        return
    if is_causal and config.get("split_tail"):
        with pytest.raises(ValueError, match="split_tail=True splits the last round"):
            attention_fwd(q, k, v, is_causal=is_causal, scale=None, segment_ids=ids, **config)
        return
    if is_causal and config == GPU_CONFIGS["kv-multicast-persistent-prefetch-q-8-ctas"]:
        with pytest.raises(ValueError, match="is not supported"):  # it stalled
            attention_fwd(q, k, v, is_causal=is_causal, scale=None, segment_ids=ids, **config)
        return
    _check_compiled(q, k, v, is_causal, ids, config)


def _check_compiled(q, k, v, is_causal, ids, config):
    out, lse = attention_fwd(q, k, v, is_causal=is_causal, scale=None, segment_ids=ids, **config)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref = np.asarray(reference_attention(*f32, is_causal=is_causal, segment_ids=ids))
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), ref, atol=2e-2, rtol=2e-2)
    np.testing.assert_allclose(np.asarray(lse), _reference_lse(q, k, is_causal=is_causal,
                                                              scale=128 ** -0.5, segment_ids=ids),
                               atol=LSE_TOL, rtol=LSE_TOL)


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="compiles the kernel for a real Hopper GPU; CPU runs use interpret mode above")
@pytest.mark.parametrize("kv_multicast", [None, False], ids=["default", "unpaired"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seq_q, seq_k", [(512, 1000), (1000, 600), (300, 2048)])
def test_compiled_on_gpu_unequal_lengths(rng, seq_q, seq_k, is_causal, kv_multicast):
    # Sq != Sk moves the causal diagonal (Sq > Sk: the first rows see no key); the pairs of
    # q blocks then load the later block's kv steps. 300 rows make 3 q blocks: no pairs.
    q, k, v = _inputs(rng, jnp.bfloat16, 2, seq_q, seq_k, 8, 2, 128)
    _check_compiled(q, k, v, is_causal, None, dict(kv_multicast=kv_multicast))


@pytest.mark.parametrize("options", [{}, dict(persistent=True, prefetch_q=True),
                                     dict(kv_multicast=True),
                                     dict(kv_multicast=True, persistent=True)],
                         ids=["default", "persistent-prefetch-q", "kv-multicast",
                              "kv-multicast-persistent"])
@pytest.mark.parametrize("segments", [False, True], ids=["nosegs", "segs"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_lowers_for_the_gpu(is_causal, segments, options):
    """Mosaic's lowering of the GPU build (register P) on a CPU-only jaxlib: it rejects what the
    interpreter accepts, e.g. a constant loop bound inside a wgmma's `run_state` body (static
    kv step counts: no causal mask)."""
    _lower_for_the_gpu(is_causal, segments, register_p=True, **options)


@pytest.mark.parametrize("segments", [False, True], ids=["nosegs", "segs"])
def test_split_tail_lowers_for_the_gpu(segments):
    """The split last round's pieces (traced kv spans, partial outputs) through Mosaic's
    lowering: 64 pair tiles over 5 clusters."""
    _lower_for_the_gpu(False, segments, register_p=True, num_ctas=10, split_tail=True)


def _lower_for_the_gpu(is_causal, segments, **options):
    """Lowers ``attention_fwd`` for a GPU (B=2, S=1000, 8:2, d=128) on a CPU-only jaxlib; the
    lowering also checks the kernel's shared memory against the 227 KiB limit."""
    q = jax.ShapeDtypeStruct((2, 1000, 8, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 1000, 2, 128), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((2, 1000), jnp.int32) if segments else None

    def forward(q, k, v, ids):
        return attention_fwd(q, k, v, is_causal=is_causal, scale=None, segment_ids=ids,
                             **options)

    jax.jit(forward).trace(q, k, k, ids).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("options", [dict(register_p=False), dict(kv_stages=3),
                                     dict(kv_stages=3, block_kv=64)],
                         ids=["smem-p", "3-stages", "3-stages-bkv64"])
def test_default_prefetch_fits_shared_memory(options):
    """prefetch_q=None loads a second q tile (persistent grid, no causal mask) only where it fits:
    not beside a P tile in shared memory or a 3-stage ring of 128-key tiles, yes beside a
    3-stage ring of 64-key tiles (with prefetch_q=True the first two exceed 227 KiB)."""
    _lower_for_the_gpu(False, False, **options)
