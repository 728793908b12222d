"""The LM: every attention through the foundation's modules, MoE, configs, FLOP accounting."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ccajax import costs, models
from ccajax.config import CCAConfig, MHAConfig, MLAConfig
from ccajax.modules import CCAttention, MultiHeadAttention, MultiLatentAttention


def small_cfg(attention="ccgqa", **kwargs):
    att = models.attention_config(attention, d_model=32, num_heads=4, head_dim=8, num_kv_heads=2)
    return models.LMConfig(**(dict(vocab_size=40, num_layers=1, attention=att, mlp_dim=48,
                                   dtype="float32") | kwargs))


# XLA's CPU backend optimisations take longer to compile than these tiny programs take to run.
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _f32(tree):
    return all(p.dtype == jnp.float32 for p in jax.tree.leaves(tree))


@pytest.mark.parametrize("attention, expected", [
    ("mha", MHAConfig(32, 4, 4, 8)), ("gqa", MHAConfig(32, 4, 2, 8)), ("mqa", MHAConfig(32, 4, 1, 8)),
    ("mla", MLAConfig(32, 4, 8, 8, 4, 8)), ("cca", CCAConfig(32, 2, 2, 8)),
    ("ccgqa", CCAConfig(32, 2, 1, 8)),
])
def test_attention_config_maps_names_to_foundation_configs(attention, expected):
    got = models.attention_config(attention, d_model=32, num_heads=4, head_dim=8,
                                  num_kv_heads=2 if attention == "gqa" else 1)
    assert got == expected


@pytest.mark.parametrize("attention, module", [
    ("mha", MultiHeadAttention), ("gqa", MultiHeadAttention), ("mqa", MultiHeadAttention),
    ("mla", MultiLatentAttention), ("cca", CCAttention), ("ccgqa", CCAttention)])
def test_blocks_use_the_foundation_modules(attention, module):
    cfg = small_cfg(attention, num_layers=2)
    model = nnx.eval_shape(lambda: models.TransformerLM(cfg, rngs=nnx.Rngs(0)))
    assert [type(b.attn) for b in model.blocks] == [module, module]
    assert all(b.attn.cfg == cfg.attention for b in model.blocks)


@pytest.mark.parametrize("attention", ["mha", "mla", "ccgqa"])  # one per attention module
def test_forward_shapes_bf16(attention):
    model = models.TransformerLM(small_cfg(attention, dtype="bfloat16"), rngs=nnx.Rngs(0))
    assert _f32(nnx.state(model, nnx.Param))  # fp32 params, bf16 compute
    tokens = jnp.arange(2 * 8, dtype=jnp.int32).reshape(2, 8) % 40
    logits, aux = fast_jit(lambda m, t: m(t, jnp.ones_like(t)))(model, tokens)
    assert logits.shape == (2, 8, 40) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all() and float(aux) == 0.0


def test_embedding_gradient_is_summed_in_float32():
    """The lookup's backward scatter-adds into the float32 table: a bf16 scatter-add serialises
    on repeated tokens on the GPU and rounds the summed gradient (see `embed_tokens`)."""
    model = models.TransformerLM(small_cfg(dtype="bfloat16"), rngs=nnx.Rngs(0))
    tokens = jnp.zeros((2, 8), jnp.int32)  # one token repeated: the case that was slow
    loss = lambda m: jnp.sum(m(tokens)[0])
    jaxpr = jax.make_jaxpr(lambda m: nnx.grad(loss)(m))(model)

    def scatter_dtypes(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "scatter-add":
                yield eqn.outvars[0].aval.dtype
            for param in eqn.params.values():
                inner = getattr(param, "jaxpr", param)
                if hasattr(inner, "eqns"):
                    yield from scatter_dtypes(inner)

    dtypes = list(scatter_dtypes(jaxpr.jaxpr))
    assert dtypes and all(d == jnp.float32 for d in dtypes), dtypes
    grad = nnx.grad(loss)(model)["embed"]["embedding"][...]
    assert grad.dtype == jnp.float32 and float(jnp.abs(grad[0]).sum()) > 0


def test_cca_prologue_reaches_the_layers():
    """The fused jnp prologue gives the plain path's logits (float32, to rounding); a prologue
    for a non-CCA attention is refused."""
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 40)
    plain = models.TransformerLM(small_cfg(), rngs=nnx.Rngs(0))
    fused = models.TransformerLM(small_cfg(cca_prologue="jnp"), rngs=nnx.Rngs(0))
    dots = lambda m: str(jax.make_jaxpr(lambda m: m(tokens))(m)).count("dot_general")
    assert dots(fused) < dots(plain)  # one down-projection matmul instead of four
    np.testing.assert_allclose(fast_jit(lambda m: m(tokens)[0])(fused),
                               fast_jit(lambda m: m(tokens)[0])(plain), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"cca_prologue='jnp' applies to CCA/CCGQA attention only"):
        small_cfg("mha", cca_prologue="jnp")
    with pytest.raises(ValueError, match=r"cca_prologue must be one of \(None, 'plain', 'jnp'"):
        small_cfg(cca_prologue="triton")


def test_moe_remat_untied():
    cfg = small_cfg(num_experts=4, experts_per_token=2, remat="full", tie_embeddings=False)
    model = models.TransformerLM(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 40)

    @fast_jit
    def forward_and_grad(model):
        def loss(m):
            logits, aux = m(tokens)
            return jnp.mean(logits ** 2) + aux, (logits, aux)
        return nnx.grad(loss, has_aux=True)(model)

    grads, (logits, aux) = forward_and_grad(model)
    assert logits.shape == (2, 8, 40) and logits.dtype == jnp.float32
    assert float(aux) >= 1.0 - 1e-5  # the load-balance loss is 1 when balanced, more otherwise
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads)) and _f32(grads)
    assert float(jnp.abs(grads["blocks"][0]["mlp"]["w_down"][...]).max()) > 0


def test_param_count_and_train_flops():
    cfg = small_cfg("mha")
    # embedding 40*32 + block (4*32*32 attention + 3*32*48 MLP + 2 norms) + final norm
    assert models.param_count(cfg) == 40 * 32 + 4 * 32 * 32 + 3 * 32 * 48 + 2 * 32 + 32
    B, S = 2, 16
    matmul = 4 * 32 * 32 + 3 * 32 * 48 + 40 * 32
    attention = 3.5 * costs.attention_flops(cfg.attention, B, S)
    assert models.train_flops_per_step(cfg, B, S) == 6 * matmul * B * S + attention


@pytest.mark.parametrize("kwargs, match", [
    (dict(vocab_size=0), r"vocab_size must be a positive int, got 0"),
    (dict(num_experts=1), r"num_experts must be 0 \(dense MLP\) or an int >= 2, got 1"),
    (dict(num_experts=2, experts_per_token=3), r"experts_per_token=3 must be <= num_experts=2"),
    (dict(dtype="bf16"), r"dtype must be one of \('float32', 'bfloat16', 'float16'\), got 'bf16'"),
    (dict(remat="some"), r"remat must be one of \('none', 'full', 'dots'\), got 'some'"),
    (dict(attention_implementation="flash"), r"attention_implementation must be one of"),
])
def test_lm_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        small_cfg(**kwargs)


def test_attention_config_errors():
    with pytest.raises(ValueError, match=r"attention must be one of \('mha', 'gqa', 'mqa', 'mla', "
                                         r"'cca', 'ccgqa'\), got 'linear'"):
        models.attention_config("linear", d_model=32, num_heads=4, head_dim=8)
    with pytest.raises(ValueError, match=r"compression=3 must divide num_heads=4; valid: \[1, 2, 4\]"):
        models.attention_config("cca", d_model=32, num_heads=4, head_dim=8, compression=3)
    with pytest.raises(ValueError, match=r"use_qk_mean=False only applies to attention 'cca' or "
                                         r"'ccgqa', got attention='gqa'"):
        models.attention_config("gqa", d_model=32, num_heads=4, head_dim=8, use_qk_mean=False)


@pytest.mark.parametrize("ingredient", ["use_conv", "use_qk_mean", "use_value_shift",
                                        "use_key_temperature"])
def test_cca_ablations_reach_the_layer_and_train(ingredient):
    """Each ablation switch lands in the CCA config and the model still trains a step."""
    att = models.attention_config("ccgqa", d_model=32, num_heads=4, head_dim=8, num_kv_heads=1,
                                  **{ingredient: False})
    assert att == dataclasses.replace(CCAConfig(32, 2, 1, 8), **{ingredient: False})
    cfg = models.LMConfig(vocab_size=64, num_layers=1, attention=att, mlp_dim=32, dtype="float32")
    model = models.TransformerLM(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % 64
    grads = nnx.grad(lambda m: m(tokens)[0].mean())(model)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


def test_decode_protocol_matches_full_forward():
    """`ccajax.generate` over the model's prefill/decode_step equals greedy full forwards."""
    from ccajax.generate import generate
    model = models.TransformerLM(small_cfg("ccgqa"), rngs=nnx.Rngs(0))
    prompt = jnp.array([[3, 5, 7, 9, 11]], jnp.int32)
    out = generate(model, prompt, max_new_tokens=5, cache_dtype=jnp.float32)
    forward = fast_jit(lambda m, t: m(t)[0])
    tokens = prompt[0].tolist()
    for _ in range(5):  # the causal model ignores the zero padding after the prefix
        logits = forward(model, jnp.array([tokens + [0] * (10 - len(tokens))]))
        tokens.append(int(jnp.argmax(logits[0, len(tokens) - 1])))
    assert out.tokens[0].tolist() == tokens[5:]
