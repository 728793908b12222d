"""ccajax's CCA / CCGQA layer against an independent, loop-based float64 reference of the spec.

The reference (`ref_cca_sequence`) is written straight from ``shared/CCA_SPEC.md`` in plain numpy
with explicit Python loops over time, heads, conv taps and keys; it imports nothing from ccajax.
The two convolutions follow the spec's literal recipe: pad u once on the left with
(t0-1)+(t1-1) zero rows, conv0 depthwise valid, conv1 per-head valid (so conv1's taps that reach
before the first token see conv0's bias b0).

Tolerances. The reference runs in float64; ccajax is run under ``jax.jit`` in float64 (inside
``jax.enable_x64(True)``) and compared with ``rtol = F64_RTOL = 1e-10`` and ``atol = F64_RTOL *
max|y_ref|`` (observed agreement is ~1e-15). A float32 run is checked at ``F32_RTOL = 2e-4``
(same scaling; observed ~3e-7). Gradients: jax.grad in float64 against central finite differences
of the float64 reference (eps 1e-5, relative tolerance 1e-7), plus ``jax.test_util.check_grads``.
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from ccajax.attention import dot_product_attention, reference_attention
from ccajax.cca import cca_attention
from ccajax.config import CCAConfig

F64_RTOL = 1e-10  # float64 ccajax vs float64 reference
F32_RTOL = 2e-4   # float32 ccajax vs float64 reference
GRAD_RTOL = 1e-7  # float64 jax.grad vs central differences (eps 1e-5) of the float64 reference
BATCH = 2


# ----------------------------------------------------------------------------------------------
# Independent reference (plain numpy, float64, explicit loops). Nothing from ccajax.
# ----------------------------------------------------------------------------------------------

def ref_cca_sequence(p: dict, x: np.ndarray, cfg, positions) -> np.ndarray:
    """One sequence (one segment) through the CCA/CCGQA layer.

    Args: p: numpy float64 params (ccajax layout); x: (S, E); cfg: CCAConfig (read as plain
      fields only); positions: (S,) ints for RoPE.
    Returns: y (S, E) float64.
    """
    x = np.asarray(x, np.float64)
    S, E = x.shape
    Hq, Hkv, d = cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim
    G = Hq // Hkv
    H = Hq + Hkv
    C = H * d
    t0, t1 = cfg.conv_kernel_sizes

    # 1. compression: q (S, Hq, d), k (S, Hkv, d)
    q = np.zeros((S, Hq, d))
    k = np.zeros((S, Hkv, d))
    for t in range(S):
        q[t] = (x[t] @ p["compress"]["wq"]).reshape(Hq, d)
        k[t] = (x[t] @ p["compress"]["wk"]).reshape(Hkv, d)

    # 2. q-k mean, before the convolutions
    mq = np.zeros((S, Hq, d))
    mk = np.zeros((S, Hkv, d))
    if cfg.use_qk_mean:
        for t in range(S):
            for h in range(Hq):
                mq[t, h] = (q[t, h] + k[t, h // G]) / 2.0
            for g in range(Hkv):
                acc = np.zeros(d)
                for h in range(g * G, (g + 1) * G):
                    acc = acc + mq[t, h]
                mk[t, g] = acc / G

    # 3. convolutional mixing on u = concat(q, k)
    if cfg.use_conv:
        w0, b0 = p["conv"]["w0"], p["conv"]["b0"]
        w1, b1 = p["conv"]["w1"], p["conv"]["b1"]
        pad = (t0 - 1) + (t1 - 1)
        upad = np.zeros((S + pad, C))  # u padded once on the left
        for t in range(S):
            upad[pad + t, : Hq * d] = q[t].reshape(-1)
            upad[pad + t, Hq * d:] = k[t].reshape(-1)
        n0 = S + pad - (t0 - 1)  # conv0, depthwise, valid: S + t1 - 1 rows
        c0 = np.zeros((n0, C))
        for i in range(n0):
            row = b0.copy()
            for tap in range(t0):  # w0[0] the oldest tap, w0[t0-1] the current one
                row = row + w0[tap] * upad[i + tap]
            c0[i] = row
        c1 = np.zeros((S, C))  # conv1, per head, valid: S rows
        for t in range(S):
            for h in range(H):
                blk = slice(h * d, (h + 1) * d)
                acc = b1[blk].copy()
                for tap in range(t1):  # w1[0] the oldest tap
                    acc = acc + c0[t + tap, blk] @ w1[tap, h]
                c1[t, blk] = acc
        qc = np.zeros((S, Hq, d))
        kc = np.zeros((S, Hkv, d))
        for t in range(S):
            qc[t] = c1[t, : Hq * d].reshape(Hq, d)
            kc[t] = c1[t, Hq * d:].reshape(Hkv, d)
    else:
        qc, kc = q, k

    # 4. add the means
    qp = qc + mq
    kp = kc + mk

    # 5. value shift: concat over channels, then split into kv heads
    v = np.zeros((S, Hkv, d))
    for t in range(S):
        if cfg.use_value_shift:
            prev = x[t - 1] if t > 0 else np.zeros(E)
        else:
            prev = x[t]
        v[t] = np.concatenate([x[t] @ p["value"]["wv1"], prev @ p["value"]["wv2"]]).reshape(Hkv, d)

    # 6. normalise, key temperature
    for t in range(S):
        for h in range(Hq):
            qp[t, h] = qp[t, h] * np.sqrt(d) / np.sqrt(np.sum(qp[t, h] ** 2))
        for g in range(Hkv):
            kp[t, g] = kp[t, g] * np.sqrt(d) / np.sqrt(np.sum(kp[t, g] ** 2))
            if cfg.use_key_temperature:
                temp = p["qk_norm"]["temp"][g]
                kp[t, g] = kp[t, g] * (np.exp(temp) if cfg.temperature_form == "exp" else temp)

    # 7. RoPE, rotate-half, first r dims
    r = int(round(cfg.rope_fraction * d))
    half = r // 2

    def rope(vec, pos):
        out = vec.copy()
        for i in range(half):
            ang = float(pos) * cfg.rope_theta ** (-2.0 * i / r)
            a, b = vec[i], vec[i + half]
            out[i] = a * np.cos(ang) - b * np.sin(ang)
            out[i + half] = b * np.cos(ang) + a * np.sin(ang)
        return out

    for t in range(S):
        for h in range(Hq):
            qp[t, h] = rope(qp[t, h], positions[t])
        for g in range(Hkv):
            kp[t, g] = rope(kp[t, g], positions[t])

    # 8. attention (GQA, scale 1/sqrt(d), optional causal mask)
    o = np.zeros((S, Hq, d))
    for h in range(Hq):
        g = h // G
        for t in range(S):
            keys = range(t + 1) if cfg.causal else range(S)
            scores = [float(qp[t, h] @ kp[s, g]) / np.sqrt(d) for s in keys]
            m = max(scores)
            w = [np.exp(sc - m) for sc in scores]
            z = sum(w)
            acc = np.zeros(d)
            for wi, s in zip(w, keys):
                acc = acc + (wi / z) * v[s, g]
            o[t, h] = acc

    # 9. up-projection
    y = np.zeros((S, E))
    for t in range(S):
        y[t] = o[t].reshape(-1) @ p["out"]["wo"]
    return y


def segment_runs(seg_row: np.ndarray) -> list[tuple[int, int]]:
    """Contiguous runs [start, end) of equal segment ids."""
    runs, start = [], 0
    for t in range(1, len(seg_row) + 1):
        if t == len(seg_row) or seg_row[t] != seg_row[t - 1]:
            runs.append((start, t))
            start = t
    return runs


def ref_cca(p, x, cfg, segment_ids=None, positions=None) -> np.ndarray:
    """Batch / packed-sequence driver: every segment is an independent sequence of the reference.

    positions: None (0.. per segment), (S,) or (B, S) explicit RoPE positions.
    """
    B, S, _ = x.shape
    y = np.zeros(x.shape)
    for b in range(B):
        seg = np.zeros(S, int) if segment_ids is None else np.asarray(segment_ids)[b]
        for start, end in segment_runs(seg):
            if positions is None:
                pos = np.arange(end - start)
            else:
                pos_b = np.asarray(positions)
                pos_b = pos_b if pos_b.ndim == 1 else pos_b[b]
                pos = pos_b[start:end]
            y[b, start:end] = ref_cca_sequence(p, x[b, start:end], cfg, pos)
    return y


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

def seed_of(name: str) -> int:
    return zlib.crc32(name.encode())


def random_params(rng: np.random.Generator, cfg: CCAConfig, scale: float = 0.3) -> dict:
    """Random float64 numpy params in ccajax's layout (every leaf ~N(0, scale^2))."""
    E, Hq, Hkv, d = cfg.d_model, cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim
    Cq, Ckv = Hq * d, Hkv * d
    t0, t1 = cfg.conv_kernel_sizes
    n = lambda *shape: rng.normal(0.0, scale, shape)
    p = {
        "compress": {"wq": n(E, Cq), "wk": n(E, Ckv)},
        "value": {"wv1": n(E, Ckv // 2), "wv2": n(E, Ckv // 2)},
        "out": {"wo": n(Cq, E)},
    }
    if cfg.use_conv:
        p["conv"] = {"w0": n(t0, Cq + Ckv), "b0": n(Cq + Ckv), "w1": n(t1, Hq + Hkv, d, d),
                     "b1": n(Cq + Ckv)}
    if cfg.use_key_temperature:
        lo, hi = (0.5, 1.5) if cfg.temperature_form == "linear" else (-0.5, 0.5)
        p["qk_norm"] = {"temp": rng.uniform(lo, hi, (Hkv,))}
    return p


def to_jnp(tree, dtype):
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _cca_jit_impl(params, x, segment_ids, positions, *, cfg):
    return cca_attention(params, x, cfg, segment_ids=segment_ids, positions=positions)


def cca_jit(params, x, cfg, segment_ids=None, positions=None):
    """cca_attention under jax.jit, compiled once per (cfg, shapes, dtypes)."""
    return _cca_jit_impl(params, x, segment_ids, positions, cfg=cfg)


def run_ccajax(p, x, cfg, dtype=jnp.float64, segment_ids=None, positions=None) -> np.ndarray:
    """cca_attention under jax.jit (float64 inside enable_x64, or float32)."""
    def go():
        seg = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
        pos = None if positions is None else jnp.asarray(positions, jnp.int32)
        y = cca_jit(to_jnp(p, dtype), jnp.asarray(x, dtype), cfg, seg, pos)
        assert y.dtype == dtype, y.dtype
        return np.asarray(y, np.float64)

    if dtype == jnp.float64:
        with jax.enable_x64(True):
            return go()
    return go()


def assert_close(y, y_ref, rtol):
    assert y.shape == y_ref.shape
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y, y_ref, rtol=rtol, atol=rtol * np.abs(y_ref).max())


def make_case(name, S, **cfg_kwargs):
    cfg = CCAConfig(**cfg_kwargs)
    rng = np.random.default_rng(seed_of(name))
    p = random_params(rng, cfg)
    x = rng.normal(size=(BATCH, S, cfg.d_model))
    return cfg, p, x


# ----------------------------------------------------------------------------------------------
# Forward against the reference
# ----------------------------------------------------------------------------------------------

CCA = dict(d_model=32, num_q_heads=2, num_kv_heads=2, head_dim=8)
GQA2 = dict(d_model=32, num_q_heads=4, num_kv_heads=2, head_dim=8)
GQA4 = dict(d_model=64, num_q_heads=4, num_kv_heads=1, head_dim=16)

ALL_OFF = dict(use_conv=False, use_qk_mean=False, use_value_shift=False, use_key_temperature=False)

FORWARD_CASES = [
    # shapes: CCA (Hq == Hkv) and CCGQA (G = 2, 4)
    ("cca-E32-H2-d8-S1", 1, CCA),
    ("cca-E32-H2-d8-S2", 2, CCA),
    ("cca-E64-H4-d16-S9", 9, dict(d_model=64, num_q_heads=4, num_kv_heads=4, head_dim=16)),
    ("ccgqa-G2-E32-Hq4-d8-S5", 5, GQA2),
    ("ccgqa-G2-E48-Hq2-Hkv1-d16-S2", 2, dict(d_model=48, num_q_heads=2, num_kv_heads=1, head_dim=16)),
    ("ccgqa-G4-E64-Hq4-Hkv1-d16-S9", 9, GQA4),
    ("ccgqa-G4-E32-Hq8-Hkv2-d8-S1", 1, dict(d_model=32, num_q_heads=8, num_kv_heads=2, head_dim=8)),
    # ablation switches, each off, and all off
    ("ccgqa-G2-no_conv", 5, {**GQA2, "use_conv": False}),
    ("ccgqa-G2-no_qk_mean", 5, {**GQA2, "use_qk_mean": False}),
    ("ccgqa-G2-no_value_shift", 5, {**GQA2, "use_value_shift": False}),
    ("ccgqa-G2-no_key_temperature", 5, {**GQA2, "use_key_temperature": False}),
    ("ccgqa-G2-all_off", 5, {**GQA2, **ALL_OFF}),
    ("cca-all_off", 5, {**CCA, **ALL_OFF}),
    ("ccgqa-G4-no_conv-no_qk_mean", 5, {**GQA4, "use_conv": False, "use_qk_mean": False}),
    # temperature form
    ("ccgqa-G2-temp_exp", 5, {**GQA2, "temperature_form": "exp"}),
    ("cca-temp_exp", 9, {**CCA, "temperature_form": "exp"}),
    # RoPE fraction and base
    ("ccgqa-G2-rope0.5", 9, {**GQA2, "rope_fraction": 0.5}),
    ("ccgqa-G4-rope0.5-theta5e6", 9, {**GQA4, "rope_fraction": 0.5, "rope_theta": 5e6}),
    ("ccgqa-G2-rope0", 5, {**GQA2, "rope_fraction": 0.0}),
    ("cca-rope0.25-d16", 5, dict(d_model=32, num_q_heads=2, num_kv_heads=2, head_dim=16,
                                  rope_fraction=0.25)),
    # kernel sizes: general padding (t0-1)+(t1-1)
    ("ccgqa-G2-k3x2", 5, {**GQA2, "conv_kernel_sizes": (3, 2)}),
    ("ccgqa-G2-k1x3", 5, {**GQA2, "conv_kernel_sizes": (1, 3)}),
    ("cca-k3x3-S2", 2, {**CCA, "conv_kernel_sizes": (3, 3)}),
    ("cca-k1x1", 5, {**CCA, "conv_kernel_sizes": (1, 1)}),
    ("ccgqa-G4-k4x2-S9", 9, {**GQA4, "conv_kernel_sizes": (4, 2)}),
    # non-causal (bidirectional attention, convs and value shift stay past-looking)
    ("cca-noncausal-S5", 5, {**CCA, "causal": False}),
    ("ccgqa-G2-noncausal-S9", 9, {**GQA2, "causal": False}),
    ("ccgqa-G4-noncausal-k3x2-rope0.5", 5, {**GQA4, "causal": False, "conv_kernel_sizes": (3, 2),
                                            "rope_fraction": 0.5}),
    ("ccgqa-G2-noncausal-all_off", 5, {**GQA2, **ALL_OFF, "causal": False}),
]


@pytest.mark.parametrize("name,S,cfg_kwargs", [pytest.param(*c, id=c[0]) for c in FORWARD_CASES])
def test_forward_matches_reference_float64(name, S, cfg_kwargs):
    cfg, p, x = make_case(name, S, **cfg_kwargs)
    y = run_ccajax(p, x, cfg, jnp.float64)
    assert_close(y, ref_cca(p, x, cfg), F64_RTOL)


@pytest.mark.parametrize("name,S,cfg_kwargs", [
    pytest.param(*FORWARD_CASES[3], id="f32-" + FORWARD_CASES[3][0]),
    pytest.param("f32-ccgqa-G4-noncausal-rope0.5", 9, {**GQA4, "causal": False, "rope_fraction": 0.5},
                 id="f32-ccgqa-G4-noncausal-rope0.5"),
])
def test_forward_matches_reference_float32(name, S, cfg_kwargs):
    cfg, p, x = make_case(name, S, **cfg_kwargs)
    y = run_ccajax(p, x, cfg, jnp.float32)
    assert_close(y, ref_cca(p, x, cfg), F32_RTOL)


# ----------------------------------------------------------------------------------------------
# Packed sequences and explicit positions
# ----------------------------------------------------------------------------------------------

SEGMENTS_S9 = np.array([[0, 0, 0, 1, 1, 1, 1, 2, 2],    # three segments
                        [7, 3, 3, 3, 3, 3, 3, 3, 3]])   # a length-1 segment, then a long one


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("name,cfg_kwargs", [
    pytest.param("seg-cca", CCA, id="cca-k2x2"),
    pytest.param("seg-ccgqa-G2-k3x2", {**GQA2, "conv_kernel_sizes": (3, 2)}, id="ccgqa-G2-k3x2"),
    pytest.param("seg-ccgqa-G4-k1x3-rope0.5", {**GQA4, "conv_kernel_sizes": (1, 3), "rope_fraction": 0.5},
                 id="ccgqa-G4-k1x3-rope0.5"),
])
def test_packed_segments_match_per_segment_reference(name, cfg_kwargs, causal):
    """Each segment behaves as its own sequence: attention, convs (c0 = b0 before the segment),
    value shift (previous token 0 at the segment start), RoPE positions restarting at 0."""
    cfg, p, x = make_case(f"{name}-{causal}", 9, **cfg_kwargs, causal=causal)
    y = run_ccajax(p, x, cfg, jnp.float64, segment_ids=SEGMENTS_S9)
    assert_close(y, ref_cca(p, x, cfg, segment_ids=SEGMENTS_S9), F64_RTOL)
    # And the reference on a packed row is not the reference on the unpacked row (the test bites).
    assert not np.allclose(y, ref_cca(p, x, cfg), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name,cfg_kwargs", [
    pytest.param("pos-cca", CCA, id="cca"),
    pytest.param("pos-ccgqa-G4-rope0.5", {**GQA4, "rope_fraction": 0.5}, id="ccgqa-G4-rope0.5"),
    pytest.param("pos-ccgqa-G2-noncausal", {**GQA2, "causal": False}, id="ccgqa-G2-noncausal"),
])
def test_explicit_positions_shift_rope(name, cfg_kwargs):
    S = 6
    cfg, p, x = make_case(name, S, **cfg_kwargs)
    # A constant offset (5..5+S-1): matches the reference; RoPE is relative, so it also equals the
    # default-position output (to float32 rounding of the angles).
    positions = np.arange(5, 5 + S)
    y = run_ccajax(p, x, cfg, jnp.float64, positions=positions)
    assert_close(y, ref_cca(p, x, cfg, positions=positions), F64_RTOL)
    assert_close(y, ref_cca(p, x, cfg), F64_RTOL)
    # Non-uniform positions change the relative offsets, hence the output.
    positions = 5 + np.array([0, 1, 3, 4, 8, 9])
    y = run_ccajax(p, x, cfg, jnp.float64, positions=positions)
    assert_close(y, ref_cca(p, x, cfg, positions=positions), F64_RTOL)
    assert not np.allclose(y, ref_cca(p, x, cfg), rtol=1e-3, atol=1e-3)


def test_explicit_batched_positions_with_segments():
    """(B, S) positions override the per-segment restart; segments still isolate everything else."""
    S = 9
    cfg, p, x = make_case("pos-batched-seg", S, **GQA2, conv_kernel_sizes=(3, 2))
    positions = np.stack([np.arange(3, 3 + S), np.arange(100, 100 + 2 * S, 2)])
    y = run_ccajax(p, x, cfg, jnp.float64, segment_ids=SEGMENTS_S9, positions=positions)
    assert_close(y, ref_cca(p, x, cfg, segment_ids=SEGMENTS_S9, positions=positions), F64_RTOL)


def test_rope_fraction_zero_ignores_positions():
    cfg, p, x = make_case("rope0-positions", 5, **GQA2, rope_fraction=0.0)
    y0 = run_ccajax(p, x, cfg, jnp.float64)
    y1 = run_ccajax(p, x, cfg, jnp.float64, positions=np.arange(17, 22))
    np.testing.assert_array_equal(y0, y1)


# ----------------------------------------------------------------------------------------------
# Causality and segment isolation
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,cfg_kwargs", [
    pytest.param("causal-cca-k3x2", {**CCA, "conv_kernel_sizes": (3, 2)}, id="cca-k3x2"),
    pytest.param("causal-ccgqa-G4", GQA4, id="ccgqa-G4"),
])
def test_causal_perturbation_does_not_reach_the_past(name, cfg_kwargs):
    S = 7
    cfg, p, x = make_case(name, S, **cfg_kwargs)
    with jax.enable_x64(True):
        fn = lambda pp, xx: cca_jit(pp, xx, cfg)
        pj = to_jnp(p, jnp.float64)
        y = np.asarray(fn(pj, jnp.asarray(x)))
        for t in range(S):
            xp = x.copy()
            xp[:, t] += np.random.default_rng(t).normal(size=x[:, t].shape)
            yp = np.asarray(fn(pj, jnp.asarray(xp)))
            np.testing.assert_allclose(yp[:, :t], y[:, :t], rtol=0, atol=1e-12)
            assert np.all(np.abs(yp[:, t] - y[:, t]).max(axis=-1) > 1e-6), t


def test_noncausal_perturbation_reaches_the_past():
    cfg, p, x = make_case("noncausal-perturb", 5, **GQA2, causal=False)
    xp = x.copy()
    xp[:, -1] += 1.0
    y, yp = run_ccajax(p, x, cfg), run_ccajax(p, xp, cfg)
    assert np.all(np.abs(yp[:, 0] - y[:, 0]).max(axis=-1) > 1e-6)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_segments_are_isolated(causal):
    """Perturbing one segment changes no output of another segment (in either direction)."""
    cfg, p, x = make_case(f"seg-isolation-{causal}", 9, **GQA2, conv_kernel_sizes=(3, 2),
                          causal=causal)
    with jax.enable_x64(True):
        fn = lambda pp, xx, ss: cca_jit(pp, xx, cfg, segment_ids=ss)
        pj, seg = to_jnp(p, jnp.float64), jnp.asarray(SEGMENTS_S9, jnp.int32)
        y = np.asarray(fn(pj, jnp.asarray(x), seg))
        for b in range(BATCH):
            for start, end in segment_runs(SEGMENTS_S9[b]):
                xp = x.copy()
                xp[b, start:end] += 1.0
                yp = np.asarray(fn(pj, jnp.asarray(xp), seg))
                outside = np.ones(9, bool)
                outside[start:end] = False
                np.testing.assert_allclose(yp[b, outside], y[b, outside], rtol=0, atol=1e-12)
                np.testing.assert_array_equal(yp[1 - b], y[1 - b])
                assert np.abs(yp[b, start:end] - y[b, start:end]).max() > 1e-6


# ----------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,cfg_kwargs,use_segments,with_check_grads", [
    pytest.param("grad-ccgqa-G2-k3x2", dict(d_model=16, num_q_heads=2, num_kv_heads=1, head_dim=4,
                                            conv_kernel_sizes=(3, 2)), False, True,
                 id="ccgqa-G2-k3x2"),
    pytest.param("grad-cca-exp-noncausal-seg", dict(d_model=16, num_q_heads=2, num_kv_heads=2,
                                                    head_dim=4, temperature_form="exp",
                                                    causal=False, rope_fraction=0.5), True, False,
                 id="cca-exp-noncausal-rope0.5-segments"),
])
def test_gradients_match_reference_finite_differences(name, cfg_kwargs, use_segments,
                                                       with_check_grads):
    """d(sum(y * cot))/d(x, every param) from jax.grad (float64) against central finite
    differences of the float64 loop reference along random directions (eps 1e-5, GRAD_RTOL), and
    (in one case, to save time) jax.test_util.check_grads (reverse mode, first order) on ccajax."""
    S = 4
    cfg = CCAConfig(**cfg_kwargs)
    rng = np.random.default_rng(seed_of(name))
    p = random_params(rng, cfg)
    x = rng.normal(size=(BATCH, S, cfg.d_model))
    cot = rng.normal(size=(BATCH, S, cfg.d_model))
    seg = np.array([[0, 0, 1, 1], [4, 4, 4, 9]]) if use_segments else None

    def loss_ref(pp, xx):
        return float(np.sum(ref_cca(pp, xx, cfg, segment_ids=seg) * cot))

    with jax.enable_x64(True):
        def loss(pp, xx):
            y = cca_attention(pp, xx, cfg,
                              segment_ids=None if seg is None else jnp.asarray(seg, jnp.int32))
            return jnp.sum(y * cot)

        pj, xj = to_jnp(p, jnp.float64), jnp.asarray(x)
        gp, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(pj, xj)
        if with_check_grads:
            check_grads(jax.jit(loss), (pj, xj), order=1, modes=["rev"])
        gp = jax.tree.map(np.asarray, gp)
        gx = np.asarray(gx)

    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(p)
    names = [jax.tree_util.keystr(path) for path, _ in paths_leaves]
    leaves = [leaf for _, leaf in paths_leaves]
    g_leaves = jax.tree.leaves(gp)
    assert len(g_leaves) == len(leaves)
    assert np.all(np.isfinite(gx)) and all(np.all(np.isfinite(g)) for g in g_leaves)

    eps = 1e-5

    def check(grad, direction, f_plus, f_minus, what):
        fd = (f_plus - f_minus) / (2 * eps)
        an = float(np.sum(grad * direction))
        assert abs(an - fd) <= GRAD_RTOL * max(1.0, abs(fd)), (what, an, fd)

    for i, (leaf, g) in enumerate(zip(leaves, g_leaves)):
        for _ in range(2):
            direction = rng.normal(size=leaf.shape)
            plus = [l + eps * direction if j == i else l for j, l in enumerate(leaves)]
            minus = [l - eps * direction if j == i else l for j, l in enumerate(leaves)]
            check(g, direction, loss_ref(jax.tree.unflatten(treedef, plus), x),
                  loss_ref(jax.tree.unflatten(treedef, minus), x), names[i])
    for _ in range(3):
        direction = rng.normal(size=x.shape)
        check(gx, direction, loss_ref(p, x + eps * direction), loss_ref(p, x - eps * direction), "x")


# ----------------------------------------------------------------------------------------------
# Attention edge cases: no NaN
# ----------------------------------------------------------------------------------------------

def test_fully_masked_rows_give_zero_not_nan():
    """Causal with Sq > Sk: the last query is aligned with the last key, so the first Sq - Sk queries
    see no key at all; they must give 0 (and finite gradients), never NaN."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 5, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 3, 2, 8)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, 3, 2, 8)), jnp.float32)
    out = np.asarray(jax.jit(reference_attention, static_argnames="is_causal")(q, k, v, is_causal=True))
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[:, :2], 0.0)
    # Rows with keys: query i (i >= 2) sees keys 0..i-2; check the last one sees all keys.
    full = np.asarray(reference_attention(q[:, -1:], k, v, is_causal=False))
    np.testing.assert_allclose(out[:, -1:], full, rtol=1e-6, atol=1e-6)
    grads = jax.jit(jax.grad(
        lambda a, b, c: jnp.sum(reference_attention(a, b, c, is_causal=True) ** 2),
        argnums=(0, 1, 2)))(q, k, v)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
    np.testing.assert_array_equal(np.asarray(grads[0])[:, :2], 0.0)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_dot_product_attention_with_segments_is_finite(causal):
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(2, 9, 4, 8)) * 10, jnp.float32)  # large logits too
    k = jnp.asarray(rng.normal(size=(2, 9, 1, 8)) * 10, jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, 9, 1, 8)), jnp.float32)
    seg = jnp.asarray(SEGMENTS_S9, jnp.int32)
    out = dot_product_attention(q, k, v, is_causal=causal, segment_ids=seg)
    assert out.shape == (2, 9, 4, 8)
    assert np.all(np.isfinite(np.asarray(out)))
    # A length-1 segment (row 1, token 0) attends only to itself: output = its own value.
    np.testing.assert_allclose(np.asarray(out)[1, 0], np.repeat(np.asarray(v)[1, 0], 4, axis=0),
                               rtol=1e-6, atol=1e-6)
