"""Float64 numpy references written for the tests, sharing no code with ccajax."""

import numpy as np


def numpy_attention(q, k, v, causal, segment_ids=None, scale=None):
    """Float64 softmax attention with kv heads repeated, one (batch, head) at a time."""
    B, Sq, Hq, d = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    out = np.zeros((B, Sq, Hq, v.shape[-1]))
    for b in range(B):
        for h in range(Hq):
            kh = h // (Hq // Hkv)
            s = q[b, :, h] @ k[b, :, kh].T * scale
            allowed = np.ones((Sq, Sk), bool)
            if causal:
                allowed &= (np.arange(Sq)[:, None] + Sk - Sq) >= np.arange(Sk)[None]
            if segment_ids is not None:
                allowed &= segment_ids[b][:, None] == segment_ids[b][None]
            for i in range(Sq):
                if allowed[i].any():
                    w = np.exp(s[i][allowed[i]] - s[i][allowed[i]].max())
                    out[b, i, h] = (w / w.sum()) @ v[b, :, kh][allowed[i]]
    return out


def numpy_rope(x, positions, theta, rotary_dim):
    """Rotate-half RoPE of x (B, S, H, d) on its first rotary_dim dims; positions (B, S) or (S,)."""
    if rotary_dim == 0:
        return x.copy()
    half = rotary_dim // 2
    inv_freq = theta ** (-np.arange(half) * 2.0 / rotary_dim)
    ang = np.broadcast_to(np.asarray(positions, np.float64), x.shape[:2])[..., None] * inv_freq
    cos, sin = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
    x1, x2 = x[..., :half], x[..., half:rotary_dim]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., rotary_dim:]], -1)
