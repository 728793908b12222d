"""The Mosaic GPU (sm90) CCA prologue kernel against its jnp reference, on the CPU.

The kernel runs under ``plgpu.force_gpu_interpret_mode`` (with the race detector on for one
case). The reference is `ccajax.cca_fused.fused_prologue` (equal to `ccajax.cca`'s functions, see test_cca_fused.py) in
float32 from the same 16-bit inputs and weights, so the tolerance covers only the kernel's own
rounding: conv0 rounded to bf16 before the conv1 matmul (as the plain path does) and the bf16
output. Outputs have unit-scale elements (rows of norm sqrt(d), times temperatures ~1): measured
worst max-abs error 1.0e-2 in bf16; bound 3e-2. A wrong halo, mask or tap gives O(1) errors.
Shapes: 2-3 row blocks of 64 (block boundaries, the first tokens, a tail), batch 1 or 2.

Gradients (the two backward kernels, `prologue_sm90.prologue_bwd`) are compared with `jax.grad` of
the same float32 reference, per leaf against the leaf's largest reference element: measured
worst 0.41% in bf16 and 0.07% in fp16 (dy and du are 16-bit in the kernels); bounds 2e-2
and 4e-3. A lost halo row or mask gives errors of the size of the gradient on those rows.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as gpu_interpret
from jax.experimental.pallas import mosaic_gpu as plgpu

from ccajax import CCAConfig, cca_qkv, init_cca_params
from ccajax._common import cast_tree
from ccajax.cca_fused import cca_qkv_fused, fused_prologue
from ccajax.pallas import prologue_sm90
from ccajax.pallas.prologue_sm90 import mosaic_prologue, prologue_fwd
from ccajax.rope import contiguous_segments, default_positions

TOL = 3e-2
GRAD_TOL = {jnp.bfloat16: 2e-2, jnp.float16: 4e-3}  # of each gradient leaf's max-abs
CONFIGS = {
    # id: (CCAConfig kwargs, S, segmented, B)
    "ccgqa-zaya1-segments": (dict(num_q_heads=4, num_kv_heads=1, rope_fraction=0.5,
                                  rope_theta=5e6), 130, True, 1),
    "cca-full-rope-exp-temp": (dict(num_q_heads=2, num_kv_heads=2, temperature_form="exp"),
                               128, False, 1),
    "no-mean-no-temp": (dict(num_q_heads=2, num_kv_heads=1, use_qk_mean=False,
                             use_key_temperature=False), 100, True, 2),
}


@pytest.fixture(autouse=True)
def _fresh_interpreter():
    """An exception inside an interpreted kernel leaves global interpreter state behind."""
    yield
    gpu_interpret.reset_gpu_interpret_mode_state()


def _segment_positions(rng, batch, seq):
    """(B, S) positions within segments: runs of random length, one starting right at a block
    boundary (row 64)."""
    ids = np.cumsum(rng.random((batch, seq)) < 0.05, axis=1)
    ids[:, 64:] += 1
    return default_positions(contiguous_segments(jnp.asarray(ids, jnp.int32)), batch, seq)


def _setup(rng, kwargs, seq, segmented, batch, head_dim=64, dtype=jnp.bfloat16):
    cfg = CCAConfig(d_model=4 * head_dim, head_dim=head_dim, **kwargs)
    params = init_cca_params(jax.random.key(int(rng.integers(1 << 30))), cfg)
    # Non-trivial biases and temperatures, rounded to dtype (the layer casts params before use).
    params = cast_tree(jax.tree.map(
        lambda a: a + 0.3 * jnp.asarray(rng.normal(size=a.shape), a.dtype), params), dtype)
    heads = cfg.num_q_heads + 2 * cfg.num_kv_heads  # q, k and the value heads, as the layer's p
    p = jnp.asarray(rng.normal(size=(batch, seq, heads, head_dim)), dtype)
    positions = (_segment_positions(rng, batch, seq) if segmented
                 else default_positions(None, batch, seq))
    return cfg, params, p, positions


def _args(cfg, params, p, positions):
    temp = params["qk_norm"]["temp"] if cfg.use_key_temperature else None
    return p, params["conv"], temp, positions, positions


def _reference(cfg, p, conv, temp, positions, segment_positions):
    f32 = lambda t: jax.tree.map(lambda a: a.astype(jnp.float32), t)  # noqa: E731
    u = p[:, :, :cfg.num_q_heads + cfg.num_kv_heads]
    return fused_prologue(f32(conv), f32(temp), f32(u), cfg, positions, segment_positions)


@pytest.mark.parametrize("name", CONFIGS)
def test_forward_matches_reference(rng, name):
    kwargs, seq, segmented, batch = CONFIGS[name]
    cfg, params, p, positions = _setup(rng, kwargs, seq, segmented, batch)
    args = _args(cfg, params, p, positions)
    # The race detector costs ~1.6x; the most complex case (G=4, segments, tail) runs with it.
    races = name == "ccgqa-zaya1-segments"
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams(detect_races=races)):
        q, k = mosaic_prologue(*args, cfg)
        q, k = np.asarray(q.astype(jnp.float32)), np.asarray(k.astype(jnp.float32))
    assert not gpu_interpret.get_races().races_found, "interpreter found a data race"
    ref_q, ref_k = _reference(cfg, *args)
    assert q.shape == ref_q.shape and k.shape == ref_k.shape
    np.testing.assert_allclose(q, ref_q, atol=TOL, rtol=TOL)
    np.testing.assert_allclose(k, ref_k, atol=TOL, rtol=TOL)
    # The first tokens and block-boundary rows, where the halo matters, explicitly.
    for rows in (slice(0, 3), slice(63, 66)):
        np.testing.assert_allclose(k[:, rows], ref_k[:, rows], atol=TOL, rtol=TOL)


@pytest.mark.parametrize("blocks_per_cta,compute_wgs", [(1, 1), (3, 1), (1, 2), (2, 2), (3, 2)])
def test_forward_row_blocks_per_cta(rng, blocks_per_cta, compute_wgs):
    """S=130 is 3 row blocks: one per CTA (no prefetch; with 2 warpgroups one idles), 2 + 1 (a
    CTA with the remainder), or all 3 in one CTA (each next block's rows copied while the
    current one is computed; with 2 warpgroups, blocks 0 and 2 in one, 1 in the other). With
    the race detector: a prefetch that overwrote rows, partners or the output staging tile
    still being read would show."""
    kwargs, seq, segmented, batch = CONFIGS["ccgqa-zaya1-segments"]
    cfg, params, p, positions = _setup(rng, kwargs, seq, segmented, batch)
    args = _args(cfg, params, p, positions)
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams(detect_races=True)):
        got = prologue_fwd(*args, cfg, blocks_per_cta=blocks_per_cta, compute_wgs=compute_wgs)
        got = [np.asarray(x.astype(jnp.float32)) for x in got]
    assert not gpu_interpret.get_races().races_found, "interpreter found a data race"
    for x, want in zip(got, _reference(cfg, *args)):
        np.testing.assert_allclose(x, want, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("kernel,blocks_per_cta,compute_wgs",
                         [("dy", 2, 1), ("dy", 3, 1), ("du", 3, 1), ("du", 1, 2), ("du", 2, 2),
                          ("du", 3, 2)])
def test_backward_kernel_row_walks_agree(rng, kernel, blocks_per_cta, compute_wgs):
    """The dy and du kernels walking S=130's 3 row blocks like the forward (see above), against
    one block per CTA, with the race detector: the dy kernel with its one warpgroup (each next
    block's cotangent copied while the current one is computed); the du kernel also with 2,
    where G=4 makes a block's 4 partner tiles pass through one slot that then stages the
    output."""
    kwargs, seq, _, batch = CONFIGS["ccgqa-zaya1-segments"]
    cfg, params, p, positions = _setup(rng, kwargs, seq, True, batch)
    p, conv, temp, positions, segpos = _args(cfg, params, p, positions)
    inputs = prologue_sm90._kernel_inputs(p, conv, temp, positions, segpos, cfg)
    heads, seq_pad, d = cfg.num_q_heads + cfg.num_kv_heads, inputs[0].shape[1], cfg.head_dim
    if kernel == "dy":
        fn = prologue_sm90._dy_kernel
        args = (inputs, *[jnp.asarray(rng.normal(size=(batch, seq_pad, h, d)), p.dtype)
                          for h in (cfg.num_q_heads, cfg.num_kv_heads)], cfg)
    else:
        fn = prologue_sm90._du_kernel
        dy = jnp.asarray(rng.normal(size=(heads, batch, seq_pad, d)), p.dtype)
        args = (dy, prologue_sm90.next_segment_positions(inputs[2]), inputs[3], inputs[4], cfg)
    walk = dict(compute_wgs=compute_wgs) if kernel == "du" else {}
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams(detect_races=True)):
        want = fn(*args, blocks_per_cta=1, **walk)
        got = fn(*args, blocks_per_cta=blocks_per_cta, **walk)
    assert not gpu_interpret.get_races().races_found, "interpreter found a data race"
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(x.astype(jnp.float32)),
                                      np.asarray(y.astype(jnp.float32)))


def test_far_positions_reduce_the_rope_angle(rng):
    """Positions in the hundreds of thousands (angles up to ~3e5 rad): the kernel reduces each
    float32 angle modulo 2 pi before its approximate sin/cos; a reduction off by a bit of
    2 pi's low part would show as O(1) errors in the rotated columns."""
    cfg, params, p, positions = _setup(rng, dict(num_q_heads=2, num_kv_heads=1), 64, False, 1)
    p_, conv, temp, _, segment_positions = _args(cfg, params, p, positions)
    args = (p_, conv, temp, positions + 300_000, segment_positions)
    with plgpu.force_gpu_interpret_mode():
        q, k = mosaic_prologue(*args, cfg)
    for got, want in zip((q, k), _reference(cfg, *args)):
        np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), want, atol=TOL, rtol=TOL)


def _loss_and_grads(prologue, args, cts):
    """jit(value_and_grad) of sum <prologue(p, conv, temp), cts> wrt p, conv and temp."""
    p, conv, temp, positions, segment_positions = args

    def loss(p, conv, temp):
        out = prologue(p, conv, temp, positions, segment_positions)
        return sum(jnp.vdot(a.astype(jnp.float32), c) for a, c in zip(out, cts))

    return jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(p, conv, temp)


def _check_gradients(rng, cfg, args, tol, kernel_context=None, **kernel_kwargs):
    """The kernel's gradients of every input and parameter against `jax.grad` of the float32
    reference, each leaf within ``tol`` of its largest reference element."""
    batch, seq = args[0].shape[:2]
    cts = [jnp.asarray(rng.normal(size=(batch, seq, h, cfg.head_dim)), jnp.float32)
           for h in (cfg.num_q_heads, cfg.num_kv_heads)]
    kernel = lambda *a: mosaic_prologue(*a, cfg, **kernel_kwargs)  # noqa: E731
    if kernel_context is None:
        got = _loss_and_grads(kernel, args, cts)
    else:
        with kernel_context:
            got = _loss_and_grads(kernel, args, cts)
    f32 = jax.tree.map(lambda a: a.astype(jnp.float32), args[:3])
    want = _loss_and_grads(lambda *a: _reference(cfg, *a), (*f32, *args[3:]), cts)
    ct_norm = float(jnp.sqrt(sum(jnp.vdot(c, c) for c in cts)))
    assert abs(float(got[0]) - float(want[0])) <= 1e-2 * ct_norm
    got_leaves = jax.tree_util.tree_leaves_with_path(got[1])
    assert len(got_leaves) == len(jax.tree.leaves(want[1])) == 5 + (args[2] is not None)
    for (path, g), w in zip(got_leaves, jax.tree.leaves(want[1])):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        scale = np.abs(w).max()
        err = np.abs(g - w).max()
        assert scale > 0 and err <= tol * scale, (jax.tree_util.keystr(path), err, scale)
    # The value heads of p are not read: their gradient is exactly zero.
    assert not np.asarray(got[1][0][:, :, cfg.num_q_heads + cfg.num_kv_heads:]).any()


@pytest.mark.parametrize("name,dtype", [(name, jnp.bfloat16) for name in CONFIGS]
                         + [("cca-full-rope-exp-temp", jnp.float16)])
def test_gradients_match_reference(rng, name, dtype):
    """The backward kernels (dy with the recompute, du with the look-ahead halo) on 2-3 row
    blocks: block boundaries, the first tokens, tails, segments, G = 4, 1, 2, partial/full RoPE,
    linear/exp/no temperature, no q-k mean, B = 2."""
    kwargs, seq, segmented, batch = CONFIGS[name]
    cfg, params, p, positions = _setup(rng, kwargs, seq, segmented, batch, dtype=dtype)
    args = _args(cfg, params, p, positions)
    if name == "ccgqa-zaya1-segments":  # the most complex case runs with the race detector
        races = plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams(detect_races=True))
        _check_gradients(rng, cfg, args, GRAD_TOL[dtype], kernel_context=races)
        assert not gpu_interpret.get_races().races_found, "interpreter found a data race"
    else:
        _check_gradients(rng, cfg, args, GRAD_TOL[dtype], interpret=True)


def test_layer_gradients_match_reference(rng):
    """q, k, v of the fused path with the kernel prologue (bf16) against the plain `cca_qkv` in
    float32: values and the gradients of every param and of x."""
    kwargs, _, segmented, _ = CONFIGS["ccgqa-zaya1-segments"]
    cfg, params, _, _ = _setup(rng, kwargs, 70, segmented, 1)
    x = jnp.asarray(rng.normal(size=(1, 70, cfg.d_model)), jnp.bfloat16)
    seg = contiguous_segments(jnp.asarray(np.repeat([[0, 1]], [40, 30], axis=1), jnp.int32))
    positions = default_positions(seg, 1, 70)
    cts = [jnp.asarray(rng.normal(size=(1, 70, h, 64)), jnp.float32)
           for h in (cfg.num_q_heads, cfg.num_kv_heads, cfg.num_kv_heads)]

    def loss(qkv, params, x):
        return sum(jnp.vdot(a.astype(jnp.float32), c) for a, c in zip(qkv(params, x), cts))

    kernel = lambda p, x: cca_qkv_fused(p, x, cfg, positions, seg, prologue="mosaic",  # noqa: E731
                                        interpret=True)
    ref = lambda p, x: cca_qkv(p, x, cfg, positions, seg)  # noqa: E731
    params = {g: v for g, v in params.items() if g != "out"}  # q, k, v do not use wo
    got = jax.jit(jax.value_and_grad(lambda *a: loss(kernel, *a), (0, 1)))(params, x)
    f32 = jax.tree.map(lambda a: a.astype(jnp.float32), (params, x))
    want = jax.jit(jax.value_and_grad(lambda *a: loss(ref, *a), (0, 1)))(*f32)
    ct_norm = float(jnp.sqrt(sum(jnp.vdot(c, c) for c in cts)))
    assert abs(float(got[0]) - float(want[0])) <= 1e-2 * ct_norm
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got[1]), jax.tree.leaves(want[1])):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        scale = np.abs(w).max()
        assert scale > 0 and np.abs(g - w).max() <= 3e-2 * scale, jax.tree_util.keystr(path)


def test_bad_inputs_name_the_problem(rng):
    cfg, params, p, positions = _setup(rng, dict(num_q_heads=2, num_kv_heads=2), 64, False, 1)
    args = _args(cfg, params, p, positions)
    with pytest.raises(ValueError, match="dtype float32"):
        mosaic_prologue(p.astype(jnp.float32), *args[1:], cfg)
    with pytest.raises(ValueError, match=r"conv True \(3, 2\)"):
        mosaic_prologue(*args, CCAConfig(256, 2, 2, 64, conv_kernel_sizes=(3, 2)))
    with pytest.raises(ValueError, match="8 rotary dims"):
        mosaic_prologue(*args, CCAConfig(256, 2, 2, 64, rope_fraction=0.125))
    with pytest.raises(ValueError, match="p must be"):
        mosaic_prologue(p[:, :, :3], *args[1:], cfg)
    with pytest.raises(ValueError, match="blocks_per_cta must be a positive int; got "
                                         "blocks_per_cta=0"):
        prologue_fwd(*args, cfg, blocks_per_cta=0)
    with pytest.raises(ValueError, match="compute_wgs must be 1 or 2; got compute_wgs=3"):
        prologue_fwd(*args, cfg, compute_wgs=3)


# (blocks_per_cta, ring stages, batch, race detector): the whole sequence per CTA (the default
# in interpret mode) and batch 1 checks the kernel's barriers; chunks and batches add several
# CTAs into one head's sums, which the detector would report (the interpreter reads, adds and
# writes back in place of the GPU's reduce-add).
LAG_CASES = [(None, 2, 1, True), (None, 1, 1, True), (1, 2, 2, False), (2, 3, 2, False)]


@pytest.mark.parametrize("blocks_per_cta,stages,batch,races", LAG_CASES)
def test_lag_kernel_matches_reference(rng, blocks_per_cta, stages, batch, races):
    """The lag products kernel against `lag_products_reference` (float32 sums of 16-bit
    products; only the order of the adds differs): S=130 with segments, one starting at row 64,
    and the padded tail; Hp > H so that the value heads of p must be skipped. Losing a lag's
    mask or shift changes the sums by the size of the dropped rows' products."""
    heads, d, seq = 3, 64, 130
    seq_pad = prologue_sm90.round_up(seq, 64)
    p = jnp.asarray(rng.normal(size=(batch, seq, heads + 1, d)), jnp.bfloat16)
    segpos = _segment_positions(rng, batch, seq)
    dy = jnp.asarray(rng.normal(size=(heads, batch, seq_pad, d)), jnp.bfloat16)
    dy = dy.at[:, :, seq:].set(0)  # the dy kernel's padded rows
    want = prologue_sm90.lag_products_reference(p[:, :, :heads], dy[:, :, :seq], segpos)
    segpos_next = prologue_sm90.next_segment_positions(prologue_sm90.pad_axis(segpos, 1, seq_pad))
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams(detect_races=races)):
        got = prologue_sm90._lag_kernel(prologue_sm90.pad_axis(p, 1, seq_pad), dy, segpos_next,
                                        blocks_per_cta=blocks_per_cta, stages=stages)
    assert not (races and gpu_interpret.get_races().races_found), "interpreter found a data race"
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5,
                               atol=1e-5 * float(np.abs(want).max()))


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="compiles the kernel for a real Hopper GPU; CPU runs use interpret mode above")
@pytest.mark.parametrize("head_dim", [128, 64])
@pytest.mark.parametrize("name", ["ccgqa-zaya1-segments", "cca-full-rope-exp-temp"])
def test_compiled_on_gpu(rng, name, head_dim):
    """Realistic shapes (8:2 / 8:8 heads, d=128 or 64, S=1000 with a tail) through the GPU build,
    values and gradients (the backward kernels); layouts are only checked by the real compiler."""
    kwargs, _, segmented, _ = CONFIGS[name]
    kwargs = dict(kwargs, num_q_heads=8, num_kv_heads=2 if "ccgqa" in name else 8)
    cfg, params, p, positions = _setup(rng, kwargs, 1000, segmented, 2, head_dim=head_dim)
    args = _args(cfg, params, p, positions)
    q, k = jax.jit(lambda *a: mosaic_prologue(*a, cfg))(*args)
    ref_q, ref_k = _reference(cfg, *args)
    np.testing.assert_allclose(np.asarray(q.astype(jnp.float32)), ref_q, atol=TOL, rtol=TOL)
    np.testing.assert_allclose(np.asarray(k.astype(jnp.float32)), ref_k, atol=TOL, rtol=TOL)
    _check_gradients(rng, cfg, args, GRAD_TOL[jnp.bfloat16])


@pytest.mark.parametrize("heads,head_dim", [((8, 2), 128), ((8, 8), 128), ((4, 4), 128),
                                            ((16, 16), 64)], ids=["8:2", "8:8", "4:4", "16:16-d64"])
def test_lowers_for_the_gpu(heads, head_dim):
    """Mosaic's lowering and layout inference of the forward and both backward kernels, at S=16k,
    run on a CPU-only jaxlib: this catches what the interpreter accepts and the GPU compiler
    rejects (a TMA into a swizzled tile from an unaligned row once did). PTX, registers and the
    SMEM limit are only checked by test_compiled_on_gpu."""
    seq = 16384
    cfg = CCAConfig(d_model=2048, num_q_heads=heads[0], num_kv_heads=heads[1], head_dim=head_dim,
                    rope_fraction=0.5)
    params = cast_tree(init_cca_params(jax.random.key(0), cfg), jnp.bfloat16)
    p = jax.ShapeDtypeStruct((1, seq, heads[0] + 2 * heads[1], head_dim), jnp.bfloat16)
    positions = default_positions(None, 1, seq)

    def loss(p, conv, temp):
        q, k = mosaic_prologue(p, conv, temp, positions, positions, cfg)
        return q.astype(jnp.float32).sum() + k.astype(jnp.float32).sum()

    fn = jax.jit(jax.grad(loss, (0, 1, 2)))
    fn.trace(p, params["conv"], params["qk_norm"]["temp"]).lower(lowering_platforms=("cuda",))
