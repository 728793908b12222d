"""A decoder-only language model whose attention layer is chosen by config.

``TransformerLM``: token embedding -> ``num_layers`` pre-norm blocks (RMSNorm, attention, RMSNorm,
SwiGLU MLP or top-k MoE MLP, each with a residual) -> RMSNorm -> tied or untied head. The attention
is the foundation's module for ``LMConfig.attention`` (`ccajax.modules.attention_module`), so every
attention runs through `ccajax.attention.dot_product_attention`'s backend dispatch.

Mixed precision: params are stored in ``param_dtype`` (float32) and cast to ``dtype`` (bfloat16)
for compute; norms, the router and the softmax statistics stay in float32; logits come back in
float32.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from ccajax import costs, decode
from ccajax.attention import IMPLEMENTATIONS
from ccajax.cca import PROLOGUES as CCA_PROLOGUES
from ccajax.config import AttentionConfig, CCAConfig, MHAConfig, MLAConfig, check_positive_int
from ccajax.modules import attention_module

ATTENTIONS = ("mha", "gqa", "mqa", "mla", "cca", "ccgqa")
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def attention_config(attention: str, *, d_model: int, num_heads: int, head_dim: int,
                     num_kv_heads: int = 1, compression: int = 2, kv_lora_rank: int = 0,
                     rope_theta: float = 10_000.0, rope_fraction: float = 1.0,
                     use_conv: bool = True, use_qk_mean: bool = True, use_value_shift: bool = True,
                     use_key_temperature: bool = True) -> AttentionConfig:
    """The foundation's config for one of `ATTENTIONS`, sized from MHA-equivalent numbers.

    Args:
      attention: "mha" (num_heads kv heads), "gqa" (num_kv_heads), "mqa" (1), "mla" (DeepSeek-V2:
        num_heads heads, latent kv_lora_rank, nope/value dims head_dim, rope dim head_dim/2),
        "cca" (num_heads/compression latent heads, as many kv heads) or "ccgqa"
        (num_heads/compression latent query heads, num_kv_heads kv heads).
      d_model, num_heads, head_dim: the MHA baseline's shape.
      num_kv_heads: kv heads of gqa and ccgqa.
      compression: C of cca and ccgqa; must divide num_heads.
      kv_lora_rank: MLA latent rank; 0 = d_model // 4.
      rope_theta, rope_fraction: RoPE base and rotated fraction (MLA rotates its rope dims fully).
      use_conv, use_qk_mean, use_value_shift, use_key_temperature: CCA's ingredients (ablations;
        `ccajax.config.CCAConfig`), cca and ccgqa only.
    Raises:
      ValueError naming the field, its value and the valid choices.
    """
    _choice("attention", attention, ATTENTIONS)
    rope = dict(rope_theta=rope_theta, rope_fraction=rope_fraction)
    ingredients = dict(use_conv=use_conv, use_qk_mean=use_qk_mean, use_value_shift=use_value_shift,
                       use_key_temperature=use_key_temperature)
    ablated = [name for name, on in ingredients.items() if not on]
    if ablated and attention not in ("cca", "ccgqa"):
        raise ValueError(f"{', '.join(n + '=False' for n in ablated)} only applies to attention "
                         f"'cca' or 'ccgqa', got attention={attention!r}")
    if attention in ("mha", "gqa", "mqa"):
        kv = {"mha": num_heads, "gqa": num_kv_heads, "mqa": 1}[attention]
        return MHAConfig(d_model, num_heads, kv, head_dim, **rope)
    if attention == "mla":
        return MLAConfig(d_model, num_heads, kv_lora_rank or d_model // 4, head_dim, head_dim // 2,
                         head_dim, rope_theta=rope_theta)
    if isinstance(compression, bool) or not isinstance(compression, int) or compression < 1 or \
            num_heads % compression:
        valid = [c for c in range(1, num_heads + 1) if num_heads % c == 0]
        raise ValueError(f"compression={compression!r} must divide num_heads={num_heads}; valid: {valid}")
    latent_heads = num_heads // compression
    kv = latent_heads if attention == "cca" else num_kv_heads
    return CCAConfig(d_model, latent_heads, kv, head_dim, **rope, **ingredients)


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """A decoder-only LM.

    Attributes:
      vocab_size: tokens of the embedding and the head.
      num_layers: transformer blocks.
      attention: the blocks' attention layer config (see `attention_config`); its d_model is the
        model width.
      mlp_dim: hidden width F of the SwiGLU MLP (of each expert with MoE).
      num_experts: 0 for a dense MLP, else experts of the top-k MoE MLP.
      experts_per_token: k of the MoE router.
      tie_embeddings: the head reuses the token embedding.
      norm_eps: RMSNorm epsilon.
      dtype: compute dtype name; param_dtype: storage dtype name of the params.
      remat: rematerialisation policy of each block, one of `REMAT_POLICIES`.
      attention_implementation: backend of `ccajax.attention.dot_product_attention`; None = default.
      cca_prologue: how CCA/CCGQA layers make q/k/v, one of `CCA_PROLOGUES` (see
        `ccajax.cca.cca_attention`); None = its default. Only with a `CCAConfig` attention.
    """

    vocab_size: int
    num_layers: int
    attention: AttentionConfig
    mlp_dim: int
    num_experts: int = 0
    experts_per_token: int = 2
    tie_embeddings: bool = True
    norm_eps: float = 1e-6
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    remat: str = "none"
    attention_implementation: str | None = None
    cca_prologue: str | None = None

    def __post_init__(self):
        for name in ("vocab_size", "num_layers", "mlp_dim", "experts_per_token"):
            check_positive_int(name, getattr(self, name))
        if not isinstance(self.attention, (CCAConfig, MHAConfig, MLAConfig)):
            raise ValueError(f"attention must be a CCAConfig, MHAConfig or MLAConfig, got "
                             f"{type(self.attention).__name__}")
        if isinstance(self.num_experts, bool) or not isinstance(self.num_experts, int) or \
                self.num_experts < 0 or self.num_experts == 1:
            raise ValueError(f"num_experts must be 0 (dense MLP) or an int >= 2, got {self.num_experts!r}")
        if self.num_experts and self.experts_per_token > self.num_experts:
            raise ValueError(f"experts_per_token={self.experts_per_token} must be <= "
                             f"num_experts={self.num_experts}")
        _choice("dtype", self.dtype, DTYPES)
        _choice("param_dtype", self.param_dtype, DTYPES)
        _choice("remat", self.remat, tuple(REMAT_POLICIES))
        _choice("attention_implementation", self.attention_implementation, (None, *IMPLEMENTATIONS))
        _choice("cca_prologue", self.cca_prologue, (None, *CCA_PROLOGUES))
        if self.cca_prologue is not None and not isinstance(self.attention, CCAConfig):
            raise ValueError(f"cca_prologue={self.cca_prologue!r} applies to CCA/CCGQA attention "
                             f"only, got a {type(self.attention).__name__}; leave it None")

    @property
    def d_model(self) -> int:
        """The model width E, the attention config's d_model."""
        return self.attention.d_model


class SwiGLU(nnx.Module):
    """x (..., E) -> (down(silu(gate(x)) * up(x)) (..., E), 0.0: no auxiliary loss)."""

    def __init__(self, d_model: int, hidden: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        linear = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate = nnx.Linear(d_model, hidden, **linear)
        self.up = nnx.Linear(d_model, hidden, **linear)
        self.down = nnx.Linear(hidden, d_model, **linear)

    def __call__(self, x):
        """x (..., E) -> (y (..., E) in the compute dtype, aux loss 0.0 float32 scalar)."""
        return self.down(nnx.silu(self.gate(x)) * self.up(x)), jnp.zeros((), jnp.float32)


class MoE(nnx.Module):
    """Top-k mixture of SwiGLU experts, dropless: x (..., E) -> (y (..., E), load-balance loss).

    Each token goes to its k highest-probability experts (weights renormalised over the k); the
    token copies are sorted by expert and run through grouped matmuls (`jax.lax.ragged_dot`). The
    auxiliary loss is Switch Transformer's ``X * sum_e f_e * P_e`` (f_e: fraction of token copies
    routed to expert e, P_e: mean router probability of e), 1.0 when balanced.
    """

    def __init__(self, d_model: int, hidden: int, num_experts: int, k: int, *, rngs: nnx.Rngs,
                 dtype, param_dtype):
        self.k, self.dtype = k, dtype
        self.router = nnx.Linear(d_model, num_experts, use_bias=False, dtype=jnp.float32,
                                 param_dtype=param_dtype, rngs=rngs)
        init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                    in_axis=1, out_axis=2)
        self.w_gate = nnx.Param(init(rngs.params(), (num_experts, d_model, hidden), param_dtype))
        self.w_up = nnx.Param(init(rngs.params(), (num_experts, d_model, hidden), param_dtype))
        self.w_down = nnx.Param(init(rngs.params(), (num_experts, hidden, d_model), param_dtype))

    def __call__(self, x):
        """x (..., E) -> (y (..., E) in the compute dtype, load-balance loss float32 scalar)."""
        tokens = x.reshape(-1, x.shape[-1])  # (T, E)
        probs = jax.nn.softmax(self.router(tokens), axis=-1)  # (T, X) float32
        weights, experts = jax.lax.top_k(probs, self.k)  # (T, k)
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
        num_experts = probs.shape[-1]
        order = jnp.argsort(experts.reshape(-1))
        token_of = order // self.k
        group_sizes = jnp.bincount(experts.reshape(-1), length=num_experts).astype(jnp.int32)
        xs = tokens[token_of].astype(self.dtype)
        w = lambda p: p[...].astype(self.dtype)
        h = nnx.silu(jax.lax.ragged_dot(xs, w(self.w_gate), group_sizes)) * \
            jax.lax.ragged_dot(xs, w(self.w_up), group_sizes)
        out = jax.lax.ragged_dot(h, w(self.w_down), group_sizes)
        out = out * weights.reshape(-1)[order][:, None].astype(out.dtype)
        y = jnp.zeros_like(tokens, dtype=out.dtype).at[token_of].add(out)
        routed = group_sizes.astype(jnp.float32) / (tokens.shape[0] * self.k)
        aux = num_experts * jnp.sum(routed * jnp.mean(probs, axis=0))
        return y.reshape(x.shape), aux


class Block(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x)). Returns (x, MoE aux loss)."""

    def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        norm = dict(epsilon=cfg.norm_eps, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)
        self.attn_norm = nnx.RMSNorm(cfg.d_model, **norm)
        cca = dict(prologue=cfg.cca_prologue) if isinstance(cfg.attention, CCAConfig) else {}
        self.attn = attention_module(cfg.attention, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                                     implementation=cfg.attention_implementation, **cca)
        self.mlp_norm = nnx.RMSNorm(cfg.d_model, **norm)
        mlp = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.mlp = (MoE(cfg.d_model, cfg.mlp_dim, cfg.num_experts, cfg.experts_per_token, **mlp)
                    if cfg.num_experts else SwiGLU(cfg.d_model, cfg.mlp_dim, **mlp))
        self.dtype = dtype

    def __call__(self, x, segment_ids=None):
        """x (B, S, E), segment_ids (B, S) int or None -> (x' (B, S, E) in the compute dtype,
        MoE aux loss float32 scalar)."""
        return self.feed_forward(x + self.attn(self.attn_input(x), segment_ids=segment_ids))

    def attn_input(self, x):
        """The attention's input: the pre-norm of the residual stream x, in the compute dtype."""
        return self.attn_norm(x).astype(self.dtype)

    def feed_forward(self, x):
        """x + mlp(norm(x)) for x (..., E) after the attention residual; returns (x, aux loss)."""
        y, aux = self.mlp(self.mlp_norm(x).astype(self.dtype))
        return (x + y).astype(self.dtype), aux


class TransformerLM(nnx.Module):
    """Decoder-only LM: tokens (B, S) int -> (logits (B, S, V) float32, MoE aux loss scalar).

    Args (of ``__call__``):
      tokens: (B, S) int token ids.
      segment_ids: (B, S) int ids of packed documents, or None for one sequence per row;
        attention, CCA's convolutions and value shift and RoPE positions restart per segment.

    It implements `ccajax.generate`'s decode protocol (``init_decode_state``, ``prefill``,
    ``decode_step``) with one `ccajax.decode` state per layer: ``ccajax.generate(model, prompt,
    max_new_tokens=...)`` (the package attribute is the function, not the module).
    """

    def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=param_dtype,
                               rngs=rngs)
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, dtype=jnp.float32,
                                      param_dtype=param_dtype, rngs=rngs)
        self.head = None if cfg.tie_embeddings else nnx.Linear(
            cfg.d_model, cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, tokens, segment_ids=None, *, logits_dtype=jnp.float32):
        """tokens (B, S) int, segment_ids (B, S) int or None -> (logits (B, S, V) in
        ``logits_dtype``, MoE aux loss float32 scalar, 0 for a dense MLP).

        ``logits_dtype=None`` keeps the head's compute dtype, for `ccajax.losses.cross_entropy`
        (no float32 copy of the logits in HBM)."""
        x = self.embed_tokens(tokens)
        block_fn = lambda block, x, seg: block(x, seg)
        policy = REMAT_POLICIES[self.cfg.remat]
        if self.cfg.remat != "none":
            block_fn = nnx.remat(block_fn, policy=policy)
        aux = jnp.zeros((), jnp.float32)
        for block in self.blocks:
            x, block_aux = block_fn(block, x, segment_ids)
            aux = aux + block_aux
        return self.logits(x, logits_dtype), aux

    def embed_tokens(self, tokens):
        """tokens (...) int -> (..., E) in the compute dtype.

        Gathers from the float32 table and casts after: gathering a bf16 copy (as `nnx.Embed`
        does) makes the backward a bf16 scatter-add, whose emulated atomics serialise on
        frequent tokens. On byte-level text that cost 113 ms per 32 x 1024 batch on an H100,
        against 0.1 ms for this float32 scatter-add (2026-11-23), and it also summed the
        embedding's gradient in bf16.
        """
        return jnp.take(self.embed.embedding[...], tokens, axis=0).astype(self.embed.dtype)

    def logits(self, x, dtype=jnp.float32):
        """Final norm and head: x (..., E) -> logits (..., V) in ``dtype`` (None: the compute dtype,
        whose rounding the head's matmul output has either way)."""
        x = self.final_norm(x).astype(self.embed.dtype)
        logits = self.embed.attend(x) if self.head is None else self.head(x)
        return logits if dtype is None else logits.astype(dtype)

    def init_decode_state(self, batch: int, max_len: int, dtype) -> list:
        """One empty `ccajax.decode` state per layer for ``batch`` sequences of ``max_len`` tokens."""
        return [decode.init_decode_state(b.attn.cfg, batch, max_len, dtype) for b in self.blocks]

    def prefill(self, tokens, lengths, state: list):
        """Runs right-padded prompts tokens (B, S) of ``lengths`` (B,) into the decode ``state``.
        Returns (logits (B, V) of each prompt's last token, the new state)."""
        x, new_state = self.embed_tokens(tokens), []
        for block, layer_state in zip(self.blocks, state):
            y, layer_state = decode.prefill(block.attn.params(), block.attn_input(x), block.attn.cfg,
                                            layer_state, lengths,
                                            implementation=self.cfg.attention_implementation)
            x, _ = block.feed_forward(x + y)
            new_state.append(layer_state)
        last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)[:, 0]
        return self.logits(last), new_state

    def decode_step(self, tokens, state: list):
        """One new token per sequence, tokens (B,); returns (its logits (B, V), the new state)."""
        x, new_state = self.embed_tokens(tokens), []
        for block, layer_state in zip(self.blocks, state):
            y, layer_state = decode.decode_step(block.attn.params(), block.attn_input(x),
                                                block.attn.cfg, layer_state)
            x, _ = block.feed_forward(x + y)
            new_state.append(layer_state)
        return self.logits(x), new_state


def param_count(cfg: LMConfig) -> int:
    """All parameters of the model (the embedding counted once when tied)."""
    model = nnx.eval_shape(lambda: TransformerLM(cfg, rngs=nnx.Rngs(0)))
    return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def train_flops_per_step(cfg: LMConfig, batch: int, seq_len: int) -> float:
    """Model FLOPs of one training step (forward + backward) on ``batch`` sequences of ``seq_len``.

    ``6 * N_matmul * tokens + L * (1 + 2.5) * attention_flops + L * 3 * conv_flops`` where
    N_matmul counts the weights that multiply activations once per token: the attention
    projections (`ccajax.costs.linear_weight_count`), the MLP (only the k active experts and the
    router with MoE) and the head (d_model * vocab, also when tied); the embedding lookup and the
    norms are free. Attention and conv FLOPs are `ccajax.costs`' (causal attention is half of
    the square; its backward 2.5x the forward).
    """
    E, F, a = cfg.d_model, cfg.mlp_dim, cfg.attention
    mlp = 3 * E * F * (cfg.experts_per_token if cfg.num_experts else 1) + E * cfg.num_experts
    n_matmul = cfg.num_layers * (costs.linear_weight_count(a) + mlp) + E * cfg.vocab_size
    tokens = batch * seq_len
    per_layer = ((1 + costs.BACKWARD_ATTENTION_FACTOR) * costs.attention_flops(a, batch, seq_len)
                 + 3 * costs.conv_flops(a, batch, seq_len))
    return 6 * n_matmul * tokens + cfg.num_layers * per_layer
