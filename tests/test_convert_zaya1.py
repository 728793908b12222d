"""ZAYA1 weight import: ccajax on converted weights against a float64 numpy ZAYA1 layer.

The reference works directly on the torch-layout state dict and shares no code with ccajax: torch's
Conv1d is a valid cross-correlation, run here on the q/k channels after one left zero padding of
(t0-1)+(t1-1) steps, exactly as the upstream PyTorch layer does.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from ccajax.cca import cca_attention, init_cca_params
from ccajax.config import CCAConfig
from ccajax.convert import from_zaya1_attention, zaya1_attention_config

# The first tokens are where the conv padding semantics show (y[0] itself sees only the value path:
# a lone token attends to itself whatever its q and k).
SEQ_LENS = (1, 2, 3, 19)
SMALL = dict(d_model=64, num_q_heads=4, num_kv_heads=2, head_dim=16)
ZAYA1_HEADS = dict(d_model=48, num_q_heads=8, num_kv_heads=2, head_dim=128)  # ZAYA1's heads, tiny E

HF_ALIASES = {
    "qkv.linear_q.weight": "qkv_proj.q_proj.weight",
    "qkv.linear_k.weight": "qkv_proj.k_proj.weight",
    "qkv.val_proj1.weight": "qkv_proj.v_proj_current.weight",
    "qkv.val_proj2.weight": "qkv_proj.v_proj_delayed.weight",
    "qkv.conv_qk.0.weight": "qkv_proj.conv_qk_depthwise.weight",
    "qkv.conv_qk.0.bias": "qkv_proj.conv_qk_depthwise.bias",
    "qkv.conv_qk.1.weight": "qkv_proj.conv_qk_grouped.weight",
    "qkv.conv_qk.1.bias": "qkv_proj.conv_qk_grouped.bias",
    "qkv.temp": "qk_norm.temp",
    "o_proj.weight": "o_proj.weight",
}


def random_state_dict(cfg: CCAConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """A ZAYA1 layer's tensors in the torch layout (Linear (out, in), Conv1d (out, in/groups, k)),
    float64, with non-zero conv biases and non-unit temperatures so that every term shows."""
    rng = np.random.default_rng(seed)
    E, Hq, Hkv, d = cfg.d_model, cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim
    t0, t1 = cfg.conv_kernel_sizes
    C = (Hq + Hkv) * d

    def normal(*shape, fan_in):
        return rng.normal(0.0, fan_in ** -0.5, shape)

    def uniform(*shape, fan_in):
        return rng.uniform(-1.0, 1.0, shape) * fan_in ** -0.5

    return {
        "qkv.linear_q.weight": normal(Hq * d, E, fan_in=E),
        "qkv.linear_k.weight": normal(Hkv * d, E, fan_in=E),
        "qkv.val_proj1.weight": normal(Hkv * d // 2, E, fan_in=E),
        "qkv.val_proj2.weight": normal(Hkv * d // 2, E, fan_in=E),
        "qkv.conv_qk.0.weight": uniform(C, 1, t0, fan_in=t0),
        "qkv.conv_qk.0.bias": uniform(C, fan_in=t0),
        "qkv.conv_qk.1.weight": uniform(C, d, t1, fan_in=t1 * d),
        "qkv.conv_qk.1.bias": uniform(C, fan_in=t1 * d),
        "qkv.temp": rng.uniform(0.1, 0.6, Hkv),  # keeps the softmax soft at d=128
        "o_proj.weight": normal(E, Hq * d, fan_in=Hq * d),
    }


# ---------------------------------------------------------------------------------------------
# float64 numpy ZAYA1 attention layer, on the torch-layout state dict


def torch_conv1d(x: np.ndarray, w: np.ndarray, b: np.ndarray, groups: int) -> np.ndarray:
    """torch.nn.functional.conv1d with padding 0, stride 1: x (B, Cin, L), w (Cout, Cin/groups, K)
    -> (B, Cout, L-K+1), out[:, o, t] = b[o] + sum_{i,k} w[o, i, k] * x[:, group(o) in i, t+k]."""
    B, c_in, L = x.shape
    c_out, c_in_g, K = w.shape
    windows = np.lib.stride_tricks.sliding_window_view(x, K, axis=2)  # (B, Cin, L-K+1, K)
    windows = windows.reshape(B, groups, c_in // groups, L - K + 1, K)
    wg = w.reshape(groups, c_out // groups, c_in_g, K)
    out = np.einsum("bgitk,goik->bgot", windows, wg).reshape(B, c_out, L - K + 1)
    return out + b[None, :, None]


def rotate_half(x: np.ndarray) -> np.ndarray:
    x1, x2 = np.split(x, 2, axis=-1)
    return np.concatenate([-x2, x1], axis=-1)


def partial_rope(x: np.ndarray, theta: float, fraction: float) -> np.ndarray:
    """x (B, S, H, d): rotate-half RoPE on the first int(d*fraction) dims at positions 0..S-1."""
    r = int(x.shape[-1] * fraction)
    inv_freq = 1.0 / theta ** (np.arange(0, r, 2) / r)
    freqs = np.arange(x.shape[1])[:, None] * inv_freq
    emb = np.concatenate([freqs, freqs], axis=-1)[None, :, None, :]
    x_rot, x_pass = x[..., :r], x[..., r:]
    return np.concatenate([x_rot * np.cos(emb) + rotate_half(x_rot) * np.sin(emb), x_pass], axis=-1)


def zaya1_layer(sd: dict, x: np.ndarray, Hq: int, Hkv: int, d: int, t0: int, t1: int,
                theta: float, fraction: float) -> np.ndarray:
    """The ZAYA1 attention layer, causal, in float64 numpy. x (B, S, E) -> (B, S, E)."""
    B, S, _ = x.shape
    G = Hq // Hkv
    q = x @ sd["qkv.linear_q.weight"].T
    k = x @ sd["qkv.linear_k.weight"].T
    query_residual = (q.reshape(B, S, Hq, d) + np.repeat(k.reshape(B, S, Hkv, d), G, axis=2)) * 0.5
    key_residual = query_residual.reshape(B, S, Hkv, G, d).mean(axis=3)

    qk = np.concatenate([q, k], axis=-1).transpose(0, 2, 1)  # (B, C, S)
    qk = np.pad(qk, ((0, 0), (0, 0), ((t0 - 1) + (t1 - 1), 0)))
    qk = torch_conv1d(qk, sd["qkv.conv_qk.0.weight"], sd["qkv.conv_qk.0.bias"], groups=qk.shape[1])
    qk = torch_conv1d(qk, sd["qkv.conv_qk.1.weight"], sd["qkv.conv_qk.1.bias"], groups=Hq + Hkv)
    qk = qk.transpose(0, 2, 1)  # (B, S, C)
    query = qk[..., : Hq * d].reshape(B, S, Hq, d) + query_residual
    key = qk[..., Hq * d:].reshape(B, S, Hkv, d) + key_residual

    shifted = np.concatenate([np.zeros_like(x[:, :1]), x[:, :-1]], axis=1)
    value = np.concatenate([x @ sd["qkv.val_proj1.weight"].T, shifted @ sd["qkv.val_proj2.weight"].T],
                           axis=-1).reshape(B, S, Hkv, d)

    eps = np.finfo(np.float64).eps
    query = query * (np.sqrt(d) / np.maximum(np.linalg.norm(query, axis=-1, keepdims=True), eps))
    key = key * (np.sqrt(d) / np.maximum(np.linalg.norm(key, axis=-1, keepdims=True), eps))
    key = key * sd["qkv.temp"][None, None, :, None]
    query, key = partial_rope(query, theta, fraction), partial_rope(key, theta, fraction)

    key, value = np.repeat(key, G, axis=2), np.repeat(value, G, axis=2)
    scores = np.einsum("bqhd,bkhd->bhqk", query, key) / np.sqrt(d)
    scores = np.where(np.tril(np.ones((S, S), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", probs, value).reshape(B, S, Hq * d)
    return out @ sd["o_proj.weight"].T


def reference(sd: dict, x: np.ndarray, cfg: CCAConfig) -> np.ndarray:
    return zaya1_layer(sd, x, cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim, *cfg.conv_kernel_sizes,
                       cfg.rope_theta, cfg.rope_fraction)


def layer_inputs(shape: dict, seq_len: int):
    cfg = zaya1_attention_config(**shape)
    x = np.random.default_rng(seq_len).normal(size=(2, seq_len, cfg.d_model))
    return cfg, random_state_dict(cfg), x


SHAPES = pytest.mark.parametrize("shape", [SMALL, ZAYA1_HEADS], ids=["d16", "d128"])
LENGTHS = pytest.mark.parametrize("seq_len", SEQ_LENS)
F32_EPS = float(np.finfo(np.float32).eps)


def max_rel_err(y, ref) -> float:
    """Largest |y - ref| over the largest |ref|."""
    return float(np.abs(np.asarray(y, np.float64) - ref).max() / np.abs(ref).max())


def jit_layer(cfg: CCAConfig):
    return jax.jit(lambda params, x: cca_attention(params, x, cfg))


# ---------------------------------------------------------------------------------------------
# numerics


def test_reference_conv_is_torch_conv1d():
    """The reference's conv against torch's definition written out as loops."""
    rng = np.random.default_rng(0)
    x, w, b = rng.normal(size=(2, 6, 5)), rng.normal(size=(6, 3, 2)), rng.normal(size=6)
    want = np.zeros((2, 6, 4))
    for o in range(6):
        g = o // 3  # groups=2: out channels 0-2 read in channels 0-2, 3-5 read 3-5
        for t in range(4):
            want[:, o, t] = b[o] + sum(w[o, i, k] * x[:, g * 3 + i, t + k]
                                       for i in range(3) for k in range(2))
    np.testing.assert_allclose(torch_conv1d(x, w, b, groups=2), want, rtol=1e-12, atol=1e-12)


@SHAPES
@LENGTHS
def test_layer_matches_zaya1_in_float64(shape, seq_len):
    """float64 weights and inputs: equal to the reference to float64 rounding (seen <= 1.4e-15)."""
    cfg, sd, x = layer_inputs(shape, seq_len)
    with jax.enable_x64(True):
        params = from_zaya1_attention(sd, cfg)
        assert all(a.dtype == jnp.float64 for a in jax.tree.leaves(params))
        y = jit_layer(cfg)(params, jnp.asarray(x))
        assert y.dtype == jnp.float64 and y.shape == x.shape
    assert max_rel_err(y, reference(sd, x, cfg)) < 1e-12


@SHAPES
@LENGTHS
def test_layer_matches_zaya1_in_float32(shape, seq_len):
    """float32 weights and inputs against the float64 reference: within 32 float32 eps of the output
    scale (3.8e-6; seen up to 7.6 eps on CPU). Full-precision matmuls, so that GPUs do not use TF32."""
    cfg, sd, x = layer_inputs(shape, seq_len)
    params = from_zaya1_attention({k: v.astype(np.float32) for k, v in sd.items()}, cfg)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params))
    with jax.default_matmul_precision("highest"):
        y = jit_layer(cfg)(params, jnp.asarray(x, jnp.float32))
    assert y.dtype == jnp.float32 and y.shape == x.shape
    assert max_rel_err(y, reference(sd, x, cfg)) < 32 * F32_EPS


# ---------------------------------------------------------------------------------------------
# names, dtypes, config


def test_hugging_face_names_give_the_same_params():
    cfg = zaya1_attention_config(**SMALL)
    sd = random_state_dict(cfg)
    want = from_zaya1_attention(sd, cfg)
    got = from_zaya1_attention({HF_ALIASES[k]: v for k, v in sd.items()}, cfg)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)


class _TorchLike:
    """Stands in for a CPU torch tensor: only the ``__array__`` protocol."""

    def __init__(self, a):
        self._a = a

    def __array__(self, dtype=None, copy=None):
        return self._a if dtype is None else self._a.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_array_likes_and_dtype_kept(dtype):
    cfg = zaya1_attention_config(**SMALL)
    sd = {k: _TorchLike(v.astype(dtype)) for k, v in random_state_dict(cfg).items()}
    params = from_zaya1_attention(sd, cfg)
    assert {a.dtype for a in jax.tree.leaves(params)} == {jnp.dtype(dtype)}


def test_zaya1_config_and_full_size_conversion():
    cfg = zaya1_attention_config()
    assert (cfg.d_model, cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim) == (2048, 8, 2, 128)
    assert cfg.conv_kernel_sizes == (2, 2) and cfg.rope_fraction == 0.5 and cfg.rope_theta == 5e6
    assert cfg.temperature_form == "linear" and cfg.causal
    assert zaya1_attention_config(d_model=64).d_model == 64
    sd = {k: v.astype(np.float32) for k, v in random_state_dict(cfg).items()}
    params = from_zaya1_attention(sd, cfg)
    want = jax.eval_shape(lambda: init_cca_params(jax.random.key(0), cfg))
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(lambda s: s.shape, want)


def test_config_without_conv_and_temperature_takes_weights_without_them():
    cfg = zaya1_attention_config(**SMALL, use_conv=False, use_key_temperature=False)
    sd = {k: v for k, v in random_state_dict(cfg).items() if "conv" not in k and "temp" not in k}
    assert set(from_zaya1_attention(sd, cfg)) == {"compress", "value", "out"}


# ---------------------------------------------------------------------------------------------
# errors


def _small():
    cfg = zaya1_attention_config(**SMALL)
    return cfg, random_state_dict(cfg)


def test_missing_key():
    cfg, sd = _small()
    del sd["qkv.conv_qk.1.bias"]
    with pytest.raises(ValueError, match=r"lacks \['qkv.conv_qk.1.bias'\].*given keys: \['o_proj.weight'"):
        from_zaya1_attention(sd, cfg)


@pytest.mark.parametrize("key, shape, message", [
    ("qkv.linear_k.weight", (33, 64),
     r"'qkv.linear_k.weight' has shape \(33, 64\), expected \(32, 64\) = \(num_kv_heads\*head_dim, d_model\)"),
    ("qkv.conv_qk.0.weight", (96, 1, 3),
     r"'qkv.conv_qk.0.weight' has shape \(96, 1, 3\), expected \(96, 1, 2\) = .*conv_kernel_sizes\[0\]"),
    ("qkv.temp", (4,), r"'qkv.temp' has shape \(4,\), expected \(2,\) = \(num_kv_heads,\) .*num_kv_heads=2"),
])
def test_wrong_shape(key, shape, message):
    cfg, sd = _small()
    sd[key] = np.zeros(shape)
    with pytest.raises(ValueError, match=message):
        from_zaya1_attention(sd, cfg)


@pytest.mark.parametrize("key", ["qkv.linear_q.bias", "qkv_proj.v_proj_current.bias", "o_proj.bias"])
def test_linear_bias_is_rejected(key):
    cfg, sd = _small()
    sd[key] = np.zeros(cfg.d_model)
    message = rf"'{key}', a bias on a linear map: biases on linear maps are not supported"
    with pytest.raises(ValueError, match=message):
        from_zaya1_attention(sd, cfg)


def test_unknown_and_doubled_keys():
    cfg, sd = _small()
    message = r"unexpected key 'qkv.linear_v.weight'.*valid keys: \['qkv.linear_q.weight'"
    with pytest.raises(ValueError, match=message):
        from_zaya1_attention({**sd, "qkv.linear_v.weight": np.zeros(1)}, cfg)
    with pytest.raises(ValueError, match=r"both 'qkv.temp' and its Hugging Face alias 'qk_norm.temp'"):
        from_zaya1_attention({**sd, "qk_norm.temp": sd["qkv.temp"]}, cfg)


def test_non_float_weights():
    cfg, sd = _small()
    sd["qkv.temp"] = np.ones(2, np.int32)
    with pytest.raises(ValueError, match=r"'qkv.temp' has dtype int32; weights must be floating point"):
        from_zaya1_attention(sd, cfg)


@pytest.mark.parametrize("change, message", [
    (dict(temperature_form="exp"), r"temperature_form='exp'; use temperature_form='linear'"),
    (dict(use_conv=False), r"'qkv.conv_qk.0.bias' but cfg.use_conv=False cannot hold it; use use_conv=True"),
    (dict(use_key_temperature=False),
     r"'qkv.temp' but cfg.use_key_temperature=False cannot hold it; use use_key_temperature=True"),
    (dict(use_qk_mean=False), r"cfg.use_qk_mean=False; use use_qk_mean=True"),
    (dict(use_value_shift=False), r"cfg.use_value_shift=False; use use_value_shift=True"),
])
def test_config_that_cannot_compute_zaya1(change, message):
    cfg, sd = _small()
    with pytest.raises(ValueError, match=message):
        from_zaya1_attention(sd, dataclasses.replace(cfg, **change))
