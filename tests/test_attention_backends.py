"""One harness that every attention backend runs: forward and all three gradients against the
float32 jnp reference, on fresh random inputs.

On the CPU (CI) it runs "xla" and "mosaic" (our Pallas Mosaic GPU kernel, in GPU interpret mode) at
small shapes; on a GPU it runs "xla", "mosaic" and "cudnn" at realistic shapes (S up to 32k):
`PYTHONPATH=. python3 -m pytest tests/test_attention_backends.py` on the device.
"""

import dataclasses
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from ccajax.attention import dot_product_attention, reference_attention

ON_GPU = jax.default_backend() == "gpu"
BACKENDS = ["xla", "mosaic"] + (
    ["cudnn", "mosaic_fwd_cudnn_bwd", "mosaic_deterministic"] if ON_GPU else [])
# Max error relative to the reference's largest magnitude. The reference is computed in float32
# from the same 16-bit inputs, so this bounds the backend's own rounding: P is rounded to the
# input dtype before the PV matmul (measured worst: bf16 ~8e-3 of |out|max at d=64).
OUT_TOL = {jnp.bfloat16: 2e-2, jnp.float16: 4e-3}
GRAD_TOL = {jnp.bfloat16: 5e-2, jnp.float16: 1e-2}


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    seq_q: int
    seq_k: int
    hq: int
    hkv: int
    d: int
    causal: bool
    dtype: type = jnp.bfloat16
    segments: bool = False

    def __str__(self):
        return (f"B{self.batch}-Sq{self.seq_q}-Sk{self.seq_k}-{self.hq}:{self.hkv}-d{self.d}-"
                f"{'causal' if self.causal else 'full'}-{jnp.dtype(self.dtype).name}"
                f"{'-seg' if self.segments else ''}")


CPU_CASES = [
    Case(1, 100, 100, 4, 2, 64, True), Case(1, 100, 100, 4, 2, 64, False),
    Case(1, 64, 64, 8, 1, 64, True, jnp.float16), Case(2, 70, 70, 2, 2, 128, False),
    Case(1, 40, 100, 2, 1, 64, False), Case(1, 1, 1, 2, 2, 64, True, jnp.float16),
    Case(1, 100, 60, 2, 2, 64, True),  # the first 40 queries see no key
    Case(1, 100, 100, 4, 2, 64, True, segments=True), Case(1, 100, 100, 2, 2, 64, False, segments=True),
]
GPU_CASES = [
    Case(1, 4096, 4096, 16, 16, 128, True), Case(2, 4095, 4095, 8, 2, 128, False),
    Case(1, 16384, 16384, 4, 4, 128, True, jnp.float16), Case(1, 32768, 32768, 2, 1, 128, True),
    Case(1, 8192, 8192, 8, 2, 64, False), Case(1, 2048, 1000, 8, 2, 128, True),
    Case(2, 4096, 4096, 8, 2, 128, True, segments=True),
]


def supports(backend: str, case: Case) -> str | None:
    """Why ``backend`` cannot run ``case``, or None when it can."""
    if backend == "cudnn" and (case.segments or case.seq_q != case.seq_k or case.seq_q % 2):
        return "cuDNN path takes no segments, Sq != Sk, or odd lengths (backward)"
    if backend == "mosaic_fwd_cudnn_bwd" and (
            case.segments or case.seq_q % 2 or case.seq_k % 2
            or (case.causal and case.seq_q != case.seq_k)):
        return "cuDNN's backward takes no segments, odd lengths, or causal Sq != Sk"
    return None


def attend(backend, q, k, v, **kwargs):
    interpret = backend == "mosaic" and not ON_GPU
    return dot_product_attention(q, k, v, implementation=backend, interpret=interpret, **kwargs)


def make_inputs(case: Case, seed: int):
    rng = np.random.default_rng(seed)
    shapes = [(case.batch, case.seq_q, case.hq, case.d)] + [(case.batch, case.seq_k, case.hkv, case.d)] * 2
    q, k, v = (jnp.asarray(rng.normal(size=s), case.dtype) for s in shapes)
    d_out = jnp.asarray(rng.normal(size=shapes[0]), jnp.float32)
    segment_ids = None
    if case.segments:  # segments of random lengths, several per tile
        segment_ids = jnp.asarray(np.sort(rng.integers(0, case.seq_q // 16 + 2, (case.batch, case.seq_q)), 1),
                                  jnp.int32)
    return (q, k, v), d_out, segment_ids


def forward_and_grads(fn, args, d_out):
    out, vjp = jax.vjp(fn, *args)
    return (out, *vjp(d_out.astype(out.dtype)))


def rel_err(got, want):
    """max |got - want| / max(|want|max, 1): a gradient that is exactly 0 (dq, dk when every row
    sees a single key) is compared on the inputs' unit scale rather than on its own zero scale."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return np.abs(got - want).max() / max(np.abs(want).max(), 1.0)


@functools.lru_cache(maxsize=None)  # every backend of a case compares against one reference
def reference_outputs(case: Case):
    """(out, dq, dk, dv) of the float32 reference from the case's 16-bit inputs, as numpy."""
    args, d_out, seg = make_inputs(case, seed=zlib.crc32(str(case).encode()))
    kw = dict(is_causal=case.causal, segment_ids=seg)
    args32 = [a.astype(jnp.float32) for a in args]
    want = jax.jit(lambda *a: forward_and_grads(lambda *x: reference_attention(*x, **kw), a, d_out))(*args32)
    return tuple(np.asarray(w) for w in want)


@pytest.mark.parametrize("case", GPU_CASES if ON_GPU else CPU_CASES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_and_gradients_match_reference(backend, case, request):
    if reason := supports(backend, case):
        pytest.skip(reason)
    args, d_out, seg = make_inputs(case, seed=zlib.crc32(str(case).encode()))
    kw = dict(is_causal=case.causal, segment_ids=seg)
    got = jax.jit(lambda *a: forward_and_grads(lambda *x: attend(backend, *x, **kw), a, d_out))(*args)
    want = reference_outputs(case)
    for name, g, w, tol in zip(("out", "dq", "dk", "dv"), got, want,
                               (OUT_TOL[case.dtype],) + (GRAD_TOL[case.dtype],) * 3):
        assert g.dtype == case.dtype, name
        assert np.isfinite(np.asarray(g, np.float32)).all(), name
        assert rel_err(g, w) <= tol, f"{name}: {rel_err(g, w):.2e} > {tol}"
    if case.causal and case.seq_q > case.seq_k:  # rows with no key: exactly 0
        np.testing.assert_array_equal(np.asarray(got[0][:, : case.seq_q - case.seq_k], np.float32), 0.0)
    if backend in ("cudnn", "mosaic_fwd_cudnn_bwd") or (backend == "mosaic" and ON_GPU):
        # cuDNN's flash backward and ours on a GPU (fused dq) sum dq with atomics: not
        # bit-reproducible. That is what "mosaic_deterministic" is for.
        return
    # Determinism of xla, mosaic_deterministic and (interpreted) mosaic: the same bits again.
    again = jax.jit(lambda *a: forward_and_grads(lambda *x: attend(backend, *x, **kw), a, d_out))(*args)
    for g, h in zip(got, again):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(h, np.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_over_a_leading_axis(backend):
    case = Case(1, 64, 64, 2, 1, 64, True)
    (q, k, v), _, _ = make_inputs(dataclasses.replace(case, batch=3), seed=1)
    q, k, v = (a[:, None] for a in (q, k, v))  # (3, 1, S, H, d): vmap over the leading 3
    got = jax.vmap(lambda q, k, v: attend(backend, q, k, v, is_causal=True))(q, k, v)
    want = reference_attention(q[:, 0].astype(jnp.float32), k[:, 0].astype(jnp.float32),
                               v[:, 0].astype(jnp.float32), is_causal=True)
    assert rel_err(got[:, 0], want) <= OUT_TOL[jnp.bfloat16]


@pytest.mark.parametrize("backend", BACKENDS)
def test_inside_shard_map(backend):
    # One-device mesh: the CPU interpreter of Mosaic GPU kernels fails when two CPU devices run it
    # at once (a barrier-accounting assertion inside jax's interpreter), so multi-device runs of
    # the mosaic backend need several GPUs.
    mesh = jax.make_mesh((1,), ("data",))
    (q, k, v), d_out, _ = make_inputs(Case(2, 64, 64, 4, 2, 64, True), seed=2)
    q, k, v = (jax.device_put(a, NamedSharding(mesh, PartitionSpec("data"))) for a in (q, k, v))
    spec = PartitionSpec("data")
    fn = jax.shard_map(lambda q, k, v: attend(backend, q, k, v, is_causal=True), mesh=mesh,
                       in_specs=(spec,) * 3, out_specs=spec)
    got = jax.jit(lambda *a: forward_and_grads(fn, a, d_out))(q, k, v)
    want = forward_and_grads(lambda *x: reference_attention(*x, is_causal=True),
                             [a.astype(jnp.float32) for a in (q, k, v)], d_out)
    for g, w in zip(got, want):
        assert rel_err(g, w) <= GRAD_TOL[jnp.bfloat16]


@pytest.mark.parametrize("kwargs, match", [
    (dict(interpret=True, implementation="xla"), "interpret=True runs the mosaic kernel; got implementation='xla'"),
    (dict(implementation="mosaic", segment_ids=jnp.zeros((1, 65), jnp.int32)), r"segment_ids must be \(B, S\)"),
])
def test_mosaic_dispatch_errors(kwargs, match):
    (q, k, v), _, _ = make_inputs(Case(1, 64, 64, 2, 2, 64, True), seed=3)
    with pytest.raises(ValueError, match=match):
        dot_product_attention(q, k, v, **kwargs)


def test_mosaic_rejects_float32():
    (q, k, v), _, _ = make_inputs(Case(1, 64, 64, 2, 2, 64, True, jnp.float32), seed=4)
    with pytest.raises(ValueError, match="q.dtype must be bfloat16 or float16; got q.dtype=float32"):
        dot_product_attention(q, k, v, implementation="mosaic", interpret=not ON_GPU)


@pytest.mark.parametrize("kwargs, match", [
    (dict(segment_ids=jnp.zeros((1, 64), jnp.int32)), "segment_ids are not passed to cuDNN"),
    (dict(seq_q=63, seq_k=63), "even sequence lengths; got Sq=63, Sk=63"),
    (dict(seq_q=32), "agree only for Sq == Sk; got Sq=32, Sk=64"),
    (dict(interpret=True), "interpret=True runs the mosaic kernel"),
])
def test_cudnn_backward_errors(kwargs, match):
    """The hybrid's limits are named before anything runs (also on the CPU)."""
    seq_q, seq_k = kwargs.pop("seq_q", 64), kwargs.pop("seq_k", 64)
    (q, _, _), _, _ = make_inputs(Case(1, seq_q, seq_q, 2, 2, 64, True), seed=5)
    (_, k, v), _, _ = make_inputs(Case(1, seq_k, seq_k, 2, 2, 64, True), seed=6)
    with pytest.raises(ValueError, match=match):
        dot_product_attention(q, k, v, is_causal=True, implementation="mosaic_fwd_cudnn_bwd",
                              **kwargs)


def test_mosaic_backward_name_is_checked():
    from ccajax.pallas.attention import mosaic_attention
    (q, k, v), _, _ = make_inputs(Case(1, 64, 64, 2, 2, 64, True), seed=7)
    with pytest.raises(ValueError, match=r"backward must be one of \('mosaic', 'mosaic_deterministic', 'cudnn'\); got "
                                         r"backward='triton'"):
        mosaic_attention(q, k, v, backward="triton")


@pytest.mark.parametrize("shape, causal, segments, head_dim, want", [
    ((1, 16384, 8, 2), True, False, 128, "mosaic"),  # causal GQA > 8k: cuDNN's bwd until 12-02
    ((2, 8192, 8, 2), True, False, 128, "mosaic"),
    ((1, 16384, 16, 16), True, False, 128, "mosaic"),
    ((1, 32768, 8, 2), False, False, 128, "mosaic"),
    ((1, 16384, 8, 2), True, True, 128, "mosaic"),  # segments
    ((2, 8191, 8, 2), False, False, 128, "mosaic"),  # odd length
    ((1, 4096, 8, 2), True, False, 96, "cudnn"),  # d=96: not ours; cuDNN takes it
    ((1, 4095, 8, 2), False, False, 96, "xla"),  # ... but not an odd length
])
def test_default_on_hopper(monkeypatch, shape, causal, segments, head_dim, want):
    """The measured rule of `default_implementation`, with a Hopper GPU pretended on any host."""
    from ccajax import attention
    monkeypatch.setattr(attention.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(attention, "on_hopper", lambda: True)
    b, s, hq, hkv = shape
    q = jax.ShapeDtypeStruct((b, s, hq, head_dim), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((b, s, hkv, head_dim), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((b, s), jnp.int32) if segments else None
    assert attention.default_implementation(q, k, k, seg, causal) == want
