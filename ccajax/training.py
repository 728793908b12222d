"""Training as pure functions of an ``nnx.State``: optimizer, loss, train and eval steps.

The training state is ``nnx.split({"model": model, "optimizer": optimizer})``: a graphdef (static)
and one ``nnx.State`` pytree holding the params, the optimizer state and its step. The steps take
and return that state, so they ``jax.jit`` with explicit shardings (`ccajax.sharding`) and the state
checkpoints as it is (`ccajax.checkpoint`).

A batch is a dict of (B, S) arrays: "inputs" and "targets" int32, "loss_mask" float32 (1 where the
target counts) and optionally "segment_ids" int32 (packed documents).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ccajax import sharding
from ccajax.losses import cross_entropy
from ccajax.models import LMConfig, TransformerLM


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup to ``learning_rate`` and cosine decay to ``min_lr_ratio`` of it.

    Weight decay applies to matrices (params of rank >= 2: projections, embedding, experts), not to
    norm scales, biases, the key temperature or conv biases. Gradients are clipped to global norm
    ``clip_norm`` (0 = no clipping).
    """

    learning_rate: float = 3e-4
    warmup_steps: int = 100
    total_steps: int = 1000
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0

    def __post_init__(self):
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if not 0 <= self.warmup_steps < self.total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={self.total_steps}), got "
                             f"{self.warmup_steps!r}")
        for name in ("min_lr_ratio", "b1", "b2"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        for name in ("eps", "weight_decay", "clip_norm"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")

    def schedule(self) -> optax.Schedule:
        return optax.warmup_cosine_decay_schedule(
            0.0, self.learning_rate, self.warmup_steps, self.total_steps,
            end_value=self.learning_rate * self.min_lr_ratio)


def decay_mask(params):
    """True for the params weight decay applies to: those of rank >= 2."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW on `OptimizerConfig.schedule` with `decay_mask`."""
    adamw = optax.adamw(cfg.schedule(), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw) if cfg.clip_norm else adamw


def create_train_state(model_cfg: LMConfig, tx: optax.GradientTransformation, seed: int):
    """``{"model": TransformerLM, "optimizer": nnx.Optimizer(model, tx, wrt=nnx.Param)}`` at ``seed``."""
    model = TransformerLM(model_cfg, rngs=nnx.Rngs(seed))
    return {"model": model, "optimizer": nnx.Optimizer(model, tx, wrt=nnx.Param)}


def lm_loss(model: TransformerLM, batch: dict, *, z_loss: float = 0.0, moe_aux_weight: float = 0.0):
    """Masked next-token cross-entropy plus the optional z-loss and MoE load-balance loss.

    Args:
      model: the LM; batch: see the module docstring.
      z_loss: weight of ``mean(logsumexp(logits)^2)`` over the counted tokens (PaLM uses 1e-4).
      moe_aux_weight: weight of the MoE load-balance loss, summed over layers.
    Returns:
      (total loss, metrics dict of scalars: "loss" (cross-entropy), "z_loss", "moe_aux", "tokens").
    """
    # Logits stay in the compute dtype: `cross_entropy` reduces them in float32 in its own passes.
    logits, moe_aux = model(batch["inputs"], batch.get("segment_ids"), logits_dtype=None)
    mask = batch["loss_mask"].astype(jnp.float32)
    tokens = jnp.sum(mask)
    denom = jnp.maximum(tokens, 1.0)
    ce, log_z = cross_entropy(logits, batch["targets"])
    # A select, not a product: a masked target outside the vocabulary (e.g. an ignore id of
    # -100) has a NaN cross-entropy, which must not reach the sum.
    counted = mask > 0
    ce = jnp.sum(jnp.where(counted, ce * mask, 0.0)) / denom
    z = jnp.sum(jnp.where(counted, log_z ** 2 * mask, 0.0)) / denom
    total = ce + z_loss * z + moe_aux_weight * moe_aux
    return total, {"loss": ce, "z_loss": z, "moe_aux": moe_aux, "tokens": tokens}


def train_step(graphdef, state, batch, *, z_loss: float = 0.0, moe_aux_weight: float = 0.0):
    """One optimizer step: (state, batch) -> (new state, metrics).

    Metrics: those of `lm_loss` plus "grad_norm" (before clipping).
    """
    train = nnx.merge(graphdef, state)
    model, optimizer = train["model"], train["optimizer"]
    loss = functools.partial(lm_loss, batch=batch, z_loss=z_loss, moe_aux_weight=moe_aux_weight)
    grads, metrics = nnx.grad(loss, has_aux=True)(model)
    metrics["grad_norm"] = optax.tree.norm(grads)
    optimizer.update(model, grads)
    return nnx.state(train), metrics


def eval_step(graphdef, state, batch):
    """Summed cross-entropy and counted tokens of one batch: {"loss_sum", "tokens"}."""
    model = nnx.merge(graphdef, state)["model"]
    _, metrics = lm_loss(model, batch)
    return {"loss_sum": metrics["loss"] * metrics["tokens"], "tokens": metrics["tokens"]}


def abstract_train_state(model_cfg: LMConfig, tx: optax.GradientTransformation, mesh):
    """The train state's structure without allocating it.

    Returns:
      (graphdef, abstract_state, shardings): the static graph, the state as
      ``jax.ShapeDtypeStruct``s carrying their FSDP shardings on ``mesh`` (a checkpoint restore
      target) and the `NamedSharding` tree of the state.
    """
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: create_train_state(model_cfg, tx, 0)))
    shardings = sharding.state_shardings(abstract, mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
    return graphdef, abstract, shardings


def init_train_state(model_cfg: LMConfig, tx: optax.GradientTransformation, seed: int, shardings):
    """A fresh train state at ``seed``, created directly in its ``shardings`` (no host copy)."""
    create = lambda: nnx.state(create_train_state(model_cfg, tx, seed))
    return jax.jit(create, out_shardings=shardings)()


def jit_steps(graphdef, shardings, mesh, *, z_loss: float = 0.0, moe_aux_weight: float = 0.0):
    """`train_step` (donating the state) and `eval_step`, jitted with the state's and the batch's
    shardings. Returns (train_step(state, batch), eval_step(state, batch))."""
    batch = sharding.batch_sharding(mesh)

    def in_mesh(step):
        # Traced with the mesh in context, so Pallas kernels run per device on the batch
        # (`ccajax.pallas.attention`) instead of replicated.
        @functools.wraps(step)
        def traced(*args, **kwargs):
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                return step(*args, **kwargs)
        return traced

    train = jax.jit(in_mesh(functools.partial(train_step, graphdef, z_loss=z_loss,
                                              moe_aux_weight=moe_aux_weight)),
                    in_shardings=(shardings, batch), out_shardings=(shardings, None),
                    donate_argnums=0)
    evaluate = jax.jit(in_mesh(functools.partial(eval_step, graphdef)),
                       in_shardings=(shardings, batch))
    return train, evaluate
