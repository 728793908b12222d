"""Cost accounting per attention layer: parameters, FLOPs and KV-cache size.

Conventions (`../shared/CCA_SPEC.md`, Costs): projection FLOPs are 2 per weight of the linear maps
per token; attention FLOPs count the two matmuls, 2*S*d each per query and head (4*B*S^2*H*d for
square q/k/v heads), halved when causal; the convolutions count 2 per tap weight per token. The
backward costs 2x the forward projections and convolutions and 2.5x the forward attention.
Element-wise work (norms, RoPE, softmax, the q-k mean) is not counted.
"""

from __future__ import annotations

import dataclasses
import math

import jax

from ccajax.cca import init_cca_params
from ccajax.config import CCAConfig, MHAConfig, MLAConfig
from ccajax.mha import init_mha_params
from ccajax.mla import init_mla_params

_INIT = {CCAConfig: init_cca_params, MHAConfig: init_mha_params, MLAConfig: init_mla_params}
BACKWARD_ATTENTION_FACTOR = 2.5


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """One attention layer's costs for a batch of ``batch`` sequences of ``seq_len`` tokens."""

    name: str
    params: int
    kv_values_per_token: int
    kv_bytes_per_token: int
    projection_flops: int
    conv_flops: int
    attention_flops: float

    @property
    def forward_flops(self) -> float:
        """Projections + convolutions + attention FLOPs of one forward pass."""
        return self.projection_flops + self.conv_flops + self.attention_flops

    @property
    def backward_flops(self) -> float:
        """2x the forward projections and convolutions + 2.5x the forward attention."""
        return (2 * (self.projection_flops + self.conv_flops)
                + BACKWARD_ATTENTION_FACTOR * self.attention_flops)


def _init_for(cfg):
    try:
        return _INIT[type(cfg)]
    except KeyError:
        raise ValueError(
            f"cfg must be a CCAConfig, MHAConfig or MLAConfig, got {type(cfg).__name__}") from None


def param_shapes(cfg) -> dict:
    """The layer's param pytree of ``jax.ShapeDtypeStruct`` (nothing is allocated)."""
    init = _init_for(cfg)
    return jax.eval_shape(lambda: init(jax.random.key(0), cfg))


def param_count(cfg) -> int:
    """Number of parameters of one layer (biases, conv, norm scales and temperature included)."""
    return sum(math.prod(s.shape) for s in jax.tree.leaves(param_shapes(cfg)))


def linear_weight_count(cfg) -> int:
    """Weights of the layer's linear maps (the projections), which each cost 2 FLOPs per token."""
    shapes = param_shapes(cfg)
    if isinstance(cfg, CCAConfig):
        shapes = {g: shapes[g] for g in ("compress", "value", "out")}
    return sum(math.prod(s.shape) for s in jax.tree.leaves(shapes) if len(s.shape) == 2)


def kv_cache_values_per_token(cfg) -> int:
    """Values cached per token for decoding: K and V (2*Hkv*d), or MLA's latent and rope key."""
    if isinstance(cfg, MLAConfig):
        return cfg.kv_lora_rank + cfg.qk_rope_head_dim
    _init_for(cfg)
    return 2 * cfg.num_kv_heads * cfg.head_dim


def attention_flops(cfg, batch: int, seq_len: int, causal: bool | None = None) -> float:
    """Forward matmul FLOPs of the attention step; ``causal`` defaults to the config's."""
    causal = cfg.causal if causal is None else causal
    if isinstance(cfg, MLAConfig):
        per_pair = 2 * cfg.num_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    else:
        _init_for(cfg)
        per_pair = 4 * cfg.num_q_heads * cfg.head_dim
    return batch * seq_len ** 2 * per_pair * (0.5 if causal else 1.0)


def conv_flops(cfg, batch: int, seq_len: int) -> int:
    """FLOPs of CCA's two convolutions (0 for other layers or with the conv switched off)."""
    if not isinstance(cfg, CCAConfig) or not cfg.use_conv:
        return 0
    t0, t1 = cfg.conv_kernel_sizes
    channels = cfg.q_width + cfg.kv_width
    return 2 * batch * seq_len * channels * (t0 + t1 * cfg.head_dim)


def layer_cost(cfg, batch: int, seq_len: int, *, name: str = "", causal: bool | None = None,
               kv_bytes_per_value: int = 2) -> LayerCost:
    """All costs of one layer (see the module docstring for the conventions)."""
    kv_values = kv_cache_values_per_token(cfg)
    return LayerCost(
        name=name or type(cfg).__name__,
        params=param_count(cfg),
        kv_values_per_token=kv_values,
        kv_bytes_per_token=kv_values * kv_bytes_per_value,
        projection_flops=2 * batch * seq_len * linear_weight_count(cfg),
        conv_flops=conv_flops(cfg, batch, seq_len),
        attention_flops=attention_flops(cfg, batch, seq_len, causal),
    )


def standard_configs(d_model: int = 2048, head_dim: int = 128, causal: bool = True) -> dict:
    """The project's comparison set at width ``d_model``, keyed by display name.

    MHA with d_model/head_dim heads, GQA and MQA of it, MLA in DeepSeek-V2-Lite's proportions (kv
    rank d_model/4, rope dim head_dim/2, nope and value dims head_dim: r=512, dr=64 at E=2048), CCA
    at C=2 and C=4, CCGQA 8:2 (ZAYA1's shape at E=2048) and 4:2.
    """
    heads = d_model // head_dim
    if heads * head_dim != d_model or heads < 8:
        raise ValueError(
            f"standard_configs needs d_model a multiple of head_dim with >= 8 heads; got d_model="
            f"{d_model}, head_dim={head_dim}")
    mha = dict(d_model=d_model, head_dim=head_dim, causal=causal)
    return {
        f"MHA {heads}:{heads}": MHAConfig(num_q_heads=heads, num_kv_heads=heads, **mha),
        f"GQA {heads}:{heads // 4}": MHAConfig(num_q_heads=heads, num_kv_heads=heads // 4, **mha),
        f"MQA {heads}:1": MHAConfig(num_q_heads=heads, num_kv_heads=1, **mha),
        f"MLA r={d_model // 4}": MLAConfig(
            d_model=d_model, num_heads=heads, kv_lora_rank=d_model // 4, qk_nope_head_dim=head_dim,
            qk_rope_head_dim=head_dim // 2, v_head_dim=head_dim, causal=causal),
        f"CCA C=2 ({heads // 2}:{heads // 2})": CCAConfig.from_compression(
            d_model, 2, head_dim, causal=causal),
        f"CCA C=4 ({heads // 4}:{heads // 4})": CCAConfig.from_compression(
            d_model, 4, head_dim, causal=causal),
        f"CCGQA {heads // 2}:{heads // 8}": CCAConfig.from_compression(
            d_model, 2, head_dim, num_kv_heads=heads // 8, causal=causal),
        f"CCGQA {heads // 4}:{heads // 8}": CCAConfig.from_compression(
            d_model, 4, head_dim, num_kv_heads=heads // 8, causal=causal),
    }


def cost_table(configs: dict, batch: int, seq_len: int, causal: bool | None = None) -> list[LayerCost]:
    """`layer_cost` of each named config."""
    return [layer_cost(cfg, batch, seq_len, name=name, causal=causal) for name, cfg in configs.items()]


def format_cost_table(costs: list[LayerCost]) -> str:
    """A plain-text table; ratios are relative to the first row (put MHA first)."""
    base = costs[0]
    header = (f"{'layer':<18}{'params':>10}{'KV B/tok':>10}{'KV vs':>7}"
              f"{'fwd GFLOP':>11}{'bwd GFLOP':>11}{'attn GFLOP':>12}{'fwd vs':>8}")
    lines = [header, "-" * len(header)]
    for c in costs:
        lines.append(
            f"{c.name:<18}{c.params / 1e6:>9.2f}M{c.kv_bytes_per_token:>10,}"
            f"{base.kv_bytes_per_token / c.kv_bytes_per_token:>6.1f}x"
            f"{c.forward_flops / 1e9:>11.1f}{c.backward_flops / 1e9:>11.1f}"
            f"{c.attention_flops / 1e9:>12.1f}{base.forward_flops / c.forward_flops:>7.2f}x")
    lines.append(f"(KV bytes at 2 bytes per value; 'vs' columns: {base.name} / layer, higher is cheaper)")
    return "\n".join(lines)
